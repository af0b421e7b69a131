//! A block's residual update together with the linear layer that ends its branch (attention's
//! `proj`, the MLP's `fc2`): `stream + mask[sample] · (x · Wᵀ + b)` as one graph node off the fused
//! CPU path (CUDA, autocast). The forward is the linear layer's ([`crate::ops::linear::portable`]) and the
//! residual update's ([`crate::ops::residual::portable`]) storage ops one after the other, so the values
//! are theirs bit for bit; the backward is theirs too. On CUDA the layer's bias add moves into the
//! residual kernel (the same rounding: tests/cuda_emulated.rs), one pass over the branch less.
//!
//! As two nodes, the residual node kept the branch (the layer's output) alive until the backward
//! pass although its backward reads only the mask: an activation-sized tensor per residual, two
//! per block, that PyTorch does not keep (at ViT-S, batch 64, bf16: ~68 MB a block). This node keeps
//! the stream (which the next LayerNorm keeps anyway), the layer's input, and the weight and bias,
//! packed into one flat tensor because a candle op takes at most three inputs.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use crate::ops::autocast::lower;

/// `stream + mask[sample] · (x · weightᵀ + bias)` for `stream` (B, …, out) f32, `x` (B, …, in),
/// weight (out, in), bias (out), mask (B,) f32; the matmul in bf16 under autocast, as
/// [`crate::ops::linear`] does it. `None` where the node does not apply (the fused CPU path, other
/// dtypes or shapes): then compose [`crate::ops::linear`] and [`crate::ops::residual_with_mask`].
pub fn linear_residual(
    stream: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if crate::ops::fused(stream) || stream.dtype() != DType::F32 || stream.elem_count() == 0 {
        return Ok(None);
    }
    let (x, weight, bias) = (lower(x)?, lower(weight)?, lower(bias)?);
    let ((out, inp), dims, x_dims) = (weight.dims2()?, stream.dims(), x.dims());
    let shapes = x_dims.len() == dims.len()
        && x_dims.split_last().map(|(k, rest)| (*k, rest)) == dims.split_last().map(|(_, rest)| (inp, rest))
        && dims.last() == Some(&out)
        && bias.dims() == [out];
    let low = x.dtype();
    let dtypes = matches!(low, DType::F32 | DType::BF16) && weight.dtype() == low && bias.dtype() == low;
    let mask_ok = mask.is_none_or(|m| m.dtype() == DType::F32 && m.dims1().ok() == dims.first().copied());
    if !(shapes && dtypes && mask_ok) {
        return Ok(None);
    }
    let rows = stream.elem_count() / out;
    let x = x.contiguous()?.reshape((rows, inp))?;
    let packed = Tensor::cat(&[&weight.flatten_all()?, &bias], 0)?;
    let op = LinearResidual {
        out,
        mask: mask.cloned(),
    };
    Ok(Some(stream.contiguous()?.apply_op3(&x, &packed, op)?))
}

pub(crate) struct LinearResidual {
    pub(crate) out: usize,
    /// The per-sample drop-path mask (0 or 1/keep), not differentiated.
    pub(crate) mask: Option<Tensor>,
}

impl LinearResidual {
    /// The weight's and the bias's layouts inside the packed parameter tensor.
    fn params(&self, lp: &Layout) -> Result<(Layout, Layout)> {
        let Some((start, end)) = lp.contiguous_offsets() else {
            candle_core::bail!("linear residual: the packed parameters must be contiguous");
        };
        let inp = (end - start - self.out) / self.out.max(1);
        Ok((
            Layout::contiguous_with_offset((self.out, inp), start),
            Layout::contiguous_with_offset(self.out, start + self.out * inp),
        ))
    }
}

impl CustomOp3 for LinearResidual {
    fn name(&self) -> &'static str {
        "dino-linear-residual"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        ls: &Layout,
        x: &CpuStorage,
        lx: &Layout,
        p: &CpuStorage,
        lp: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (lw, lb) = self.params(lp)?;
        let (branch, shape) = crate::ops::linear::portable::forward(x, lx, p, &lw, Some((p, &lb)))?;
        let branch_layout = Layout::contiguous(shape);
        let out = match &self.mask {
            None => crate::ops::residual::portable::cpu(s, ls, &branch, &branch_layout, None)?,
            Some(m) => {
                let (ms, ml) = m.storage_and_layout();
                let Storage::Cpu(ms) = &*ms else {
                    candle_core::bail!("linear residual: the mask is not on the CPU");
                };
                crate::ops::residual::portable::cpu(s, ls, &branch, &branch_layout, Some((ms, ml)))?
            }
        };
        Ok((out, ls.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        ls: &Layout,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        p: &candle_core::CudaStorage,
        lp: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::ops::residual::portable::cuda::run_with_bias;
        let (lw, lb) = self.params(lp)?;
        // The matmul alone: the residual kernel adds the bias as it reads the branch.
        let (branch, shape) = crate::ops::linear::portable::forward(x, lx, p, &lw, None)?;
        let branch_layout = Layout::contiguous(shape);
        let out = match &self.mask {
            None => run_with_bias((s, ls), (&branch, &branch_layout), (p, &lb), None)?,
            Some(m) => {
                let (ms, ml) = m.storage_and_layout();
                let Storage::Cuda(ms) = &*ms else {
                    candle_core::bail!("linear residual: the mask is not on the GPU");
                };
                run_with_bias((s, ls), (&branch, &branch_layout), (p, &lb), Some((ms, ml)))?
            }
        };
        Ok((out, ls.shape().clone()))
    }

    /// The residual update's backward (the stream's gradient as it is; the branch's times the
    /// mask, in the layer's dtype), then the linear layer's (dx = g·W, dW = gᵀ·x, db = Σ g in f32).
    fn bwd(
        &self,
        _stream: &Tensor,
        x: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = x.dims2()?;
        let out = self.out;
        let g =
            crate::ops::residual::portable::branch_grad(grad, x.dtype(), self.mask.as_ref())?.reshape((rows, out))?;
        let w = packed.narrow(0, 0, out * inp)?.reshape((out, inp))?;
        let (dx, dw) = crate::ops::linear::portable::backward(x, &w, &g)?;
        let db = crate::ops::bias::bias_grad(&g, packed.dtype())?;
        let dp = Tensor::cat(&[&dw.flatten_all()?, &db], 0)?;
        Ok((Some(grad.clone()), dx, Some(dp)))
    }
}
