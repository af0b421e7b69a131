//! Softmax over the last dimension, forward and backward one row at a time
//! (backward: dx = y · (g − Σ g·y), from the saved output alone).

pub(super) mod portable;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{f32_slice, fused, math, par_map, par_map2, ROWS_PER_TASK};

/// The attention probabilities `softmax(scale · x)` from the logits `x` (scaled after the matmul,
/// as the official `(q @ k.transpose(-2, -1)) * self.scale`; off the fused CPU path the scale is
/// applied inside the softmax kernel). Under autocast the logits are bf16 and so
/// are the probabilities, computed in f32 inside one kernel: PyTorch's autocast makes f32
/// probabilities that the next matmul casts to bf16 at once, the same values after an f32 round
/// trip through memory (and f32 probabilities kept for the backward pass). Otherwise as
/// [`softmax_last_dim`].
pub fn attention_probabilities(x: &Tensor, scale: f64) -> Result<Tensor> {
    match super::autocast::active() {
        Some(low) if x.dtype() == low => portable::softmax_scaled(x, scale),
        _ if fused(x) => softmax_last_dim(&(x * scale)?),
        _ => portable::softmax_scaled(&super::autocast::widen(x)?, scale),
    }
}

/// Differentiable softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        // f32 under autocast (PyTorch's policy for softmax).
        return portable::softmax_last_dim(&super::autocast::widen(x)?);
    }
    x.contiguous()?.apply_op1(SoftmaxOp)
}

/// Σ a·b (Σ a without `b`) over 8 lanes, lane j taking the elements at i ≡ j (mod 8) in order, then
/// the lanes in order: the order both row kernels have always summed in, written as whole 8-wide
/// chunks so that the loops vectorise (an `acc[i % 8]` index inside the exp loop kept it scalar,
/// and softmax was 15% of a DINOv2 forward pass).
#[inline(always)]
fn lane_dot(a: &[f32], b: Option<&[f32]>) -> f32 {
    let mut acc = [0f32; 8];
    let whole = a.len() / 8 * 8;
    match b {
        None => {
            for c in a[..whole].chunks_exact(8) {
                for (s, &x) in acc.iter_mut().zip(c) {
                    *s += x;
                }
            }
        }
        Some(b) => {
            for (c, e) in a[..whole].chunks_exact(8).zip(b[..whole].chunks_exact(8)) {
                for ((s, &x), &y) in acc.iter_mut().zip(c).zip(e) {
                    *s += x * y;
                }
            }
        }
    }
    for (j, s) in acc.iter_mut().enumerate().take(a.len() - whole) {
        *s += a[whole + j] * b.map_or(1.0, |b| b[whole + j]);
    }
    acc.iter().sum()
}

avx2_multiversion! {
    pub(super) fn rows_forward(x: &[f32], d: usize, y: &mut [f32]) {
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            // Exact in any order. `>` rather than f32::max, which LLVM keeps scalar; both skip NaN
            // (whose exp then makes the row NaN).
            let mut m = [f32::NEG_INFINITY; 8];
            let whole = d / 8 * 8;
            for c in xr[..whole].chunks_exact(8) {
                for (l, &v) in m.iter_mut().zip(c) {
                    *l = if v > *l { v } else { *l };
                }
            }
            let max = xr[whole..].iter().chain(&m).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            for (yv, &xv) in yr.iter_mut().zip(xr) {
                *yv = math::exp(xv - max);
            }
            let inv = 1.0 / lane_dot(yr, None);
            for yv in yr.iter_mut() {
                *yv *= inv;
            }
        }
    }
}

avx2_multiversion! {
    pub(super) fn rows_backward(y: &[f32], g: &[f32], d: usize, dx: &mut [f32]) {
        for ((yr, gr), dxr) in y.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let dot = lane_dot(yr, Some(gr));
            for ((o, &yv), &gv) in dxr.iter_mut().zip(yr).zip(gr) {
                *o = yv * (gv - dot);
            }
        }
    }
}

fn last_dim(l: &Layout) -> Result<usize> {
    match l.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("softmax: no last dimension to normalise in {:?}", l.dims()),
    }
}

struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "dino-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let d = last_dim(l)?;
        let y = par_map(x, ROWS_PER_TASK * d, |xc, yc| rows_forward(xc, d, yc));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?))
    }
}

struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "dino-softmax-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        let d = last_dim(l1)?;
        if y.len() != g.len() {
            candle_core::bail!("softmax backward: output {:?} but grad {:?}", l1.dims(), l2.dims());
        }
        let dx = par_map2(y, g, ROWS_PER_TASK * d, |yc, gc, dc| rows_backward(yc, gc, d, dc));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
