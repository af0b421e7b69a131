//! LayerNorm for every device and dtype the fused CPU kernel (mod.rs) does not take (CUDA, bf16,
//! f64): one kernel each way on CUDA (dino_rs's, candle's forward for dtypes other than f32), a row
//! loop forward and an explicit formula backward elsewhere, computed in at least f32.
//!
//! Composed of candle ops, a LayerNorm was ~11 kernels forward and, through candle's autograd,
//! ~50 backward (each graph edge zero-fills a gradient buffer and adds into it). On a GPU, where
//! candle's time goes into launching small kernels rather than running them (docs/gpu.md,
//! Reference measurements), that count is the step time.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, D};

use crate::ops::{at_least_f32, last_dim, map_rows};

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    layer_norm_to(x, weight, bias, eps, None)
}

/// [`layer_norm`] with its output written as `out` (bf16 where it feeds a bf16 matmul under
/// autocast): computed as the inputs' dtype, rounded once. A separate cast would be a graph node of
/// its own, and candle keeps a node's input (here the f32 output) until the backward pass.
pub fn layer_norm_to(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64, out: Option<DType>) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if weight.dims1()? != d || bias.dims1()? != d {
        candle_core::bail!(
            "layer norm: input {:?} with weight {:?} and bias {:?}",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    let out = out.filter(|&t| t != x.dtype());
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, AnyLayerNorm { eps, out })
}

struct AnyLayerNorm {
    eps: f64,
    /// The output's dtype where it is not the input's.
    out: Option<DType>,
}

impl CustomOp3 for AnyLayerNorm {
    fn name(&self) -> &'static str {
        "dino-layer-norm-any"
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
        fn run<T: WithDType>(x: &[T], w: &[T], b: &[T], d: usize, eps: f64) -> Vec<T> {
            let widen = |v: &[T]| -> Vec<f64> { v.iter().map(|&e| WithDType::to_f64(e)).collect() };
            let (w, b) = (widen(w), widen(b));
            map_rows(x, d, |row, out| {
                let mean = row.iter().sum::<f64>() / d as f64;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
                let rstd = 1.0 / (var + eps).sqrt();
                for (i, o) in out.iter_mut().enumerate() {
                    *o = (row[i] - mean) * rstd * w[i] + b[i];
                }
            })
        }
        let d = last_dim(l1, self.name())?;
        let out = by_dtype!(self.name(), run, [(s1, l1), (s2, l2), (s3, l3)], d, self.eps);
        let out = match self.out {
            Some(t) => out.to_dtype(&Layout::contiguous(l1.shape()), t)?,
            None => out,
        };
        Ok((out, l1.shape().clone()))
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
        cuda::layer_norm(s1, l1, s2, l2, s3, l3, self.eps as f32, self.out)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = layer_norm_backward(x, w, b, grad, self.eps)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// dx, d weight and d bias of [`layer_norm_to`] for input `x` and the output gradient `grad` (in
/// the output's dtype, which may differ from `x`'s).
pub(crate) fn layer_norm_backward(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = x.dim(D::Minus1)?;
    let grad = &grad.to_dtype(x.dtype())?;
    let same = [w.dtype(), b.dtype()].iter().all(|&t| t == x.dtype());
    // CUDA's kernels take f32 (LayerNorm runs in f32 under autocast); other dtypes compose.
    if same && (x.device().is_cpu() || x.dtype() == candle_core::DType::F32) {
        // dx, dw and db from one op (three kernels on CUDA), packed one after the other.
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBackward { eps })?;
        let n = x.elem_count();
        return Ok((
            packed.narrow(0, 0, n)?.reshape(x.shape())?,
            packed.narrow(0, n, d)?,
            packed.narrow(0, n + d, d)?,
        ));
    }
    let (x32, w32, g) = (at_least_f32(x)?, at_least_f32(w)?, at_least_f32(grad)?);
    let xc = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
    let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let xhat = xc.broadcast_mul(&rstd)?;
    // dx = rstd · (gw − mean(gw) − x̂ · mean(gw · x̂)), with gw = g · weight.
    let gw = g.broadcast_mul(&w32)?;
    let dx = gw
        .broadcast_sub(&gw.mean_keepdim(D::Minus1)?)?
        .sub(&xhat.broadcast_mul(&(&gw * &xhat)?.mean_keepdim(D::Minus1)?)?)?
        .broadcast_mul(&rstd)?;
    let rows = x.elem_count() / d;
    let dw = (&g * &xhat)?.reshape((rows, d))?.sum(0)?;
    let db = g.reshape((rows, d))?.sum(0)?;
    Ok((
        dx.to_dtype(x.dtype())?,
        dw.to_dtype(w.dtype())?,
        db.to_dtype(b.dtype())?,
    ))
}

