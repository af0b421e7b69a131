//! Attention on CUDA for forward passes that keep nothing for a backward pass (inference, feature
//! extraction, the EMA teacher), in one kernel (src/ops/cuda/attention.cu): FlashAttention's online
//! softmax over key tiles, tensor-core matmuls, q, k and v read straight from the `qkv` projection
//! and the output written in token order. Composed, the same attention is a copy of q, k and v into
//! head-major order, the (B, heads, N, N) logits and probabilities, two batched matmuls and a copy
//! back; the kernel moves none of those matrices through memory.
//!
//! It takes bf16 (autocast) with a head dimension of 64 (ViT-S/16, ViT-B/16). Elsewhere, or when
//! the result needs a gradient, [`attention_no_grad`] returns `None` and the caller composes
//! ([`attention_composed`]).

// Without the `cuda` feature the kernel never applies.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::launch::ATTENTION_HEAD_DIM;

/// `softmax(q·kᵀ·scale)·v` per head for `qkv` (B, N, 3·C) laid out as the official
/// `qkv(x).reshape(B, N, 3, heads, C/heads)`, as (B, N, C), by the fused kernel; `None` where it
/// does not apply (not CUDA, not bf16, another head dimension, a result that needs a gradient,
/// `DINO_RS_COMPOSED_OPS=1`).
pub fn attention_no_grad(qkv: &Tensor, heads: usize, scale: f64) -> Result<Option<Tensor>> {
    if !applies(qkv, heads) {
        return Ok(None);
    }
    let qkv = qkv.contiguous()?;
    // The kernel reads 16 bytes at a time.
    if qkv.layout().start_offset() % 8 != 0 {
        return Ok(None);
    }
    let op = FusedAttention {
        heads,
        scale: scale as f32,
    };
    Ok(Some(qkv.apply_op1_no_bwd(&op)?))
}

fn applies(qkv: &Tensor, heads: usize) -> bool {
    let Ok((b, n, c3)) = qkv.dims3() else {
        return false;
    };
    cfg!(feature = "cuda")
        && super::kernels_enabled()
        && qkv.device().is_cuda()
        && qkv.dtype() == DType::BF16
        && !(qkv.track_op() && super::grad_enabled())
        && n > 0
        && heads > 0
        && c3 == 3 * heads * ATTENTION_HEAD_DIM
        && b * heads <= 65_535
        && b * n * c3 < u32::MAX as usize
}

/// The composed attention every device can run: the output (B, N, C) and the attention weights
/// (B, heads, N, N), for `qkv` as in [`attention_no_grad`]. Scales the logits inside the softmax,
/// after q·kᵀ, as the official `(q @ k.transpose(-2, -1)) * self.scale`.
pub fn attention_composed(qkv: &Tensor, heads: usize, scale: f64) -> Result<(Tensor, Tensor)> {
    let (b, n, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let qkv = qkv
        .reshape((b, n, 3, heads, c / heads))?
        .permute((2, 0, 3, 1, 4))?
        // One copy into (3, B, heads, N, head dim): q, k and v are then contiguous slices.
        .contiguous()?;
    let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
    let attn = super::attention_probabilities(&q.matmul(&k.t()?)?, scale)?;
    let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
    Ok((out, attn))
}

struct FusedAttention {
    heads: usize,
    scale: f32,
}

impl CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "dino-attention-no-grad"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused attention kernel runs on CUDA only (the CPU has ops::attention)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::run(s, l, self.heads, self.scale)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Result, Shape};

    use super::super::cuda::view;
    use super::super::launch;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

    pub(super) fn run(s: &CudaStorage, l: &Layout, heads: usize, scale: f32) -> Result<(CudaStorage, Shape)> {
        let dev = s.device();
        let (b, n, c3) = l.shape().dims3()?;
        let qkv = view::<half::bf16>(s, l, "attention")?;
        let func = dev.get_or_load_custom_func("dino_attention_fwd_bf16", "dino_rs_attention", PTX)?;
        // SAFETY: the kernel writes every element (each token of each head).
        let out = unsafe { dev.alloc::<half::bf16>(b * n * c3 / 3)? };
        let (tokens, h) = (n as u32, heads as u32);
        let mut builder = func.builder();
        builder.arg(&qkv).arg(&out).arg(&tokens).arg(&h).arg(&scale);
        // SAFETY: the arguments follow dino_attention_fwd_bf16's signature; qkv holds B × N × 3 ×
        // heads × 64 bf16 from a 16-byte aligned start (checked by the caller), out B × N × heads × 64.
        unsafe { builder.launch(launch::attention(b, n, heads).into()) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((b, n, c3 / 3)),
        ))
    }
}
