//! Datasets and the multi-crop loader.

pub mod array;
pub mod decode;
pub mod folder;
pub mod loader;

use image::RgbImage;

pub use array::ArrayDataset;
pub use decode::load_rgb;
pub use folder::ImageFolder;
pub use loader::{Batch, EpochIter, LoaderConfig, MultiCropLoader};

use crate::error::Result;

/// A random-access collection of images (with optional integer labels, −1 when unlabelled).
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn load(&self, index: usize) -> Result<RgbImage>;
    fn label(&self, index: usize) -> i64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
