//! Resizing the learned position embedding for crops of another size, exactly as the official
//! `interpolate_pos_encoding`: PyTorch's bicubic (A = −0.75, align_corners=False, border clamp)
//! with `scale_factor = (size/p + 0.1) / sqrt(N)`. The resampling is linear, so it is done as
//! two small matmuls whose weights reproduce PyTorch's coefficients, and gradients reach
//! `pos_embed` through it.

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

/// Patch position embeddings `(1, N, D)` on an s×s grid resized to `out_h`×`out_w` patches,
/// returned as `(1, out_h·out_w, D)`. `out_h`, `out_w` are the crop's height and width in patches.
pub fn interpolate(patch_pos: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, n, dim) = patch_pos.dims3()?;
    let s = (n as f64).sqrt() as usize;
    if s * s != n {
        candle_core::bail!("position embedding has {n} patch tokens, not a square grid");
    }
    if out_h == s && out_w == s {
        return Ok(patch_pos.clone());
    }
    let dev: &Device = patch_pos.device();
    let scale = |out: usize| (out as f64 + 0.1) / s as f64;
    let wx = Tensor::from_vec(bicubic_matrix(s, out_w, scale(out_w)), (out_w, s), dev)?;
    let wy = Tensor::from_vec(bicubic_matrix(s, out_h, scale(out_h)), (out_h, s), dev)?;
    // Along the width first, then the height: the order PyTorch's kernel accumulates in.
    let grid = patch_pos.reshape((s, s, dim))?.transpose(1, 2)?.contiguous()?; // (h, D, w)
    let along_w = grid.broadcast_matmul(&wx.t()?)?; // (h, D, out_w)
    let rows = along_w.transpose(1, 2)?.contiguous()?.reshape((s, out_w * dim))?;
    wy.matmul(&rows)?.reshape((1, out_h * out_w, dim))
}
