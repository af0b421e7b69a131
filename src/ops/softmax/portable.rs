//! Softmax over the last dimension for every device and dtype the fused CPU kernel (mod.rs) does
//! not take (CUDA, bf16, f64): one kernel each way on CUDA (f32 and bf16, with attention's scale
//! applied inside), a row loop forward and an explicit formula backward elsewhere, computed in at
//! least f32. Composed of candle ops, a softmax was 5 kernels forward and ~20 backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType, D};

use crate::ops::{at_least_f32, last_dim, map_rows};

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    softmax_scaled(x, 1.0)
}

/// `softmax(scale · x)` over the last dimension: attention's scale folded into its softmax, as one
/// kernel each way on CUDA instead of a multiply more over the (B, heads, N, N) logits.
pub fn softmax_scaled(x: &Tensor, scale: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(AnySoftmax { scale })
}

pub(crate) struct AnySoftmax {
    pub(crate) scale: f64,
}

impl CustomOp1 for AnySoftmax {
    fn name(&self) -> &'static str {
        "dino-softmax-any"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(x: &[T], d: usize, scale: f64) -> Vec<T> {
            map_rows(x, d, |row, out| {
                let max = row.iter().map(|v| v * scale).fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for (o, v) in out.iter_mut().zip(row) {
                    *o = (v * scale - max).exp();
                    sum += *o;
                }
                for o in out.iter_mut() {
                    *o /= sum;
                }
            })
        }
        let d = last_dim(l, self.name())?;
        let out = by_dtype!(self.name(), run, [(s, l)], d, self.scale);
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::softmax(s, l, self.scale as f32)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_backward(y, grad, self.scale)?))
    }
}

/// The gradient of x for y = softmax(scale · x) and the output gradient `grad`:
/// dx = scale · y · (g − Σ g·y) over the row, one kernel where the dtype has one.
pub(crate) fn softmax_backward(y: &Tensor, grad: &Tensor, scale: f64) -> Result<Tensor> {
    let g = grad.to_dtype(y.dtype())?.contiguous()?;
    if y.device().is_cpu() || matches!(y.dtype(), candle_core::DType::F32 | candle_core::DType::BF16) {
        return y.apply_op2_no_bwd(&g, &SoftmaxBackward { scale });
    }
    let (y32, g) = (at_least_f32(y)?, at_least_f32(grad)?);
    let dot = (&g * &y32)?.sum_keepdim(D::Minus1)?;
    (g.broadcast_sub(&dot)?.mul(&y32)? * scale)?.to_dtype(y.dtype())
}

/// Softmax's backward pass from its output `y` and the output gradient `g` (same dtype):
/// `dx = scale · y · (g − Σ g·y)` per row, in f64 on the CPU and f32 on CUDA.
struct SoftmaxBackward {
    scale: f64,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "dino-softmax-backward-portable"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(y: &[T], g: &[T], d: usize, scale: f64) -> Vec<T> {
            let f = |v: &T| WithDType::to_f64(*v);
            let mut out = Vec::with_capacity(y.len());
            for (yr, gr) in y.chunks_exact(d).zip(g.chunks_exact(d)) {
                let dot: f64 = yr.iter().zip(gr).map(|(a, b)| f(a) * f(b)).sum();
                out.extend(yr.iter().zip(gr).map(|(a, b)| T::from_f64(scale * f(a) * (f(b) - dot))));
            }
            out
        }
        let d = last_dim(l1, self.name())?;
        let out = by_dtype!(self.name(), run, [(s1, l1), (s2, l2)], d, self.scale);
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::softmax_backward(s1, l1, s2, l2, self.scale as f32)
    }
}

