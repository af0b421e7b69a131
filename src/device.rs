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
    keep_freed_memory(cuda)
        .map_err(|e| format!("CUDA device {index}: setting its memory pool's release threshold: {e}"))?;
    open.push((index, device.clone()));
    Ok(device)
}

/// The memory pool cudarc allocates from (`cuMemAllocAsync` draws on the device's current pool, its
/// default pool unless a program set another).
#[cfg(feature = "cuda")]
fn memory_pool(
    cuda: &candle_core::CudaDevice,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool, String> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let device = cuda.cuda_stream().context().cu_device();
    // SAFETY: a device handle of an open context.
    unsafe { result::device::get_mem_pool(device) }.map_err(|e| e.to_string())
}

/// Freed device memory stays in the pool for the next allocation. The pool's release threshold is 0
/// by default: at every synchronisation (each step's `loss.item()`) it hands all its unused memory
/// back to the driver, and the next step maps it again, page by page. PyTorch's caching allocator
/// keeps what it frees in the same way.
#[cfg(feature = "cuda")]
fn keep_freed_memory(cuda: &candle_core::CudaDevice) -> Result<(), String> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let pool = memory_pool(cuda)?;
    let mut threshold = u64::MAX;
    // SAFETY: the pool is the device's; the attribute's value is a u64 (cuuint64_t).
    unsafe {
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .map_err(|e| e.to_string())
}

/// The release threshold of `device`'s memory pool, in bytes (`u64::MAX` once [`cuda`] opened it;
/// kernel parity checks it). `None` off CUDA.
pub fn memory_pool_release_threshold(device: &Device) -> candle_core::Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        let pool = memory_pool(cuda).map_err(candle_core::Error::Msg)?;
        let mut threshold = 0u64;
        // SAFETY: as in keep_freed_memory.
        unsafe {
            result::mem_pool::get_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        }
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        return Ok(Some(threshold));
    }
    let _ = device;
    Ok(None)
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
        staging::copy(cuda, &data, &mut slice.as_view_mut(), |_| true)?;
        return Ok(on_device(slice, cuda, shape));
    }
    Tensor::from_vec(data, shape, device)
}

/// `data` as an f32 tensor of `shape` on `device`, through the same page-locked staging as
/// [`upload_u8`] to a CUDA device (crops given as float arrays: 134 MB a ViT-S training step). NaN
/// or infinite values are an error naming `what`: on CUDA each MiB is checked as it is copied into
/// staging, while it is in cache, rather than in a pass of its own over the whole array.
pub fn upload_f32(data: &[f32], shape: &[usize], device: &Device, what: &str) -> crate::Result<Tensor> {
    if data.len() != shape.iter().product::<usize>() {
        return Err(crate::Error::Shape(format!(
            "{what}: {} values for shape {shape:?}",
            data.len()
        )));
    }
    let non_finite = || crate::Error::invalid(format!("{what} contains NaN or infinite values"));
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        if !data.is_empty() {
            // SAFETY: f32 has no padding bytes, and any bytes are valid u8s.
            let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) };
            // SAFETY: as in upload_u8.
            let mut slice = unsafe { cuda.alloc::<f32>(data.len()) }?;
            let finite = {
                // SAFETY: the same memory seen as its bytes, which the copy writes in full.
                let mut view = unsafe { slice.transmute_mut::<u8>(bytes.len()) }
                    .ok_or_else(|| candle_core::Error::Msg("upload_f32: a buffer too small for its bytes".into()))?;
                // Chunks start at multiples of 4 bytes from an f32 slice: whole, aligned floats.
                staging::copy(cuda, bytes, &mut view, |chunk| {
                    // SAFETY: see above; the length is a multiple of 4.
                    all_finite(unsafe { std::slice::from_raw_parts(chunk.as_ptr().cast::<f32>(), chunk.len() / 4) })
                })?
            };
            // The queued copies finish on the stream; the buffer then goes back to the pool unread.
            return if finite {
                Ok(on_device(slice, cuda, shape))
            } else {
                Err(non_finite())
            };
        }
    }
    use rayon::prelude::*;
    let finite = crate::parallel::install(|| data.par_chunks(1 << 16).all(all_finite));
    if !finite {
        return Err(non_finite());
    }
    Ok(Tensor::from_slice(data, shape, device)?)
}

