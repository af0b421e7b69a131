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

/// The bias gradient of a linear layer from its output gradient `g` (…, d): the sums over every
/// row, taken in f32 (as PyTorch accumulates them), as `dtype`. On CUDA, for f32 and bf16, one
/// pass over `g` in two kernels (src/ops/cuda/bias.cu); elsewhere `g` in f32 summed by candle.
pub(super) fn bias_grad(g: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    let d = g.dims().last().copied().unwrap_or(1);
    let rows = g.elem_count() / d.max(1);
    #[cfg(feature = "cuda")]
    if g.device().is_cuda()
        && super::kernels_enabled()
        && matches!(g.dtype(), candle_core::DType::F32 | candle_core::DType::BF16)
        && rows * d > 0
    {
        let g = g.contiguous()?.reshape((rows, d))?;
        return g.apply_op1_no_bwd(&cuda::ColumnSums)?.to_dtype(dtype);
    }
    super::at_least_f32(g)?.reshape((rows, d))?.sum(0)?.to_dtype(dtype)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape};

    use super::super::cuda::view;
    use super::super::launch;

    /// f32 column sums of a contiguous (rows, d) f32 or bf16 tensor.
    pub(super) struct ColumnSums;

    impl CustomOp1 for ColumnSums {
        fn name(&self) -> &'static str {
            "dino-column-sums"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("column sums: a CUDA kernel (the CPU sums with candle)")
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = s.device();
            let (rows, d) = l.shape().dims2()?;
            let (tiles, [cols, total]) = launch::column_sums(rows, d);
            // SAFETY: the tile kernel writes every partial (each tile's row of d), the total
            // kernel every output.
            let partial = unsafe { dev.alloc::<f32>(tiles * d)? };
            let out = unsafe { dev.alloc::<f32>(d)? };
            let (r, dd, tr, t) = (rows as u32, d as u32, launch::TILE_ROWS as u32, tiles as u32);
            let name = match s.dtype() {
                DType::F32 => "dino_column_sums_f32",
                DType::BF16 => "dino_column_sums_bf16",
                other => candle_core::bail!("column sums: no CUDA kernel for {other:?}"),
            };
            let func = crate::ops::kernels::kernel!(dev, "bias", name)?;
            let mut builder = func.builder();
            let (gf, gh);
            if s.dtype() == DType::F32 {
                gf = view::<f32>(s, l, "column sums")?;
                builder.arg(&gf);
            } else {
                gh = view::<half::bf16>(s, l, "column sums")?;
                builder.arg(&gh);
            }
            builder.arg(&partial).arg(&r).arg(&dd).arg(&tr);
            // SAFETY: the arguments follow dino_column_sums_<dtype>'s signature; g holds rows × d
            // values, partial tiles × d.
            unsafe { builder.launch(cols.into()) }.w()?;
            let func = crate::ops::kernels::kernel!(dev, "bias", "dino_column_sums_total")?;
            let mut builder = func.builder();
            builder.arg(&partial).arg(&out).arg(&t).arg(&dd);
            // SAFETY: the arguments follow dino_column_sums_total's signature.
            unsafe { builder.launch(total.into()) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(d)))
        }
    }
}
