//! The residual update of a block with stochastic depth, `x + branch · keep[b]`, where `keep[b]`
//! is 0 or 1/keep_prob per sample (1 everywhere without stochastic depth). Through candle the
//! per-sample scale was a broadcast multiply, and both it and the add ran on candle's worker pool
//! that spins between operations.

pub(super) mod portable;

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, fused, ELEMS_PER_TASK};

/// `x + branch · scale[b]` for `x`, `branch` of shape (B, ...) and one scale per sample.
pub fn residual(x: &Tensor, branch: &Tensor, scale: Option<&[f32]>) -> Result<Tensor> {
    let b = x.dim(0)?;
    if let Some(s) = scale {
        if s.len() != b {
            candle_core::bail!("residual: {} scales for a batch of {b}", s.len());
        }
    }
    if !fused(x) {
        let mask = scale
            .map(|s| Tensor::from_slice(s, b, x.device())?.to_dtype(x.dtype()))
            .transpose()?;
        return residual_with_mask(x, branch, mask.as_ref());
    }
    let op = Residual {
        scale: scale.map(|s| Arc::new(s.to_vec())),
    };
    x.contiguous()?.apply_op2(&branch.contiguous()?, op)
}

/// [`residual`] off the fused CPU path, with the per-sample scales already a (B,) tensor on `x`'s
/// device (one upload for every block of a forward pass).
pub fn residual_with_mask(x: &Tensor, branch: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    if let Some(y) = crate::ops::residual::portable::residual(x, branch, mask)? {
        return Ok(y);
    }
    // Under autocast the branch ends in a bf16 matmul and the stream is f32: the sum takes the
    // wider dtype, as PyTorch's type promotion does.
    use super::autocast::promote_to;
    let (x, branch) = (&promote_to(branch, x)?, &promote_to(x, branch)?);
    match mask {
        Some(m) => x + branch.broadcast_mul(&super::per_sample(&m.to_dtype(x.dtype())?, x.rank())?)?,
        None => x + branch,
    }
}

avx2_multiversion! {
    fn axpy(x: &[f32], y: &[f32], a: f32, out: &mut [f32]) {
        for ((o, &xv), &yv) in out.iter_mut().zip(x).zip(y) {
            *o = xv + a * yv;
        }
    }
}

avx2_multiversion! {
    fn scale_into(y: &[f32], a: f32, out: &mut [f32]) {
        for (o, &yv) in out.iter_mut().zip(y) {
            *o = a * yv;
        }
    }
}

/// Applies `f(sample scale, input chunks, output chunk)` over every sample's elements in parallel.
fn per_sample(n: usize, b: usize, scale: Option<&[f32]>, f: impl Fn(f32, usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let per = n / b.max(1);
    crate::parallel::install(|| {
        out.par_chunks_mut(ELEMS_PER_TASK)
            .with_min_len(crate::parallel::min_len())
            .enumerate()
            .for_each(|(ci, chunk)| {
                // A chunk may span samples: split it where the sample changes.
                let start = ci * ELEMS_PER_TASK;
                let mut off = 0;
                while off < chunk.len() {
                    let at = start + off;
                    let sample = at / per.max(1);
                    let end = ((sample + 1) * per - start).min(chunk.len());
                    let a = scale.map_or(1.0, |s| s[sample]);
                    f(a, at, &mut chunk[off..end]);
                    off = end;
                }
            })
    });
    out
}

/// `x + y · scale[sample]` for a batch of `b` samples.
pub(super) fn add_scaled(x: &[f32], y: &[f32], b: usize, scale: Option<&[f32]>) -> Vec<f32> {
    per_sample(x.len(), b, scale, |a, at, o| {
        let n = o.len();
        axpy(&x[at..at + n], &y[at..at + n], a, o)
    })
}

/// `g · scale[sample]` for a batch of `b` samples.
pub(super) fn scale_samples(g: &[f32], b: usize, scale: &[f32]) -> Vec<f32> {
    per_sample(g.len(), b, Some(scale), |a, at, o| {
        let n = o.len();
        scale_into(&g[at..at + n], a, o)
    })
}

struct Residual {
    scale: Option<Arc<Vec<f32>>>,
}

impl CustomOp2 for Residual {
    fn name(&self) -> &'static str {
        "dino-residual"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, y) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        if l1.dims() != l2.dims() {
            candle_core::bail!("residual: input {:?} but branch {:?}", l1.dims(), l2.dims());
        }
        let b = l1.dims().first().copied().unwrap_or(1);
        let out = add_scaled(x, y, b, self.scale.as_deref().map(Vec::as_slice));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _branch: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dbranch = match &self.scale {
            None => grad.clone(),
            Some(s) => grad
                .contiguous()?
                .apply_op1_no_bwd(&ScaleSamples { scale: s.clone() })?,
        };
        Ok((Some(grad.clone()), Some(dbranch)))
    }
}

struct ScaleSamples {
    scale: Arc<Vec<f32>>,
}

impl CustomOp1 for ScaleSamples {
    fn name(&self) -> &'static str {
        "dino-scale-samples"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, self.name())?;
        let b = l.dims().first().copied().unwrap_or(1);
        let out = scale_samples(g, b, &self.scale);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}