/// Whether every value is finite (one branch per chunk, not per value: this runs over every crop).
fn all_finite(values: &[f32]) -> bool {
    !values.iter().fold(false, |bad, v| bad | !v.is_finite())
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

/// The staging buffers' bookkeeping, apart from CUDA so that the CPU tests check it: which buffer
/// a piece of an upload is written into, and which buffers are freed to keep page-locked memory
/// bounded. `B` is a page-locked buffer on CUDA.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod slots {
    /// Buffers per slot: an upload's copy may still be in flight while the next upload of that
    /// shape is written, into the other buffer.
    pub const RING: usize = 2;
    /// The largest staging buffer: a larger upload goes in pieces of this size (float crops given
    /// to `Trainer.step` are 134 MB at ViT-S's batch of 64), and each piece's copy overlaps the
    /// next piece's memcpy.
    pub const PIECE: usize = 32 << 20;
    /// Page-locked bytes kept per device. Past this the least recently used slot is freed (which
    /// waits for its copies); a ViT-S step's float crops take ~200 MB of it.
    pub const PINNED: usize = 1 << 30;

    /// Piece `index` of uploads whose piece is `len` bytes. Each piece of an upload has a slot of
    /// its own: with one ring for all the pieces of a size, piece k+2 of a 64 MiB+ upload waited
    /// for piece k's copy, which the stream runs only after the whole previous step, so the host
    /// stalled until the GPU caught up. Now a piece waits only for the same piece RING uploads ago.
    struct Slot<B> {
        len: usize,
        index: usize,
        buffers: Vec<B>,
        next: usize,
        used: u64,
    }

    pub struct Slots<B> {
        clock: u64,
        slots: Vec<Slot<B>>,
    }

    impl<B> Default for Slots<B> {
        fn default() -> Self {
            Slots {
                clock: 0,
                slots: Vec::new(),
            }
        }
    }

    impl<B> Slots<B> {
        /// The buffer to write piece `index` (`len` bytes) of the next upload into, made by `alloc`
        /// when its slot has fewer than RING.
        pub fn buffer<E>(
            &mut self,
            len: usize,
            index: usize,
            alloc: impl FnOnce() -> Result<B, E>,
        ) -> Result<&mut B, E> {
            self.clock += 1;
            let at = match self.slots.iter().position(|s| s.len == len && s.index == index) {
                Some(i) => i,
                None => {
                    while !self.slots.is_empty() && self.pinned() + RING * len > PINNED {
                        let oldest = (0..self.slots.len()).min_by_key(|&i| self.slots[i].used).unwrap_or(0);
                        // On CUDA, dropping a page-locked buffer waits for its copies to finish.
                        self.slots.swap_remove(oldest);
                    }
                    self.slots.push(Slot {
                        len,
                        index,
                        buffers: Vec::with_capacity(RING),
                        next: 0,
                        used: 0,
                    });
                    self.slots.len() - 1
                }
            };
            let slot = &mut self.slots[at];
            slot.used = self.clock;
            let k = slot.next % RING;
            slot.next += 1;
            if slot.buffers.len() <= k {
                slot.buffers.push(alloc()?);
            }
            Ok(&mut slot.buffers[k])
        }

        /// The bytes the slots hold.
        pub fn pinned(&self) -> usize {
            self.slots.iter().map(|s| s.len * s.buffers.len()).sum()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The buffers (numbered as they were made) that the pieces of one upload of `bytes` go to.
        fn upload(slots: &mut Slots<usize>, made: &mut usize, bytes: usize) -> Vec<usize> {
            let lens: Vec<usize> = (0..bytes.div_ceil(PIECE))
                .map(|k| PIECE.min(bytes - k * PIECE))
                .collect();
            lens.iter()
                .enumerate()
                .map(|(k, &len)| {
                    *slots
                        .buffer(len, k, || {
                            *made += 1;
                            Ok::<_, ()>(*made)
                        })
                        .unwrap()
                })
                .collect()
        }

        #[test]
        fn the_pieces_of_an_upload_never_share_a_buffer_and_wait_only_for_ring_uploads_ago() {
            let (mut slots, mut made) = (Slots::default(), 0);
            // A ViT-S step's float crops: globals 77 MB (3 pieces), locals 57 MB (2 pieces).
            let (globals, locals) = (2 * 64 * 3 * 224 * 224 * 4, 8 * 64 * 3 * 96 * 96 * 4);
            let steps: Vec<[Vec<usize>; 2]> = (0..4)
                .map(|_| {
                    [
                        upload(&mut slots, &mut made, globals),
                        upload(&mut slots, &mut made, locals),
                    ]
                })
                .collect();
            // No buffer twice among one step's uploads: a piece then waits for a copy of the step
            // before, which the stream ran before that step's compute, never for a copy queued
            // behind it (the stall of one ring per size, where piece k+2 waited for piece k).
            for step in &steps {
                let mut all: Vec<usize> = step.concat();
                let n = all.len();
                all.sort();
                all.dedup();
                assert_eq!(all.len(), n, "a step's pieces share a buffer: {steps:?}");
            }
            // From the third step on the buffers of the first two come back: no more are made.
            assert_eq!((&steps[2], &steps[3]), (&steps[0], &steps[1]));
            assert_eq!(made, 8, "{steps:?}");
            assert!(slots.pinned() <= PINNED);
        }

        #[test]
        fn page_locked_memory_stays_bounded() {
            let (mut slots, mut made) = (Slots::default(), 0);
            // Uploads of ever new sizes (a caller's varying batch sizes): old slots are freed.
            for i in 1..200 {
                upload(&mut slots, &mut made, (i * 3) << 20);
                assert!(slots.pinned() <= PINNED, "{} bytes pinned", slots.pinned());
            }
        }
    }
}

#[cfg(feature = "cuda")]
mod staging {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use candle_core::cuda_backend::cudarc::driver::{CudaViewMut, PinnedHostSlice};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Result};
    use rayon::prelude::*;

    use super::slots::{Slots, PIECE};

    type Pool = HashMap<candle_core::cuda_backend::DeviceId, Slots<PinnedHostSlice<u8>>>;

    /// `data` copied into `dst` (on `dev`'s stream) through the pool's staging buffers, and whether
    /// `check` held for every chunk of up to 1 MiB (each checked while it is copied; an upload
    /// whose check failed is still copied in full, and the caller discards it).
    pub(super) fn copy(
        dev: &CudaDevice,
        data: &[u8],
        dst: &mut CudaViewMut<'_, u8>,
        check: impl Fn(&[u8]) -> bool + Sync,
    ) -> Result<bool> {
        let mut ok = true;
        for (k, piece) in data.chunks(PIECE).enumerate() {
            let at = k * PIECE;
            ok &= copy_piece(dev, k, piece, &mut dst.slice_mut(at..at + piece.len()), &check)?;
        }
        Ok(ok)
    }

    fn copy_piece(
        dev: &CudaDevice,
        index: usize,
        data: &[u8],
        dst: &mut CudaViewMut<'_, u8>,
        check: &(impl Fn(&[u8]) -> bool + Sync),
    ) -> Result<bool> {
        static POOL: Mutex<Option<Pool>> = Mutex::new(None);
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let slots = pool.get_or_insert_with(HashMap::new).entry(dev.id()).or_default();
        let stream = dev.cuda_stream();
        // SAFETY: written in full below before any copy reads it.
        let staging = slots.buffer(data.len(), index, || {
            unsafe { stream.context().alloc_pinned::<u8>(data.len()) }.w()
        })?;
        // Waits for this buffer's previous copy (RING uploads of this piece ago) to finish. Copied
        // on the pool: one thread's memcpy is far below the memory bandwidth.
        let out = staging.as_mut_slice().w()?;
        let ok = crate::parallel::install(|| {
            out.par_chunks_mut(1 << 20)
                .zip(data.par_chunks(1 << 20))
                .map(|(o, d)| {
                    o.copy_from_slice(d);
                    check(d)
                })
                .reduce(|| true, |a, b| a & b)
        });
        // Asynchronous from page-locked memory; the buffer records an event that the next write
        // into it waits for.
        stream.memcpy_htod(staging, dst).w()?;
        Ok(ok)
    }
}
