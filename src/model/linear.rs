//! `nn.Linear` with DINO's initialisation (trunc_normal(std=0.02) weights, zero bias; the official
//! truncation bounds are ±2 absolute, i.e. 100 standard deviations: a plain normal). Inputs of any
//! rank go through one (rows, in) × (in, out) matmul, and the bias through [`crate::ops::add_bias`].

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
    /// `x · weightᵀ` without the bias (for callers that fuse the bias into what follows).
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let (rows, k) = match dims {
            [] => candle_core::bail!("linear: a scalar has no features"),
            [k] => (1, *k),
            [.., k] => (x.elem_count() / k.max(&1), *k),
        };
        // A broadcast (batched) matmul would give the weight a per-batch gradient to sum afterwards.
        let y = x.contiguous()?.reshape((rows, k))?.matmul(&self.weight.t()?)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked non-empty above") = self.weight.dim(0)?;
        y.reshape(out_dims)
    }

    /// `gelu_erf(x · weightᵀ + bias)` with the bias and the activation fused.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.matmul(x)?;
        match &self.bias {
            Some(b) => crate::ops::bias_gelu(&y, b),
            None => crate::ops::gelu_erf(&y),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.matmul(x)?;
        match &self.bias {
            Some(b) => crate::ops::add_bias(&y, b),
            None => Ok(y),
        }
    }
}
