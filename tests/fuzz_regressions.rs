//! Inputs found by the fuzz targets in `fuzz/` (one test per finding, each file under
//! `tests/fixtures/fuzz/<target>/`), and a replay of the kept corpora `fuzz/corpus/<target>/`
//! through the same bodies the fuzzer runs (`fuzz/bodies.rs`).

use std::path::{Path, PathBuf};

#[path = "../fuzz/bodies.rs"]
mod bodies;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn replay(target: &str, body: fn(&[u8])) {
    bodies::init();
    let dir = root().join("fuzz/corpus").join(target);
    let inputs = files(&dir);
    assert!(!inputs.is_empty(), "{} is empty", dir.display());
    for path in inputs {
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| body(&data)).is_err() {
            panic!("{target} panicked on {}", path.display());
        }
    }
}

#[test]
fn replay_decode_augment_corpus() {
    replay("decode_augment", bodies::decode_augment);
}

#[test]
fn replay_checkpoint_corpus() {
    replay("checkpoint", bodies::checkpoint);
}

fn fixture(target: &str, name: &str) -> PathBuf {
    let path = root().join("tests/fixtures/fuzz").join(target).join(name);
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// Every finding also replays through the fuzz body (no panic).
#[test]
fn findings_replay_through_the_fuzz_bodies() {
    bodies::init();
    for (target, body) in [
        ("decode_augment", bodies::decode_augment as fn(&[u8])),
        ("checkpoint", bodies::checkpoint),
    ] {
        let dir = root().join("tests/fixtures/fuzz").join(target);
        if !dir.is_dir() {
            continue;
        }
        for path in files(&dir) {
            let data = std::fs::read(&path).unwrap();
            if std::panic::catch_unwind(|| body(&data)).is_err() {
                panic!("{target} panicked on {}", path.display());
            }
        }
    }
}

fn model_err(name: &str) -> String {
    let path = fixture("checkpoint", name);
    match _dino_rs::dino::Dino::load(&path, &candle_core::Device::Cpu) {
        Ok(_) => panic!("{name} loaded"),
        Err(e) => e.to_string(),
    }
}

fn trainer_err(name: &str) -> String {
    let path = fixture("checkpoint", name);
    match _dino_rs::train::DinoTrainer::load(&path, &candle_core::Device::Cpu, None) {
        Ok(_) => panic!("{name} loaded"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, file: &str, parts: &[&str]) {
    assert!(msg.contains(file), "message does not name the file: {msg}");
    for p in parts {
        assert!(msg.contains(p), "message lacks {p:?}: {msg}");
    }
}

/// Saved metadata with `num_heads: 0`: the attention layer divided by zero (head width) while
/// building the model. Now `VitConfig::validate` runs on loaded metadata.
#[test]
fn model_num_heads_zero_is_refused() {
    let msg = model_err("model_num_heads_zero.safetensors");
    assert_mentions(
        &msg,
        "model_num_heads_zero",
        &["invalid model configuration", "num_heads must be positive"],
    );
}

/// Saved metadata with a head of 10^18 layers: `Vec::with_capacity` panicked (capacity overflow).
#[test]
fn model_head_nlayers_huge_is_refused() {
    let msg = model_err("model_head_nlayers_1e18.safetensors");
    assert_mentions(
        &msg,
        "model_head_nlayers_1e18",
        &["invalid model configuration", "nlayers at most 64"],
    );
}

/// Saved metadata with `patch_size: 2^32`: the patch embedding's fan-in (3·p²) overflowed.
#[test]
fn model_patch_size_huge_is_refused() {
    let msg = model_err("model_patch_size_2pow32.safetensors");
    assert_mentions(
        &msg,
        "model_patch_size_2pow32",
        &["invalid model configuration", "patch_size"],
    );
}

/// A backbone whose `pos_embed` is (1, 0, D): `pos[1] - 1` underflowed while inferring the grid.
#[test]
fn backbone_pos_embed_without_tokens_is_refused() {
    let path = fixture("checkpoint", "backbone_pos_embed_without_tokens.safetensors");
    let msg = match _dino_rs::dino::Dino::load_backbone(&path, None, &candle_core::Device::Cpu) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    assert_mentions(
        &msg,
        "backbone_pos_embed_without_tokens",
        &["unexpected shapes", "pos_embed [1, 0, 8]"],
    );
}

/// A trainer checkpoint asking for 10^12 epochs: the lr/wd/momentum schedules (one f64 per
/// iteration) asked the allocator for terabytes.
#[test]
fn trainer_epochs_huge_is_refused() {
    let msg = trainer_err("trainer_epochs_1e12.safetensors");
    assert_mentions(
        &msg,
        "trainer_epochs_1e12",
        &["invalid training configuration", "epochs (1000000000000)"],
    );
}

/// `epochs · niter_per_ep` overflowed usize (2^40 · 2^40).
#[test]
fn trainer_epochs_times_niter_overflow_is_refused() {
    let msg = trainer_err("trainer_epochs_times_niter_overflows.safetensors");
    assert_mentions(
        &msg,
        "trainer_epochs_times_niter_overflows",
        &["invalid training configuration"],
    );
}

/// `niter_per_ep: 0` with 2^50 epochs: no iteration schedule, but the teacher-temperature schedule
/// (one value per epoch) asked for 8 PiB.
#[test]
fn trainer_niter_zero_is_refused() {
    let msg = trainer_err("trainer_niter_zero_epochs_2pow50.safetensors");
    assert_mentions(
        &msg,
        "trainer_niter_zero_epochs_2pow50",
        &["invalid training configuration", "niter_per_ep (0)"],
    );
}

/// `n_local: usize::MAX`: the loss's crop count `2 + n_local` overflowed.
#[test]
fn trainer_n_local_huge_is_refused() {
    let msg = trainer_err("trainer_n_local_usize_max.safetensors");
    assert_mentions(
        &msg,
        "trainer_n_local_usize_max",
        &["invalid training configuration", "n_local"],
    );
}

fn weights_err(name: &str) -> String {
    let path = fixture("checkpoint", name);
    match _dino_rs::checkpoint::load_weights(&path) {
        Ok(_) => panic!("{name} loaded"),
        Err(e) => e.to_string(),
    }
}

/// Found by the fuzzer (minimised): a pickle whose storage reference is a tuple one element
/// short. candle-core 0.11.1's `rebuild_args` did `Vec::remove(4)` on it and panicked; the panic
/// is now caught at the call into candle and reported as a malformed file.
#[test]
fn pth_rebuild_args_panic_is_an_error() {
    for name in [
        "pth_rebuild_args_panic_fuzzer_min.pth",
        "pth_storage_tuple_without_numel.pth",
    ] {
        let msg = weights_err(name);
        assert_mentions(&msg, name, &["cannot read PyTorch checkpoint"]);
    }
    let msg = weights_err("pth_storage_tuple_without_numel.pth");
    assert!(msg.contains("malformed pickle data"), "{msg}");
}

/// A pickle declaring a 2^20 × 2^20 float tensor over an 8-byte storage: candle allocated the
/// declared 4 TiB before reading. Declared sizes are now checked against the file's length.
#[test]
fn pth_shape_larger_than_file_is_refused() {
    let msg = weights_err("pth_shape_2pow40_in_8_bytes.pth");
    assert_mentions(
        &msg,
        "pth_shape_2pow40_in_8_bytes",
        &["tensor w declares shape [1048576, 1048576]", "more data than the"],
    );
}
