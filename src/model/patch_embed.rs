//! Patch embedding: the official `Conv2d(3, D, kernel=p, stride=p)` computed as one matmul over
//! non-overlapping patches (a strided conv is exactly that, and candle's conv2d is slow here).
//! The weight keeps the conv's (D, 3, p, p) layout and name so official checkpoints load.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

#[derive(Debug, Clone)]
pub struct PatchEmbed {
    weight: Tensor,
    bias: Tensor,
    patch_size: usize,
    in_chans: usize,
    embed_dim: usize,
}

impl PatchEmbed {
    pub fn new(patch_size: usize, in_chans: usize, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("proj");
        // PyTorch's Conv2d default init (the official code leaves it): U(±1/sqrt(fan_in)).
        let bound = 1.0 / ((in_chans * patch_size * patch_size) as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let weight = vb.get_with_hints((embed_dim, in_chans, patch_size, patch_size), "weight", init)?;
        let bias = vb.get_with_hints(embed_dim, "bias", init)?;
        Ok(Self {
            weight,
            bias,
            patch_size,
            in_chans,
            embed_dim,
        })
    }
}

impl Module for PatchEmbed {
    /// (B, C, H, W) -> (B, H/p · W/p, D), patches in row-major order like `flatten(2)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let weight = self.weight.reshape((self.embed_dim, self.in_chans * p * p))?;
        crate::ops::linear(&patches, &weight, Some(&self.bias))?.reshape((b, gh * gw, self.embed_dim))
    }
}