/// LayerNorm's backward pass for input `x`, weight `w` and output gradient `g` of one dtype:
/// `[dx (as x), dw (d), db (d)]` in one flat tensor. Each row's mean and 1/std are recomputed
/// (two passes, as the forward's); the sums are taken in f64 on the CPU and in f32 on CUDA.
struct LayerNormBackward {
    eps: f64,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "dino-layer-norm-backward-portable"
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
        fn run<T: WithDType>(x: &[T], w: &[T], g: &[T], d: usize, eps: f64) -> Vec<T> {
            let f = |v: &T| WithDType::to_f64(*v);
            let w: Vec<f64> = w.iter().map(f).collect();
            let (mut dw, mut db) = (vec![0f64; d], vec![0f64; d]);
            let mut out = Vec::with_capacity(x.len() + 2 * d);
            let mut xhat = vec![0f64; d];
            for (xr, gr) in x.chunks_exact(d).zip(g.chunks_exact(d)) {
                let mean = xr.iter().map(f).sum::<f64>() / d as f64;
                let var = xr.iter().map(|v| (f(v) - mean).powi(2)).sum::<f64>() / d as f64;
                let rstd = 1.0 / (var + eps).sqrt();
                let (mut mean_gw, mut mean_gwx) = (0.0, 0.0);
                for i in 0..d {
                    xhat[i] = (f(&xr[i]) - mean) * rstd;
                    let gw = f(&gr[i]) * w[i];
                    mean_gw += gw;
                    mean_gwx += gw * xhat[i];
                    dw[i] += f(&gr[i]) * xhat[i];
                    db[i] += f(&gr[i]);
                }
                (mean_gw, mean_gwx) = (mean_gw / d as f64, mean_gwx / d as f64);
                // dx = rstd · (gw − mean(gw) − x̂ · mean(gw · x̂))
                out.extend((0..d).map(|i| {
                    let gw = f(&gr[i]) * w[i];
                    T::from_f64(rstd * (gw - mean_gw - xhat[i] * mean_gwx))
                }));
            }
            out.extend(dw.iter().chain(&db).map(|&v| T::from_f64(v)));
            out
        }
        let d = last_dim(l1, self.name())?;
        let out = by_dtype!(self.name(), run, [(s1, l1), (s2, l2), (s3, l3)], d, self.eps);
        Ok((out, Shape::from(l1.shape().elem_count() + 2 * d)))
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
        cuda::layer_norm_backward(s1, l1, s2, l2, s3, l3, self.eps as f32)
    }
}

