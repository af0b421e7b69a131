//! The `dino_rs._dino_rs` extension module: one binding file per core module.

mod augment;
mod data;
mod errors;
mod loss;
mod model;
mod numpy;
mod train;

use pyo3::prelude::*;

/// Sets the number of threads dino_rs computes on (default: `DINO_RS_NUM_THREADS`, else all cores).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    Ok(crate::parallel::set_num_threads(n)?)
}

/// The number of threads dino_rs computes on.
#[pyfunction]
fn get_num_threads() -> usize {
    crate::parallel::num_threads()
}

/// Which build is installed: `build` ("cpu" or "cuda"), the CUDA version and compute capability a
/// CUDA build targets (None in a CPU build), and the CPU features detected at run time, which pick
/// the matmul and fused-op kernels (AVX-512 where present, else AVX2, else portable code).
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    let d = pyo3::types::PyDict::new(py);
    d.set_item("version", env!("CARGO_PKG_VERSION"))?;
    d.set_item("build", if cfg!(feature = "cuda") { "cuda" } else { "cpu" })?;
    // CUDARC_CUDA_VERSION is e.g. 13000: major·1000 + minor·10.
    let cuda_version = option_env!("DINO_RS_CUDA_VERSION")
        .and_then(|v| v.parse::<u32>().ok())
        .map(|v| format!("{}.{}", v / 1000, v % 1000 / 10));
    d.set_item("cuda_version", cuda_version)?;
    d.set_item("cuda_compute_capability", option_env!("DINO_RS_CUDA_COMPUTE_CAP"))?;
    let features = pyo3::types::PyDict::new(py);
    #[cfg(target_arch = "x86_64")]
    {
        features.set_item("avx2", std::is_x86_feature_detected!("avx2"))?;
        features.set_item("fma", std::is_x86_feature_detected!("fma"))?;
        features.set_item("avx512f", std::is_x86_feature_detected!("avx512f"))?;
    }
    d.set_item("cpu_arch", std::env::consts::ARCH)?;
    d.set_item("cpu_features", features)?;
    Ok(d)
}

/// Whether this build has CUDA support and a CUDA device can be opened.
#[pyfunction]
fn cuda_is_available() -> bool {
    cuda_error().is_none()
}

/// Why no CUDA device can be used, or None when one opens: a CPU-only build, no driver library,
/// no device, a driver too old for the build, ... (what [`cuda_is_available`] answers False for).
#[pyfunction]
fn cuda_error() -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        crate::device::cuda(0).err()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Some("this build of dino_rs has no CUDA support (built without the `cuda` feature)".into())
    }
}

/// A row of `_kernel_parity`: the check, its figure, or the error that stopped it.
type ParityRow = (String, Option<f64>, Option<String>);

/// Each of dino_rs's device kernels against the CPU (src/ops/parity.rs), in a fixed order:
/// `(check, max |device − cpu| / max |cpu|, None)`, or `(check, None, error)` for a check that
/// failed, after which the next ones still run. For scripts/gpu_check.sh and
/// tests/python/test_gpu.py; on "cpu" every value is 0 (and within 1e-2 for the bf16 checks).
#[pyfunction]
fn _kernel_parity(py: Python<'_>, device: &str) -> PyResult<Vec<ParityRow>> {
    let device = model::parse_device(device)?;
    let checks = py
        .detach(|| crate::ops::kernel_parity(&device))
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    Ok(checks
        .into_iter()
        .map(|(name, value)| match value {
            Ok(v) => (name, Some(v), None),
            Err(e) => (name, None, Some(e)),
        })
        .collect())
}

/// Writes a uint8 (H, W, 3) or (H, W) array as a PNG file (used by the demo and plot helpers).
#[pyfunction]
fn _write_png(py: Python<'_>, path: std::path::PathBuf, image: &Bound<'_, ::numpy::PyUntypedArray>) -> PyResult<()> {
    let img = numpy::image_from_array(image)?;
    py.detach(move || {
        img.save_with_format(&path, image::ImageFormat::Png)
            .map_err(|e| (path, e))
    })
    .map_err(|(path, e)| pyo3::exceptions::PyOSError::new_err(format!("{}: cannot write PNG ({e})", path.display())))
}

#[pymodule]
fn _dino_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULT_MAX_PIXELS", crate::config::DEFAULT_MAX_PIXELS)?;
    m.add_class::<augment::PyMultiCropAugmenter>()?;
    m.add_class::<data::PyImageFolder>()?;
    m.add_class::<data::PyArrayDataset>()?;
    m.add_class::<data::PyMultiCropLoader>()?;
    m.add_class::<data::LoaderIterator>()?;
    m.add_class::<model::PyDino>()?;
    m.add_class::<loss::PyDinoLoss>()?;
    m.add_class::<train::PyTrainer>()?;
    m.add_function(wrap_pyfunction!(model::load_backbone, m)?)?;
    m.add_function(wrap_pyfunction!(loss::cosine_scheduler, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_is_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_error, m)?)?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add_function(wrap_pyfunction!(_write_png, m)?)?;
    m.add_function(wrap_pyfunction!(_kernel_parity, m)?)?;
    m.add_function(wrap_pyfunction!(train::_train_config, m)?)?;
    Ok(())
}
