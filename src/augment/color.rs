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
    trunc_u8(degenerate + factor * (value as f32 - degenerate))
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

avx2_multiversion! {
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
}

avx2_multiversion! {
pub fn adjust_saturation(img: &mut RgbImage, factor: f32) {
    // trunc(l + f·(v − l)) = l + floor(f·(v − l)) for integer l and a non-negative result, so a
    // 16.16 fixed-point product with an arithmetic shift (a floor) reproduces the float blend.
    let f = (factor * 65536.0).round() as i32;
    for p in img.chunks_exact_mut(3) {
        let l = luma(p[0], p[1], p[2]) as i32;
        for v in p.iter_mut() {
            *v = (l + ((f * (*v as i32 - l)) >> 16)).clamp(0, 255) as u8;
        }
    }
}
}

/// Truncates to u8 after clamping to 0..=255 (NaN becomes 0). Rust's checked `as` cast
/// compiles to compare-and-branch sequences that dominate the per-pixel HSV code.
#[inline(always)]
#[allow(clippy::manual_clamp)] // clamp() keeps NaN; max() turns it into 0, which the cast needs.
fn trunc_u8(x: f32) -> u8 {
    let x = x.max(0.0).min(255.0);
    // SAFETY: x is finite and within 0..=255 here, so the conversion is defined.
    unsafe { x.to_int_unchecked::<u8>() }
}

/// PIL's `RGB -> HSV` conversion (all channels 0..=255), written without data-dependent
/// branches: channel order is random in photos, so branches mispredict on most pixels.
#[inline]
pub fn rgb_to_hsv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let cr = (maxc - minc) as f32;
    // Grey pixels (cr = 0) come out as h = 0, s = 0 like PIL's special case.
    let inv = if maxc != minc { 1.0 / cr } else { 0.0 };
    let s = cr / (maxc.max(1) as f32);
    let rc = (maxc - r) as f32 * inv;
    let gc = (maxc - g) as f32 * inv;
    let bc = (maxc - b) as f32 * inv;
    let h_b = 4.0 + gc - rc;
    let h_g = if g == maxc { 2.0 + rc - bc } else { h_b };
    let h = if r == maxc { bc - gc } else { h_g };
    // fmod(h/6 + 1, 1) with h/6 in (-1/6, 1): one conditional subtraction.
    let h = h / 6.0 + 1.0;
    let h = if h >= 1.0 { h - 1.0 } else { h };
    (trunc_u8(h * 255.0), trunc_u8(s * 255.0), maxc)
}

/// For each sector `floor(6h)`, which of (v, t, p, q) becomes R, G and B.
const SECTORS: [[usize; 3]; 6] = [[0, 1, 2], [3, 0, 2], [2, 0, 1], [2, 3, 0], [1, 2, 0], [0, 2, 3]];

/// PIL's `HSV -> RGB` conversion (s = 0 needs no special case: then p = q = t = v).
#[inline]
pub fn hsv_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    let hf = h as f32 * (6.0 / 255.0);
    let i = trunc_u8(hf) as usize;
    let f = hf - i as f32;
    let fs = s as f32 * (1.0 / 255.0);
    let vf = v as f32;
    // floor(x + 0.5) is round() for these non-negative values, without a libm call.
    let p = trunc_u8(vf * (1.0 - fs) + 0.5);
    let q = trunc_u8(vf * (1.0 - fs * f) + 0.5);
    let t = trunc_u8(vf * (1.0 - fs * (1.0 - f)) + 0.5);
    let vals = [v, t, p, q];
    let [ri, gi, bi] = SECTORS[i % 6];
    (vals[ri], vals[gi], vals[bi])
}

/// Truncation of a non-negative float that LLVM vectorises (the value is clamped first).
#[inline(always)]
#[allow(clippy::manual_clamp)] // clamp() keeps NaN; max() turns it into 0, which the cast needs.
fn trunc_f(x: f32) -> f32 {
    let x = x.max(0.0).min(16_777_216.0);
    // SAFETY: x is finite and within i32's range after the clamp (NaN becomes 0 through max).
    unsafe { x.to_int_unchecked::<i32>() as f32 }
}

/// 1.0 where the integer-valued `x` is 0, else 0.0 (for `x` >= 0): a select as arithmetic.
#[inline(always)]
fn is_zero(x: f32) -> f32 {
    (1.0 - x).max(0.0)
}

