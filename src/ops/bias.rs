//! `x + bias` broadcast over the rows of the last dimension, whose backward sums the gradient's
//! rows in parallel. Through candle this was a broadcast add on its spinning worker pool and, in
//! the backward pass, a column-wise reduction walking memory with a stride of one row per element.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, fused, par_map, ROWS_PER_TASK};

/// `x + bias` over the last dimension, differentiable in both.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return x.broadcast_add(bias);
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, AddBias)
}

avx2_multiversion! {
    fn add_rows(x: &[f32], b: &[f32], y: &mut [f32]) {
        let d = b.len();
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            for i in 0..d {
                yr[i] = xr[i] + b[i];
            }
        }
    }
}

avx2_multiversion! {
    fn sum_rows(g: &[f32], acc: &mut [f32]) {
        let d = acc.len();
        for gr in g.chunks_exact(d) {
            for i in 0..d {
                acc[i] += gr[i];
            }
        }
    }
}

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "dino-add-bias"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, b) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        let d = b.len();
        if l1.dims().last() != Some(&d) || d == 0 {
            candle_core::bail!("add bias: input {:?} with bias {:?}", l1.dims(), l2.dims());
        }
        let y = par_map(x, ROWS_PER_TASK * d, |xc, yc| add_rows(xc, b, yc));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, bias: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad.contiguous()?.apply_op1_no_bwd(&SumRows { d: bias.elem_count() })?;
        Ok((Some(grad.clone()), Some(db.reshape(bias.shape())?)))
    }
}

/// Adds the column sums of `g`, rows of `acc.len()`, into `acc`: per task of rows, then in task
/// order (the same result on any number of threads).
pub(super) fn column_sums(g: &[f32], acc: &mut [f32]) {
    let d = acc.len();
    let partials: Vec<Vec<f32>> = crate::parallel::install(|| {
        g.par_chunks(ROWS_PER_TASK * d)
            .map(|c| {
                let mut p = vec![0f32; d];
                sum_rows(c, &mut p);
                p
            })
            .collect()
    });
    for p in partials {
        for (o, v) in acc.iter_mut().zip(p) {
            *o += v;
        }
    }
}

/// Column sums of a (rows, d) buffer, added up per task and then in task order.
pub(super) struct SumRows {
    pub(super) d: usize,
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "dino-sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, self.name())?;
        let d = self.d;
        if d == 0 || g.len() % d != 0 {
            candle_core::bail!("sum rows: {:?} is not rows of {d}", l.dims());
        }
        let mut out = vec![0f32; d];
        column_sums(g, &mut out);
        Ok((CpuStorage::F32(out), Shape::from(d)))
    }
}
