//! A pre-norm transformer block with stochastic depth:
//! x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x))).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::Attention;
use super::layer_norm::LayerNorm;
use super::mlp::Mlp;

pub const LN_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
}

/// Per-sample keep masks (0 or 1/keep_prob) for the two residual branches.
pub struct DropPathMasks {
    pub attn: Vec<f32>,
    pub mlp: Vec<f32>,
}

fn residual(x: &Tensor, branch: Tensor, mask: Option<&Vec<f32>>) -> Result<Tensor> {
    crate::ops::residual(x, &branch, mask.map(|m| m.as_slice()))
}

impl Block {
    pub fn new(dim: usize, num_heads: usize, mlp_ratio: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(dim, LN_EPS, vb.pp("norm1"))?,
            attn: Attention::new(dim, num_heads, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, LN_EPS, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, (dim as f64 * mlp_ratio) as usize, vb.pp("mlp"))?,
        })
    }

    pub fn forward_masked(&self, x: &Tensor, masks: Option<&DropPathMasks>) -> Result<Tensor> {
        let x = residual(x, self.attn.forward(&self.norm1.forward(x)?)?, masks.map(|m| &m.attn))?;
        residual(&x, self.mlp.forward(&self.norm2.forward(&x)?)?, masks.map(|m| &m.mlp))
    }

    /// The attention weights this block computes for `x` (the official `get_last_selfattention`).
    pub fn attention(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.attn.forward_with_attention(&self.norm1.forward(x)?)?.1)
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_masked(x, None)
    }
}
