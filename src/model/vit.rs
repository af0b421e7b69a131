//! The Vision Transformer backbone of DINO (the official `vision_transformer.py`): conv patch
//! embedding, CLS token, learned position embedding resized per crop size, pre-norm blocks with
//! stochastic depth, final LayerNorm; the output is the CLS token.
//!
//! The same module is DINOv2's backbone (its `DinoVisionTransformer`, inference as its hub
//! models run): optional register tokens between the CLS token and the patches, LayerScale on
//! both residual branches, and a SwiGLU MLP (ViT-g). Its position embedding is resized exactly as
//! DINO's (bicubic, scale factor with the 0.1 offset, no antialiasing), so one code path serves both.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use rand::Rng;

use super::block::{Block, DropPathMasks, LN_EPS};
use super::layer_norm::LayerNorm;
use super::linear::{LinearInit, TRUNC_NORMAL_STD};
use super::patch_embed::PatchEmbed;
use super::pos_embed::{self, PosInterpolation};

/// Upper bounds [`VitConfig::validate`] accepts (far above the official ViT-B/8: 224, 768, 12).
pub const MAX_IMG_SIZE: usize = 1 << 16;
pub const MAX_WIDTH: usize = 1 << 16;
pub const MAX_DEPTH: usize = 1 << 12;

/// Backbone hyper-parameters. Presets follow the official `vit_tiny/small/base`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VitConfig {
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub drop_path_rate: f64,
    /// DINOv2's register tokens, between the CLS token and the patches (0: none, as in DINO).
    #[serde(default)]
    pub num_register_tokens: usize,
    /// DINOv2's LayerScale (`ls1.gamma`, `ls2.gamma`): a learned per-channel scale on each
    /// residual branch, initialised to [`LAYER_SCALE_INIT`].
    #[serde(default)]
    pub layer_scale: bool,
    #[serde(default)]
    pub ffn: Ffn,
    #[serde(default)]
    pub family: Family,
    /// How the position grid is resized for other crop sizes: DINOv2's `_reg` models are antialiased.
    #[serde(default)]
    pub pos_interpolation: PosInterpolation,
    /// How a new model's linear layers start (DINO's scheme or PyTorch's default).
    #[serde(default)]
    pub init: LinearInit,
}

/// DINOv2's LayerScale initial value (its `layerscale` configuration).
pub const LAYER_SCALE_INIT: f64 = 1e-5;

/// The MLP of each block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ffn {
    /// fc1 → exact GELU → fc2 (DINO; DINOv2 ViT-S/B/L).
    #[default]
    Mlp,
    /// DINOv2's fused SwiGLU (ViT-g): `w12` → silu(first half) · second half → `w3`, its width
    /// `mlp_ratio·D·2/3` rounded up to a multiple of 8.
    Swiglu,
}

/// Which published family a backbone follows where they differ outside the weights: the
/// evaluation transform's crop (DINO: the training size; DINOv2: 224 from 256 whatever the
/// 518-pixel position grid) and the names written by `export_backbone`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Dino,
    Dinov2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Dino => "dino",
            Family::Dinov2 => "dinov2",
        }
    }
}

impl VitConfig {
    /// Whether an `h`×`w` crop fits the patch grid (both sides multiples of the patch size): the
    /// forward pass and the trainer's checks of a caller's crops say so in the same words.
    pub fn check_crop(&self, h: usize, w: usize) -> crate::Result<()> {
        let p = self.patch_size;
        if h.is_multiple_of(p) && w.is_multiple_of(p) {
            return Ok(());
        }
        Err(crate::Error::Shape(format!(
            "crop size {h}x{w} is not a multiple of the patch size {p}"
        )))
    }

    pub fn custom(embed_dim: usize, depth: usize, num_heads: usize, patch_size: usize, img_size: usize) -> Self {
        Self {
            img_size,
            patch_size,
            in_chans: 3,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            drop_path_rate: 0.0,
            num_register_tokens: 0,
            layer_scale: false,
            ffn: Ffn::Mlp,
            family: Family::Dino,
            pos_interpolation: PosInterpolation::Offset,
            init: LinearInit::Dino,
        }
    }

