//! Per-transform tests of the multi-crop augmenter, statistical checks of every probability,
//! and determinism across thread counts.

use _dino_rs::augment::blur::{box_radius, gaussian_blur};
use _dino_rs::augment::color::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, grayscale, hsv_to_rgb, rgb_to_hsv,
};
use _dino_rs::augment::crop::RandomResizedCrop;
use _dino_rs::augment::flip::hflip;
use _dino_rs::augment::normalize::Normalize;
use _dino_rs::augment::solarize::solarize;
use _dino_rs::{AugmentConfig, MultiCropAugmenter};
use fast_image_resize::Resizer;
use image::{Rgb, RgbImage};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w.max(1)) as u8,
            (y * 255 / h.max(1)) as u8,
            ((x + y) % 256) as u8,
        ])
    })
}

fn checkerboard(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        if (x + y) % 2 == 0 {
            Rgb([255, 255, 255])
        } else {
            Rgb([0, 0, 0])
        }
    })
}

/// Sum of squared differences between horizontal and vertical neighbours.
fn hf_energy(img: &RgbImage) -> f64 {
    let mut e = 0.0;
    for y in 0..img.height() {
        for x in 0..img.width() {
            let p = img.get_pixel(x, y);
            if x + 1 < img.width() {
                let q = img.get_pixel(x + 1, y);
                e += (0..3).map(|c| (p[c] as f64 - q[c] as f64).powi(2)).sum::<f64>();
            }
            if y + 1 < img.height() {
                let q = img.get_pixel(x, y + 1);
                e += (0..3).map(|c| (p[c] as f64 - q[c] as f64).powi(2)).sum::<f64>();
            }
        }
    }
    e
}

#[test]
fn solarize_inverts_values_at_or_above_threshold_only() {
    let mut img = RgbImage::from_fn(256, 1, |x, _| Rgb([x as u8, x as u8, x as u8]));
    solarize(&mut img, 128);
    for x in 0..256u32 {
        let expected = if x >= 128 { 255 - x } else { x } as u8;
        assert_eq!(img.get_pixel(x, 0)[0], expected, "value {x}");
    }
}

#[test]
fn grayscale_equalises_channels_with_601_luma() {
    let mut img = gradient(40, 30);
    let before = img.clone();
    grayscale(&mut img);
    for (p, q) in img.pixels().zip(before.pixels()) {
        assert!(p[0] == p[1] && p[1] == p[2]);
        let luma = 0.299 * q[0] as f64 + 0.587 * q[1] as f64 + 0.114 * q[2] as f64;
        assert!((p[0] as f64 - luma).abs() <= 0.5 + 1e-9, "luma {luma} vs {}", p[0]);
    }
}

#[test]
fn flip_mirrors_rows_and_is_an_involution() {
    let orig = gradient(7, 5);
    let mut img = orig.clone();
    hflip(&mut img);
    for y in 0..5 {
        for x in 0..7 {
            assert_eq!(img.get_pixel(x, y), orig.get_pixel(6 - x, y));
        }
    }
    hflip(&mut img);
    assert_eq!(img, orig);
}

#[test]
fn normalize_writes_chw_with_mean_and_std() {
    let img = RgbImage::from_fn(3, 2, |x, y| Rgb([(10 * x) as u8, (20 * y) as u8, 255]));
    let (mean, std) = ([0.5, 0.25, 0.0], [0.5, 2.0, 1.0]);
    let mut out = vec![0.0; 18];
    Normalize::new(mean, std).apply(&img, &mut out);
    for y in 0..2 {
        for x in 0..3 {
            let p = img.get_pixel(x, y);
            for c in 0..3 {
                let expected = (p[c] as f32 / 255.0 - mean[c]) / std[c];
                assert!((out[c * 6 + (y * 3 + x) as usize] - expected).abs() < 1e-6);
            }
        }
    }
}

