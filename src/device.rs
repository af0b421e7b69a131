//! CUDA devices as dino_rs opens them: one candle device per ordinal for the whole process, issuing
//! all its work on one stream of its own.
//!
//! Why not `Device::new_cuda`: that device issues work on CUDA's *per-thread* default stream, which
//! resolves to a different stream on every host thread, and per-thread streams do not wait for
//! each other. dino_rs runs a training step or a forward pass on whichever dino_rs pool thread picks
//! it up, uploads batches from the caller's thread, and frees a tensor on the thread that drops it
//! (a stream-ordered free): on per-thread streams, step k+1 could read weights that step k's
//! AdamW is still writing, and memory could be reused while a kernel on another stream reads it.
//! One stream shared by every thread orders all of it as it was issued.
//!
//! With a stream of its own, cudarc counts the context as multi-stream and then records and waits
//! on CUDA events around every read and write of every tensor (and it creates two events for
//! every allocation in any case): host work per operation that orders nothing one stream does not
//! already order. Event tracking is turned off.
//!
//! Sharing the device also lets tensors of two models meet: candle refuses to combine tensors of
//! two device objects, even for the same GPU.

use candle_core::{Device, Tensor};

/// CUDA device `index`, opened on first use and shared afterwards. A failed open is not
/// remembered, so a later call tries again.
#[cfg(feature = "cuda")]
pub fn cuda(index: usize) -> Result<Device, String> {
    static OPEN: std::sync::Mutex<Vec<(usize, Device)>> = std::sync::Mutex::new(Vec::new());
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, device)) = open.iter().find(|(i, _)| *i == index) {
        return Ok(device.clone());
    }
    let device = crate::panic::open_cuda(index)?;
    let cuda = device.as_cuda_device().map_err(|e| e.to_string())?;
    // SAFETY: cudarc's events order work across streams; every tensor of this device is used on its
    // one stream, where the issue order already is the execution order.
    unsafe { cuda.disable_event_tracking() };
    open.push((index, device.clone()));
    Ok(device)
}

/// `data` as a u8 tensor of `shape` on `device`. To a CUDA device it goes through a page-locked
/// staging buffer and an asynchronous copy on the device's stream: a copy from ordinary (pageable)
/// memory makes the driver stage it itself and, for batches of megabytes, hold the calling thread
/// until the stream has drained up to the copy, i.e. until the GPU has finished the previous step.
pub fn upload_u8(data: Vec<u8>, shape: (usize, usize, usize, usize), device: &Device) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let elems = shape.0 * shape.1 * shape.2 * shape.3;
        if data.len() != elems {
            candle_core::bail!("{} bytes for a u8 tensor of shape {shape:?}", data.len());
        }
        // SAFETY: the copy below fills it before anything reads it (both on the device's stream).
        let mut slice = unsafe { cuda.alloc::<u8>(data.len()) }?;
        staging::copy(cuda, &data, &mut slice.as_view_mut())?;
        return Ok(on_device(slice, cuda, shape));
    }
    Tensor::from_vec(data, shape, device)
}

/// `data` as an f32 tensor of `shape` on `device`, through the same page-locked staging as
/// [`upload_u8`] to a CUDA device (crops given as float arrays: 134 MB a ViT-S training step).
pub fn upload_f32(data: &[f32], shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        if data.len() != shape.iter().product::<usize>() {
            candle_core::bail!("{} values for an f32 tensor of shape {shape:?}", data.len());
        }
        if !data.is_empty() {
            // SAFETY: f32 has no padding bytes, and any bytes are valid u8s.
            let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) };
            // SAFETY: as in upload_u8.
            let mut slice = unsafe { cuda.alloc::<f32>(data.len()) }?;
            {
                // SAFETY: the same memory seen as its bytes, which the copy writes in full.
                let mut view = unsafe { slice.transmute_mut::<u8>(bytes.len()) }
                    .ok_or_else(|| candle_core::Error::Msg("upload_f32: a buffer too small for its bytes".into()))?;
                staging::copy(cuda, bytes, &mut view)?;
            }
            return Ok(on_device(slice, cuda, shape));
        }
    }
    Tensor::from_slice(data, shape, device)
}

