//! The transformer MLP: `fc1` → exact (erf) GELU → `fc2`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::linear::{linear, Linear};

#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(dim, hidden, true, vb.pp("fc1"))?,
            fc2: linear(hidden, dim, true, vb.pp("fc2"))?,
        })
    }

    pub fn fc1(&self) -> &Linear {
        &self.fc1
    }

    pub fn fc2(&self) -> &Linear {
        &self.fc2
    }

    /// `gelu(fc1(x))`: everything before `fc2`.
    pub fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        self.fc1.forward_gelu(x)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.hidden(x)?)
    }
}