#[test]
fn crop_boxes_respect_scale_and_ratio_bounds() {
    let (w, h) = (500u32, 375u32);
    for (scale, n) in [((0.4f32, 1.0f32), 5000), ((0.05, 0.4), 5000)] {
        let crop = RandomResizedCrop::new(224, scale, (3.0 / 4.0, 4.0 / 3.0));
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut fractions = Vec::new();
        for _ in 0..n {
            let b = crop.sample(w, h, &mut rng);
            assert!(
                b.width > 0 && b.height > 0 && b.left + b.width <= w && b.top + b.height <= h,
                "{b:?}"
            );
            let frac = (b.width * b.height) as f64 / (w * h) as f64;
            let ratio = b.width as f64 / b.height as f64;
            // Rounding each side to whole pixels moves area and ratio by at most ~1 px per side.
            let slack_area = (b.width + b.height + 1) as f64 / (w * h) as f64;
            assert!(
                frac >= scale.0 as f64 - slack_area && frac <= scale.1 as f64 + slack_area,
                "area {frac} for {scale:?}"
            );
            let slack_ratio = ratio * (1.0 / b.width as f64 + 1.0 / b.height as f64);
            assert!(
                ratio >= 0.75 - slack_ratio && ratio <= 4.0 / 3.0 + slack_ratio,
                "ratio {ratio}"
            );
            fractions.push(frac);
        }
        // Accepted draws are uniform in area fraction, truncated where the box no longer fits.
        let mean = fractions.iter().sum::<f64>() / n as f64;
        assert!(
            mean > scale.0 as f64 && mean < scale.1 as f64,
            "mean area fraction {mean} for {scale:?}"
        );
        if scale.1 < 0.5 {
            let expected = (scale.0 + scale.1) as f64 / 2.0;
            assert!(
                (mean - expected).abs() < 0.01,
                "mean area fraction {mean}, expected {expected}"
            );
        }
    }
}

#[test]
fn crop_falls_back_to_centre_for_extreme_shapes() {
    let crop = RandomResizedCrop::new(16, (0.9, 1.0), (3.0 / 4.0, 4.0 / 3.0));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let b = crop.sample(1000, 1, &mut rng);
    assert_eq!((b.width, b.height, b.top), (1, 1, 0));
    assert_eq!(b.left, 499);
    let b = crop.sample(1, 1, &mut rng);
    assert_eq!((b.left, b.top, b.width, b.height), (0, 0, 1, 1));
}

#[test]
fn blur_lowers_high_frequency_energy_and_keeps_flat_images() {
    let board = checkerboard(32, 32);
    let mut prev = hf_energy(&board);
    for sigma in [0.3f32, 0.8, 1.5, 2.0] {
        let mut img = board.clone();
        gaussian_blur(&mut img, sigma);
        let e = hf_energy(&img);
        assert!(e < prev, "sigma {sigma}: energy {e} not below {prev}");
        prev = e;
    }
    let mut flat = RgbImage::from_pixel(20, 10, Rgb([90, 140, 200]));
    gaussian_blur(&mut flat, 1.7);
    assert!(flat.pixels().all(|p| *p == Rgb([90, 140, 200])));
}

#[test]
fn blur_of_an_impulse_has_the_gaussian_variance() {
    for sigma in [1.0f32, 2.0] {
        let n = 41u32;
        let mut img = RgbImage::new(n, 1);
        img.put_pixel(n / 2, 0, Rgb([255, 255, 255]));
        // A 1-row image: the vertical passes are identities, the horizontal ones give the profile.
        gaussian_blur(&mut img, sigma);
        let w: Vec<f64> = (0..n).map(|x| img.get_pixel(x, 0)[0] as f64).collect();
        let total: f64 = w.iter().sum();
        let mean = w.iter().enumerate().map(|(x, v)| x as f64 * v).sum::<f64>() / total;
        let var = w
            .iter()
            .enumerate()
            .map(|(x, v)| (x as f64 - mean).powi(2) * v)
            .sum::<f64>()
            / total;
        assert!((mean - (n / 2) as f64).abs() < 0.05, "mean {mean}");
        let target = (sigma * sigma) as f64;
        assert!(
            (var - target).abs() / target < 0.25,
            "sigma {sigma}: variance {var} vs {target}"
        );
    }
    // sigma=1 over 3 passes: l=0, a=0.25; a box of weights (1/6, 2/3, 1/6) has variance 1/3 per pass.
    assert!((box_radius(1.0, 3) - 0.25).abs() < 1e-6, "{}", box_radius(1.0, 3));
}

