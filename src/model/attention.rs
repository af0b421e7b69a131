//! Multi-head self-attention as in the official ViT (`qkv` with bias, scaled dot product,
//! `proj`). On the CPU in f32 the core is the fused [`crate::ops::attention`]; on CUDA in bf16,
//! where nothing needs a gradient, the fused kernel of [`crate::ops::flash_attention`];
//! elsewhere [`crate::ops::attention_composed`], which also returns the attention weights (for
//! attention maps). Its softmax has a backward pass (candle-nn's fused `softmax_last_dim` does not).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::linear::{linear, Linear, LinearInit};

#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    pub fn new(dim: usize, num_heads: usize, init: LinearInit, vb: VarBuilder) -> Result<Self> {
        let head_dim = dim / num_heads;
        Ok(Self {
            qkv: linear(dim, 3 * dim, true, init, vb.pp("qkv"))?,
            proj: linear(dim, dim, true, init, vb.pp("proj"))?,
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
        let qkv = self.qkv.forward(x)?;
        let (out, attn) = crate::ops::attention_composed(&qkv, self.num_heads, self.scale)?;
        Ok((self.proj.forward(&out)?, attn))
    }
}

impl Attention {
    /// The heads' outputs merged, (B, N, D): everything before `proj`.
    pub fn attend(&self, x: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        if crate::ops::fused(x) {
            crate::ops::attention(&qkv, self.num_heads, self.scale)
        } else if let Some(out) = crate::ops::flash_attention(&qkv, self.num_heads, self.scale)? {
            Ok(out)
        } else {
            Ok(crate::ops::attention_composed(&qkv, self.num_heads, self.scale)?.0)
        }
    }
}

impl Attention {
    /// [`Self::attend`] for the first token's query only, `(B, 1, D)`: every token is still a key
    /// and a value, so the result is row 0 of `attend(x)`, for the cost of the k and v projections
    /// (2·D² per token instead of 3·D², and one query's scores instead of N). Differentiable.
    pub fn attend_first(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, d) = x.dims3()?;
        let (heads, w, bias) = (self.num_heads, self.qkv.weight(), self.qkv.bias());
        let rows = |start: usize, len: usize| bias.map(|t| t.narrow(0, start, len)).transpose();
        let q = crate::ops::linear(&x.narrow(1, 0, 1)?, &w.narrow(0, 0, d)?, rows(0, d)?.as_ref())?;
        let kv = crate::ops::linear(x, &w.narrow(0, d, 2 * d)?, rows(d, 2 * d)?.as_ref())?;
        let kv = crate::ops::split_heads(&kv, 2, heads)?;
        let (k, v) = (kv.get(0)?, kv.get(1)?);
        // With one token, (B, 1, heads, hd) and (B, heads, 1, hd) are the same memory.
        let q = q.reshape((b, heads, 1, d / heads))?;
        let p = crate::ops::attention_probabilities(&q.matmul(&k.t()?)?, self.scale)?;
        p.matmul(&v)?.reshape((b, 1, d))
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(&self.attend(x)?)
    }
}
