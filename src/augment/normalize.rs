//! `ToTensor` + `Normalize`: packed RGB u8 to planar (C, H, W) float32, (v/255 − mean)/std.

use image::RgbImage;

/// Per-channel lookup tables: one multiply-free load per sample.
#[derive(Debug, Clone)]
pub struct Normalize {
    lut: [[f32; 256]; 3],
}

impl Normalize {
    pub fn new(mean: [f32; 3], std: [f32; 3]) -> Self {
        let mut lut = [[0.0; 256]; 3];
        for c in 0..3 {
            for (v, out) in lut[c].iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - mean[c]) / std[c];
            }
        }
        Self { lut }
    }

    /// Writes `img` into `out` (length 3·H·W) in CHW order.
    pub fn apply(&self, img: &RgbImage, out: &mut [f32]) {
        let plane = (img.width() * img.height()) as usize;
        assert_eq!(out.len(), 3 * plane, "output slice must hold 3 planes of the image");
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            r[i] = self.lut[0][px[0] as usize];
            g[i] = self.lut[1][px[1] as usize];
            b[i] = self.lut[2][px[2] as usize];
        }
    }
}
