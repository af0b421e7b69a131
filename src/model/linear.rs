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

/// How a new model's linear layers start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearInit {
    /// DINO's `_init_weights`: weights N(0, 0.02) (its truncation at ±2 never bites), biases 0.
    #[default]
    Dino,
    /// PyTorch's `nn.Linear` default, which DINO overrides: weights and biases U(±1/√fan_in).
    /// Much larger weights for narrow layers (±0.125 at width 64 against 0.02); on small data
    /// it is the start that learns (docs/recipe.md).
    Torch,
}

impl LinearInit {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "dino" => Some(Self::Dino),
            "torch" => Some(Self::Torch),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Dino => "dino",
            Self::Torch => "torch",
        }
    }
}

pub fn linear(in_dim: usize, out_dim: usize, bias: bool, init: LinearInit, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (in_dim.max(1) as f64).sqrt();
    let (w_init, b_init) = match init {
        LinearInit::Dino => (
            Init::Randn {
                mean: 0.0,
                stdev: TRUNC_NORMAL_STD,
            },
            Init::Const(0.0),
        ),
        LinearInit::Torch => (
            Init::Uniform { lo: -bound, up: bound },
            Init::Uniform { lo: -bound, up: bound },
        ),
    };
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", w_init)?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", b_init)?)
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