    /// The MLP's hidden width (DINOv2's rule for SwiGLU).
    pub fn mlp_hidden(&self) -> usize {
        let hidden = (self.embed_dim as f64 * self.mlp_ratio) as usize;
        match self.ffn {
            Ffn::Mlp => hidden,
            Ffn::Swiglu => (hidden * 2 / 3).div_ceil(8) * 8,
        }
    }

    /// The crop size of the evaluation transform (resize the short side to 256/224 of it, centre
    /// crop): each family's official one.
    pub fn eval_size(&self) -> usize {
        match self.family {
            Family::Dino => self.img_size,
            Family::Dinov2 => 224usize.div_ceil(self.patch_size) * self.patch_size,
        }
    }

    /// Tokens before the patches: CLS and the registers.
    pub fn num_prefix_tokens(&self) -> usize {
        1 + self.num_register_tokens
    }
    pub fn vit_tiny(patch_size: usize) -> Self {
        Self::custom(192, 12, 3, patch_size, 224)
    }
    pub fn vit_small(patch_size: usize) -> Self {
        Self::custom(384, 12, 6, patch_size, 224)
    }
    pub fn vit_base(patch_size: usize) -> Self {
        Self::custom(768, 12, 12, patch_size, 224)
    }
    pub fn preset(arch: &str, patch_size: usize) -> Option<Self> {
        match arch {
            "vit_tiny" => Some(Self::vit_tiny(patch_size)),
            "vit_small" => Some(Self::vit_small(patch_size)),
            "vit_base" => Some(Self::vit_base(patch_size)),
            _ => None,
        }
    }
    pub fn num_patches(&self) -> usize {
        (self.img_size / self.patch_size).pow(2)
    }
    pub fn validate(&self) -> crate::Result<()> {
        use crate::error::ensure;
        ensure(
            self.patch_size > 0 && self.img_size >= self.patch_size && self.img_size.is_multiple_of(self.patch_size),
            || {
                format!(
                    "img_size ({}) must be a positive multiple of patch_size ({})",
                    self.img_size, self.patch_size
                )
            },
        )?;
        ensure(self.embed_dim > 0 && self.depth > 0 && self.num_heads > 0, || {
            "embed_dim, depth and num_heads must be positive".into()
        })?;
        ensure(self.embed_dim.is_multiple_of(self.num_heads), || {
            format!(
                "embed_dim ({}) must be divisible by num_heads ({})",
                self.embed_dim, self.num_heads
            )
        })?;
        ensure((0.0..1.0).contains(&self.drop_path_rate), || {
            format!("drop_path_rate must be in [0, 1), got {}", self.drop_path_rate)
        })?;
        // Configurations also come from files (a saved model's metadata): bounds far above any
        // real ViT keep every size derived from them (patch counts, fan-ins, MLP width) in range.
        ensure(
            self.img_size <= MAX_IMG_SIZE && self.embed_dim <= MAX_WIDTH && self.depth <= MAX_DEPTH,
            || {
                format!(
                    "img_size ({}) must be at most {MAX_IMG_SIZE}, embed_dim ({}) at most {MAX_WIDTH} and depth ({}) at most {MAX_DEPTH}",
                    self.img_size, self.embed_dim, self.depth
                )
            },
        )?;
        ensure(self.num_register_tokens <= 1024, || {
            format!(
                "num_register_tokens must be at most 1024, got {}",
                self.num_register_tokens
            )
        })?;
        ensure(self.in_chans == 3, || {
            format!("in_chans must be 3 (RGB crops), got {}", self.in_chans)
        })?;
        let hidden = self.embed_dim as f64 * self.mlp_ratio;
        ensure((1.0..=MAX_WIDTH as f64 * 16.0).contains(&hidden), || {
            format!(
                "mlp_ratio ({}) must give an MLP width between 1 and {} (embed_dim {})",
                self.mlp_ratio,
                MAX_WIDTH * 16,
                self.embed_dim
            )
        })
    }
}

