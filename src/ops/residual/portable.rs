//! The residual update `x + branch · mask[sample]` off the fused CPU path: one kernel on CUDA
//! (src/ops/cuda/residual.cu; the stream f32, the branch f32 or bf16), a loop on the CPU. The
//! per-sample masks of every block arrive as one device tensor per forward pass instead of one
//! upload per residual. Composed of candle ops this was a cast, a broadcast multiply and an add
//! forward, and ~8 kernels backward through autograd; here the backward is the gradient itself for
//! the stream and one multiply (and cast) for the branch.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::ops::contiguous;

/// Whether [`residual`] takes these: the same shape; the stream f32 (or f64 on the CPU); the
/// branch f32 or bf16 (any float on the CPU); the mask f32 (f64 with an f64 stream), one per sample.
fn applies(x: &Tensor, branch: &Tensor, mask: Option<&Tensor>) -> bool {
    let cpu = x.device().is_cpu();
    let stream = x.dtype() == DType::F32 || (cpu && x.dtype() == DType::F64);
    let branch_ok = matches!(branch.dtype(), DType::F32 | DType::BF16)
        || (cpu && matches!(branch.dtype(), DType::F64 | DType::F16));
    let mask_ok = mask.is_none_or(|m| {
        m.dtype() == x.dtype() && m.rank() == 1 && x.rank() > 0 && x.dims().first() == Some(&m.elem_count())
    });
    stream && branch_ok && mask_ok && x.shape() == branch.shape() && x.elem_count() > 0
}

/// `x + branch · mask[sample]` (or `x + branch`) in `x`'s dtype; `None` where [`applies`] says no.
pub fn residual(x: &Tensor, branch: &Tensor, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
    if !applies(x, branch, mask) {
        return Ok(None);
    }
    let (x, branch) = (x.contiguous()?, branch.contiguous()?);
    match mask {
        Some(m) => x.apply_op3(&branch, &m.contiguous()?, ResidualMasked),
        None => x.apply_op2(&branch, Residual),
    }
    .map(Some)
}

/// The values of a CPU storage as f64.
fn values(s: &CpuStorage, l: &Layout) -> Result<Vec<f64>> {
    use candle_core::WithDType;
    fn widen<T: WithDType>(v: &[T]) -> Vec<f64> {
        v.iter().map(|&e| e.to_f64()).collect()
    }
    Ok(match s {
        CpuStorage::F32(v) => widen(contiguous(v, l, "residual")?),
        CpuStorage::F64(v) => widen(contiguous(v, l, "residual")?),
        CpuStorage::BF16(v) => widen(contiguous(v, l, "residual")?),
        CpuStorage::F16(v) => widen(contiguous(v, l, "residual")?),
        other => candle_core::bail!("residual: expected floats, got {:?}", other.dtype()),
    })
}

/// `x[i] + mask[i / per] · b[i]`, each step rounded in `x`'s dtype (as the f32 kernels do).
pub(crate) fn cpu(
    x: &CpuStorage,
    lx: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    mask: Option<(&CpuStorage, &Layout)>,
) -> Result<CpuStorage> {
    let (bv, mv) = (values(b, lb)?, mask.map(|(m, l)| values(m, l)).transpose()?);
    let per = lx.shape().elem_count() / lx.dims().first().copied().unwrap_or(1).max(1);
    let scaled = |i: usize| mv.as_ref().map_or(bv[i], |m| m[i / per.max(1)] * bv[i]);
    Ok(match x {
        CpuStorage::F32(v) => CpuStorage::F32(
            contiguous(v, lx, "residual")?
                .iter()
                .enumerate()
                .map(|(i, &xv)| xv + scaled(i) as f32)
                .collect(),
        ),
        CpuStorage::F64(v) => CpuStorage::F64(
            contiguous(v, lx, "residual")?
                .iter()
                .enumerate()
                .map(|(i, &xv)| xv + scaled(i))
                .collect(),
        ),
        other => candle_core::bail!("residual: the stream must be f32 or f64, got {:?}", other.dtype()),
    })
}

/// The branch's gradient: the stream's, times the mask, in the branch's dtype.
pub(crate) fn branch_grad(grad: &Tensor, branch: DType, mask: Option<&Tensor>) -> Result<Tensor> {
    let g = match mask {
        Some(m) => grad.broadcast_mul(&crate::ops::per_sample(m, grad.rank())?)?,
        None => grad.clone(),
    };
    g.to_dtype(branch)
}

struct Residual;

impl CustomOp2 for Residual {
    fn name(&self) -> &'static str {
        "dino-residual-any"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((cpu(s1, l1, s2, l2, None)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::run((s1, l1), (s2, l2), None)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        branch: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(branch_grad(grad, branch.dtype(), None)?)))
    }
}

