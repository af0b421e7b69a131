//! Decoding, datasets and the loader: real files written to a temporary folder.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use _dino_rs::data::load_rgb;
use _dino_rs::{
    ArrayDataset, AugmentConfig, Dataset, Error, ImageFolder, LoaderConfig, MultiCropAugmenter, MultiCropLoader,
};
use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};

const MAX: u64 = 1 << 30;

fn photo(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([(x * 3 + seed) as u8, (y * 5 + seed) as u8, ((x ^ y) + seed) as u8])
    })
}

fn small_aug() -> Arc<MultiCropAugmenter> {
    Arc::new(
        MultiCropAugmenter::new(AugmentConfig {
            global_size: 16,
            local_size: 8,
            n_local: 2,
            ..Default::default()
        })
        .unwrap(),
    )
}

fn write(dir: &Path, rel: &str, img: &RgbImage) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    img.save(&p).unwrap();
}

#[test]
fn decodes_formats_and_converts_to_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let rgb = photo(20, 10, 1);
    for ext in ["png", "bmp", "tiff", "webp"] {
        let p = dir.path().join(format!("a.{ext}"));
        rgb.save(&p).unwrap();
        assert_eq!(load_rgb(&p, MAX).unwrap(), rgb, "{ext} is lossless");
    }
    let jpg = dir.path().join("a.jpg");
    rgb.save(&jpg).unwrap();
    assert_eq!(load_rgb(&jpg, MAX).unwrap().dimensions(), (20, 10));

    let gray = GrayImage::from_fn(6, 4, |x, _| Luma([(x * 40) as u8]));
    let p = dir.path().join("g.png");
    gray.save(&p).unwrap();
    let img = load_rgb(&p, MAX).unwrap();
    assert!(img.pixels().zip(gray.pixels()).all(|(c, g)| c.0 == [g[0]; 3]));

    let rgba = RgbaImage::from_pixel(3, 3, Rgba([10, 20, 30, 0]));
    let p = dir.path().join("t.png");
    rgba.save(&p).unwrap();
    assert!(
        load_rgb(&p, MAX).unwrap().pixels().all(|c| c.0 == [10, 20, 30]),
        "alpha is dropped like PIL's convert('RGB')"
    );

    let deep: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_pixel(2, 2, Rgb([65535, 0, 32896]));
    let p = dir.path().join("d.png");
    deep.save(&p).unwrap();
    assert_eq!(load_rgb(&p, MAX).unwrap().get_pixel(0, 0).0, [255, 0, 128]);
}

#[test]
fn bad_files_are_image_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.png");
    photo(64, 64, 0).save(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let jpg = dir.path().join("good.jpg");
    photo(64, 64, 0).save(&jpg).unwrap();
    let jpeg = std::fs::read(&jpg).unwrap();
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("trunc.jpg", jpeg[..jpeg.len() * 2 / 3].to_vec(), "truncated"),
        ("empty.jpg", vec![], "empty file"),
        (
            "text.jpg",
            b"hello, I am not an image".to_vec(),
            "not a recognised image",
        ),
        ("trunc.png", bytes[..bytes.len() / 2].to_vec(), "corrupt or truncated"),
        (
            "garbage.png",
            [&bytes[..40], &[0xAB; 300][..]].concat(),
            "corrupt or truncated",
        ),
    ];
    for (name, data, expected) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        match load_rgb(&p, MAX) {
            Err(e @ Error::Image { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(name) && msg.contains(expected), "{name}: {msg}");
            }
            other => panic!("{name}: expected an image error, got {other:?}"),
        }
    }
    assert!(matches!(
        load_rgb(&dir.path().join("missing.png"), MAX),
        Err(Error::Io { .. })
    ));
    let msg = load_rgb(&good, 1000).unwrap_err().to_string();
    assert!(msg.contains("max_pixels=1000") && msg.contains("64x64"), "{msg}");
}

