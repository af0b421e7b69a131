//! With the `cuda` feature, compiles dino_rs's own CUDA kernels (src/ops/cuda/*.cu) to PTX, which
//! the driver loads at run time. The default (CPU) build needs no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

/// The kernel sources in src/ops/cuda, each compiled to `$OUT_DIR/<name>.ptx`.
const KERNELS: &[&str] = &[
    "update",
    "gelu",
    "residual",
    "layer_norm",
    "softmax",
    "attention",
    "pixels",
    "weight_norm",
    "bias",
    "pack",
];

fn main() {
    println!("cargo:rerun-if-changed=src/ops/cuda");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    // The driver JIT-compiles PTX for the card it finds; this only sets the oldest it may be.
    let arch = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    for name in KERNELS {
        let src = format!("src/ops/cuda/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("-arch=compute_{arch}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc} for {src} (the cuda feature needs nvcc: set NVCC): {e}"));
        assert!(status.success(), "{nvcc} failed on {src}");
    }
}
