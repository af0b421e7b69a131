//! Multi-head self-attention as in the official ViT (`qkv` with bias, scaled dot product,
//! `proj`). On the CPU in f32 the core is the fused [`crate::ops::attention`]; the explicit
//! version below also returns the attention weights (for attention maps) and runs elsewhere. Softmax is [`crate::ops::softmax_last_dim`], which has a backward pass (candle-nn's
//! fused `softmax_last_dim` does not).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::linear::{linear, Linear};

#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    pub fn new(dim: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        let head_dim = dim / num_heads;
        Ok(Self {
            qkv: linear(dim, 3 * dim, true, vb.pp("qkv"))?,
            proj: linear(dim, dim, true, vb.pp("proj"))?,
            num_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    pub fn qkv(&self) -> &Linear {
        &self.qkv
    }

    pub fn proj(&self) -> &Linear {
        &self.proj
    }

    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// Returns the output (B, N, D) and the attention weights (B, heads, N, N).
    pub fn forward_with_attention(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, n, c) = x.dims3()?;
        let h = self.num_heads;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, h, c / h))?
            .permute((2, 0, 3, 1, 4))?
            // One copy into (3, B, heads, N, head dim): q, k and v are then contiguous slices.
            .contiguous()?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let attn = crate::ops::attention_probabilities(&q.matmul(&k.t()?)?, self.scale)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        Ok((self.proj.forward(&out)?, attn))
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !crate::ops::fused(x) {
            return Ok(self.forward_with_attention(x)?.0);
        }
        let qkv = self.qkv.forward(x)?;
        self.proj
            .forward(&crate::ops::attention(&qkv, self.num_heads, self.scale)?)
    }
}
