//! # dino_rs
//!
//! DINO self-supervised learning (Caron et al. 2021, "Emerging Properties in Self-Supervised
//! Vision Transformers") in Rust: the official multi-crop augmentation, datasets and a native
//! loader, with Python bindings behind the `python` feature.

#[macro_use]
mod simd;

pub mod augment;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod dino;
pub mod error;
pub mod loss;
pub mod model;
pub mod ops;
pub mod optim;
pub mod panic;
pub mod parallel;
pub mod profile;
pub mod schedule;
pub mod teacher;
pub mod train;

#[cfg(feature = "python")]
mod python;

// Training allocates and frees many tensor-sized buffers per step; with glibc's malloc the large
// ones go back to the kernel each time and every step pays page faults zeroing them again
// (30% of a CPU step, measured with perf). mimalloc pools them, though its default purge delay
// still returns idle memory after 1 s (MIMALLOC_PURGE_DELAY=-1 removed most remaining faults).
// Not under cargo-fuzz (`--cfg fuzzing`): AddressSanitizer and libFuzzer's malloc limit only see
// allocations that go through the system allocator.
#[cfg(not(fuzzing))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub use augment::{MultiCropAugmenter, ViewKind};
pub use config::AugmentConfig;
pub use data::{ArrayDataset, Batch, Dataset, ImageFolder, LoaderConfig, MultiCropLoader};
pub use error::{Error, Result};
pub use parallel::{num_threads, set_num_threads};
