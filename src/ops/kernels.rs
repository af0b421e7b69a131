//! dino_rs's CUDA kernels, registered once: build.rs compiles every src/ops/cuda/*.cu to PTX and
//! lists them in the table below, and each op asks for its kernel by module and name. The launch
//! shapes and parameter records are launch.rs's; the helpers the kernels share are in
//! src/ops/cuda/common.cuh.

use candle_core::Result;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The CUDA module name and PTX of src/ops/cuda/`stem`.cu.
pub(crate) fn module(stem: &str) -> Result<(&'static str, &'static str)> {
    match MODULES.iter().find(|(s, _, _)| *s == stem) {
        Some((_, name, ptx)) => Ok((name, ptx)),
        None => candle_core::bail!("no CUDA kernel module {stem:?} (src/ops/cuda/{stem}.cu)"),
    }
}

/// Kernel `$name` of src/ops/cuda/`$stem`.cu on the candle CUDA device `$dev`, its module loaded
/// the first time one of its kernels is asked for. A macro, not a function: the loaded kernel's
/// type is private to candle.
macro_rules! kernel {
    ($dev:expr, $stem:expr, $name:expr) => {
        $crate::ops::kernels::module($stem).and_then(|(module, ptx)| $dev.get_or_load_custom_func($name, module, ptx))
    };
}
pub(crate) use kernel;
