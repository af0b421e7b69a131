//! The transformer MLP: `fc1` → exact (erf) GELU → `fc2`, or DINOv2's fused SwiGLU (ViT-g):
//! `w12` → silu(first half) · second half → `w3`.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::linear::{linear, Linear, LinearInit};
use super::vit::Ffn;

#[derive(Debug, Clone)]
pub struct Mlp {
    /// `fc1` (GELU) or `w12` (SwiGLU: both halves in one matmul, as DINOv2 stores them).
    inner: Linear,
    /// `fc2` or `w3`.
    out: Linear,
    ffn: Ffn,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, ffn: Ffn, init: LinearInit, vb: VarBuilder) -> Result<Self> {
        let (inner, out) = match ffn {
            Ffn::Mlp => (
                linear(dim, hidden, true, init, vb.pp("fc1"))?,
                linear(hidden, dim, true, init, vb.pp("fc2"))?,
            ),
            Ffn::Swiglu => (
                linear(dim, 2 * hidden, true, init, vb.pp("w12"))?,
                linear(hidden, dim, true, init, vb.pp("w3"))?,
            ),
        };
        Ok(Self { inner, out, ffn })
    }

    /// DINO's `fc1`; None for SwiGLU, whose first layer is not followed by a GELU.
    pub fn fc1(&self) -> Option<&Linear> {
        (self.ffn == Ffn::Mlp).then_some(&self.inner)
    }

    /// The output layer (`fc2`, or SwiGLU's `w3`).
    pub fn fc2(&self) -> &Linear {
        &self.out
    }

    /// Everything before the output layer.
    pub fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        match self.ffn {
            Ffn::Mlp => self.inner.forward_gelu(x),
            Ffn::Swiglu => {
                let x12 = self.inner.forward(x)?;
                let h = x12.dim(D::Minus1)? / 2;
                candle_nn::ops::silu(&x12.narrow(D::Minus1, 0, h)?)?.mul(&x12.narrow(D::Minus1, h, h)?)
            }
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.hidden(x)?)
    }
}