#[derive(Debug, Clone)]
pub struct VisionTransformer {
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    register_tokens: Option<Tensor>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    config: VitConfig,
}

impl VisionTransformer {
    pub fn new(config: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let d = config.embed_dim;
        let patch_embed = PatchEmbed::new(config.patch_size, config.in_chans, d, vb.pp("patch_embed"))?;
        let tn = Init::Randn {
            mean: 0.0,
            stdev: TRUNC_NORMAL_STD,
        };
        let pos_embed = vb.get_with_hints((1, config.num_patches() + 1, d), "pos_embed", tn)?;
        let cls_token = vb.get_with_hints((1, 1, d), "cls_token", tn)?;
        // DINOv2 initialises registers N(0, 1e-6); a loaded model brings its own.
        let register_tokens = (config.num_register_tokens > 0)
            .then(|| {
                let init = Init::Randn { mean: 0.0, stdev: 1e-6 };
                vb.get_with_hints((1, config.num_register_tokens, d), "register_tokens", init)
            })
            .transpose()?;
        let blocks = (0..config.depth)
            .map(|i| Block::new(config, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(d, LN_EPS, vb.pp("norm"))?;
        Ok(Self {
            patch_embed,
            cls_token,
            pos_embed,
            register_tokens,
            blocks,
            norm,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// The position embedding for an `h`×`w` pixel crop, `(1, 1 + h/p·w/p, D)`.
    pub fn interpolate_pos_encoding(&self, h: usize, w: usize) -> Result<Tensor> {
        let p = self.config.patch_size;
        let n = self.pos_embed.dim(1)? - 1;
        let cls = self.pos_embed.narrow(1, 0, 1)?;
        let patches = self.pos_embed.narrow(1, 1, n)?;
        Tensor::cat(
            &[
                &cls,
                &pos_embed::interpolate(&patches, h / p, w / p, self.config.pos_interpolation)?,
            ],
            1,
        )
    }

    /// Tokens before the first block: CLS + patch embeddings + position embedding, then the
    /// registers (if any) inserted after the CLS token, which get no position embedding.
    pub fn prepare_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        self.config
            .check_crop(h, w)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let patches = self.patch_embed.forward(x)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.config.embed_dim))?;
        // Under autocast the patches come out of a bf16 matmul; like torch.cat, the tokens take the
        // wider dtype (the CLS token's f32), so the residual stream stays f32.
        let patches = crate::ops::autocast::promote_to(&cls, &patches)?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?;
        let (n, d) = (tokens.dim(1)?, self.config.embed_dim);
        // The position embedding is a bias over (token, channel) shared by the batch: the fused
        // add sums its gradient over the images in parallel.
        let pos = self.interpolate_pos_encoding(h, w)?.reshape(n * d)?;
        let tokens = crate::ops::add_bias(&tokens.reshape((b, n * d))?, &pos)?.reshape((b, n, d))?;
        match &self.register_tokens {
            None => Ok(tokens),
            Some(r) => {
                let r = r.broadcast_as((b, r.dim(1)?, d))?.to_dtype(tokens.dtype())?;
                Tensor::cat(&[&tokens.narrow(1, 0, 1)?, &r, &tokens.narrow(1, 1, n - 1)?], 1)
            }
        }
    }

    /// CLS features `(B, D)`. With `rng`, stochastic depth is applied (training the student).
    pub fn forward_t<R: Rng + ?Sized>(&self, x: &Tensor, rng: Option<&mut R>) -> Result<Tensor> {
        let tokens = self.blocks_forward(x, rng, true)?;
        // LayerNorm is per token: normalising only the CLS token gives the official output.
        self.norm.forward(&tokens.narrow(1, 0, 1)?)?.squeeze(1)
    }

    /// Every token after the final LayerNorm, `(B, 1 + registers + patches, D)` (DINOv2's
    /// `x_norm_clstoken`, `x_norm_regtokens` and `x_norm_patchtokens` in one), eval mode.
    pub fn forward_tokens(&self, x: &Tensor) -> Result<Tensor> {
        self.norm
            .forward(&self.blocks_forward::<rand_chacha::ChaCha8Rng>(x, None, false)?)
    }

    /// The stream after the last block; with `cls_only`, only its CLS row `(B, 1, D)` where the
    /// CPU kernels run (the last block then skips the work for the rows nobody reads).
    fn blocks_forward<R: Rng + ?Sized>(&self, x: &Tensor, rng: Option<&mut R>, cls_only: bool) -> Result<Tensor> {
        let mut tokens = self.prepare_tokens(x)?;
        let b = tokens.dim(0)?;
        let mut masks: Vec<Option<DropPathMasks>> = match rng {
            Some(rng) if self.config.drop_path_rate > 0.0 => (0..self.blocks.len())
                .map(|i| Some(self.drop_path_masks(i, b, rng)))
                .collect(),
            _ => Vec::new(),
        };
        if !masks.is_empty() && !crate::ops::fused(&tokens) {
            upload(&mut masks, &tokens)?;
        }
        let last = self.blocks.len() - 1;
        for (i, block) in self.blocks.iter().enumerate() {
            let m = masks.get(i).and_then(|m| m.as_ref());
            // CPU f32 only: elsewhere the whole block is one kernel (flash attention, bf16) that
            // this path has not been measured against.
            tokens = if i == last && cls_only && crate::ops::fused(&tokens) {
                block.forward_cls(&tokens, m)?
            } else {
                block.forward_masked(&tokens, m)?
            };
        }
        Ok(tokens)
    }

    /// Stochastic-depth rate of block `i`: linear from 0 to `drop_path_rate` (torch.linspace).
    fn drop_rate(&self, i: usize) -> f64 {
        let depth = self.blocks.len();
        if depth <= 1 {
            return 0.0;
        }
        self.config.drop_path_rate * i as f64 / (depth - 1) as f64
    }

    fn drop_path_masks<R: Rng + ?Sized>(&self, i: usize, b: usize, rng: &mut R) -> DropPathMasks {
        let keep = 1.0 - self.drop_rate(i);
        let mut mask = || -> Vec<f32> {
            (0..b)
                .map(|_| ((keep + rng.random::<f64>()).floor() / keep) as f32)
                .collect()
        };
        DropPathMasks {
            attn: mask(),
            mlp: mask(),
            on_device: None,
        }
    }

    /// The last block's self-attention `(B, heads, 1+N, 1+N)` (official `get_last_selfattention`).
    pub fn last_self_attention(&self, x: &Tensor) -> Result<Tensor> {
        let mut tokens = self.prepare_tokens(x)?;
        let (last, rest) = self.blocks.split_last().expect("a ViT has at least one block");
        for block in rest {
            tokens = block.forward(&tokens)?;
        }
        last.attention(&tokens)
    }

    /// CLS→patch attention of the last block per head, `(B, heads, h/p, w/p)`.
    pub fn cls_attention_maps(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let p = self.config.patch_size;
        let attn = self.last_self_attention(x)?;
        let heads = attn.dim(1)?;
        let prefix = self.config.num_prefix_tokens();
        let n = attn.dim(D::Minus1)? - prefix;
        attn.narrow(2, 0, 1)?
            .narrow(3, prefix, n)?
            .reshape((b, heads, h / p, w / p))
    }
}

impl Module for VisionTransformer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t::<rand_chacha::ChaCha8Rng>(x, None)
    }
}

/// Every block's two masks as one (2·depth, B) tensor on `like`'s device and dtype, each block
/// getting its two rows: one upload per forward pass instead of one per residual.
fn upload(masks: &mut [Option<DropPathMasks>], like: &Tensor) -> Result<()> {
    let rows: Vec<f32> = masks
        .iter()
        .flatten()
        .flat_map(|m| m.attn.iter().chain(&m.mlp).copied())
        .collect();
    let b = like.dim(0)?;
    let all = Tensor::from_vec(rows, (2 * masks.len(), b), like.device())?.to_dtype(like.dtype())?;
    for (i, m) in masks.iter_mut().flatten().enumerate() {
        m.on_device = Some([all.get(2 * i)?, all.get(2 * i + 1)?]);
    }
    Ok(())
}
