//! DINO's evaluation transform (`eval_knn.py`): Resize the shorter side to 256/224 of the model's
//! input size (bicubic, antialiased), centre-crop to the input size, normalise.

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

use super::normalize::Normalize;

#[derive(Debug, Clone)]
pub struct EvalTransform {
    pub size: u32,
    pub resize: u32,
    normalize: Normalize,
}

impl EvalTransform {
    pub fn new(size: u32, mean: [f32; 3], std: [f32; 3]) -> Self {
        // Resize(256) + CenterCrop(224) scaled to the model's size.
        let resize = ((size as f64) * 256.0 / 224.0) as u32;
        Self {
            size,
            resize: resize.max(size),
            normalize: Normalize::new(mean, std),
        }
    }

    /// torchvision `Resize(int)`: shorter side to `resize`, longer side `int(resize·long/short)`.
    fn resized_dims(&self, w: u32, h: u32) -> (u32, u32) {
        if w <= h {
            (self.resize, ((self.resize as u64 * h as u64) / w as u64).max(1) as u32)
        } else {
            (((self.resize as u64 * w as u64) / h as u64).max(1) as u32, self.resize)
        }
    }

    /// Writes the (3, size, size) normalised crop of `img` into `out`.
    pub fn apply(&self, img: &RgbImage, out: &mut [f32]) {
        let (rw, rh) = self.resized_dims(img.width(), img.height());
        // One resampling pass from the source box that the resize + centre crop keeps.
        let (sx, sy) = (img.width() as f64 / rw as f64, img.height() as f64 / rh as f64);
        let left = ((rw - self.size) as f64 / 2.0).round();
        let top = ((rh - self.size) as f64 / 2.0).round();
        let mut dst = RgbImage::new(self.size, self.size);
        let options = ResizeOptions::new()
            .resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom))
            .crop(left * sx, top * sy, self.size as f64 * sx, self.size as f64 * sy);
        Resizer::new()
            .resize(img, &mut dst, &options)
            .expect("RGB8 to RGB8 inside the source");
        self.normalize.apply(&dst, out);
    }
}
