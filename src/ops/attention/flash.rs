//! Attention on CUDA in FlashAttention's way (src/ops/cuda/attention.cu): the online softmax over
//! key tiles and tensor-core matmuls, q, k and v read straight from the `qkv` projection and the
//! output written in token order; no (B, heads, N, N) matrix is written, kept or read. Composed,
//! the same attention copies q, k and v into head-major order, writes the logits and probabilities,
//! runs two batched matmuls and copies back, and keeps the probabilities for the backward pass.
//!
//! Forward passes that need no gradient (features, the EMA teacher) run one kernel. With a
//! gradient, the forward kernel also keeps each row's log-sum-exp (B·N·heads floats) and the
//! backward pass recomputes the probabilities from it, in three kernels that write the gradient of
//! `qkv` directly, each element summed in a fixed order (no atomics), so steps repeat bit for bit.
//!
//! It takes bf16 (autocast) with a head dimension of 64 (ViT-S/16, ViT-B/16). Elsewhere
//! [`flash_attention`] returns `None` and the caller composes ([`attention_composed`]).

// Without the `cuda` feature the kernels never apply.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::ops::launch::ATTENTION_HEAD_DIM;

/// What the forward pass keeps for the backward pass: each row's log-sum-exp on the device.
#[cfg(feature = "cuda")]
type Kept = candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>;
#[cfg(not(feature = "cuda"))]
type Kept = ();

/// `softmax(q·kᵀ·scale)·v` per head for `qkv` (B, N, 3·C) laid out as the official
/// `qkv(x).reshape(B, N, 3, heads, C/heads)`, as (B, N, C), by the fused kernels, with a backward
/// pass where `qkv` needs a gradient; `None` where they do not apply (not CUDA, not bf16, another
/// head dimension, `DINO_RS_COMPOSED_OPS=1` or `DINO_RS_FLASH_ATTENTION=0`).
pub fn flash_attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Option<Tensor>> {
    if !applies(qkv, heads) {
        return Ok(None);
    }
    let qkv = aligned(&qkv.contiguous()?)?;
    let scale = scale as f32;
    if qkv.track_op() && crate::ops::grad_enabled() {
        let op = FusedAttention {
            heads,
            scale,
            kept: Some(OnceLock::new()),
        };
        return Ok(Some(qkv.apply_op1(op)?));
    }
    let op = FusedAttention {
        heads,
        scale,
        kept: None,
    };
    Ok(Some(qkv.apply_op1_no_bwd(&op)?))
}

/// `t` (contiguous) starting on a 16-byte boundary, as the kernels read 16 bytes at a time: a copy
/// where it does not.
fn aligned(t: &Tensor) -> Result<Tensor> {
    if t.layout().start_offset().is_multiple_of(8) {
        Ok(t.clone())
    } else {
        t.copy()
    }
}

fn applies(qkv: &Tensor, heads: usize) -> bool {
    let Ok((b, n, c3)) = qkv.dims3() else {
        return false;
    };
    let policy = crate::ops::OpsPolicy::current();
    cfg!(feature = "cuda")
        && policy.kernels
        && policy.flash_attention
        && qkv.device().is_cuda()
        && qkv.dtype() == DType::BF16
        && n > 0
        && heads > 0
        && c3 == 3 * heads * ATTENTION_HEAD_DIM
        && b * heads <= 65_535
        && b * n * c3 < u32::MAX as usize
}

