//! Colour transforms with torchvision's definitions on PIL images: `ColorJitter` (brightness,
//! contrast, saturation as `ImageEnhance` blends, hue as a shift of PIL's 8-bit HSV hue, in a
//! random order) and `RandomGrayscale` (ITU-R 601-2 luma replicated to three channels).
//! Arithmetic follows PIL's: blends truncate to u8, luma uses PIL's fixed-point weights.

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::Rng;

/// PIL's `L` conversion: ITU-R 601-2 luma, L = R·299/1000 + G·587/1000 + B·114/1000.
#[inline]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// `Image.blend(degenerate, img, factor)`: degenerate + factor·(img − degenerate), truncated.
#[inline]
fn blend(degenerate: f32, value: u8, factor: f32) -> u8 {
    (degenerate + factor * (value as f32 - degenerate)).clamp(0.0, 255.0) as u8
}

fn blend_lut(degenerate: f32, factor: f32) -> [u8; 256] {
    let mut lut = [0u8; 256];
    for (v, out) in lut.iter_mut().enumerate() {
        *out = blend(degenerate, v as u8, factor);
    }
    lut
}

pub fn adjust_brightness(img: &mut RgbImage, factor: f32) {
    let lut = blend_lut(0.0, factor);
    img.iter_mut().for_each(|v| *v = lut[*v as usize]);
}

pub fn adjust_contrast(img: &mut RgbImage, factor: f32) {
    let n = (img.width() * img.height()) as u64;
    let sum: u64 = img
        .as_raw()
        .chunks_exact(3)
        .map(|p| luma(p[0], p[1], p[2]) as u64)
        .sum();
    // ImageEnhance.Contrast: a flat grey image at int(mean(L) + 0.5).
    let mean = (sum as f64 / n.max(1) as f64 + 0.5).floor() as f32;
    let lut = blend_lut(mean, factor);
    img.iter_mut().for_each(|v| *v = lut[*v as usize]);
}

pub fn adjust_saturation(img: &mut RgbImage, factor: f32) {
    for p in img.chunks_exact_mut(3) {
        let l = luma(p[0], p[1], p[2]) as f32;
        for v in p.iter_mut() {
            *v = blend(l, *v, factor);
        }
    }
}

/// PIL's `RGB -> HSV` conversion (all channels 0..=255).
#[inline]
pub fn rgb_to_hsv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return (0, 0, maxc);
    }
    let cr = (maxc - minc) as f32;
    let s = cr / maxc as f32;
    let rc = (maxc - r) as f32 / cr;
    let gc = (maxc - g) as f32 / cr;
    let bc = (maxc - b) as f32 / cr;
    let h = if r == maxc {
        bc - gc
    } else if g == maxc {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    let h = (h / 6.0 + 1.0).rem_euclid(1.0);
    (
        ((h * 255.0) as i32).clamp(0, 255) as u8,
        ((s * 255.0) as i32).clamp(0, 255) as u8,
        maxc,
    )
}

/// PIL's `HSV -> RGB` conversion.
#[inline]
pub fn hsv_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    if s == 0 {
        return (v, v, v);
    }
    let hf = h as f32 * 6.0 / 255.0;
    let i = hf.floor();
    let f = hf - i;
    let fs = s as f32 / 255.0;
    let vf = v as f32;
    let p = (vf * (1.0 - fs)).round().clamp(0.0, 255.0) as u8;
    let q = (vf * (1.0 - fs * f)).round().clamp(0.0, 255.0) as u8;
    let t = (vf * (1.0 - fs * (1.0 - f))).round().clamp(0.0, 255.0) as u8;
    match (i as i32) % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// torchvision `adjust_hue` on PIL: the 8-bit hue channel shifted by `int(factor·255)` with wraparound.
pub fn adjust_hue(img: &mut RgbImage, factor: f32) {
    let shift = (factor * 255.0) as i32;
    for p in img.chunks_exact_mut(3) {
        let (h, s, v) = rgb_to_hsv(p[0], p[1], p[2]);
        let h = (h as i32 + shift).rem_euclid(256) as u8;
        let (r, g, b) = hsv_to_rgb(h, s, v);
        p[0] = r;
        p[1] = g;
        p[2] = b;
    }
}

/// `RandomGrayscale`'s transform: luma replicated to R, G and B.
pub fn grayscale(img: &mut RgbImage) {
    for p in img.chunks_exact_mut(3) {
        let l = luma(p[0], p[1], p[2]);
        p.fill(l);
    }
}

/// One of ColorJitter's four operations with its sampled factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ColorOp {
    Brightness(f32),
    Contrast(f32),
    Saturation(f32),
    Hue(f32),
}

impl ColorOp {
    pub fn apply(self, img: &mut RgbImage) {
        match self {
            ColorOp::Brightness(f) => adjust_brightness(img, f),
            ColorOp::Contrast(f) => adjust_contrast(img, f),
            ColorOp::Saturation(f) => adjust_saturation(img, f),
            ColorOp::Hue(f) => adjust_hue(img, f),
        }
    }
}

/// torchvision `ColorJitter(brightness, contrast, saturation, hue)`.
#[derive(Debug, Clone, Copy)]
pub struct ColorJitter {
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

impl ColorJitter {
    /// Draws the operations in a random order; a zero strength leaves its operation out, as
    /// torchvision does.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Vec<ColorOp> {
        let mut order = [0usize, 1, 2, 3];
        order.shuffle(rng);
        let factor = |rng: &mut R, s: f32| {
            (1.0 - s).max(0.0) + rng.random::<f32>() * (1.0 + s - (1.0 - s).max(0.0))
        };
        let mut ops = Vec::with_capacity(4);
        for k in order {
            match k {
                0 if self.brightness > 0.0 => {
                    ops.push(ColorOp::Brightness(factor(rng, self.brightness)))
                }
                1 if self.contrast > 0.0 => ops.push(ColorOp::Contrast(factor(rng, self.contrast))),
                2 if self.saturation > 0.0 => {
                    ops.push(ColorOp::Saturation(factor(rng, self.saturation)))
                }
                3 if self.hue > 0.0 => {
                    ops.push(ColorOp::Hue((rng.random::<f32>() * 2.0 - 1.0) * self.hue))
                }
                _ => {}
            }
        }
        ops
    }
}
