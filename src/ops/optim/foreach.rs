//! Parameter updates over all parameters at once on CUDA, as PyTorch's multi-tensor ("foreach")
//! optimisers do: AdamW in one launch, the EMA teacher in one, gradient clipping in two
//! (src/ops/cuda/update.cu). Per parameter these were three or four launches and, for clipping,
//! three temporaries for the norm: ~1,200 launches a ViT-S step, all after the step's one read-back
//! (the loss), when the GPU waits for the host to queue them.
//!
//! Each kernel block takes one chunk of one tensor; the host lists the chunks ([`chunk_table`]) and
//! the tensors' device pointers and per-tensor scalars, and uploads both tables once per call.
//! Elsewhere (the CPU, other dtypes, `DINO_RS_COMPOSED_OPS=1`) each function returns `None` and the
//! caller updates parameter by parameter.

// Without the `cuda` feature every function here returns `None` before it reaches a kernel.
#![cfg_attr(not(feature = "cuda"), allow(unused_variables, dead_code))]

use candle_core::{Result, Tensor};

use crate::ops::launch::{AdamWItem, CHUNK};

/// Whether the kernels take `tensors`: a CUDA build with the kernels on, and every tensor f32 on
/// CUDA, contiguous, and small enough for the kernels' 32-bit indices.
fn applies<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> bool {
    cfg!(feature = "cuda")
        && crate::ops::kernels_enabled()
        && tensors.into_iter().all(|t| {
            t.device().is_cuda()
                && t.dtype() == candle_core::DType::F32
                && t.is_contiguous()
                && t.elem_count() <= (u32::MAX as usize - CHUNK)
        })
}

/// AdamW on every item, in place. `None` (nothing changed) where the kernels do not apply; then the
/// caller updates each parameter on its own.
pub fn adamw_foreach(items: &[AdamWItem<'_>]) -> Result<Option<()>> {
    if items.is_empty() || !applies(items.iter().flat_map(|i| [i.param, i.m, i.v, i.grad])) {
        return Ok(None);
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
    Ok(Some(()))
}

/// θ_t ← m·θ_t + (1 − m)·θ_s for every `(teacher, student)` pair, in place; `None` where the
/// kernels do not apply.
pub fn ema_foreach(pairs: &[(&Tensor, &Tensor)], momentum: f64) -> Result<Option<()>> {
    if pairs.is_empty() || !applies(pairs.iter().flat_map(|&(t, s)| [t, s])) {
        return Ok(None);
    }
    for (t, s) in pairs {
        same_len(t, &[s], "ema")?;
    }
    #[cfg(feature = "cuda")]
    cuda::ema(pairs, momentum)?;
    Ok(Some(()))
}

/// DINO's per-parameter clipping of every gradient in place (`g · clip/(‖g‖ + 1e-6)` where that
/// factor is below 1), with nothing read back; `None` where the kernels do not apply.
pub fn clip_foreach(grads: &[&Tensor], clip: f64) -> Result<Option<()>> {
    if grads.is_empty() || !applies(grads.iter().copied()) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    cuda::clip(grads, clip)?;
    Ok(Some(()))
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
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Result, Tensor};

    use crate::ops::cuda::device_ptr;

    use crate::ops::launch::{self, chunk_table, foreach_blocks};
    use crate::ops::launch::{AdamWItem, AdamWStep};

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

    pub(super) fn adamw(items: &[AdamWItem<'_>], s: AdamWStep) -> Result<()> {
        let dev = cuda_device(items[0].param)?;
        let rec = launch::adamw_records(items, device_ptr)?;
        let lens: Vec<usize> = items.iter().map(|i| i.param.elem_count()).collect();
        let (table, count, _) = chunks(&dev, &lens)?;
        if count == 0 {
            return Ok(());
        }
        let records = dev.clone_htod(&rec)?;
        let func = crate::ops::kernels::kernel!(dev, "update", "dino_adamw_foreach")?;
        let [keep1, beta2, keep2, eps] = launch::adamw_scalars(&s);
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
        unsafe { b.launch(foreach_blocks(count).into()) }.w()?;
        Ok(())
    }

    pub(super) fn ema(pairs: &[(&Tensor, &Tensor)], momentum: f64) -> Result<()> {
        let dev = cuda_device(pairs[0].0)?;
        let rec = launch::ema_records(pairs, device_ptr)?;
        let lens: Vec<usize> = pairs.iter().map(|(t, _)| t.elem_count()).collect();
        let (table, count, _) = chunks(&dev, &lens)?;
        if count == 0 {
            return Ok(());
        }
        let records = dev.clone_htod(&rec)?;
        let func = crate::ops::kernels::kernel!(dev, "update", "dino_ema_foreach")?;
        let (m, keep) = (momentum as f32, (1.0 - momentum) as f32);
        let mut b = func.builder();
        b.arg(&records).arg(&table).arg(&m).arg(&keep);
        // SAFETY: as in `adamw`, for dino_ema_foreach.
        unsafe { b.launch(foreach_blocks(count).into()) }.w()?;
        Ok(())
    }

    pub(super) fn clip(grads: &[&Tensor], clip: f64) -> Result<()> {
        let dev = cuda_device(grads[0])?;
        let lens: Vec<usize> = grads.iter().map(|g| g.elem_count()).collect();
        let (table, count, first) = chunks(&dev, &lens)?;
        if count == 0 {
            return Ok(());
        }
        let rec = launch::grad_records(grads, &first, device_ptr)?;
        let records = dev.clone_htod(&rec)?;
        // SAFETY: dino_sumsq_foreach writes every entry before dino_clip_foreach reads it.
        let partial = unsafe { dev.alloc::<f32>(count as usize) }?;
        let sumsq = crate::ops::kernels::kernel!(dev, "update", "dino_sumsq_foreach")?;
        let mut b = sumsq.builder();
        b.arg(&records).arg(&table).arg(&partial);
        // SAFETY: the arguments follow dino_sumsq_foreach's signature (records as in `adamw`, one
        // partial sum per chunk), launched with the 256 threads its reduction needs.
        unsafe { b.launch(foreach_blocks(count).into()) }.w()?;
        let scale = crate::ops::kernels::kernel!(dev, "update", "dino_clip_foreach")?;
        let clip = clip as f32;
        let mut b = scale.builder();
        b.arg(&records).arg(&table).arg(&partial).arg(&clip);
        // SAFETY: as above, for dino_clip_foreach; each record's chunk range indexes `partial`.
        unsafe { b.launch(foreach_blocks(count).into()) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::launch::AdamWStep;

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
        assert!(adamw_foreach(&[item])?.is_none());
        assert!(ema_foreach(&[(&p, &p)], 0.9)?.is_none());
        assert!(clip_foreach(&[&p], 1.0)?.is_none());
        assert_eq!(p.to_vec1::<f32>()?, vec![1.0; 4], "nothing changed");
        Ok(())
    }
}