#[test]
fn image_folder_scans_recursively_with_sorted_classes() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "zebra/1.png", &photo(8, 8, 1));
    write(dir.path(), "apple/x/2.PNG", &photo(8, 8, 2));
    write(dir.path(), "apple/3.jpg", &photo(8, 8, 3));
    write(dir.path(), "loose.png", &photo(8, 8, 4));
    std::fs::write(dir.path().join("apple/notes.txt"), "not an image").unwrap();
    let ds = ImageFolder::new(dir.path(), MAX).unwrap();
    assert_eq!(ds.classes(), ["apple", "zebra"]);
    assert_eq!(ds.len(), 4);
    let rel: Vec<String> = ds
        .paths()
        .iter()
        .map(|p| p.strip_prefix(dir.path()).unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(rel, ["apple/3.jpg", "apple/x/2.PNG", "loose.png", "zebra/1.png"]);
    assert_eq!(ds.labels(), [0, 0, -1, 1]);
    assert_eq!(ds.load(3).unwrap(), photo(8, 8, 1));

    let empty = tempfile::tempdir().unwrap();
    assert!(ImageFolder::new(empty.path(), MAX)
        .unwrap_err()
        .to_string()
        .contains("no image files"));
    assert!(matches!(
        ImageFolder::new(dir.path().join("nope"), MAX),
        Err(Error::Io { .. })
    ));
}

#[cfg(unix)]
#[test]
fn image_folder_reports_symlink_loops() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a/1.png", &photo(4, 4, 0));
    std::os::unix::fs::symlink(dir.path().join("a"), dir.path().join("a/loop")).unwrap();
    let err = ImageFolder::new(dir.path(), MAX).unwrap_err().to_string();
    assert!(err.contains("loop"), "{err}");
}

fn array_dataset(n: usize) -> Arc<dyn Dataset> {
    let data: Vec<u8> = (0..n * 12 * 10 * 3).map(|i| (i % 251) as u8).collect();
    Arc::new(ArrayDataset::new(data, [n, 12, 10, 3], Some((0..n as i64).collect())).unwrap())
}

