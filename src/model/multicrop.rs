//! `MultiCropWrapper`: each group of equal-resolution crops goes through the backbone as one
//! batch; the head runs once on the concatenated features.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use rand::Rng;

use super::head::{DinoHead, HeadConfig};
use super::vit::{VisionTransformer, VitConfig};

#[derive(Debug, Clone)]
pub struct MultiCropWrapper {
    pub backbone: VisionTransformer,
    /// None for a backbone loaded on its own (features and attention only, no training).
    pub head: Option<DinoHead>,
}

impl MultiCropWrapper {
    /// Parameters are named `backbone.*` and `head.*`, as in the official training checkpoints.
    pub fn new(vit: &VitConfig, head: Option<&HeadConfig>, vb: VarBuilder) -> Result<Self> {
        let backbone = VisionTransformer::new(vit, vb.pp("backbone"))?;
        let head = head.map(|h| DinoHead::new(h, vb.pp("head"))).transpose()?;
        Ok(Self { backbone, head })
    }

    /// `groups` are (n·B, 3, S, S) batches of crops sharing a resolution; returns head outputs
    /// for all of them in order. With `rng`, the backbone applies stochastic depth.
    pub fn forward_t<R: Rng + ?Sized>(&self, groups: &[&Tensor], rng: Option<&mut R>) -> Result<Tensor> {
        Ok(self.forward_with(groups, rng, None)?.1)
    }

    /// [`MultiCropWrapper::forward_t`] with `last_layer` as the head's last weight where given
    /// ([`DinoHead::last_layer_leaf`]), returning the backbone's CLS features of every crop (what
    /// DINOv2's KoLeo term reads) beside the head outputs, both in the groups' order.
    pub fn forward_with<R: Rng + ?Sized>(
        &self,
        groups: &[&Tensor],
        mut rng: Option<&mut R>,
        last_layer: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let feats = groups
            .iter()
            .map(|g| self.backbone.forward_t(g, rng.as_deref_mut()))
            .collect::<Result<Vec<_>>>()?;
        let feats = Tensor::cat(&feats, 0)?;
        let out = match (&self.head, last_layer) {
            (Some(head), Some(w)) => head.forward_with(&feats, w)?,
            (Some(head), None) => head.forward(&feats)?,
            (None, _) => {
                candle_core::bail!("this model has no DINO head (a backbone loaded on its own): it cannot be trained")
            }
        };
        Ok((feats, out))
    }
}