#[test]
fn colour_ops_match_their_definitions() {
    let img = gradient(16, 16);
    let mut b = img.clone();
    adjust_brightness(&mut b, 1.0);
    assert_eq!(b, img);
    adjust_brightness(&mut b, 0.5);
    assert!(b.as_raw().iter().zip(img.as_raw()).all(|(o, i)| *o == i / 2));

    let mut c = img.clone();
    adjust_contrast(&mut c, 0.0);
    let first = *c.get_pixel(0, 0);
    assert!(c.pixels().all(|p| *p == first) && first[0] == first[1]);

    let (mut s, mut g) = (img.clone(), img.clone());
    adjust_saturation(&mut s, 0.0);
    grayscale(&mut g);
    assert_eq!(s, g);

    let mut h = RgbImage::from_pixel(2, 2, Rgb([255, 0, 0]));
    adjust_hue(&mut h, 0.5);
    let p = h.get_pixel(0, 0);
    assert!(
        p[0] < 10 && p[1] > 245 && p[2] > 245,
        "red shifted by half a turn is cyan, got {p:?}"
    );
}

#[test]
fn hsv_round_trip_is_close() {
    let mut worst = 0i32;
    for r in (0..256).step_by(5) {
        for g in (0..256).step_by(7) {
            for b in (0..256).step_by(11) {
                let (h, s, v) = rgb_to_hsv(r as u8, g as u8, b as u8);
                let (r2, g2, b2) = hsv_to_rgb(h, s, v);
                for (a, z) in [(r, r2), (g, g2), (b, b2)] {
                    worst = worst.max((a - z as i32).abs());
                }
            }
        }
    }
    // PIL's 8-bit HSV quantises hue to 1/255 of a turn: a few levels at most.
    assert!(worst <= 6, "worst round-trip error {worst}");
}

/// An augmenter whose crop is always the whole 64x48 image and where only the listed knobs act.
fn isolated(f: impl FnOnce(&mut AugmentConfig)) -> MultiCropAugmenter {
    let mut c = AugmentConfig {
        global_size: 24,
        local_size: 24,
        n_local: 2,
        global_scale: (1.0, 1.0),
        local_scale: (1.0, 1.0),
        ratio: (4.0 / 3.0, 4.0 / 3.0),
        flip_p: 0.0,
        color_jitter_p: 0.0,
        grayscale_p: 0.0,
        blur_p: (0.0, 0.0, 0.0),
        solarize_p: 0.0,
        ..AugmentConfig::default()
    };
    f(&mut c);
    MultiCropAugmenter::new(c).unwrap()
}

/// Fraction of `n` draws of `view` whose output differs from the untouched view.
fn applied_rate(aug: &MultiCropAugmenter, base: &MultiCropAugmenter, img: &RgbImage, view: usize, n: u64) -> f64 {
    let mut resizer = Resizer::new();
    let plain = base.view_rgb(img, view, &mut MultiCropAugmenter::view_rng(0, 0, view), &mut resizer);
    let changed = (0..n)
        .filter(|&key| {
            let mut rng = MultiCropAugmenter::view_rng(3, key, view);
            aug.view_rgb(img, view, &mut rng, &mut resizer) != plain
        })
        .count();
    changed as f64 / n as f64
}

fn assert_rate(name: &str, rate: f64, p: f64, n: u64) {
    let sd = (p * (1.0 - p) / n as f64).sqrt().max(1e-9);
    assert!(
        (rate - p).abs() <= 4.5 * sd + 0.01,
        "{name}: rate {rate:.4}, expected {p} (±{:.4})",
        4.5 * sd
    );
}

