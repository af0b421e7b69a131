//! The attention probabilities softmax(scale · q·kᵀ) from q and k, as one graph node.
//!
//! As a matmul node and a softmax node, the graph kept the logits (B, heads, N, N) until the
//! backward pass, because a candle node keeps its inputs, though the softmax's backward reads only
//! its output. That is the largest tensor of a block: at ViT-S in f32, batch 64, 119 MB per block
//! for the globals. This node keeps q and k (which the matmul kept anyway) and the probabilities.
//! Where the flash attention kernels take attention (CUDA, bf16, a head dimension of 64) no
//! (B, heads, N, N) matrix is kept at all; this is for the rest (f32 on CUDA, other head dims, the
//! CPU off its fused kernels, attention maps).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::ops::softmax::portable::{softmax_backward, AnySoftmax};

/// softmax(scale · q·kᵀ) over the last dimension, for `q` (…, N, d) and `k` (…, M, d) of one
/// dtype; `None` for dtypes the softmax kernels do not take (f32 and bf16; f64 on the CPU), where
/// the caller composes.
pub fn attention_scores(q: &Tensor, k: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let takes = matches!(q.dtype(), DType::F32 | DType::BF16) || (q.device().is_cpu() && q.dtype() == DType::F64);
    if q.dtype() != k.dtype() || !takes || q.rank() < 2 {
        return Ok(None);
    }
    Ok(Some(q.contiguous()?.apply_op2(&k.contiguous()?, Scores { scale })?))
}

struct Scores {
    scale: f64,
}

/// q·kᵀ with the backend's batched matmul, and its shape.
fn logits<S: BackendStorage>(q: &S, lq: &Layout, k: &S, lk: &Layout) -> Result<(S, Shape)> {
    let (dq, dk) = (lq.dims(), lk.dims());
    let r = dq.len();
    if dk.len() != r || dq[..r - 2] != dk[..r - 2] || dq[r - 1] != dk[r - 1] {
        candle_core::bail!("attention scores: q {dq:?} against k {dk:?}");
    }
    let (n, m, d) = (dq[r - 2], dk[r - 2], dq[r - 1]);
    let batch = dq[..r - 2].iter().product();
    let logits = q.matmul(k, (batch, n, m, d), lq, &lk.transpose(r - 2, r - 1)?)?;
    let mut shape = dq[..r - 2].to_vec();
    shape.extend([n, m]);
    Ok((logits, Shape::from(shape)))
}

impl CustomOp2 for Scores {
    fn name(&self) -> &'static str {
        "dino-attention-scores"
    }

    fn cpu_fwd(&self, q: &CpuStorage, lq: &Layout, k: &CpuStorage, lk: &Layout) -> Result<(CpuStorage, Shape)> {
        let (s, shape) = logits(q, lq, k, lk)?;
        AnySoftmax { scale: self.scale }.cpu_fwd(&s, &Layout::contiguous(&shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        k: &candle_core::CudaStorage,
        lk: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (s, shape) = logits(q, lq, k, lk)?;
        AnySoftmax { scale: self.scale }.cuda_fwd(&s, &Layout::contiguous(&shape))
    }

    /// With dl the gradient of the (unscaled) logits: dq = dl · k, dk = dlᵀ · q.
    fn bwd(&self, q: &Tensor, k: &Tensor, y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dq, dk) = backward(q, k, y, g, self.scale)?;
        Ok((Some(dq), Some(dk)))
    }
}

/// dq and dk of [`attention_scores`] for its output `y` and the output gradient `g`.
pub(crate) fn backward(q: &Tensor, k: &Tensor, y: &Tensor, g: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let dl = softmax_backward(y, g, scale)?;
    Ok((dl.matmul(k)?, dl.t()?.matmul(q)?))
}
