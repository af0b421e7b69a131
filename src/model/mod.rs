//! The DINO networks: a ViT backbone, the DINO head and the multi-crop wrapper, built from small
//! layers (one kind per file) whose parameter names are the official state-dict keys.

pub mod attention;
pub mod block;
pub mod head;
pub mod layer_norm;
pub mod layout;
pub mod linear;
pub mod mlp;
pub mod multicrop;
pub mod patch_embed;
pub mod pos_embed;
pub mod store;
pub mod vit;

pub use head::{DinoHead, HeadConfig};
pub use multicrop::MultiCropWrapper;
pub use store::ParamStore;
pub use vit::{Family, Ffn, VisionTransformer, VitConfig};
