//! Resizing the learned position embedding for crops of another size, exactly as the official
//! `interpolate_pos_encoding`s, in one of two ways ([`PosInterpolation`]):
//! * DINO's, and DINOv2's hub models without registers: PyTorch's bicubic (A = −0.75,
//!   align_corners=False, border clamp) with `scale_factor = (size/p + 0.1) / sqrt(N)`;
//! * DINOv2's `_reg` hub models: to the output size, antialiased (PyTorch's separable filter:
//!   Keys' cubic with A = −0.5, stretched by the scale when shrinking, weights normalised to sum 1).
//!
//! The resampling is linear, so it is done as two small matmuls whose weights reproduce PyTorch's
//! coefficients, and gradients reach `pos_embed` through it.

use candle_core::{Device, Result, Tensor};

const A: f32 = -0.75;

fn cubic1(x: f32) -> f32 {
    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
}

fn cubic2(x: f32) -> f32 {
    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
}

/// The (out × in) matrix of PyTorch's 1-D bicubic resampling with the given scale factor.
/// PyTorch maps output index d to source (d + 0.5)·(1/scale) − 0.5 in f32, the reciprocal
/// taken in f64 first, as upsample_bicubic2d does when a scale factor is passed.
pub fn bicubic_matrix(in_size: usize, out_size: usize, scale_factor: f64) -> Vec<f32> {
    let inv = (1.0 / scale_factor) as f32;
    let mut m = vec![0.0f32; out_size * in_size];
    for d in 0..out_size {
        let src = inv * (d as f32 + 0.5) - 0.5;
        let i0 = src.floor();
        let t = src - i0;
        let x2 = 1.0 - t;
        let coeffs = [cubic2(t + 1.0), cubic1(t), cubic1(x2), cubic2(x2 + 1.0)];
        for (k, c) in coeffs.into_iter().enumerate() {
            let idx = (i0 as i64 - 1 + k as i64).clamp(0, in_size as i64 - 1) as usize;
            m[d * in_size + idx] += c;
        }
    }
    m
}

/// How the position grid is resized (see the module comment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PosInterpolation {
    /// Bicubic with the scale factor (out + 0.1)/in, no antialiasing.
    #[default]
    Offset,
    /// Bicubic to the output size, antialiased.
    Antialias,
}

/// PyTorch's antialiased bicubic filter (Keys' cubic with A = −0.5).
fn aa_cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// The (out × in) matrix of PyTorch's antialiased 1-D bicubic resampling to `out_size`
/// (`F.interpolate(size=..., mode="bicubic", antialias=True)`): each output takes the input
/// samples within twice the scale (at least 2) of its centre, weighted by the filter stretched
/// by the scale when shrinking, normalised to sum 1; no border replication.
pub fn bicubic_aa_matrix(in_size: usize, out_size: usize) -> Vec<f32> {
    let scale = in_size as f64 / out_size as f64;
    let support = 2.0 * scale.max(1.0);
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut m = vec![0.0f32; out_size * in_size];
    for d in 0..out_size {
        let center = scale * (d as f64 + 0.5);
        // Truncation toward zero, as the C++ casts.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
        let w: Vec<f64> = (lo..hi)
            .map(|j| aa_cubic((j as f64 - center + 0.5) * invscale))
            .collect();
        let total: f64 = w.iter().sum();
        for (j, wj) in (lo..hi).zip(w) {
            m[d * in_size + j] = if total != 0.0 { (wj / total) as f32 } else { wj as f32 };
        }
    }
    m
}

/// Patch position embeddings `(1, N, D)` on an s×s grid resized to `out_h`×`out_w` patches,
/// returned as `(1, out_h·out_w, D)`. `out_h`, `out_w` are the crop's height and width in patches.
pub fn interpolate(patch_pos: &Tensor, out_h: usize, out_w: usize, how: PosInterpolation) -> Result<Tensor> {
    let (_, n, dim) = patch_pos.dims3()?;
    let s = (n as f64).sqrt() as usize;
    if s * s != n {
        candle_core::bail!("position embedding has {n} patch tokens, not a square grid");
    }
    if out_h == s && out_w == s {
        return Ok(patch_pos.clone());
    }
    let dev: &Device = patch_pos.device();
    let matrix = |out: usize| match how {
        PosInterpolation::Offset => bicubic_matrix(s, out, (out as f64 + 0.1) / s as f64),
        PosInterpolation::Antialias => bicubic_aa_matrix(s, out),
    };
    let wx = Tensor::from_vec(matrix(out_w), (out_w, s), dev)?;
    let wy = Tensor::from_vec(matrix(out_h), (out_h, s), dev)?;
    // Along the width first, then the height: the order PyTorch's kernel accumulates in.
    let grid = patch_pos.reshape((s, s, dim))?.transpose(1, 2)?.contiguous()?; // (h, D, w)
    let along_w = grid.broadcast_matmul(&wx.t()?)?; // (h, D, out_w)
    let rows = along_w.transpose(1, 2)?.contiguous()?.reshape((s, out_w * dim))?;
    wy.matmul(&rows)?.reshape((1, out_h * out_w, dim))
}
