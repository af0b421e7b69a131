//! RandomResizedCrop as torchvision samples it (`RandomResizedCrop.get_params`), resampled with
//! a PIL-compatible antialiased bicubic (Catmull-Rom) filter.

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use rand::Rng;

/// A crop box in source pixels: top-left corner (`left`, `top`) and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

/// Samples crop boxes covering `scale` of the image area with aspect ratio in `ratio`.
#[derive(Debug, Clone, Copy)]
pub struct RandomResizedCrop {
    pub size: u32,
    pub scale: (f32, f32),
    pub ratio: (f32, f32),
}

impl RandomResizedCrop {
    pub fn new(size: u32, scale: (f32, f32), ratio: (f32, f32)) -> Self {
        Self { size, scale, ratio }
    }

    /// torchvision's sampling: ten tries of a uniform area fraction and a log-uniform aspect ratio,
    /// then the centre crop clamped to the ratio range.
    pub fn sample<R: Rng + ?Sized>(&self, width: u32, height: u32, rng: &mut R) -> CropBox {
        let area = width as f64 * height as f64;
        let (log_lo, log_hi) = ((self.ratio.0 as f64).ln(), (self.ratio.1 as f64).ln());
        for _ in 0..10 {
            let target_area = area * uniform(rng, self.scale.0 as f64, self.scale.1 as f64);
            let aspect = uniform(rng, log_lo, log_hi).exp();
            let w = (target_area * aspect).sqrt().round();
            let h = (target_area / aspect).sqrt().round();
            if w > 0.0 && w <= width as f64 && h > 0.0 && h <= height as f64 {
                let (w, h) = (w as u32, h as u32);
                // torch.randint(0, n + 1): inclusive of the far edge.
                let top = rng.random_range(0..=height - h);
                let left = rng.random_range(0..=width - w);
                return CropBox {
                    left,
                    top,
                    width: w,
                    height: h,
                };
            }
        }
        let in_ratio = width as f64 / height as f64;
        let (lo, hi) = (self.ratio.0 as f64, self.ratio.1 as f64);
        let (w, h) = if in_ratio < lo {
            (width, ((width as f64 / lo).round() as u32).clamp(1, height))
        } else if in_ratio > hi {
            (((height as f64 * hi).round() as u32).clamp(1, width), height)
        } else {
            (width, height)
        };
        CropBox {
            left: (width - w) / 2,
            top: (height - h) / 2,
            width: w,
            height: h,
        }
    }
}

fn uniform<R: Rng + ?Sized>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Crops `bbox` out of `src` and resizes it to `size`×`size` with PIL's antialiased bicubic.
pub fn resized_crop(resizer: &mut Resizer, src: &RgbImage, bbox: CropBox, size: u32) -> RgbImage {
    let mut dst = RgbImage::new(size, size);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom))
        .crop(bbox.left as f64, bbox.top as f64, bbox.width as f64, bbox.height as f64);
    resizer
        .resize(src, &mut dst, &options)
        .expect("source and destination are both RGB8 and the crop box lies inside the source");
    dst
}