/// The composed attention every device can run: the output (B, N, C) and the attention weights
/// (B, heads, N, N), for `qkv` as in [`flash_attention`]. Scales the logits inside the softmax,
/// after q·kᵀ, as the official `(q @ k.transpose(-2, -1)) * self.scale`.
pub fn attention_composed(qkv: &Tensor, heads: usize, scale: f64) -> Result<(Tensor, Tensor)> {
    let (b, n, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let (q, k, v) = head_major(qkv, heads)?;
    let attn = match crate::ops::attention_scores(&q, &k, scale)? {
        Some(attn) => attn,
        None => crate::ops::attention_probabilities(&q.matmul(&k.t()?)?, scale)?,
    };
    let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
    Ok((out, attn))
}

/// q, k and v, each (B, heads, N, head dim), from `qkv` (B, N, 3·C): contiguous slices of one
/// copy ([`split_heads`]).
pub(crate) fn head_major(qkv: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let qkv = split_heads(qkv, 3, heads)?;
    Ok((qkv.get(0)?, qkv.get(1)?, qkv.get(2)?))
}

/// `x` (B, N, parts·C), the projections side by side as the `qkv` layer writes them, as one copy
/// (parts, B, heads, N, C / heads): each part's heads contiguous.
pub(crate) fn split_heads(x: &Tensor, parts: usize, heads: usize) -> Result<Tensor> {
    let (b, n, width) = x.dims3()?;
    x.reshape((b, n, parts, heads, width / parts / heads))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()
}

struct FusedAttention {
    heads: usize,
    scale: f32,
    /// Where a gradient is wanted: the rows' log-sum-exps, set by the forward pass.
    kept: Option<OnceLock<Kept>>,
}

impl CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "dino-flash-attention"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused attention kernels run on CUDA only (the CPU has ops::attention)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out, lse) = cuda::forward(s, l, self.heads, self.scale, self.kept.is_some())?;
        if let (Some(kept), Some(lse)) = (&self.kept, lse) {
            if kept.set(lse).is_err() {
                candle_core::bail!("flash attention: one forward pass per op");
            }
        }
        Ok(out)
    }

    fn bwd(&self, qkv: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(lse) = self.kept.as_ref().and_then(OnceLock::get) else {
            candle_core::bail!("flash attention: backward pass without the forward pass's statistics");
        };
        Ok(Some(backward(qkv, out, grad, lse, self.heads, self.scale)?))
    }
}

/// What a forward pass for a gradient keeps besides its output: each row's log-sum-exp.
pub(crate) struct Stats(Kept);

/// [`flash_attention`] for a backward pass that the caller runs ([`backward_kept`]), outside
/// candle's graph: the output and the rows' statistics; `None` where the kernels do not apply.
pub(crate) fn forward_keeping(qkv: &Tensor, heads: usize, scale: f64) -> Result<Option<(Tensor, Stats)>> {
    if !applies(qkv, heads) {
        return Ok(None);
    }
    let op = FusedAttention {
        heads,
        scale: scale as f32,
        kept: Some(OnceLock::new()),
    };
    let out = aligned(&qkv.contiguous()?)?.apply_op1_no_bwd(&op)?;
    match op.kept.and_then(OnceLock::into_inner) {
        Some(lse) => Ok(Some((out, Stats(lse)))),
        None => candle_core::bail!("flash attention: the forward pass kept no statistics"),
    }
}

/// The gradient of `qkv` from [`forward_keeping`]'s output and statistics.
pub(crate) fn backward_kept(
    qkv: &Tensor,
    out: &Tensor,
    grad: &Tensor,
    stats: &Stats,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    backward(qkv, out, grad, &stats.0, heads, scale as f32)
}

fn backward(qkv: &Tensor, out: &Tensor, grad: &Tensor, lse: &Kept, heads: usize, scale: f32) -> Result<Tensor> {
    let grad = aligned(&grad.to_dtype(DType::BF16)?.contiguous()?)?;
    let op = FusedAttentionBackward { heads, scale, lse };
    aligned(&qkv.contiguous()?)?.apply_op3_no_bwd(&out.contiguous()?, &grad, &op)
}

/// The gradient of `qkv` from (qkv, out, grad of out) and the forward's log-sum-exps.
struct FusedAttentionBackward<'a> {
    heads: usize,
    scale: f32,
    lse: &'a Kept,
}