/// dino_rs's LayerNorm kernels (layer_norm.cu): forward from f32 (two-pass variance, writing f32
/// or bf16) and backward; candle's `layernorm_*` kernel (candle-kernels' reduce.cu, as candle-nn
/// launches it) for the forward pass of other dtypes.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{kernel_name, kernels, Map3, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape, WithDType};

    use crate::ops::cuda::{row_blocks, rows_cols, slice_view, view};
    use crate::ops::launch;

    struct LayerNorm(f32);

    impl Map3 for LayerNorm {
        fn f<T: DeviceRepr + WithDType>(
            &self,
            x: &CudaSlice<T>,
            lx: &Layout,
            w: &CudaSlice<T>,
            lw: &Layout,
            b: &CudaSlice<T>,
            lb: &Layout,
            dev: &CudaDevice,
        ) -> Result<CudaSlice<T>> {
            let (x, w, b) = (
                slice_view(x, lx, "layer norm input")?,
                slice_view(w, lw, "layer norm weight")?,
                slice_view(b, lb, "layer norm bias")?,
            );
            let (rows, cols) = rows_cols(lx);
            let block = if cols < 1024 { 32 } else { 1024 };
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (block, 1, 1),
                shared_mem_bytes: 0,
            };
            let func = dev.get_or_load_func(&kernel_name::<T>("layernorm"), &kernels::REDUCE)?;
            // SAFETY: every element is written by the kernel.
            let dst = unsafe { dev.alloc::<T>(rows * cols)? };
            let mut builder = func.builder();
            builder.arg(&x);
            builder.arg(&dst);
            builder.arg(&w);
            builder.arg(&b);
            candle_core::builder_arg!(builder, cols as i32, block as i32, self.0);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(dst)
        }
    }

    pub(super) fn layer_norm(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        eps: f32,
        out: Option<candle_core::DType>,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device();
        let to_bf16 = out == Some(candle_core::DType::BF16);
        if s1.dtype() == candle_core::DType::F32 && (out.is_none() || to_bf16) {
            // Our own kernel: two-pass variance (candle's `layernorm` takes one pass).
            let (x, w, b) = (
                view::<f32>(s1, l1, "layer norm input")?,
                view::<f32>(s2, l2, "layer norm weight")?,
                view::<f32>(s3, l3, "layer norm bias")?,
            );
            let (rows, cols) = rows_cols(l1);
            let (r, d) = (rows as u32, cols as u32);
            macro_rules! launch {
                ($t:ty, $name:literal) => {{
                    let func = crate::ops::kernels::kernel!(dev, "layer_norm", $name)?;
                    // SAFETY: every element is written by the kernel.
                    let dst = unsafe { dev.alloc::<$t>(rows * cols)? };
                    let mut builder = func.builder();
                    builder
                        .arg(&x)
                        .arg(&w)
                        .arg(&b)
                        .arg(&dst)
                        .arg(&r)
                        .arg(&d)
                        .arg(&eps);
                    // SAFETY: the arguments match the kernel's signature; x holds rows × d values.
                    unsafe { builder.launch(row_blocks(rows)) }.w()?;
                    CudaStorage::wrap_cuda_slice(dst, dev.clone())
                }};
            }
            let y = if to_bf16 {
                launch!(half::bf16, "dino_layer_norm_fwd_bf16")
            } else {
                launch!(f32, "dino_layer_norm_fwd")
            };
            return Ok((y, l1.shape().clone()));
        }
        let slice = LayerNorm(eps).map(&s1.slice, l1, &s2.slice, l2, &s3.slice, l3, dev)?;
        let y = CudaStorage {
            slice,
            device: dev.clone(),
        };
        let y = match out {
            Some(t) => y.to_dtype(&Layout::contiguous(l1.shape()), t)?,
            None => y,
        };
        Ok((y, l1.shape().clone()))
    }

    /// `[dx, dw, db]` of LayerNorm (see `LayerNormBackward`) for f32 `x`, weight `w`, gradient `g`.
    pub(super) fn layer_norm_backward(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        eps: f32,
    ) -> Result<(CudaStorage, Shape)> {
        if [s1.dtype(), s2.dtype(), s3.dtype()]
            .iter()
            .any(|&t| t != candle_core::DType::F32)
        {
            candle_core::bail!("layer norm backward on CUDA takes f32");
        }
        let dev = s1.device();
        let (x, w, g) = (
            view::<f32>(s1, l1, "layer norm input")?,
            view::<f32>(s2, l2, "layer norm weight")?,
            view::<f32>(s3, l3, "layer norm gradient")?,
        );
        let (rows, d) = rows_cols(l1);
        let n = rows * d;
        let (tiles, [rows_cfg, cols_cfg, sum_cfg]) = launch::layer_norm_backward(rows, d);
        // SAFETY: the kernels below write every element of each before it is read: dx and the
        // row statistics by the row kernel, the partials by the column kernel, dw and db by the sum.
        let mut out = unsafe { dev.alloc::<f32>(n + 2 * d)? };
        let stats = unsafe { dev.alloc::<f32>(2 * rows)? };
        let partial_dw = unsafe { dev.alloc::<f32>(tiles * d)? };
        let partial_db = unsafe { dev.alloc::<f32>(tiles * d)? };
        let (r, dd, tr, t) = (rows as u32, d as u32, launch::TILE_ROWS as u32, tiles as u32);
        {
            let func = crate::ops::kernels::kernel!(dev, "layer_norm", "dino_layer_norm_bwd_rows")?;
            let mut dx = out.slice_mut(0..n);
            let mut builder = func.builder();
            builder
                .arg(&x)
                .arg(&w)
                .arg(&g)
                .arg(&mut dx)
                .arg(&stats)
                .arg(&r)
                .arg(&dd)
                .arg(&eps);
            // SAFETY: the arguments match dino_layer_norm_bwd_rows's signature; x and g hold rows × d
            // values, stats 2 per row.
            unsafe { builder.launch(rows_cfg.into()) }.w()?;
        }
        {
            let func = crate::ops::kernels::kernel!(dev, "layer_norm", "dino_layer_norm_bwd_cols")?;
            let mut builder = func.builder();
            builder
                .arg(&x)
                .arg(&g)
                .arg(&stats)
                .arg(&partial_dw)
                .arg(&partial_db)
                .arg(&r)
                .arg(&dd)
                .arg(&tr);
            // SAFETY: the arguments match dino_layer_norm_bwd_cols's signature; the partials hold
            // tiles × d values.
            unsafe { builder.launch(cols_cfg.into()) }.w()?;
        }
        {
            let func = crate::ops::kernels::kernel!(dev, "layer_norm", "dino_layer_norm_bwd_sum")?;
            let (mut head, mut db) = out.split_at_mut(n + d);
            let mut dw = head.slice_mut(n..n + d);
            let mut builder = func.builder();
            builder
                .arg(&partial_dw)
                .arg(&partial_db)
                .arg(&mut dw)
                .arg(&mut db)
                .arg(&t)
                .arg(&dd);
            // SAFETY: the arguments match dino_layer_norm_bwd_sum's signature; dw and db hold d values.
            unsafe { builder.launch(sum_cfg.into()) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(n + 2 * d)))
    }
}
