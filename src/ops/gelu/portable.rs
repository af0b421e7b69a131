//! `gelu_erf(x + bias)` for every device and dtype the fused CPU kernel does not take: one kernel
//! forward and one backward on CUDA (src/ops/cuda/gelu.cu, f32 and bf16: the MLP under autocast),
//! a row loop on the CPU (bf16, f64). Composed of candle ops it was a broadcast add and a GELU
//! forward, and ~10 kernels backward through autograd.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1/√(2π)
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// Whether [`bias_gelu`] takes `x` and `bias`: the same float dtype, f32 or bf16 off the CPU.
fn applies(x: &Tensor, bias: &Tensor) -> bool {
    let float = matches!(x.dtype(), DType::F32 | DType::BF16)
        || (x.device().is_cpu() && matches!(x.dtype(), DType::F64 | DType::F16));
    float && x.dtype() == bias.dtype() && bias.rank() == 1 && x.dims().last() == Some(&bias.elem_count())
}

/// `gelu_erf(x + bias)` over the last dimension; `None` where [`applies`] says no.
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    if !applies(x, bias) {
        return Ok(None);
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, BiasGeluAny).map(Some)
}

/// x + b rounded to `T` first (nn.Linear adds its bias in the layer's dtype), then in f64.
fn biased<T: WithDType>(x: T, b: T) -> f64 {
    T::from_f64(x.to_f64() + b.to_f64()).to_f64()
}

fn gelu(v: f64) -> f64 {
    0.5 * v * (1.0 + candle_core::cpu::erf::erf_f64(v * FRAC_1_SQRT_2))
}

fn gelu_grad(v: f64) -> f64 {
    0.5 * (1.0 + candle_core::cpu::erf::erf_f64(v * FRAC_1_SQRT_2)) + v * FRAC_1_SQRT_2PI * (-0.5 * v * v).exp()
}

fn forward<T: WithDType>(x: &[T], b: &[T], d: usize) -> Vec<T> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| T::from_f64(gelu(biased(v, b[i % d]))))
        .collect()
}

fn backward<T: WithDType>(x: &[T], b: &[T], g: &[T], d: usize) -> Vec<T> {
    x.iter()
        .zip(g)
        .enumerate()
        .map(|(i, (&v, &gv))| T::from_f64(gv.to_f64() * gelu_grad(biased(v, b[i % d]))))
        .collect()
}

fn width(l: &Layout, bias: &Layout, what: &str) -> Result<usize> {
    let d = bias.shape().elem_count();
    if d == 0 || l.dims().last() != Some(&d) {
        candle_core::bail!("{what}: input {:?} with bias {:?}", l.dims(), bias.dims());
    }
    Ok(d)
}

struct BiasGeluAny;

impl CustomOp2 for BiasGeluAny {
    fn name(&self) -> &'static str {
        "dino-bias-gelu-any"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = width(l1, l2, self.name())?;
        let y = by_dtype!(self.name(), forward, [(s1, l1), (s2, l2)], d);
        Ok((y, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = width(l1, l2, self.name())?;
        let y = cuda::run("dino_bias_gelu", &[(s1, l1), (s2, l2)], d)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, b: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, db) = backward_tensors(x, b, grad)?;
        Ok((Some(dx), Some(db)))
    }
}

/// dx and d bias of [`bias_gelu`] for the output gradient `grad`.
pub(crate) fn backward_tensors(x: &Tensor, b: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let dx = x.apply_op3_no_bwd(b, &grad.contiguous()?, &BiasGeluBackwardAny)?;
    let db = crate::ops::bias::bias_grad(&dx, b.dtype())?;
    Ok((dx, db))
}

/// dx of `gelu_erf(x + bias)` for the gradient (the third input).
struct BiasGeluBackwardAny;

impl CustomOp3 for BiasGeluBackwardAny {
    fn name(&self) -> &'static str {
        "dino-bias-gelu-backward-any"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = width(l1, l2, self.name())?;
        if l1.shape() != l3.shape() {
            candle_core::bail!("{}: input {:?} but grad {:?}", self.name(), l1.dims(), l3.dims());
        }
        let dx = by_dtype!(self.name(), backward, [(s1, l1), (s2, l2), (s3, l3)], d);
        Ok((dx, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = width(l1, l2, self.name())?;
        if l1.shape() != l3.shape() {
            candle_core::bail!("{}: input {:?} but grad {:?}", self.name(), l1.dims(), l3.dims());
        }
        let dx = cuda::run("dino_bias_gelu_bwd", &[(s1, l1), (s2, l2), (s3, l3)], d)?;
        Ok((dx, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

    use crate::ops::cuda::{grid_stride, view};

    /// Runs `<name>_f32` or `<name>_bf16` of gelu.cu: the inputs (the first sets the element
    /// count), then a new output, the count and the row width `d`.
    pub(super) fn run(name: &str, inputs: &[(&CudaStorage, &Layout)], d: usize) -> Result<CudaStorage> {
        let (first, _) = inputs[0];
        let dev = first.device().clone();
        match first.dtype() {
            DType::F32 => typed::<f32>(&format!("{name}_f32"), &dev, inputs, d),
            DType::BF16 => typed::<half::bf16>(&format!("{name}_bf16"), &dev, inputs, d),
            other => candle_core::bail!("{name}: no CUDA kernel for {other:?}"),
        }
    }

    fn typed<T: CudaDType + DeviceRepr>(
        name: &str,
        dev: &CudaDevice,
        inputs: &[(&CudaStorage, &Layout)],
        d: usize,
    ) -> Result<CudaStorage> {
        let func = crate::ops::kernels::kernel!(dev, "gelu", name)?;
        let mut views = Vec::with_capacity(inputs.len());
        for (s, l) in inputs {
            views.push(view::<T>(s, l, name)?);
        }
        let n = inputs[0].1.shape().elem_count();
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        let (count, width) = (n as u32, d as u32);
        let mut builder = func.builder();
        for v in &views {
            builder.arg(v);
        }
        builder.arg(&out);
        builder.arg(&count);
        builder.arg(&width);
        // SAFETY: the arguments follow the kernel's signature (inputs, output, count, width).
        unsafe { builder.launch(grid_stride(n)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}