/// A device buffer as a tensor of `shape` (no graph).
#[cfg(feature = "cuda")]
pub(crate) fn on_device<T: candle_core::cuda_backend::CudaDType, S: Into<candle_core::Shape>>(
    slice: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    cuda: &candle_core::CudaDevice,
    shape: S,
) -> Tensor {
    let storage = candle_core::Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(slice, cuda.clone()));
    Tensor::from_storage(storage, shape, candle_core::op::BackpropOp::none(), false)
}

#[cfg(feature = "cuda")]
mod staging {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use candle_core::cuda_backend::cudarc::driver::{CudaViewMut, PinnedHostSlice};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Result};
    use rayon::prelude::*;

    /// Buffers per size: a batch's copy may still be in flight while the next batch of that size
    /// is written, into the other buffer.
    const RING: usize = 2;
    /// Sizes kept per device (a training run uploads two: its globals and its locals, plus a last
    /// short batch without drop_last); the least recently used size goes beyond that.
    const SIZES: usize = 4;
    /// The largest staging buffer: a larger upload goes in pieces of this size (float crops given
    /// to `Trainer.step` are 134 MB at ViT-S's batch of 64), so that page-locked memory stays below
    /// RING × SIZES × PIECE whatever a caller passes, and a piece's copy overlaps the next one's
    /// memcpy into the other buffer.
    const PIECE: usize = 32 << 20;

    struct Ring {
        len: usize,
        buffers: Vec<PinnedHostSlice<u8>>,
        next: usize,
        used: u64,
    }

    type Pool = HashMap<candle_core::cuda_backend::DeviceId, (u64, Vec<Ring>)>;

    /// `data` copied into `dst` (on `dev`'s stream) through the pool's staging buffers.
    pub(super) fn copy(dev: &CudaDevice, data: &[u8], dst: &mut CudaViewMut<'_, u8>) -> Result<()> {
        for (k, piece) in data.chunks(PIECE).enumerate() {
            let at = k * PIECE;
            copy_piece(dev, piece, &mut dst.slice_mut(at..at + piece.len()))?;
        }
        Ok(())
    }

    fn copy_piece(dev: &CudaDevice, data: &[u8], dst: &mut CudaViewMut<'_, u8>) -> Result<()> {
        static POOL: Mutex<Option<Pool>> = Mutex::new(None);
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let (clock, rings) = pool.get_or_insert_with(HashMap::new).entry(dev.id()).or_default();
        *clock += 1;
        let at = match rings.iter().position(|r| r.len == data.len()) {
            Some(i) => i,
            None => {
                if rings.len() >= SIZES {
                    let oldest = (0..rings.len()).min_by_key(|&i| rings[i].used).unwrap_or(0);
                    // Dropping a pinned buffer waits for its copies to finish.
                    rings.swap_remove(oldest);
                }
                rings.push(Ring {
                    len: data.len(),
                    buffers: Vec::with_capacity(RING),
                    next: 0,
                    used: 0,
                });
                rings.len() - 1
            }
        };
        let ring = &mut rings[at];
        ring.used = *clock;
        let k = ring.next % RING;
        ring.next += 1;
        if ring.buffers.len() <= k {
            let stream = dev.cuda_stream();
            // SAFETY: written in full below before any copy reads it.
            ring.buffers
                .push(unsafe { stream.context().alloc_pinned::<u8>(data.len()) }.w()?);
        }
        let staging = &mut ring.buffers[k];
        // Waits for this buffer's previous copy (RING uploads of this size ago) to finish. Copied
        // on the pool: one thread's memcpy is far below the memory bandwidth.
        let out = staging.as_mut_slice().w()?;
        crate::parallel::install(|| {
            out.par_chunks_mut(1 << 20)
                .zip(data.par_chunks(1 << 20))
                .for_each(|(o, d)| o.copy_from_slice(d))
        });
        // Asynchronous from page-locked memory; the buffer records an event that the next write
        // into it waits for.
        dev.cuda_stream().memcpy_htod(staging, dst).w()
    }
}