#[test]
fn loader_visits_every_image_once_per_epoch_and_reshuffles() {
    let loader = MultiCropLoader::new(
        array_dataset(10),
        small_aug(),
        LoaderConfig {
            batch_size: 3,
            drop_last: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(loader.len(), 4);
    let mut orders = Vec::new();
    for epoch in 0..2 {
        let batches: Vec<_> = loader.iter_epoch(epoch).map(Result::unwrap).collect();
        assert_eq!(batches.iter().map(|b| b.len()).collect::<Vec<_>>(), [3, 3, 3, 1]);
        for b in &batches {
            assert_eq!(b.globals.len(), 2 * b.len() * 3 * 16 * 16);
            assert_eq!(b.locals.len(), 2 * b.len() * 3 * 8 * 8);
        }
        let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        orders.push(seen.clone());
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }
    assert_ne!(orders[0], orders[1], "each epoch gets its own shuffle");
    let again: Vec<usize> = loader.iter_epoch(0).flat_map(|b| b.unwrap().indices).collect();
    assert_eq!(again, orders[0], "an epoch's order depends on (seed, epoch) only");

    let dropping = MultiCropLoader::new(
        array_dataset(10),
        small_aug(),
        LoaderConfig {
            batch_size: 3,
            shuffle: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(dropping.len(), 3);
    let idx: Vec<usize> = dropping.iter_epoch(5).flat_map(|b| b.unwrap().indices).collect();
    assert_eq!(idx, (0..9).collect::<Vec<_>>());
}

#[test]
fn loader_batches_equal_direct_augmentation() {
    let ds = array_dataset(4);
    let aug = small_aug();
    let loader = MultiCropLoader::new(
        ds.clone(),
        aug.clone(),
        LoaderConfig {
            batch_size: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let a: Vec<_> = loader.iter_epoch(1).map(Result::unwrap).collect();
    let b: Vec<_> = loader.iter_epoch(1).map(Result::unwrap).collect();
    assert_eq!(a[0].globals, b[0].globals);
    assert_eq!(a[0].locals, b[0].locals);
    let c: Vec<_> = loader.iter_epoch(2).map(Result::unwrap).collect();
    assert_ne!(a[0].globals, c[0].globals, "fresh augmentation draws every epoch");
}

#[test]
fn u8_batches_normalised_on_the_device_equal_the_f32_batches() {
    use candle_core::{Device, Tensor};
    let aug = small_aug();
    let loader = MultiCropLoader::new(
        array_dataset(7),
        aug.clone(),
        LoaderConfig {
            batch_size: 3,
            drop_last: false,
            ..Default::default()
        },
    )
    .unwrap();
    let floats: Vec<_> = loader.iter_epoch(3).map(Result::unwrap).collect();
    let bytes: Vec<_> = loader.iter_epoch_as::<u8>(3).map(Result::unwrap).collect();
    assert_eq!(floats.len(), bytes.len());
    let norm = aug.normalize();
    let mut distinct = std::collections::HashSet::new();
    for (f, u) in floats.iter().zip(&bytes) {
        assert_eq!(f.indices, u.indices);
        let b = u.len();
        for (fv, uv, n, s) in [(&f.globals, &u.globals, 2 * b, 16), (&f.locals, &u.locals, 2 * b, 8)] {
            let x = Tensor::from_vec(uv.clone(), (n, 3, s, s), &Device::Cpu).unwrap();
            let y: Vec<f32> = norm.on_device(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            // Bit for bit: the device looks values up in the augmenter's own table.
            assert!(y.iter().zip(fv.iter()).all(|(a, b)| a.to_bits() == b.to_bits()));
            distinct.extend(uv.iter().copied());
        }
    }
    assert!(
        distinct.len() > 100,
        "the crops cover many pixel values: {}",
        distinct.len()
    );
    // One channel's table really is per channel: a grey pixel normalises differently in R, G and B.
    let grey = Tensor::full(128u8, (1, 3, 1, 1), &Device::Cpu).unwrap();
    let v: Vec<f32> = norm.on_device(&grey).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(v[0] != v[1] && v[1] != v[2], "{v:?}");
    assert!(norm
        .on_device(&grey.to_dtype(candle_core::DType::F32).unwrap())
        .is_err());
}

#[test]
fn loader_skips_or_raises_on_unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..5 {
        write(dir.path(), &format!("c/{i}.png"), &photo(20, 20, i));
    }
    std::fs::write(dir.path().join("c/bad.png"), b"definitely not a png").unwrap();
    let ds: Arc<dyn Dataset> = Arc::new(ImageFolder::new(dir.path(), MAX).unwrap());
    let cfg = LoaderConfig {
        batch_size: 2,
        drop_last: false,
        ..Default::default()
    };
    let raising = MultiCropLoader::new(ds.clone(), small_aug(), cfg).unwrap();
    let err = raising
        .iter_epoch(0)
        .find_map(|b| b.err())
        .expect("the bad file fails the epoch");
    assert!(err.to_string().contains("bad.png"), "{err}");

    let skipping = MultiCropLoader::new(
        ds,
        small_aug(),
        LoaderConfig {
            skip_errors: true,
            ..cfg
        },
    )
    .unwrap();
    let mut it = skipping.iter_epoch(0);
    let sizes: Vec<usize> = it.by_ref().map(|b| b.unwrap().len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 5);
    assert_eq!(sizes, [2, 2, 1]);
    assert_eq!(it.skipped().count(), 1);
    assert!(it.skipped().first().unwrap().contains("bad.png"));
}

#[test]
fn dropping_an_epoch_midway_stops_its_thread_promptly() {
    let big = Arc::new(
        MultiCropAugmenter::new(AugmentConfig {
            global_size: 96,
            local_size: 48,
            n_local: 6,
            ..Default::default()
        })
        .unwrap(),
    );
    let loader = MultiCropLoader::new(
        array_dataset(400),
        big,
        LoaderConfig {
            batch_size: 8,
            prefetch: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let mut it = loader.iter_epoch(0);
    assert!(it.next().unwrap().is_ok());
    let start = Instant::now();
    drop(it);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "drop took {:?}",
        start.elapsed()
    );
}

#[test]
fn loader_rejects_bad_settings() {
    let aug = small_aug();
    for (cfg, needle) in [
        (
            LoaderConfig {
                batch_size: 0,
                ..Default::default()
            },
            "batch_size",
        ),
        (
            LoaderConfig {
                prefetch: 0,
                ..Default::default()
            },
            "prefetch",
        ),
        (
            LoaderConfig {
                batch_size: 11,
                ..Default::default()
            },
            "larger than the dataset",
        ),
    ] {
        let err = MultiCropLoader::new(array_dataset(10), aug.clone(), cfg)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(needle), "{err}");
    }
}
