//! `nn.Linear` with DINO's initialisation (trunc_normal(std=0.02) weights, zero bias; the official
//! truncation bounds are ±2 absolute, i.e. 100 standard deviations: a plain normal). Inputs of any
//! rank go through [`crate::ops::linear`], one (rows, in) × (in, out) matmul.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

pub const TRUNC_NORMAL_STD: f64 = 0.02;

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: TRUNC_NORMAL_STD,
        },
    )?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

impl Linear {
    /// `gelu_erf(x · weightᵀ + bias)` with the bias and the activation fused.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        let y = crate::ops::linear(x, &self.weight, None)?;
        match &self.bias {
            Some(b) => crate::ops::bias_gelu(&y, b),
            None => crate::ops::gelu_erf(&y),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::linear(x, &self.weight, self.bias.as_ref())
    }
}
