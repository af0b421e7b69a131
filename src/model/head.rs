//! The DINO projection head (official `DINOHead`): an MLP (in → hidden → … → bottleneck, GELU),
//! L2 normalisation, and a weight-normalised linear layer without bias to `out_dim`. With
//! `norm_last_layer` the weight's norm (`weight_g`) stays fixed at 1 and is not trained.

use candle_core::{DType, Module, Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};

use super::linear::{linear, Linear, LinearInit};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadConfig {
    pub in_dim: usize,
    pub out_dim: usize,
    pub hidden_dim: usize,
    pub bottleneck_dim: usize,
    pub nlayers: usize,
    pub norm_last_layer: bool,
    #[serde(default)]
    pub init: LinearInit,
}

/// Upper bounds [`HeadConfig::validate`] accepts (the official head: 3 layers, width 2048, 65536 out).
pub const MAX_HEAD_WIDTH: usize = 1 << 22;
pub const MAX_HEAD_LAYERS: usize = 64;

impl HeadConfig {
    /// Positive widths and bounded sizes: configurations also come from files (saved metadata).
    pub fn validate(&self) -> crate::Result<()> {
        let dims = [self.in_dim, self.out_dim, self.hidden_dim, self.bottleneck_dim];
        crate::error::ensure(
            dims.iter().all(|&d| (1..=MAX_HEAD_WIDTH).contains(&d)) && self.nlayers <= MAX_HEAD_LAYERS,
            || {
                format!(
                    "head in_dim, out_dim, hidden_dim and bottleneck_dim must be in [1, {MAX_HEAD_WIDTH}] and nlayers at most {MAX_HEAD_LAYERS}, got {:?} and {}",
                    dims, self.nlayers
                )
            },
        )
    }

    pub fn new(in_dim: usize, out_dim: usize) -> Self {
        Self {
            in_dim,
            out_dim,
            hidden_dim: 2048,
            bottleneck_dim: 256,
            nlayers: 3,
            norm_last_layer: true,
            init: LinearInit::Dino,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DinoHead {
    mlp: Vec<Linear>,
    weight_g: Tensor,
    weight_v: Tensor,
}

/// `F.normalize(x, dim=-1)`: x / max(‖x‖, 1e-12), in f32 under autocast (as PyTorch's `norm`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let x = &crate::ops::autocast::widen(x)?;
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}

impl DinoHead {
    pub fn new(c: &HeadConfig, vb: VarBuilder) -> Result<Self> {
        let nlayers = c.nlayers.max(1);
        let vm = vb.pp("mlp");
        let mut mlp = Vec::with_capacity(nlayers);
        if nlayers == 1 {
            mlp.push(linear(c.in_dim, c.bottleneck_dim, true, c.init, vm.pp("0"))?);
        } else {
            // Sequential indices skip the GELUs: 0, 2, 4, ...
            mlp.push(linear(c.in_dim, c.hidden_dim, true, c.init, vm.pp("0"))?);
            for i in 1..nlayers - 1 {
                mlp.push(linear(c.hidden_dim, c.hidden_dim, true, c.init, vm.pp(2 * i))?);
            }
            mlp.push(linear(
                c.hidden_dim,
                c.bottleneck_dim,
                true,
                c.init,
                vm.pp(2 * (nlayers - 1)),
            )?);
        }
        let vl = vb.pp("last_layer");
        // nn.Linear's default init (the official code leaves the last layer to it).
        let bound = 1.0 / (c.bottleneck_dim as f64).sqrt();
        let weight_v = vl.get_with_hints(
            (c.out_dim, c.bottleneck_dim),
            "weight_v",
            Init::Uniform { lo: -bound, up: bound },
        )?;
        let weight_g = vl.get_with_hints((c.out_dim, 1), "weight_g", Init::Const(1.0))?;
        Ok(Self {
            mlp,
            weight_g,
            weight_v,
        })
    }

    /// The bottleneck features after the MLP and L2 normalisation.
    pub fn bottleneck(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, layer) in self.mlp.iter().enumerate() {
            x = if i + 1 < self.mlp.len() {
                layer.forward_gelu(&x)?
            } else {
                layer.forward(&x)?
            };
        }
        l2_normalize(&x)
    }

    /// The last layer's effective weight g · v / ‖v‖ (norm over each output row).
    pub fn last_layer_weight(&self) -> Result<Tensor> {
        crate::ops::weight_norm(&self.weight_v, &self.weight_g)
    }

    /// The last layer's weight, as `dtype` (the matmul's: bf16 under autocast), as a leaf of its
    /// own for a training step: the step's graph ends there, and [`DinoHead::last_layer_grads`]
    /// turns its gradient into v's and g's once the graph is freed. Inside the graph, the weight
    /// norm's backward ran first in the backward pass, with every activation still alive, and
    /// candle's autograd added two weight-sized f32 buffers to its output there (a zero-filled
    /// gradient and the sum into it): the step's peak memory at the official out_dim of 65,536.
    pub fn last_layer_leaf(&self, dtype: DType) -> Result<Var> {
        let w = crate::ops::weight_norm_to(&self.weight_v, &self.weight_g, Some(dtype))?;
        Var::from_tensor(&w.detach())
    }

    /// The gradients of `weight_v` and `weight_g` from that of [`DinoHead::last_layer_leaf`]'s weight.
    pub fn last_layer_grads(&self, dw: &Tensor) -> Result<(Tensor, Tensor)> {
        crate::ops::weight_norm_backward(dw, &self.weight_v, &self.weight_g)
    }

    pub fn weight_v(&self) -> &Tensor {
        &self.weight_v
    }

    pub fn weight_g(&self) -> &Tensor {
        &self.weight_g
    }

    /// The head with `weight` as its last layer's weight (see [`DinoHead::last_layer_leaf`]).
    pub fn forward_with(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        crate::ops::linear(&self.bottleneck(x)?, weight, None)
    }
}

impl Module for DinoHead {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Under autocast the weight is made in bf16, what the matmul casts it to.
        let weight = crate::ops::weight_norm_to(&self.weight_v, &self.weight_g, crate::ops::autocast::active())?;
        self.forward_with(x, &weight)
    }
}
