//! Parameter updates over all parameters at once on CUDA, as PyTorch's multi-tensor ("foreach")
//! optimisers do: AdamW in one launch, the EMA teacher in one, gradient clipping in two
//! (src/ops/cuda/update.cu). Per parameter these were three or four launches and, for clipping,
//! three temporaries for the norm: ~1,200 launches a ViT-S step, all after the step's one read-back
//! (the loss), when the GPU waits for the host to queue them.
//!
//! Each kernel block takes one chunk of one tensor; the host lists the chunks ([`chunk_table`]) and
//! the tensors' device pointers and per-tensor scalars, and uploads both tables once per call.
//! Elsewhere (the CPU, other dtypes, `DINO_RS_COMPOSED_OPS=1`) each function returns false and the
//! caller updates parameter by parameter.

// Without the `cuda` feature every function here returns false before it reaches a kernel.
#![cfg_attr(not(feature = "cuda"), allow(unused_variables, dead_code))]

use candle_core::{Result, Tensor};

use super::update::AdamWStep;

/// Elements per chunk: `CHUNK` in src/ops/cuda/update.cu.
const CHUNK: usize = 8192;

/// One parameter's AdamW update: the parameter, its moments and gradient, and its step's scalars.
pub struct AdamWItem<'a> {
    pub param: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub grad: &'a Tensor,
    pub step: AdamWStep,
}

/// The chunks of tensors of `lens` elements, tensor by tensor: `(tensor, first element)` for each,
/// and the index of each tensor's first chunk. Empty tensors have none.
fn chunk_table(lens: &[usize]) -> (Vec<[u32; 2]>, Vec<u32>) {
    let mut chunks = Vec::with_capacity(lens.iter().map(|n| n.div_ceil(CHUNK)).sum());
    let mut first = Vec::with_capacity(lens.len());
    for (t, &n) in lens.iter().enumerate() {
        first.push(chunks.len() as u32);
        chunks.extend((0..n).step_by(CHUNK).map(|start| [t as u32, start as u32]));
    }
    (chunks, first)
}

/// Whether the kernels take `tensors`: a CUDA build with the kernels on, and every tensor f32 on
/// CUDA, contiguous, and small enough for the kernels' 32-bit indices.
fn applies<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> bool {
    cfg!(feature = "cuda")
        && super::kernels_enabled()
        && tensors.into_iter().all(|t| {
            t.device().is_cuda()
                && t.dtype() == candle_core::DType::F32
                && t.is_contiguous()
                && t.elem_count() <= (u32::MAX as usize - CHUNK)
        })
}

