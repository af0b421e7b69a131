//! What dino_rs's CUDA kernels (src/ops/cuda/*.cu, compiled to PTX by build.rs) share: views of
//! contiguous storage, and their launch shapes (src/ops/launch.rs) as cudarc takes them.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};

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

/// One warp per row ([`super::launch::row_blocks`]) as cudarc takes it.
pub(super) fn row_blocks(rows: usize) -> LaunchConfig {
    super::launch::row_blocks(rows).into()
}

/// (rows, columns) of a row op's input: the last dimension is a row.
pub(super) fn rows_cols(l: &Layout) -> (usize, usize) {
    let d = l.dims().last().copied().unwrap_or(1).max(1);
    (l.shape().elem_count() / d, d)
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

/// The device address of the first element of `t` (contiguous, f32 or bf16), for the kernels that
/// take tables of tensors. The tensor must stay alive until the kernel that reads the address has
/// run: its storage is freed in stream order after that.
pub(super) fn device_ptr(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle_core::bail!("expected a CUDA tensor");
    };
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor");
    };
    let stream = s.device.cuda_stream();
    let ptr = match s.dtype() {
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::BF16 => s.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        other => candle_core::bail!("expected an f32 or bf16 tensor, got {other:?}"),
    };
    Ok(ptr + (start * s.dtype().size_in_bytes()) as u64)
}
