//! A pre-norm transformer block with stochastic depth:
//! x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x))). The whole block is one graph
//! node: [`crate::ops::transformer_block`] on the CPU in f32, [`crate::ops::transformer_block_portable`]
//! elsewhere when something needs a gradient; otherwise (inference, the teacher) layer by layer.
//! DINOv2's LayerScale enters the block nodes folded into `attn.proj` and `mlp.fc2` (see
//! [`Block::folded_params`]); its SwiGLU blocks (ViT-g) always run layer by layer, since the block
//! nodes take exactly DINO's twelve parameters.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::Attention;
use super::layer_norm::LayerNorm;
use super::linear::Linear;
use super::mlp::Mlp;
use super::vit::{VitConfig, LAYER_SCALE_INIT};

pub const LN_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
    /// LayerScale's `ls1.gamma` and `ls2.gamma` (D,), DINOv2 only.
    layer_scale: Option<[Tensor; 2]>,
}

/// Per-sample keep masks (0 or 1/keep_prob) for the two residual branches.
pub struct DropPathMasks {
    pub attn: Vec<f32>,
    pub mlp: Vec<f32>,
    /// The same two as (B,) tensors on the device, for the layer-by-layer path (slices of one
    /// upload per forward pass).
    pub on_device: Option<[Tensor; 2]>,
}

/// `x + branch · mask` with branch `which` (0: attention, 1: MLP) of `masks`.
fn residual(x: &Tensor, branch: Tensor, masks: Option<&DropPathMasks>, which: usize) -> Result<Tensor> {
    match masks {
        Some(DropPathMasks {
            on_device: Some(dev), ..
        }) if !crate::ops::fused(x) => crate::ops::residual_with_mask(x, &branch, Some(&dev[which])),
        Some(m) => crate::ops::residual(x, &branch, Some([&m.attn, &m.mlp][which].as_slice())),
        None => crate::ops::residual(x, &branch, None),
    }
}

/// [`residual`] with the branch `layer(input)`: off the fused CPU path one graph node
/// ([`crate::ops::linear_residual`]), so that the layer's output is not kept for the backward pass.
fn residual_after(
    x: &Tensor,
    layer: &Linear,
    input: &Tensor,
    masks: Option<&DropPathMasks>,
    which: usize,
) -> Result<Tensor> {
    let mask = match masks {
        None => Some(None),
        Some(DropPathMasks {
            on_device: Some(dev), ..
        }) => Some(Some(&dev[which])),
        Some(_) => None,
    };
    if let (Some(mask), Some(bias)) = (mask, layer.bias()) {
        if let Some(out) = crate::ops::linear_residual(x, input, layer.weight(), bias, mask)? {
            return Ok(out);
        }
    }
    residual(x, layer.forward(input)?, masks, which)
}

impl Block {
    pub fn new(config: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let dim = config.embed_dim;
        let gamma = |name: &str| {
            let init = candle_nn::Init::Const(LAYER_SCALE_INIT);
            vb.pp(name).get_with_hints(dim, "gamma", init)
        };
        let layer_scale = config
            .layer_scale
            .then(|| Ok::<_, candle_core::Error>([gamma("ls1")?, gamma("ls2")?]));
        Ok(Self {
            norm1: LayerNorm::new(dim, LN_EPS, vb.pp("norm1"))?,
            attn: Attention::new(dim, config.num_heads, config.init, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, LN_EPS, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, config.mlp_hidden(), config.ffn, config.init, vb.pp("mlp"))?,
            layer_scale: layer_scale.transpose()?,
        })
    }

    pub fn forward_masked(&self, x: &Tensor, masks: Option<&DropPathMasks>) -> Result<Tensor> {
        let (heads, eps) = (self.attn.num_heads(), self.norm1.eps());
        // A LayerScale block takes the fused node with its gammas folded in, else runs scaled
        // layer by layer (it never takes the portable node, which has no gammas).
        let folded;
        let params = match &self.layer_scale {
            None => self.params(),
            Some(gammas) => {
                folded = if crate::ops::fused(x) {
                    self.folded_params(gammas)?
                } else {
                    None
                };
                match &folded {
                    Some(p) => Some(std::array::from_fn(|i| &p[i])),
                    None => return self.forward_layers(x, masks),
                }
            }
        };
        if let Some(params) = params {
            if crate::ops::fused(x) {
                let keep = masks.map_or([None, None], |m| [Some(m.attn.as_slice()), Some(m.mlp.as_slice())]);
                return crate::ops::transformer_block(x, params, heads, eps, keep);
            }
            let on_device = match masks {
                None => Some(None),
                Some(DropPathMasks {
                    on_device: Some([attn, mlp]),
                    ..
                }) => Some(Some([attn, mlp])),
                Some(_) => None,
            };
            if let Some(masks) = on_device {
                if let Some(y) = crate::ops::transformer_block_portable(x, params, heads, eps, masks)? {
                    return Ok(y);
                }
            }
        }
        self.forward_layers(x, masks)
    }

