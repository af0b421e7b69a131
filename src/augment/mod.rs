//! DINO's multi-crop augmentation (`DataAugmentationDINO` in the official `main_dino.py`), one
//! file per transform plus [`multicrop`] composing them.

pub mod blur;
pub mod color;
pub mod crop;
pub mod eval;
pub mod flip;
pub mod multicrop;
pub mod normalize;
pub mod solarize;

pub use multicrop::{MultiCropAugmenter, ViewKind};
