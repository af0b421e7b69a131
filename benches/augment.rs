//! Criterion benches of the multi-crop pipeline on the bundled ~500x375 JPEG photos:
//! decode alone, augment alone (2x224 + 8x96, official recipe) and both, one thread.
//! The torchvision comparison lives in benches/bench_augment.py.

use std::path::PathBuf;

use _dino_rs::data::load_rgb;
use _dino_rs::{AugmentConfig, MultiCropAugmenter};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn photos() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/dino_rs/data");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    v.sort();
    v
}

fn bench(c: &mut Criterion) {
    let paths = photos();
    let aug = MultiCropAugmenter::new(AugmentConfig::default()).unwrap();
    let decoded: Vec<_> = paths.iter().map(|p| load_rgb(p, u64::MAX).unwrap()).collect();
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let mut g = c.benchmark_group("multicrop_1thread");
    g.throughput(Throughput::Elements(paths.len() as u64));
    g.bench_function("decode", |b| {
        b.iter(|| paths.iter().map(|p| load_rgb(p, u64::MAX).unwrap()).collect::<Vec<_>>())
    });
    let refs: Vec<_> = decoded.iter().collect();
    let keys: Vec<u64> = (0..refs.len() as u64).collect();
    g.bench_function("augment_2x224_8x96", |b| {
        b.iter(|| one.install(|| aug.batch(&refs, 0, &keys)))
    });
    g.bench_function("decode_and_augment", |b| {
        b.iter(|| {
            let imgs: Vec<_> = paths.iter().map(|p| load_rgb(p, u64::MAX).unwrap()).collect();
            let r: Vec<_> = imgs.iter().collect();
            one.install(|| aug.batch(&r, 0, &keys))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
