//! Linear layers with DINO's initialisation (trunc_normal(std=0.02) weights, zero bias). The
//! official truncation bounds are ±2 absolute, i.e. 100 standard deviations: a plain normal.

use candle_core::Result;
use candle_nn::{Init, Linear, VarBuilder};

pub const TRUNC_NORMAL_STD: f64 = 0.02;

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
