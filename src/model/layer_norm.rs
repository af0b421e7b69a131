//! LayerNorm with a backward pass: candle-nn's fused `LayerNorm` has none, so gradients through
//! it silently stop (docs/design.md, Gradients). The kernel is [`crate::ops::layer_norm`].

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The output as the input of a linear layer: in bf16 under bf16 autocast, as the layer would
    /// cast it ([`crate::ops::layer_norm_lowered`]); as [`Module::forward`] otherwise.
    pub fn forward_lowered(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::layer_norm_lowered(x, &self.weight, &self.bias, self.eps)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}
