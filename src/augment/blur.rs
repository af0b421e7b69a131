//! Gaussian blur as PIL's `ImageFilter.GaussianBlur(radius)` computes it (what DINO's
//! `GaussianBlur` calls): three passes of an extended box blur per axis whose fractional radius
//! matches the Gaussian's variance (Gwosdek et al. 2011), in 8.24 fixed point, u8 between passes.

use image::RgbImage;

const PASSES: u32 = 3;

/// The box radius giving `passes` boxes the variance of a Gaussian with std `sigma` (PIL's
/// `_gaussian_blur_radius`).
pub fn box_radius(sigma: f32, passes: u32) -> f32 {
    let sigma2 = sigma * sigma / passes as f32;
    let big_l = (12.0 * sigma2 + 1.0).sqrt();
    let l = ((big_l - 1.0) / 2.0).floor();
    let a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2) / (6.0 * (sigma2 - (l + 1.0) * (l + 1.0)));
    l + a
}

/// Tap offsets and 8.24 fixed-point weights of one extended-box pass: full weight inside the
/// integer radius, the fractional remainder split over the two next taps.
fn box_taps(radius: f32) -> Vec<(isize, u32)> {
    let r = radius.floor() as isize;
    let ww = ((1u64 << 24) as f64 / (radius as f64 * 2.0 + 1.0)) as u32;
    let fw = (((1u64 << 24) - (r as u64 * 2 + 1) * ww as u64) / 2) as u32;
    let mut taps = Vec::with_capacity(2 * r as usize + 3);
    if fw > 0 {
        taps.push((-r - 1, fw));
    }
    taps.extend((-r..=r).map(|k| (k, ww)));
    if fw > 0 {
        taps.push((r + 1, fw));
    }
    taps
}

/// One horizontal pass over packed RGB rows. The interior is a flat 1-D convolution over the row's
/// bytes with taps 3 bytes apart, which the compiler vectorises; only the edges clamp.
#[inline(always)]
fn pass_horizontal(src: &[u8], dst: &mut [u8], width: usize, taps: &[(isize, u32)], acc: &mut [u32]) {
    let reach = taps.iter().map(|(k, _)| k.unsigned_abs()).max().unwrap_or(0);
    let last = width as isize - 1;
    for (srow, drow) in src.chunks_exact(width * 3).zip(dst.chunks_exact_mut(width * 3)) {
        let edge = |x: usize, drow: &mut [u8]| {
            for c in 0..3 {
                let mut acc = 1u32 << 23;
                for &(k, w) in taps {
                    acc += srow[(x as isize + k).clamp(0, last) as usize * 3 + c] as u32 * w;
                }
                drow[x * 3 + c] = (acc >> 24) as u8;
            }
        };
        if width <= 2 * reach {
            (0..width).for_each(|x| edge(x, drow));
            continue;
        }
        (0..reach).chain(width - reach..width).for_each(|x| edge(x, drow));
        let (lo, hi) = (reach * 3, (width - reach) * 3);
        let acc = &mut acc[..hi - lo];
        acc.fill(1 << 23);
        for &(k, w) in taps {
            let shifted = &srow[(lo as isize + 3 * k) as usize..(hi as isize + 3 * k) as usize];
            for (a, &v) in acc.iter_mut().zip(shifted) {
                *a += v as u32 * w;
            }
        }
        for (o, a) in drow[lo..hi].iter_mut().zip(acc.iter()) {
            *o = (a >> 24) as u8;
        }
    }
}

/// Row-wise accumulation so the inner loop runs over contiguous memory.
#[inline(always)]
fn pass_vertical(src: &[u8], dst: &mut [u8], width: usize, height: usize, taps: &[(isize, u32)], acc: &mut [u32]) {
    let stride = width * 3;
    let last = height as isize - 1;
    for y in 0..height as isize {
        acc.fill(1 << 23);
        for &(k, w) in taps {
            let row = (y + k).clamp(0, last) as usize;
            for (a, &v) in acc.iter_mut().zip(&src[row * stride..(row + 1) * stride]) {
                *a += v as u32 * w;
            }
        }
        let out = &mut dst[y as usize * stride..(y as usize + 1) * stride];
        for (o, a) in out.iter_mut().zip(acc.iter()) {
            *o = (a >> 24) as u8;
        }
    }
}

avx2_multiversion! {
    /// Blurs `img` in place with a Gaussian of standard deviation `sigma` (PIL's "radius").
    pub fn gaussian_blur(img: &mut RgbImage, sigma: f32) {
        if sigma <= 0.0 {
            return;
        }
        let (width, height) = (img.width() as usize, img.height() as usize);
        let taps = box_taps(box_radius(sigma, PASSES));
        let mut tmp = vec![0u8; img.len()];
        let mut acc = vec![0u32; width * 3];
        // Passes alternate between the image and `tmp`; an even count (2 * PASSES) ends in the image.
        let buf: &mut [u8] = img;
        for pass in 0..2 * PASSES {
            let (src, dst): (&[u8], &mut [u8]) = if pass % 2 == 0 { (&*buf, &mut tmp) } else { (&tmp, &mut *buf) };
            if pass < PASSES {
                pass_horizontal(src, dst, width, &taps, &mut acc);
            } else {
                pass_vertical(src, dst, width, height, &taps, &mut acc);
            }
        }
    }
}