#[test]
fn every_probability_matches_over_thousands_of_draws() {
    let n = 3000;
    let img = gradient(64, 48);
    let bright = RgbImage::from_fn(64, 48, |x, y| Rgb([128 + (x % 100) as u8, 150 + (y % 100) as u8, 200]));
    // Tiny sigmas can round back to the input, so blur detection uses sigma >= 1 on noise.
    let noisy = RgbImage::from_fn(64, 48, |x, y| {
        let h = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).wrapping_mul(2_246_822_519);
        Rgb([(h >> 24) as u8, (h >> 16) as u8, (h >> 8) as u8])
    });
    let blurring = || {
        isolated(|c| {
            c.blur_p = (1.0, 0.1, 0.5);
            c.blur_sigma = (1.0, 2.0);
        })
    };
    let base = isolated(|_| {});
    let cases: Vec<(&str, MultiCropAugmenter, &RgbImage, usize, f64)> = vec![
        ("flip_p", isolated(|c| c.flip_p = 0.5), &img, 0, 0.5),
        (
            "color_jitter_p",
            isolated(|c| {
                c.color_jitter_p = 0.8;
                c.contrast = 0.0;
                c.saturation = 0.0;
                c.hue = 0.0;
            }),
            &bright,
            2,
            0.8,
        ),
        ("grayscale_p", isolated(|c| c.grayscale_p = 0.2), &img, 1, 0.2),
        ("blur_p global 1", blurring(), &noisy, 0, 1.0),
        ("blur_p global 2", blurring(), &noisy, 1, 0.1),
        ("blur_p local", blurring(), &noisy, 3, 0.5),
        ("solarize_p global 2", isolated(|c| c.solarize_p = 0.2), &bright, 1, 0.2),
        (
            "solarize_p never on global 1",
            isolated(|c| c.solarize_p = 1.0),
            &bright,
            0,
            0.0,
        ),
        (
            "solarize_p never on locals",
            isolated(|c| c.solarize_p = 1.0),
            &bright,
            2,
            0.0,
        ),
    ];
    for (name, aug, src, view, p) in cases {
        assert_rate(name, applied_rate(&aug, &base, src, view, n), p, n);
    }
}

#[test]
fn output_is_identical_whatever_the_thread_count() {
    let aug = MultiCropAugmenter::new(AugmentConfig {
        global_size: 64,
        local_size: 32,
        n_local: 4,
        ..Default::default()
    })
    .unwrap();
    let imgs: Vec<RgbImage> = (0..6).map(|i| gradient(90 + 13 * i, 70 + 7 * i)).collect();
    let refs: Vec<&RgbImage> = imgs.iter().collect();
    let keys: Vec<u64> = (0..6).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| aug.batch(&refs, 42, &keys))
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(4));
    assert_ne!(
        one,
        aug.batch(&refs, 43, &keys),
        "a different seed must change the views"
    );
    // A single image's views equal its slot in the batch.
    let views = aug.views(&imgs[2], 42, 2);
    let glen = 3 * 64 * 64;
    assert_eq!(views[1], one.0[(6 + 2) * glen..(6 + 3) * glen].to_vec());
}

#[test]
fn config_validation_names_the_parameter() {
    let bad = [
        AugmentConfig {
            flip_p: 1.5,
            ..Default::default()
        },
        AugmentConfig {
            global_scale: (1.0, 0.4),
            ..Default::default()
        },
        AugmentConfig {
            local_scale: (0.0, 0.4),
            ..Default::default()
        },
        AugmentConfig {
            hue: 0.7,
            ..Default::default()
        },
        AugmentConfig {
            std: [0.2, 0.0, 0.2],
            ..Default::default()
        },
        AugmentConfig {
            global_size: 0,
            ..Default::default()
        },
        AugmentConfig {
            blur_sigma: (2.0, 0.1),
            ..Default::default()
        },
    ];
    let names = [
        "flip_p",
        "global_scale",
        "local_scale",
        "hue",
        "std",
        "global_size",
        "blur_sigma",
    ];
    for (cfg, name) in bad.into_iter().zip(names) {
        let err = MultiCropAugmenter::new(cfg).unwrap_err().to_string();
        assert!(err.contains(name), "{err:?} should name {name}");
    }
    assert!(MultiCropAugmenter::new(AugmentConfig::default()).is_ok());
}

#[test]
fn vectorised_hue_equals_the_scalar_hsv_definition() {
    let img = RgbImage::from_fn(97, 61, |x, y| {
        let h = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).wrapping_mul(2_246_822_519);
        Rgb([
            (h >> 24) as u8,
            (h >> 16) as u8,
            if x % 7 == 0 { (h >> 24) as u8 } else { (h >> 8) as u8 },
        ])
    });
    for factor in [-0.5f32, -0.1, -0.013, 0.0, 0.05, 0.1, 0.49] {
        let mut fast = img.clone();
        adjust_hue(&mut fast, factor);
        let shift = (factor * 255.0) as i32;
        for (out, p) in fast.pixels().zip(img.pixels()) {
            let (h, s, v) = rgb_to_hsv(p[0], p[1], p[2]);
            let (r, g, b) = hsv_to_rgb((h as i32 + shift).rem_euclid(256) as u8, s, v);
            assert_eq!(out.0, [r, g, b], "factor {factor}, input {:?}", p.0);
        }
    }
}
