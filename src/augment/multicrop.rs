//! DINO's `DataAugmentationDINO`: two global views and `n_local` local views per image, each with
//! its own crop and photometric draws, written straight into normalised CHW float32 buffers.
//!
//! Randomness: every (image key, view) pair gets its own ChaCha8 stream, so the output depends on
//! the seed alone, never on which thread ran which view.

use fast_image_resize::Resizer;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::blur::gaussian_blur;
use super::color::{grayscale, ColorJitter};
use super::crop::{resized_crop, RandomResizedCrop};
use super::flip::hflip;
use super::normalize::{Normalize, Pixel};
use super::solarize::solarize;
use crate::config::AugmentConfig;
use crate::error::Result;

/// Which of the three official pipelines a view goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewKind {
    /// Blur with `blur_p.0`.
    Global1,
    /// Blur with `blur_p.1`, then solarize with `solarize_p`.
    Global2,
    /// Blur with `blur_p.2`, at `local_size`.
    Local,
}

/// Multi-crop augmentation with the official DINO recipe (every knob in [`AugmentConfig`]).
#[derive(Debug, Clone)]
pub struct MultiCropAugmenter {
    config: AugmentConfig,
    global_crop: RandomResizedCrop,
    local_crop: RandomResizedCrop,
    jitter: ColorJitter,
    normalize: Normalize,
}

/// SplitMix64 finaliser: turns (seed, key) into well-spread ChaCha seeds.
pub fn mix_seed(seed: u64, key: u64) -> u64 {
    let mut z = seed
        ^ key
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl MultiCropAugmenter {
    pub fn new(config: AugmentConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            global_crop: RandomResizedCrop::new(config.global_size, config.global_scale, config.ratio),
            local_crop: RandomResizedCrop::new(config.local_size, config.local_scale, config.ratio),
            jitter: ColorJitter {
                brightness: config.brightness,
                contrast: config.contrast,
                saturation: config.saturation,
                hue: config.hue,
            },
            normalize: Normalize::new(config.mean, config.std),
            config,
        })
    }

    pub fn config(&self) -> &AugmentConfig {
        &self.config
    }

    /// The `ToTensor` + `Normalize` step every view ends with.
    pub fn normalize(&self) -> &Normalize {
        &self.normalize
    }

    pub fn n_views(&self) -> usize {
        self.config.n_views()
    }

    /// Floats in one global view (3·G·G) and one local view (3·L·L).
    pub fn view_len(&self, kind: ViewKind) -> usize {
        let s = self.size(kind) as usize;
        3 * s * s
    }

    pub fn size(&self, kind: ViewKind) -> u32 {
        match kind {
            ViewKind::Local => self.config.local_size,
            _ => self.config.global_size,
        }
    }

    pub fn kind(view: usize) -> ViewKind {
        match view {
            0 => ViewKind::Global1,
            1 => ViewKind::Global2,
            _ => ViewKind::Local,
        }
    }

    /// The RNG stream of view `view` of the image identified by `key` under `seed`.
    pub fn view_rng(seed: u64, key: u64, view: usize) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, key));
        rng.set_stream(view as u64);
        rng
    }

    /// Produces view `view` of `img` as packed RGB u8 (before normalisation).
    pub fn view_rgb<R: Rng + ?Sized>(
        &self,
        img: &RgbImage,
        view: usize,
        rng: &mut R,
        resizer: &mut Resizer,
    ) -> RgbImage {
        let c = &self.config;
        let kind = Self::kind(view);
        let crop = if kind == ViewKind::Local {
            &self.local_crop
        } else {
            &self.global_crop
        };
        let bbox = crop.sample(img.width(), img.height(), rng);
        let mut out = resized_crop(resizer, img, bbox, crop.size);
        if rng.random::<f32>() < c.flip_p {
            hflip(&mut out);
        }
        if rng.random::<f32>() < c.color_jitter_p {
            for op in self.jitter.sample(rng) {
                op.apply(&mut out);
            }
        }
        if rng.random::<f32>() < c.grayscale_p {
            grayscale(&mut out);
        }
        let blur_p = match kind {
            ViewKind::Global1 => c.blur_p.0,
            ViewKind::Global2 => c.blur_p.1,
            ViewKind::Local => c.blur_p.2,
        };
        if rng.random::<f32>() < blur_p {
            let sigma = c.blur_sigma.0 + rng.random::<f32>() * (c.blur_sigma.1 - c.blur_sigma.0);
            gaussian_blur(&mut out, sigma);
        }
        if kind == ViewKind::Global2 && rng.random::<f32>() < c.solarize_p {
            solarize(&mut out, 128);
        }
        out
    }

    /// Writes normalised view `view` of `img` into `out` (CHW, length `view_len`).
    pub fn view_into(&self, img: &RgbImage, seed: u64, key: u64, view: usize, out: &mut [f32]) {
        let mut rng = Self::view_rng(seed, key, view);
        let mut resizer = Resizer::new();
        let rgb = self.view_rgb(img, view, &mut rng, &mut resizer);
        self.normalize.apply(&rgb, out);
    }

    /// All views of one image, globals first, each a CHW float32 vector.
    pub fn views(&self, img: &RgbImage, seed: u64, key: u64) -> Vec<Vec<f32>> {
        (0..self.n_views())
            .into_par_iter()
            .map(|v| {
                let mut out = vec![0.0; self.view_len(Self::kind(v))];
                self.view_into(img, seed, key, v, &mut out);
                out
            })
            .collect()
    }

    /// Augments a batch into `(globals, locals)` laid out as (2, B, 3, G, G) and (n_local, B, 3, L, L).
    /// `keys[b]` identifies image `b`'s random streams. Parallel over every (view, image) pair.
    pub fn batch(&self, images: &[&RgbImage], seed: u64, keys: &[u64]) -> (Vec<f32>, Vec<f32>) {
        self.batch_as(images, seed, keys)
    }

    /// [`MultiCropAugmenter::batch`] written as `T`: normalised f32, or u8 before normalisation
    /// (for [`Normalize::on_device`]).
    pub fn batch_as<T: Pixel>(&self, images: &[&RgbImage], seed: u64, keys: &[u64]) -> (Vec<T>, Vec<T>) {
        assert_eq!(images.len(), keys.len(), "one key per image");
        let b = images.len();
        let (glen, llen) = (self.view_len(ViewKind::Global1), self.view_len(ViewKind::Local));
        let mut globals = vec![T::default(); 2 * b * glen];
        let mut locals = vec![T::default(); self.config.n_local * b * llen];
        let global_jobs = globals
            .par_chunks_mut(glen.max(1))
            .enumerate()
            .map(|(i, out)| (i / b.max(1), i % b.max(1), out));
        let local_jobs = locals
            .par_chunks_mut(llen.max(1))
            .enumerate()
            .map(|(i, out)| (2 + i / b.max(1), i % b.max(1), out));
        global_jobs
            .chain(local_jobs)
            .for_each_init(Resizer::new, |resizer, (view, i, out)| {
                let mut rng = Self::view_rng(seed, keys[i], view);
                let rgb = self.view_rgb(images[i], view, &mut rng, resizer);
                T::write(&self.normalize, &rgb, out);
            });
        (globals, locals)
    }
}