/// dino_rs's softmax kernels (softmax.cu) for f32 and bf16, forward and backward; candle's
/// `softmax_*` kernel (candle-kernels' reduce.cu, as candle-nn launches it) for other dtypes.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{kernel_name, kernels, Map1, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape, WithDType};

    use crate::ops::cuda::{row_blocks, rows_cols, slice_view, view};

    struct Softmax;

    impl Map1 for Softmax {
        fn f<T: DeviceRepr + WithDType>(&self, x: &CudaSlice<T>, dev: &CudaDevice, l: &Layout) -> Result<CudaSlice<T>> {
            let x = slice_view(x, l, "softmax input")?;
            let (rows, cols) = rows_cols(l);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (1, 32, 1),
                shared_mem_bytes: 0,
            };
            let func = dev.get_or_load_func(&kernel_name::<T>("softmax"), &kernels::REDUCE)?;
            // SAFETY: every element is written by the kernel.
            let dst = unsafe { dev.alloc::<T>(rows * cols)? };
            let mut builder = func.builder();
            builder.arg(&x);
            builder.arg(&dst);
            candle_core::builder_arg!(builder, cols as i32);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(dst)
        }
    }

    /// The name of softmax.cu's kernel `base`_f32 or `base`_bf16 for `s`'s dtype, and the suffix.
    fn softmax_kernel(s: &CudaStorage, base: &str) -> Result<(String, &'static str)> {
        let suffix = match s.dtype() {
            candle_core::DType::F32 => "f32",
            candle_core::DType::BF16 => "bf16",
            t => candle_core::bail!("softmax kernels take f32 or bf16, got {t:?}"),
        };
        Ok((format!("{base}_{suffix}"), suffix))
    }

    pub(super) fn softmax(s: &CudaStorage, l: &Layout, scale: f32) -> Result<(CudaStorage, Shape)> {
        let dev = s.device();
        if matches!(s.dtype(), candle_core::DType::F32 | candle_core::DType::BF16) {
            let (rows, d) = rows_cols(l);
            let (name, suffix) = softmax_kernel(s, "dino_softmax_fwd")?;
            let func = crate::ops::kernels::kernel!(dev, "softmax", &name)?;
            let (r, dd) = (rows as u32, d as u32);
            macro_rules! launch {
                ($t:ty) => {{
                    let x = view::<$t>(s, l, "softmax input")?;
                    // SAFETY: every element is written by the kernel.
                    let y = unsafe { dev.alloc::<$t>(rows * d)? };
                    let mut b = func.builder();
                    b.arg(&x).arg(&y).arg(&r).arg(&dd).arg(&scale);
                    // SAFETY: the arguments match dino_softmax_fwd_*'s signature for this dtype.
                    unsafe { b.launch(row_blocks(rows)) }.w()?;
                    CudaStorage::wrap_cuda_slice(y, dev.clone())
                }};
            }
            let out = if suffix == "f32" {
                launch!(f32)
            } else {
                launch!(half::bf16)
            };
            return Ok((out, l.shape().clone()));
        }
        if scale != 1.0 {
            candle_core::bail!("softmax with a scale on CUDA takes f32 or bf16, got {:?}", s.dtype());
        }
        let slice = Softmax.map(&s.slice, dev, l)?;
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            l.shape().clone(),
        ))
    }

    /// `dx = scale · y · (g − Σ g·y)` per row, for f32 or bf16 `y` and `g` of one dtype.
    pub(super) fn softmax_backward(
        sy: &CudaStorage,
        ly: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
        scale: f32,
    ) -> Result<(CudaStorage, Shape)> {
        if sy.dtype() != sg.dtype() {
            candle_core::bail!("softmax backward: {:?} output, {:?} gradient", sy.dtype(), sg.dtype());
        }
        let dev = sy.device();
        let (rows, d) = rows_cols(ly);
        let (name, suffix) = softmax_kernel(sy, "dino_softmax_bwd")?;
        let func = crate::ops::kernels::kernel!(dev, "softmax", &name)?;
        let (r, dd) = (rows as u32, d as u32);
        macro_rules! launch {
            ($t:ty) => {{
                let y = view::<$t>(sy, ly, "softmax output")?;
                let g = view::<$t>(sg, lg, "softmax gradient")?;
                // SAFETY: every element is written by the kernel.
                let dx = unsafe { dev.alloc::<$t>(rows * d)? };
                let mut b = func.builder();
                b.arg(&y).arg(&g).arg(&dx).arg(&r).arg(&dd).arg(&scale);
                // SAFETY: the arguments match dino_softmax_bwd_*'s signature for this dtype.
                unsafe { b.launch(row_blocks(rows)) }.w()?;
                CudaStorage::wrap_cuda_slice(dx, dev.clone())
            }};
        }
        let out = if suffix == "f32" {
            launch!(f32)
        } else {
            launch!(half::bf16)
        };
        Ok((out, ly.shape().clone()))
    }
}