struct ResidualMasked;

impl CustomOp3 for ResidualMasked {
    fn name(&self) -> &'static str {
        "dino-residual-masked-any"
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
        Ok((cpu(s1, l1, s2, l2, Some((s3, l3)))?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::run((s1, l1), (s2, l2), Some((s3, l3)))?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        branch: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(grad.clone()),
            Some(branch_grad(grad, branch.dtype(), Some(mask))?),
            None,
        ))
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Result};

    use crate::ops::cuda::{grid_stride, view};

    const OP: &str = "residual";

    pub(in crate::ops) fn run(
        (x, lx): (&CudaStorage, &Layout),
        (b, lb): (&CudaStorage, &Layout),
        mask: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let suffix = match b.dtype() {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            other => candle_core::bail!("residual: no CUDA kernel for a {other:?} branch"),
        };
        let name = match mask {
            Some(_) => format!("dino_residual_masked_{suffix}"),
            None => format!("dino_residual_{suffix}"),
        };
        let func = crate::ops::kernels::kernel!(dev, "residual", &name)?;
        let n = lx.shape().elem_count();
        let xs = view::<f32>(x, lx, OP)?;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<f32>(n)? };
        let count = n as u32;
        let per_sample = (n / lx.dims().first().copied().unwrap_or(1).max(1)) as u32;
        let mut builder = func.builder();
        builder.arg(&xs);
        let (bf, bh);
        match b.dtype() {
            DType::F32 => {
                bf = view::<f32>(b, lb, OP)?;
                builder.arg(&bf);
            }
            _ => {
                bh = view::<half::bf16>(b, lb, OP)?;
                builder.arg(&bh);
            }
        }
        let ms;
        if let Some((m, lm)) = mask {
            ms = view::<f32>(m, lm, OP)?;
            builder.arg(&ms);
        }
        builder.arg(&out);
        builder.arg(&count);
        if mask.is_some() {
            builder.arg(&per_sample);
        }
        // SAFETY: the arguments follow the kernel's signature (x, branch, [mask,] out, n[, per_sample]).
        unsafe { builder.launch(grid_stride(n)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    /// [`run`] with a linear layer's `bias` (d, in the branch's dtype) added to the branch first,
    /// rounded in that dtype as the layer's own bias add would: one pass instead of two.
    pub(in crate::ops) fn run_with_bias(
        (x, lx): (&CudaStorage, &Layout),
        (b, lb): (&CudaStorage, &Layout),
        (bias, lbias): (&CudaStorage, &Layout),
        mask: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let n = lx.shape().elem_count();
        let d = lbias.shape().elem_count();
        if bias.dtype() != b.dtype() || d == 0 || lb.shape().elem_count() != n || !n.is_multiple_of(d) {
            candle_core::bail!(
                "residual: a {:?} bias of {d} for a {:?} branch of {n}",
                bias.dtype(),
                b.dtype()
            );
        }
        let name = match b.dtype() {
            DType::F32 => "dino_residual_bias_f32",
            DType::BF16 => "dino_residual_bias_bf16",
            other => candle_core::bail!("residual: no CUDA kernel for a {other:?} branch"),
        };
        let func = crate::ops::kernels::kernel!(dev, "residual", name)?;
        let xs = view::<f32>(x, lx, OP)?;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<f32>(n)? };
        let (count, width) = (n as u32, d as u32);
        let per_sample = (n / lx.dims().first().copied().unwrap_or(1).max(1)) as u32;
        let null = 0u64;
        let mut builder = func.builder();
        builder.arg(&xs);
        let (bf, bh, biasf, biash);
        match b.dtype() {
            DType::F32 => {
                bf = view::<f32>(b, lb, OP)?;
                biasf = view::<f32>(bias, lbias, OP)?;
                builder.arg(&bf).arg(&biasf);
            }
            _ => {
                bh = view::<half::bf16>(b, lb, OP)?;
                biash = view::<half::bf16>(bias, lbias, OP)?;
                builder.arg(&bh).arg(&biash);
            }
        }
        let ms;
        match mask {
            Some((m, lm)) => {
                ms = view::<f32>(m, lm, OP)?;
                builder.arg(&ms);
            }
            None => {
                builder.arg(&null);
            }
        }
        builder.arg(&out).arg(&count).arg(&per_sample).arg(&width);
        // SAFETY: the arguments follow dino_residual_bias_<dtype>'s signature (x, branch, bias,
        // mask or null, out, n, per_sample, d); bias holds d values, the others n (mask one per sample).
        unsafe { builder.launch(grid_stride(n)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}
