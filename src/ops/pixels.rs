//! Normalising u8 crops on CUDA in one kernel (src/ops/cuda/pixels.cu): a table lookup per value,
//! the CPU's table, so the result is bit for bit the CPU's. Composed, the lookup widened the bytes
//! to u32, added the channel offsets and gathered: three temporaries of the batch's size (the
//! globals of a ViT-S batch are 19 M values).

// Without the `cuda` feature the kernel never applies.
#![cfg_attr(not(feature = "cuda"), allow(dead_code, unused_variables))]

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `table[256·c + v]` for each value v of channel c of `pixels` (N, 3, H, W) u8, as f32; `None`
/// where the kernel does not apply (not CUDA, `DINO_RS_COMPOSED_OPS=1`, over 2³² values).
pub fn normalize_u8(pixels: &Tensor, table: &[[f32; 256]; 3]) -> Result<Option<Tensor>> {
    let Ok((_, c, _, _)) = pixels.dims4() else {
        return Ok(None);
    };
    if !(cfg!(feature = "cuda")
        && super::kernels_enabled()
        && pixels.device().is_cuda()
        && pixels.dtype() == DType::U8
        && c == 3
        && pixels.elem_count() < u32::MAX as usize)
    {
        return Ok(None);
    }
    let table = Tensor::from_iter(table.iter().flatten().copied(), pixels.device())?;
    Ok(Some(pixels.contiguous()?.apply_op2_no_bwd(&table, &NormalizeU8)?))
}

struct NormalizeU8;

impl CustomOp2 for NormalizeU8 {
    fn name(&self) -> &'static str {
        "dino-normalize-u8"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("normalize_u8 runs on CUDA only (the CPU normalises while it crops)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        px: &candle_core::CudaStorage,
        lp: &Layout,
        table: &candle_core::CudaStorage,
        lt: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;

        let dev = px.device();
        let (_, _, h, w) = lp.shape().dims4()?;
        let n = lp.shape().elem_count();
        let (pixels, table) = (
            super::cuda::view::<u8>(px, lp, "normalize pixels")?,
            super::cuda::view::<f32>(table, lt, "normalize table")?,
        );
        let func = crate::ops::kernels::kernel!(dev, "pixels", "dino_normalize_u8")?;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<f32>(n)? };
        let (count, plane) = (n as u32, (h * w) as u32);
        let mut b = func.builder();
        b.arg(&pixels).arg(&table).arg(&out).arg(&count).arg(&plane);
        // SAFETY: the arguments follow dino_normalize_u8's signature; table holds 3 × 256 values.
        unsafe { b.launch(super::cuda::grid_stride(n)) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            lp.shape().clone(),
        ))
    }
}