    /// Layer by layer: the reference the fused block is tested against.
    pub fn forward_layers(&self, x: &Tensor, masks: Option<&DropPathMasks>) -> Result<Tensor> {
        // The norms feed the qkv and fc1 layers: under autocast they write bf16 directly.
        let attended = self.attn.attend(&self.norm1.forward_lowered(x)?)?;
        self.after_attention(x, &attended, masks)
    }

    /// The block's output for the first (CLS) token only, `(B, 1, D)`, with every token still
    /// attended to: row 0 of [`Self::forward_masked`]. For a last block whose other rows nobody
    /// reads (CLS features, the DINO head), it costs the k and v projections of all tokens and
    /// the rest for one: about a sixth of the block's matmul work.
    pub fn forward_cls(&self, x: &Tensor, masks: Option<&DropPathMasks>) -> Result<Tensor> {
        let attended = self.attn.attend_first(&self.norm1.forward_lowered(x)?)?;
        self.after_attention(&x.narrow(1, 0, 1)?, &attended, masks)
    }

    /// Everything after the heads' merged outputs `attended`: proj and its residual onto `x`, then
    /// the MLP's. DINOv2's blocks scale each branch per channel before its add.
    fn after_attention(&self, x: &Tensor, attended: &Tensor, masks: Option<&DropPathMasks>) -> Result<Tensor> {
        let Some(gammas) = &self.layer_scale else {
            let x = residual_after(x, self.attn.proj(), attended, masks, 0)?;
            let hidden = self.mlp.hidden(&self.norm2.forward_lowered(&x)?)?;
            return residual_after(&x, self.mlp.fc2(), &hidden, masks, 1);
        };
        let scaled = |branch: Tensor, gamma: &Tensor| {
            // As PyTorch's `x * gamma` under autocast: the wider dtype.
            let gamma = crate::ops::autocast::promote_to(&branch, gamma)?;
            let branch = crate::ops::autocast::promote_to(&gamma, &branch)?;
            branch.broadcast_mul(&gamma)
        };
        let x = residual(x, scaled(self.attn.proj().forward(attended)?, &gammas[0])?, masks, 0)?;
        let mlp = self.mlp.forward(&self.norm2.forward_lowered(&x)?)?;
        residual(&x, scaled(mlp, &gammas[1])?, masks, 1)
    }

    /// [`Self::params`] with LayerScale folded in: `γ ⊙ (W x + b)` is `(diag(γ) W) x + γ ⊙ b`, so
    /// scaling the rows of `attn.proj` and `mlp.fc2` and their biases makes a DINOv2 block a DINO
    /// block, and it runs as one fused node instead of layer by layer (DINOv2 features at DINO's
    /// speed). Computed on every call from the current tensors: a few D×D products, nothing
    /// cached that training could make stale, and gradients reach γ through the products. Only on
    /// the fused CPU f32 path; elsewhere the scaled layer-by-layer block keeps PyTorch's order of
    /// rounding under autocast.
    fn folded_params(&self, gammas: &[Tensor; 2]) -> Result<Option<[Tensor; 12]>> {
        let Some(params) = self.params() else {
            return Ok(None);
        };
        let mut out = params.map(|t| t.clone());
        use crate::ops::Param::{Fc2Bias, Fc2Weight, ProjBias, ProjWeight};
        for (gamma, (w, b)) in gammas.iter().zip([(ProjWeight, ProjBias), (Fc2Weight, Fc2Bias)]) {
            out[w as usize] = params[w].broadcast_mul(&gamma.unsqueeze(1)?)?;
            out[b as usize] = params[b].mul(gamma)?;
        }
        Ok(Some(out))
    }

    /// The parameters in [`crate::ops::BLOCK_PARAMS`] order (None if a linear layer has no bias,
    /// or the MLP is not DINO's).
    fn params(&self) -> Option<[&Tensor; 12]> {
        let (qkv, proj) = (self.attn.qkv(), self.attn.proj());
        let (fc1, fc2) = (self.mlp.fc1()?, self.mlp.fc2());
        Some([
            self.norm1.weight(),
            self.norm1.bias(),
            qkv.weight(),
            qkv.bias()?,
            proj.weight(),
            proj.bias()?,
            self.norm2.weight(),
            self.norm2.bias(),
            fc1.weight(),
            fc1.bias()?,
            fc2.weight(),
            fc2.bias()?,
        ])
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