/// AdamW on every item, in place. False (nothing changed) where the kernels do not apply; then the
/// caller updates each parameter on its own.
pub fn adamw_foreach(items: &[AdamWItem<'_>]) -> Result<bool> {
    if items.is_empty() || !applies(items.iter().flat_map(|i| [i.param, i.m, i.v, i.grad])) {
        return Ok(false);
    }
    let s0 = items[0].step;
    if items
        .iter()
        .any(|i| (i.step.beta1, i.step.beta2, i.step.eps) != (s0.beta1, s0.beta2, s0.eps))
    {
        candle_core::bail!("adamw: one update over all parameters needs the same betas and eps for all");
    }
    for i in items {
        same_len(i.param, &[i.m, i.v, i.grad], "adamw")?;
    }
    #[cfg(feature = "cuda")]
    cuda::adamw(items, s0)?;
    Ok(true)
}

/// θ_t ← m·θ_t + (1 − m)·θ_s for every `(teacher, student)` pair, in place; false where the
/// kernels do not apply.
pub fn ema_foreach(pairs: &[(&Tensor, &Tensor)], momentum: f64) -> Result<bool> {
    if pairs.is_empty() || !applies(pairs.iter().flat_map(|&(t, s)| [t, s])) {
        return Ok(false);
    }
    for (t, s) in pairs {
        same_len(t, &[s], "ema")?;
    }
    #[cfg(feature = "cuda")]
    cuda::ema(pairs, momentum)?;
    Ok(true)
}

/// DINO's per-parameter clipping of every gradient in place (`g · clip/(‖g‖ + 1e-6)` where that
/// factor is below 1), with nothing read back; false where the kernels do not apply.
pub fn clip_foreach(grads: &[&Tensor], clip: f64) -> Result<bool> {
    if grads.is_empty() || !applies(grads.iter().copied()) {
        return Ok(false);
    }
    #[cfg(feature = "cuda")]
    cuda::clip(grads, clip)?;
    Ok(true)
}

fn same_len(t: &Tensor, others: &[&Tensor], op: &str) -> Result<()> {
    for o in others {
        if o.elem_count() != t.elem_count() {
            candle_core::bail!("{op}: tensors of {:?} and {:?} paired", t.dims(), o.dims());
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Result, Storage, Tensor};

    use super::{chunk_table, AdamWItem, AdamWStep};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/update.ptx"));

    /// Records laid out as update.cu's structs: pointers 8-byte aligned, then 4-byte fields.
    #[derive(Default)]
    struct Records(Vec<u8>);

    impl Records {
        fn ptr(&mut self, t: &Tensor) -> Result<&mut Self> {
            assert!(self.0.len() % 8 == 0, "update.cu's records put their pointers first");
            self.0.extend_from_slice(&device_ptr(t)?.to_le_bytes());
            Ok(self)
        }
        fn u32(&mut self, x: u32) -> &mut Self {
            self.0.extend_from_slice(&x.to_le_bytes());
            self
        }
        fn f32(&mut self, x: f32) -> &mut Self {
            self.0.extend_from_slice(&x.to_le_bytes());
            self
        }
        /// Checks that each of `count` records took `size` bytes (the struct's `sizeof`).
        fn check(&self, count: usize, size: usize, what: &str) -> Result<()> {
            if self.0.len() != count * size {
                candle_core::bail!("{what}: {} bytes written for {count} records of {size}", self.0.len());
            }
            Ok(())
        }
    }

    /// The address of `t`'s first element. The tensor must stay alive until the kernel that reads
    /// the address has run: its storage is freed in stream order after that.
    fn device_ptr(t: &Tensor) -> Result<u64> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            candle_core::bail!("expected a CUDA tensor");
        };
        let Some((start, _)) = layout.contiguous_offsets() else {
            candle_core::bail!("expected a contiguous tensor");
        };
        let stream = s.device.cuda_stream();
        let (ptr, _sync) = s.as_cuda_slice::<f32>()?.device_ptr(&stream);
        Ok(ptr + (start * std::mem::size_of::<f32>()) as u64)
    }

    fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
        Ok(t.device().as_cuda_device()?.clone())
    }

    /// The chunk table of tensors of `lens` elements on the device, its length and each tensor's
    /// first chunk.
    fn chunks(dev: &CudaDevice, lens: &[usize]) -> Result<(CudaSlice<u32>, u32, Vec<u32>)> {
        let (table, first) = chunk_table(lens);
        let count = table.len() as u32;
        Ok((dev.clone_htod(table.as_flattened())?, count, first))
    }

    fn grid(chunks: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (chunks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) fn adamw(items: &[AdamWItem<'_>], s: AdamWStep) -> Result<()> {
        let dev = cuda_device(items[0].param)?;
        let mut rec = Records::default();
        for i in items {
            let [decay, inv_bc2, _, step] = i.step.kernel_scalars();
            rec.ptr(i.param)?.ptr(i.m)?.ptr(i.v)?.ptr(i.grad)?;
            rec.u32(i.param.elem_count() as u32).f32(decay).f32(inv_bc2).f32(step);
        }
        rec.check(items.len(), 48, "adamw")?;
        let lens: Vec<usize> = items.iter().map(|i| i.param.elem_count()).collect();
        let (table, count, _) = chunks(&dev, &lens)?;
        if count == 0 {
            return Ok(());
        }
        let records = dev.clone_htod(&rec.0)?;
        let func = dev.get_or_load_custom_func("dino_adamw_foreach", "dino_rs_update", PTX)?;
        let (keep1, beta2, keep2, eps) = (
            (1.0 - s.beta1) as f32,
            s.beta2 as f32,
            (1.0 - s.beta2) as f32,
            s.eps as f32,
        );
        let mut b = func.builder();
        b.arg(&records)
            .arg(&table)
            .arg(&keep1)
            .arg(&beta2)
            .arg(&keep2)
            .arg(&eps);
        // SAFETY: the arguments follow dino_adamw_foreach's signature; the records hold the
        // addresses of live, contiguous f32 tensors of the lengths recorded, and the table lists
        // chunks inside them.
        unsafe { b.launch(grid(count)) }.w()?;
        Ok(())
    }

    pub(super) fn ema(pairs: &[(&Tensor, &Tensor)], momentum: f64) -> Result<()> {
        let dev = cuda_device(pairs[0].0)?;
        let mut rec = Records::default();
        for (t, s) in pairs {
            rec.ptr(t)?.ptr(s)?.u32(t.elem_count() as u32).u32(0);
        }
        rec.check(pairs.len(), 24, "ema")?;
        let lens: Vec<usize> = pairs.iter().map(|(t, _)| t.elem_count()).collect();
        let (table, count, _) = chunks(&dev, &lens)?;
        if count == 0 {
            return Ok(());
        }
        let records = dev.clone_htod(&rec.0)?;
        let func = dev.get_or_load_custom_func("dino_ema_foreach", "dino_rs_update", PTX)?;
        let (m, keep) = (momentum as f32, (1.0 - momentum) as f32);
        let mut b = func.builder();
        b.arg(&records).arg(&table).arg(&m).arg(&keep);
        // SAFETY: as in `adamw`, for dino_ema_foreach.
        unsafe { b.launch(grid(count)) }.w()?;
        Ok(())
    }

    pub(super) fn clip(grads: &[&Tensor], clip: f64) -> Result<()> {
        let dev = cuda_device(grads[0])?;
        let lens: Vec<usize> = grads.iter().map(|g| g.elem_count()).collect();
        let (table, count, first) = chunks(&dev, &lens)?;
        if count == 0 {
            return Ok(());
        }
        let mut rec = Records::default();
        for (i, g) in grads.iter().enumerate() {
            rec.ptr(g)?
                .u32(lens[i] as u32)
                .u32(first[i])
                .u32(lens[i].div_ceil(super::CHUNK) as u32)
                .u32(0);
        }
        rec.check(grads.len(), 24, "clip")?;
        let records = dev.clone_htod(&rec.0)?;
        // SAFETY: dino_sumsq_foreach writes every entry before dino_clip_foreach reads it.
        let partial = unsafe { dev.alloc::<f32>(count as usize) }?;
        let sumsq = dev.get_or_load_custom_func("dino_sumsq_foreach", "dino_rs_update", PTX)?;
        let mut b = sumsq.builder();
        b.arg(&records).arg(&table).arg(&partial);
        // SAFETY: the arguments follow dino_sumsq_foreach's signature (records as in `adamw`, one
        // partial sum per chunk), launched with the 256 threads its reduction needs.
        unsafe { b.launch(grid(count)) }.w()?;
        let scale = dev.get_or_load_custom_func("dino_clip_foreach", "dino_rs_update", PTX)?;
        let clip = clip as f32;
        let mut b = scale.builder();
        b.arg(&records).arg(&table).arg(&partial).arg(&clip);
        // SAFETY: as above, for dino_clip_foreach; each record's chunk range indexes `partial`.
        unsafe { b.launch(grid(count)) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chunk_table_covers_every_element_once_tensor_by_tensor() {
        let lens = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 0, 5];
        let (chunks, first) = chunk_table(&lens);
        assert_eq!(first.len(), lens.len());
        let mut seen: Vec<Vec<usize>> = lens.iter().map(|&n| vec![0; n]).collect();
        for (k, &[t, start]) in chunks.iter().enumerate() {
            let (t, start) = (t as usize, start as usize);
            assert!(start < lens[t], "chunk {k} starts past its tensor");
            assert_eq!(start % CHUNK, 0);
            // update.cu's blocks cover start .. min(start + CHUNK, n).
            for count in &mut seen[t][start..(start + CHUNK).min(lens[t])] {
                *count += 1;
            }
            let index = k as u32 - first[t];
            assert_eq!(
                index as usize * CHUNK,
                start,
                "tensor {t}'s chunks are contiguous from its first"
            );
        }
        for (t, s) in seen.iter().enumerate() {
            assert!(s.iter().all(|&c| c == 1), "tensor {t} of {} elements", lens[t]);
            let count = lens[t].div_ceil(CHUNK);
            let listed = chunks.iter().filter(|c| c[0] as usize == t).count();
            assert_eq!(listed, count, "tensor {t}: clip's per-tensor chunk count");
        }
        assert_eq!(chunks.len(), lens.iter().map(|n| n.div_ceil(CHUNK)).sum::<usize>());
    }

    #[test]
    fn the_cpu_updates_parameter_by_parameter() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let p = Tensor::ones(4, candle_core::DType::F32, &dev)?;
        let step = AdamWStep {
            decay: 1.0,
            beta1: 0.9,
            beta2: 0.999,
            bias_correction2_sqrt: 1.0,
            eps: 1e-8,
            step_size: 0.1,
        };
        let item = AdamWItem {
            param: &p,
            m: &p,
            v: &p,
            grad: &p,
            step,
        };
        assert!(!adamw_foreach(&[item])?);
        assert!(!ema_foreach(&[(&p, &p)], 0.9)?);
        assert!(!clip_foreach(&[&p], 1.0)?);
        assert_eq!(p.to_vec1::<f32>()?, vec![1.0; 4], "nothing changed");
        Ok(())
    }
}