/// One pixel of [`adjust_hue`] in f32 arithmetic only (min/max/mul instead of branches, which
/// mispredict on most pixels of a photo). Same rounding as [`rgb_to_hsv`] → shift → [`hsv_to_rgb`].
#[inline(always)]
fn hue_pixel(r: f32, g: f32, b: f32, shift: f32) -> [f32; 3] {
    let maxc = r.max(g).max(b);
    let cr = maxc - r.min(g).min(b);
    // 1/cr, or 0 for grey pixels (cr is a whole number).
    let inv = cr.min(1.0) / cr.max(1.0);
    let s8 = trunc_f(cr / maxc.max(1.0) * 255.0);
    let (rc, gc, bc) = ((maxc - r) * inv, (maxc - g) * inv, (maxc - b) * inv);
    let er = is_zero(maxc - r);
    let eg = is_zero(maxc - g) * (1.0 - er);
    let eb = 1.0 - er - eg;
    let h = er * (bc - gc) + eg * (2.0 + rc - bc) + eb * (4.0 + gc - rc);
    let h = h / 6.0 + 1.0;
    let h = h - trunc_f(h);
    // Shifted 8-bit hue, wrapped into 0..256 (shift is within ±128).
    let h8 = trunc_f(h * 255.0).min(255.0) + shift + 256.0;
    let h8 = h8 - 256.0 * trunc_f(h8 * (1.0 / 256.0));
    let hf = h8 * (6.0 / 255.0);
    let i = trunc_f(hf);
    let f = hf - i;
    let fs = s8 * (1.0 / 255.0);
    // Channel n in {5: R, 3: G, 1: B} takes sector m = (n + i) mod 6 of (q, p, p, t, v, v) via
    // weights c in {f, 1, 1, 1 − f, 0, 0}: out = round(v·(1 − s·c)), exactly PIL's p, q, t or v.
    let channel = |n: f32| {
        let m = n + i;
        let m = m - 6.0 * (m - 5.0).clamp(0.0, 1.0);
        let c =
            f * is_zero(m) + is_zero((m - 1.0).abs()) + is_zero((m - 2.0).abs()) + (1.0 - f) * is_zero((m - 3.0).abs());
        trunc_f(maxc * (1.0 - fs * c) + 0.5).min(255.0)
    };
    [channel(5.0), channel(3.0), channel(1.0)]
}

/// Pixels per planar block in [`adjust_hue`]: enough for full vectors, small enough for L1.
const HUE_BLOCK: usize = 64;

avx2_multiversion! {
    /// torchvision `adjust_hue` on PIL: the 8-bit hue channel shifted by `int(factor·255)` with
    /// wraparound. Pixels are split into planar f32 blocks so [`hue_pixel`] runs vectorised.
    pub fn adjust_hue(img: &mut RgbImage, factor: f32) {
        let shift = (factor * 255.0) as i32 as f32;
        let (mut r, mut g, mut b) = ([0f32; HUE_BLOCK], [0f32; HUE_BLOCK], [0f32; HUE_BLOCK]);
        for chunk in img.chunks_mut(3 * HUE_BLOCK) {
            let n = chunk.len() / 3;
            for (j, p) in chunk.chunks_exact(3).enumerate() {
                (r[j], g[j], b[j]) = (p[0] as f32, p[1] as f32, p[2] as f32);
            }
            for j in 0..HUE_BLOCK {
                [r[j], g[j], b[j]] = hue_pixel(r[j], g[j], b[j], shift);
            }
            for (j, p) in chunk.chunks_exact_mut(3).enumerate().take(n) {
                p.copy_from_slice(&[trunc_u8(r[j]), trunc_u8(g[j]), trunc_u8(b[j])]);
            }
        }
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
        let factor = |rng: &mut R, s: f32| (1.0 - s).max(0.0) + rng.random::<f32>() * (1.0 + s - (1.0 - s).max(0.0));
        let mut ops = Vec::with_capacity(4);
        for k in order {
            match k {
                0 if self.brightness > 0.0 => ops.push(ColorOp::Brightness(factor(rng, self.brightness))),
                1 if self.contrast > 0.0 => ops.push(ColorOp::Contrast(factor(rng, self.contrast))),
                2 if self.saturation > 0.0 => ops.push(ColorOp::Saturation(factor(rng, self.saturation))),
                3 if self.hue > 0.0 => ops.push(ColorOp::Hue((rng.random::<f32>() * 2.0 - 1.0) * self.hue)),
                _ => {}
            }
        }
        ops
    }
}
