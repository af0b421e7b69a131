//! The bodies of the fuzz targets, shared word for word by the fuzzer (`fuzz/fuzz_targets/*.rs`)
//! and the replay test (`tests/fuzz_regressions.rs`), both of which include this file by path.
//! Each body must return (any `Err` is fine) and never panic, abort, hang or allocate without
//! bound; the checks below are the properties the fuzzer asserts on top of that.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use _dino_rs::augment::eval::EvalTransform;
use _dino_rs::config::{IMAGENET_MEAN, IMAGENET_STD};
use _dino_rs::data::decode::decode_rgb;
use _dino_rs::dino::Dino;
use _dino_rs::train::DinoTrainer;
use _dino_rs::{checkpoint, AugmentConfig, MultiCropAugmenter};
use candle_core::{DType, Device, Tensor};

/// Pixel limit for fuzzed images: 4 MP, so no input can make the decoder allocate more than ~100 MB.
pub const MAX_PIXELS: u64 = 1 << 22;

/// One compute thread (the fuzzer runs single-core), and the default panic hook.
///
/// libfuzzer-sys installs a hook that aborts on every panic, even one caught by `catch_unwind`;
/// dino_rs catches the panics of candle's pickle reader on malformed files (see
/// `checkpoint::load_weights`) and turns them into errors, which is the behaviour under test. A
/// panic nothing catches still reaches libfuzzer-sys's own `catch_unwind`, which aborts: it is
/// reported as a crash with the panic message printed by the default hook.
pub fn init() {
    _dino_rs::set_num_threads(1).expect("one thread");
    drop(std::panic::take_hook());
}

/// Bytes of an image file → `decode_rgb` → every multi-crop view and the eval transform.
pub fn decode_augment(data: &[u8]) {
    let name = Path::new("fuzz-input");
    let img = match decode_rgb(data, name, MAX_PIXELS) {
        Ok(img) => img,
        Err(e) => {
            // Errors name the file, as a Python traceback has no other context.
            let msg = e.to_string();
            assert!(msg.starts_with("fuzz-input: ") && msg.len() > 12, "bad message {msg:?}");
            return;
        }
    };
    let (w, h) = img.dimensions();
    assert!(w > 0 && h > 0 && (w as u64 * h as u64) <= MAX_PIXELS, "decoded {w}x{h}");
    assert_eq!(img.as_raw().len(), 3 * w as usize * h as usize);

    let config = AugmentConfig {
        global_size: 32,
        local_size: 16,
        n_local: 2,
        max_pixels: MAX_PIXELS,
        ..AugmentConfig::default()
    };
    let aug = MultiCropAugmenter::new(config).expect("valid config");
    let key = data.len() as u64;
    for view in 0..aug.n_views() {
        let len = aug.view_len(MultiCropAugmenter::kind(view));
        assert_eq!(len, 3 * aug.size(MultiCropAugmenter::kind(view)).pow(2) as usize);
        let mut out = vec![f32::NAN; len];
        aug.view_into(&img, 0, key, view, &mut out);
        assert!(
            out.iter().all(|v| v.is_finite()),
            "view {view} of a {w}x{h} image is not finite"
        );
    }
    let eval = EvalTransform::new(32, IMAGENET_MEAN, IMAGENET_STD);
    let mut out = vec![f32::NAN; 3 * 32 * 32];
    eval.apply(&img, &mut out);
    assert!(
        out.iter().all(|v| v.is_finite()),
        "eval view of a {w}x{h} image is not finite"
    );
}

/// A fresh path per call (process id + counter), in /dev/shm when there is one: candle's pickle
/// reader only reads files.
fn temp_path() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("dino_rs-fuzz-{}-{n}.ckpt", std::process::id()))
}

/// Features and attention of one crop the size of a patch (tiny whatever the model).
fn exercise(dino: &Dino) {
    let p = dino.vit.patch_size;
    let crops = Tensor::zeros((1, 3, p, p), DType::F32, &Device::Cpu).expect("zeros");
    if let Ok(f) = dino.features(&crops, true) {
        assert_eq!(f.dims(), &[1, dino.vit.embed_dim]);
    }
    if let Ok(a) = dino.attention(&crops, false) {
        assert_eq!(a.dims(), &[1, dino.vit.num_heads, 1, 1]);
    }
}

/// Bytes of a checkpoint → our safetensors reader and `Dino::from_saved` (`DINO.load`), then
/// through a file: `DinoTrainer::load` (`Trainer.load`) and `Dino::load_backbone`, which reads
/// `.pth` and safetensors by content and infers the architecture from the tensor shapes. A model
/// that loads runs one forward pass.
pub fn checkpoint(data: &[u8]) {
    let name = Path::new("fuzz-input.safetensors");
    if let Ok((tensors, meta)) = checkpoint::load_bytes(data, name) {
        if let Ok(dino) = Dino::from_saved(name, tensors, &meta, &Device::Cpu) {
            exercise(&dino);
        }
    }
    let path = temp_path();
    std::fs::write(&path, data).expect("write the temp file");
    if let Ok((trainer, _extra)) = DinoTrainer::load(&path, &Device::Cpu, None) {
        exercise(&trainer.dino);
    }
    let loaded = Dino::load_backbone(&path, None, &Device::Cpu);
    let _ = std::fs::remove_file(&path);
    if let Ok(dino) = loaded {
        exercise(&dino);
    }
}