impl CustomOp3 for FusedAttentionBackward<'_> {
    fn name(&self) -> &'static str {
        "dino-flash-attention-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused attention kernels run on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        lq: &Layout,
        out: &candle_core::CudaStorage,
        lo: &Layout,
        grad: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward((qkv, lq), (out, lo), (grad, lg), self.lse, self.heads, self.scale)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Result, Shape};

    use crate::ops::cuda::view;
    use crate::ops::launch;

    /// The output and, with `keep`, the rows' log-sum-exps.
    pub(super) fn forward(
        s: &CudaStorage,
        l: &Layout,
        heads: usize,
        scale: f32,
        keep: bool,
    ) -> Result<((CudaStorage, Shape), Option<CudaSlice<f32>>)> {
        let dev = s.device();
        let (b, n, c3) = l.shape().dims3()?;
        let qkv = view::<half::bf16>(s, l, "attention")?;
        let func = crate::ops::kernels::kernel!(dev, "attention", "dino_attention_fwd_bf16")?;
        // SAFETY: the kernel writes every element (each token of each head), and every row's
        // log-sum-exp.
        let out = unsafe { dev.alloc::<half::bf16>(b * n * c3 / 3)? };
        let lse = if keep {
            Some(unsafe { dev.alloc::<f32>(b * n * heads)? })
        } else {
            None
        };
        let (tokens, h) = (n as u32, heads as u32);
        let null = 0u64;
        let mut builder = func.builder();
        builder.arg(&qkv).arg(&out);
        match &lse {
            Some(lse) => builder.arg(lse),
            None => builder.arg(&null),
        };
        builder.arg(&tokens).arg(&h).arg(&scale);
        // SAFETY: the arguments follow dino_attention_fwd_bf16's signature; qkv holds B × N × 3 ×
        // heads × 64 bf16 from a 16-byte aligned start (checked by the caller), out B × N × heads ×
        // 64, lse (or null) B × N × heads.
        unsafe { builder.launch(launch::attention(b, n, heads).into()) }.w()?;
        let out = CudaStorage::wrap_cuda_slice(out, dev.clone());
        Ok(((out, Shape::from((b, n, c3 / 3))), lse))
    }

    pub(super) fn backward(
        (sq, lq): (&CudaStorage, &Layout),
        (so, lo): (&CudaStorage, &Layout),
        (sg, lg): (&CudaStorage, &Layout),
        lse: &CudaSlice<f32>,
        heads: usize,
        scale: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = sq.device();
        let (b, n, c3) = lq.shape().dims3()?;
        let rows = b * n * heads;
        let (qkv, out, grad) = (
            view::<half::bf16>(sq, lq, "attention input")?,
            view::<half::bf16>(so, lo, "attention output")?,
            view::<half::bf16>(sg, lg, "attention gradient")?,
        );
        if out.len() != rows * 64 || grad.len() != rows * 64 || lse.len() != rows {
            candle_core::bail!("flash attention backward: sizes do not match qkv {:?}", lq.dims());
        }
        // SAFETY: the first kernel writes every row's dot; dkdv every k and v element of the
        // gradient, dq every q element.
        let dot = unsafe { dev.alloc::<f32>(rows)? };
        let dqkv = unsafe { dev.alloc::<half::bf16>(b * n * c3)? };
        let r = rows as u32;
        let f = crate::ops::kernels::kernel!(dev, "attention", "dino_attention_bwd_dot")?;
        let mut builder = f.builder();
        builder.arg(&out).arg(&grad).arg(&dot).arg(&r);
        // SAFETY: the arguments follow dino_attention_bwd_dot's signature; out and grad hold rows × 64.
        unsafe { builder.launch(launch::row_blocks(rows).into()) }.w()?;
        let (tokens, h) = (n as u32, heads as u32);
        for name in ["dino_attention_bwd_dkdv", "dino_attention_bwd_dq"] {
            let f = crate::ops::kernels::kernel!(dev, "attention", name)?;
            let mut builder = f.builder();
            builder
                .arg(&qkv)
                .arg(&grad)
                .arg(lse)
                .arg(&dot)
                .arg(&dqkv)
                .arg(&tokens)
                .arg(&h)
                .arg(&scale);
            // SAFETY: the arguments follow the kernel's signature (qkv, dout, lse, dot, dqkv, n,
            // heads, scale); qkv and grad start 16-byte aligned (checked by the caller).
            unsafe { builder.launch(launch::attention(b, n, heads).into()) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(dqkv, dev.clone()), Shape::from((b, n, c3))))
    }
}
