//! LayerNorm over the last dimension with weight and bias, forward and backward in one pass per
//! row. The backward recomputes each row's mean and 1/std rather than keeping normalised inputs.

pub(super) mod portable;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::autocast::widen;
use super::{f32_slice, fused, par_map, rows_with_sums, ROWS_PER_TASK};

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension, differentiable in all three.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused(x) {
        return composed(x, weight, bias, eps);
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp { eps: eps as f32 },
    )
}

/// [`layer_norm`] as the input of a linear layer: under autocast, written in the low dtype the layer
/// would cast it to, without keeping the f32 output for the backward pass (see
/// [`portable::layer_norm_to`]). Elsewhere [`layer_norm`].
pub fn layer_norm_lowered(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    match super::autocast::active() {
        Some(low) => portable::layer_norm_to(&widen(x)?, &widen(weight)?, &widen(bias)?, eps, Some(low)),
        None => layer_norm(x, weight, bias, eps),
    }
}

fn composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    // In f32 under autocast, as PyTorch's: bf16 moments over a row lose the small variations.
    portable::layer_norm(&widen(x)?, &widen(weight)?, &widen(bias)?, eps)
}

#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    // Eight running sums so the loop vectorises (a single accumulator is a serial dependency).
    let mut acc = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = sum(x) / d;
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            let v = c[k] - mean;
            acc[k] += v * v;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
    let var = (acc.iter().sum::<f32>() + tail) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

avx2_multiversion! {
    fn forward_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
        let d = w.len();
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let (mean, rstd) = moments(xr, eps);
            for i in 0..d {
                yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
            }
        }
    }
}

avx2_multiversion! {
    /// dx for these rows added into `dx`; dw and db of these rows added into `dwdb` (`[dw | db]`).
    fn backward_rows(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], dwdb: &mut [f32]) {
        let d = w.len();
        let (dw, db) = dwdb.split_at_mut(d);
        let mut gw = vec![0f32; d];
        let mut gwx = vec![0f32; d];
        for ((xr, gr), dxr) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let (mean, rstd) = moments(xr, eps);
            for i in 0..d {
                let xhat = (xr[i] - mean) * rstd;
                gw[i] = gr[i] * w[i];
                gwx[i] = gw[i] * xhat;
                dw[i] += gr[i] * xhat;
                db[i] += gr[i];
            }
            let a = sum(&gw) / d as f32;
            let c = sum(&gwx) / d as f32;
            for i in 0..d {
                let xhat = (xr[i] - mean) * rstd;
                dxr[i] += rstd * (gw[i] - a - xhat * c);
            }
        }
    }
}

/// LayerNorm of rows of `w.len()`, as a new buffer.
pub(super) fn forward(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    par_map(x, ROWS_PER_TASK * w.len(), |xc, yc| forward_rows(xc, w, b, eps, yc))
}

/// Adds dx for the gradient `g` into `dx`, and d weight, d bias into `dwdb` (`[dw | db]`).
pub(super) fn backward(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], dwdb: &mut [f32]) {
    rows_with_sums(x, g, dx, w.len(), dwdb, |xc, gc, dc, p| {
        backward_rows(xc, w, gc, eps, dc, p)
    });
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "dino-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
            f32_slice(s3, l3, self.name())?,
        );
        let d = l1.dims().last().copied().unwrap_or(0);
        if d == 0 || w.len() != d || b.len() != d {
            candle_core::bail!(
                "layer norm: input {:?} with weight {} and bias {}",
                l1.dims(),
                w.len(),
                b.len()
            );
        }
        let y = forward(x, w, b, self.eps);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let n = x.elem_count();
        let flat = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBackward { eps: self.eps })?;
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = flat.narrow(0, n, d)?.reshape(w.shape())?;
        let db = flat.narrow(0, n + d, d)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `[dx (flattened) | dweight | dbias]` in one buffer (a custom op has one output).
struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "dino-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
            f32_slice(s3, l3, self.name())?,
        );
        let d = w.len();
        if x.len() != g.len() || d == 0 || x.len() % d != 0 {
            candle_core::bail!(
                "layer norm backward: input {:?}, grad {:?}, weight {d}",
                l1.dims(),
                l3.dims()
            );
        }
        let n = x.len();
        let mut out = vec![0f32; n + 2 * d];
        let (dx, dwdb) = out.split_at_mut(n);
        backward(x, w, g, self.eps, dx, dwdb);
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * d)))
    }
}
