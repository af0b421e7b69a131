//! What dino_rs's CUDA kernels (src/ops/cuda/*.cu, compiled to PTX by build.rs) share: views of
//! contiguous storage and the launch shape of their element-wise, grid-stride loops.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Result};

/// A grid-stride launch over `n` elements: 256 threads a block, at most 65,535 blocks.
pub(super) fn grid_stride(n: usize) -> LaunchConfig {
    let threads = 256u32;
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).clamp(1, 65_535), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The elements of `s` that the contiguous layout `l` covers.
pub(super) fn slice_view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// [`slice_view`] of a storage holding `T`.
pub(super) fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    slice_view(s.as_cuda_slice::<T>()?, l, op)
}
