//! Configuration structs with the official DINO defaults (Caron et al. 2021, `main_dino.py`).

use crate::error::{ensure, Result};

/// ImageNet statistics, the normalisation of every official DINO model.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// PIL refuses images above twice its 89.5 MP warning limit as decompression bombs; so do we.
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// Every knob of DINO's `DataAugmentationDINO`, defaults as in the official code.
#[derive(Debug, Clone, PartialEq)]
pub struct AugmentConfig {
    pub global_size: u32,
    pub local_size: u32,
    pub n_local: usize,
    pub global_scale: (f32, f32),
    pub local_scale: (f32, f32),
    /// RandomResizedCrop aspect-ratio range (torchvision's default 3/4..4/3).
    pub ratio: (f32, f32),
    pub flip_p: f32,
    pub color_jitter_p: f32,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    pub grayscale_p: f32,
    /// Blur probability for (global 1, global 2, every local crop).
    pub blur_p: (f32, f32, f32),
    pub blur_sigma: (f32, f32),
    /// Solarisation probability, applied to the second global crop only.
    pub solarize_p: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Images with more pixels than this are refused before decoding.
    pub max_pixels: u64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            global_size: 224,
            local_size: 96,
            n_local: 8,
            global_scale: (0.4, 1.0),
            local_scale: (0.05, 0.4),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
            color_jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_p: (1.0, 0.1, 0.5),
            blur_sigma: (0.1, 2.0),
            solarize_p: 0.2,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

fn check_prob(name: &str, p: f32) -> Result<()> {
    ensure((0.0..=1.0).contains(&p), || {
        format!("{name} must be a probability in [0, 1], got {p}")
    })
}

fn check_range(name: &str, (lo, hi): (f32, f32), min: f32, max: f32) -> Result<()> {
    ensure(
        lo.is_finite() && hi.is_finite() && min <= lo && lo <= hi && hi <= max,
        || {
            // MIN_POSITIVE stands for "above 0" and MAX for "no upper bound": not their 40 digits
            let low = if min == f32::MIN_POSITIVE {
                "0 < low".to_string()
            } else {
                format!("{min} <= low")
            };
            let high = if max == f32::MAX {
                String::new()
            } else {
                format!(" <= {max}")
            };
            format!("{name} must be (low, high) with {low} <= high{high}, got ({lo}, {hi})")
        },
    )
}

impl AugmentConfig {
    /// Number of views per image: 2 globals + `n_local` locals.
    pub fn n_views(&self) -> usize {
        2 + self.n_local
    }

    pub fn validate(&self) -> Result<()> {
        ensure(self.global_size > 0 && self.local_size > 0, || {
            format!(
                "crop sizes must be positive, got global_size={} local_size={}",
                self.global_size, self.local_size
            )
        })?;
        ensure(self.global_size <= 8192 && self.local_size <= 8192, || {
            format!(
                "crop sizes above 8192 are not supported, got global_size={} local_size={}",
                self.global_size, self.local_size
            )
        })?;
        ensure(self.n_local <= 1024, || {
            format!("n_local must be in [0, 1024], got {}", self.n_local)
        })?;
        check_range("global_scale", self.global_scale, f32::MIN_POSITIVE, 1.0)?;
        check_range("local_scale", self.local_scale, f32::MIN_POSITIVE, 1.0)?;
        check_range("ratio", self.ratio, f32::MIN_POSITIVE, f32::MAX)?;
        for (name, p) in [
            ("flip_p", self.flip_p),
            ("color_jitter_p", self.color_jitter_p),
            ("grayscale_p", self.grayscale_p),
            ("blur_p[0]", self.blur_p.0),
            ("blur_p[1]", self.blur_p.1),
            ("blur_p[2]", self.blur_p.2),
            ("solarize_p", self.solarize_p),
        ] {
            check_prob(name, p)?;
        }
        for (name, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            ensure(v.is_finite() && v >= 0.0, || format!("{name} must be >= 0, got {v}"))?;
        }
        ensure((0.0..=0.5).contains(&self.hue), || {
            format!("hue must be in [0, 0.5], got {}", self.hue)
        })?;
        check_range("blur_sigma", self.blur_sigma, 0.0, 1000.0)?;
        ensure(self.mean.iter().all(|m| m.is_finite()), || {
            format!("mean must be finite, got {:?}", self.mean)
        })?;
        ensure(self.std.iter().all(|s| s.is_finite() && *s > 0.0), || {
            format!("std must be positive and finite, got {:?}", self.std)
        })?;
        ensure(self.max_pixels > 0, || "max_pixels must be positive".to_string())
    }
}
