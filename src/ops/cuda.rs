//! What dino_rs's CUDA kernels (src/ops/cuda/*.cu, compiled to PTX by build.rs) share: views of
//! contiguous storage, and their launch shapes (src/ops/launch.rs) as cudarc takes them.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Result};

use super::launch::Launch;

impl From<Launch> for LaunchConfig {
    fn from(l: Launch) -> Self {
        let ([gx, gy, gz], [bx, by, bz]) = (l.grid, l.block);
        LaunchConfig {
            grid_dim: (gx, gy, gz),
            block_dim: (bx, by, bz),
            shared_mem_bytes: 0,
        }
    }
}

/// [`super::launch::grid_stride`] as cudarc takes it.
pub(super) fn grid_stride(n: usize) -> LaunchConfig {
    super::launch::grid_stride(n).into()
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
