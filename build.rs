//! With the `cuda` feature, compiles dino_rs's own CUDA kernels (every src/ops/cuda/*.cu) to PTX,
//! which the driver loads at run time, and writes the registry that embeds them
//! (`$OUT_DIR/kernels.rs`, included by src/ops/kernels.rs): a new `.cu` file needs no list edited.
//! The default (CPU) build needs no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

const KERNEL_DIR: &str = "src/ops/cuda";

fn main() {
    println!("cargo:rerun-if-changed={KERNEL_DIR}");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDARC_CUDA_VERSION");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    // NVIDIA's CUDA 13 pip packages (the dino-rs-cu13 wheel depends on them) put their libraries in
    // site-packages/nvidia/cu13/lib, beside the dino_rs package folder that holds the extension:
    // found there first for libcudart (linked) and for what cudarc opens at run time (the caller's
    // RUNPATH applies to dlopen), else on the system's search path, as before.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-rpath,$ORIGIN/../nvidia/cu13/lib");
    // For dino_rs.build_info(): what this CUDA build targets.
    let arch_for_info = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    println!("cargo:rustc-env=DINO_RS_CUDA_COMPUTE_CAP={arch_for_info}");
    if let Ok(v) = std::env::var("CUDARC_CUDA_VERSION") {
        println!("cargo:rustc-env=DINO_RS_CUDA_VERSION={v}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    // The driver JIT-compiles PTX for the card it finds; this only sets the oldest it may be.
    let arch = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let mut stems: Vec<String> = std::fs::read_dir(KERNEL_DIR)
        .unwrap_or_else(|e| panic!("reading {KERNEL_DIR}: {e}"))
        .filter_map(|entry| {
            let path = entry.expect("a directory entry").path();
            (path.extension()? == "cu").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    stems.sort();
    let mut registry = String::from(
        "/// Every src/ops/cuda/*.cu as (file stem, CUDA module name, PTX); written by build.rs.\n\
         pub(crate) const MODULES: &[(&str, &str, &str)] = &[\n",
    );
    for stem in &stems {
        let src = format!("{KERNEL_DIR}/{stem}.cu");
        let ptx = out.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("-arch=compute_{arch}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc} for {src} (the cuda feature needs nvcc: set NVCC): {e}"));
        assert!(status.success(), "{nvcc} failed on {src}");
        registry += &format!(
            "    ({stem:?}, \"dino_rs_{stem}\", include_str!({:?})),\n",
            ptx.display().to_string()
        );
    }
    registry += "];\n";
    std::fs::write(out.join("kernels.rs"), registry).expect("writing kernels.rs");
}
