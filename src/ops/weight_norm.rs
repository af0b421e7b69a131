//! The weight-normalised last layer's weight, w = g · v / ‖v‖ (norm over each output row), as one
//! graph node: forward and backward each one pass over the rows (a row loop on the CPU, a warp per
//! row on CUDA: src/ops/cuda/weight_norm.cu).
//!
//! Composed of candle ops the graph kept v² and w itself until the backward pass, each the size of
//! the weight: at out_dim 65,536 and a bottleneck of 256, 64 MB apiece, plus the f32 w under
//! autocast's bf16 cast. PyTorch's `_weight_norm` keeps v, g and the row norms; so does this node
//! (v and g are parameters, alive anyway; the norms are recomputed), and under autocast it writes
//! the bf16 weight the matmul takes itself. Its backward written as candle ops held seven
//! weight-sized f32 temporaries at once, at the step's peak (`heaptrack` on bench_memory.py's
//! step at out_dim 65,536: the largest item there); as one op it writes dv and dg and nothing else.
//! `DINO_RS_COMPOSED_OPS=1` keeps the candle-op versions (any device and dtype).

// Without the `cuda` feature the kernels never apply.
#![cfg_attr(not(feature = "cuda"), allow(dead_code, unused_variables))]

use candle_core::backend::BackendStorage;
use candle_core::op::{Div, Mul, ReduceOp, Sqr, Sqrt};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

use super::{contiguous, kernels_enabled};

/// g · v / ‖v‖ for `v` (out, in) and `g` (out, 1), differentiable in both.
pub fn weight_norm(v: &Tensor, g: &Tensor) -> Result<Tensor> {
    weight_norm_to(v, g, None)
}

/// [`weight_norm`] written as `out` (bf16 for a bf16 matmul under autocast): a separate cast would
/// keep the f32 weight until the backward pass.
pub fn weight_norm_to(v: &Tensor, g: &Tensor, out: Option<DType>) -> Result<Tensor> {
    let (rows, _) = v.dims2()?;
    if g.dims() != [rows, 1] || g.dtype() != v.dtype() {
        candle_core::bail!(
            "weight norm: v {:?} {:?} with g {:?} {:?}",
            v.dims(),
            v.dtype(),
            g.dims(),
            g.dtype()
        );
    }
    let out = out.filter(|&t| t != v.dtype());
    v.contiguous()?.apply_op2(&g.contiguous()?, WeightNorm { out })
}

struct WeightNorm {
    /// The output's dtype where it is not the parameters'.
    out: Option<DType>,
}

/// Whether the one-pass forward and backward take parameters of `dtype` on this device: f32 and
/// f64 on the CPU, f32 on CUDA (the master weights); otherwise candle ops.
fn one_pass(dtype: DType, cpu: bool) -> bool {
    kernels_enabled() && (dtype == DType::F32 || (cpu && dtype == DType::F64))
}

/// `v · (g / sqrt(Σ v²))` as candle's storage ops, on any backend; the squares are freed before it
/// returns.
fn composed_forward<S: BackendStorage>(v: &S, lv: &Layout, g: &S, lg: &Layout, dtype: Option<DType>) -> Result<S> {
    let (out, inp) = lv.shape().dims2()?;
    let rows = Layout::contiguous((out, 1));
    let sums = v
        .unary_impl::<Sqr>(lv)?
        .reduce_op(ReduceOp::Sum, &Layout::contiguous((out, inp)), &[1])?;
    let factor = g.binary_impl::<Div>(&sums.unary_impl::<Sqrt>(&rows)?, lg, &rows)?;
    let w = v.binary_impl::<Mul>(&factor, lv, &rows.broadcast_as((out, inp))?)?;
    match dtype {
        Some(t) => w.to_dtype(&Layout::contiguous((out, inp)), t),
        None => Ok(w),
    }
}

/// The CPU's forward: each row's Σ v² in f64, `w = v · (g / ‖v‖)` rounded once to `U`.
fn cpu_forward<T: WithDType, U: WithDType>(v: &[T], g: &[T], d: usize) -> Vec<U> {
    let mut w = vec![U::from_f64(0.0); v.len()];
    crate::parallel::install(|| {
        w.par_chunks_mut(d)
            .zip(v.par_chunks(d))
            .zip(g)
            .for_each(|((wr, vr), g)| {
                let sq: f64 = vr.iter().map(|x| x.to_f64() * x.to_f64()).sum();
                let f = g.to_f64() / sq.sqrt();
                for (o, x) in wr.iter_mut().zip(vr) {
                    *o = U::from_f64(x.to_f64() * f);
                }
            })
    });
    w
}

impl CustomOp2 for WeightNorm {
    fn name(&self) -> &'static str {
        "dino-weight-norm"
    }

    fn cpu_fwd(&self, v: &CpuStorage, lv: &Layout, g: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = lv.shape().clone();
        if !one_pass(v.dtype(), true) {
            return Ok((composed_forward(v, lv, g, lg, self.out)?, shape));
        }
        let d = shape.dims2()?.1;
        fn to<T: WithDType>(v: &[T], g: &[T], d: usize, out: DType) -> Result<CpuStorage> {
            Ok(match out {
                DType::F32 => CpuStorage::F32(cpu_forward(v, g, d)),
                DType::F64 => CpuStorage::F64(cpu_forward(v, g, d)),
                DType::BF16 => CpuStorage::BF16(cpu_forward(v, g, d)),
                DType::F16 => CpuStorage::F16(cpu_forward(v, g, d)),
                t => candle_core::bail!("weight norm: no {t:?} output"),
            })
        }
        let out = self.out.unwrap_or(v.dtype());
        let what = self.name();
        let w = match (v, g) {
            (CpuStorage::F32(v), CpuStorage::F32(g)) => to(contiguous(v, lv, what)?, contiguous(g, lg, what)?, d, out)?,
            (CpuStorage::F64(v), CpuStorage::F64(g)) => to(contiguous(v, lv, what)?, contiguous(g, lg, what)?, d, out)?,
            _ => candle_core::bail!("{what}: v {:?} with g {:?}", v.dtype(), g.dtype()),
        };
        Ok((w, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        v: &candle_core::CudaStorage,
        lv: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = self.out.unwrap_or(v.dtype());
        if one_pass(v.dtype(), false) && matches!(out, DType::F32 | DType::BF16) {
            return cuda::forward(v, lv, g, lg, out);
        }
        Ok((composed_forward(v, lv, g, lg, self.out)?, lv.shape().clone()))
    }

    fn bwd(&self, v: &Tensor, g: &Tensor, _w: &Tensor, dw: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dv, dg) = weight_norm_backward(dw, v, g)?;
        Ok((Some(dv), Some(dg)))
    }
}

/// The gradients of v and g from the weight's, `dw` (v's dtype, or bf16 under autocast). With
/// n = ‖v‖ per row: dg = Σ dw·v / n, and dv = (g/n) · (dw − v · Σ(dw·v) / n²). For the graph node
/// and for a weight made a leaf of the step's graph ([`crate::model::head::DinoHead::last_layer_leaf`]).
pub fn weight_norm_backward(dw: &Tensor, v: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let (rows, d) = v.dims2()?;
    if dw.dims() != v.dims() || g.dims() != [rows, 1] || g.dtype() != v.dtype() {
        candle_core::bail!(
            "weight norm backward: gradient {:?} for v {:?} {:?} and g {:?} {:?}",
            dw.dims(),
            v.dims(),
            v.dtype(),
            g.dims(),
            g.dtype()
        );
    }
    let takes = match v.dtype() {
        DType::F32 => matches!(dw.dtype(), DType::F32 | DType::BF16),
        DType::F64 => dw.dtype() == DType::F64,
        _ => false,
    };
    if takes && one_pass(v.dtype(), v.device().is_cpu()) {
        // dv and dg from one op, packed one after the other.
        let packed = dw
            .contiguous()?
            .apply_op3_no_bwd(&v.contiguous()?, &g.contiguous()?, &WeightNormBackward)?;
        let n = rows * d;
        return Ok((
            packed.narrow(0, 0, n)?.reshape((rows, d))?,
            packed.narrow(0, n, rows)?.reshape((rows, 1))?,
        ));
    }
    let dw = dw.to_dtype(v.dtype())?;
    let n = v.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let dot = (&dw * v)?.sum_keepdim(D::Minus1)?;
    let dg = dot.broadcast_div(&n)?;
    let dv = dw
        .broadcast_sub(&v.broadcast_mul(&dot.broadcast_div(&n.sqr()?)?)?)?
        .broadcast_mul(&g.broadcast_div(&n)?)?;
    Ok((dv, dg))
}

/// The weight norm's backward pass for the output gradient `dw` (the parameters' dtype, or bf16
/// under autocast), `v` and `g`: `[dv (rows × d), dg (rows)]` in one flat tensor of the
/// parameters' dtype. Each row's ‖v‖² and Σ dw·v in one pass (f64 on the CPU, f32 on CUDA).
struct WeightNormBackward;

/// The CPU's backward: `rows · d` values of dv, then `rows` of dg.
fn cpu_backward<G: WithDType, T: WithDType>(dw: &[G], v: &[T], g: &[T], d: usize) -> Vec<T> {
    let rows = g.len();
    let mut out = vec![T::from_f64(0.0); rows * d + rows];
    let (dv, dg) = out.split_at_mut(rows * d);
    crate::parallel::install(|| {
        dv.par_chunks_mut(d)
            .zip(dg.par_iter_mut())
            .zip(v.par_chunks(d).zip(dw.par_chunks(d)))
            .zip(g)
            .for_each(|(((dvr, dg), (vr, dwr)), g)| {
                let sq: f64 = vr.iter().map(|x| x.to_f64() * x.to_f64()).sum();
                let dot: f64 = vr.iter().zip(dwr).map(|(x, y)| x.to_f64() * y.to_f64()).sum();
                let n = sq.sqrt();
                let (a, b) = (g.to_f64() / n, dot / sq);
                for ((o, x), y) in dvr.iter_mut().zip(vr).zip(dwr) {
                    *o = T::from_f64(a * (y.to_f64() - x.to_f64() * b));
                }
                *dg = T::from_f64(dot / n);
            })
    });
    out
}

impl CustomOp3 for WeightNormBackward {
    fn name(&self) -> &'static str {
        "dino-weight-norm-backward"
    }

    fn cpu_fwd(
        &self,
        dw: &CpuStorage,
        ldw: &Layout,
        v: &CpuStorage,
        lv: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, d) = lv.shape().dims2()?;
        let what = self.name();
        let out = match (dw, v, g) {
            (CpuStorage::F32(dw), CpuStorage::F32(v), CpuStorage::F32(g)) => CpuStorage::F32(cpu_backward(
                contiguous(dw, ldw, what)?,
                contiguous(v, lv, what)?,
                contiguous(g, lg, what)?,
                d,
            )),
            (CpuStorage::BF16(dw), CpuStorage::F32(v), CpuStorage::F32(g)) => CpuStorage::F32(cpu_backward(
                contiguous(dw, ldw, what)?,
                contiguous(v, lv, what)?,
                contiguous(g, lg, what)?,
                d,
            )),
            (CpuStorage::F64(dw), CpuStorage::F64(v), CpuStorage::F64(g)) => CpuStorage::F64(cpu_backward(
                contiguous(dw, ldw, what)?,
                contiguous(v, lv, what)?,
                contiguous(g, lg, what)?,
                d,
            )),
            _ => candle_core::bail!(
                "{what}: gradient {:?} with v {:?} and g {:?}",
                dw.dtype(),
                v.dtype(),
                g.dtype()
            ),
        };
        Ok((out, Shape::from(rows * d + rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dw: &candle_core::CudaStorage,
        ldw: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(dw, ldw, v, lv, g, lg)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Result, Shape};

    use crate::ops::cuda::view;
    use crate::ops::launch::row_blocks;

    /// Views of the f32 parameters v (rows, d) and g (rows, 1), and rows and d.
    fn parameters<'a>(
        v: &'a CudaStorage,
        lv: &Layout,
        g: &'a CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaView<'a, f32>, CudaView<'a, f32>, usize, usize)> {
        let (rows, d) = lv.shape().dims2()?;
        Ok((view(v, lv, "weight norm v")?, view(g, lg, "weight norm g")?, rows, d))
    }

    /// `w` as `out` (f32 or bf16) from f32 `v` and `g`.
    pub(super) fn forward(
        v: &CudaStorage,
        lv: &Layout,
        g: &CudaStorage,
        lg: &Layout,
        out: DType,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = v.device();
        let (vs, gs, rows, d) = parameters(v, lv, g, lg)?;
        let (r, dd) = (rows as u32, d as u32);
        macro_rules! launch {
            ($t:ty, $name:literal) => {{
                let func = crate::ops::kernels::kernel!(dev, "weight_norm", $name)?;
                // SAFETY: the kernel writes every element.
                let w = unsafe { dev.alloc::<$t>(rows * d)? };
                let mut b = func.builder();
                b.arg(&vs).arg(&gs).arg(&w).arg(&r).arg(&dd);
                // SAFETY: the arguments follow the kernel's signature for this output dtype.
                unsafe { b.launch(row_blocks(rows).into()) }.w()?;
                CudaStorage::wrap_cuda_slice(w, dev.clone())
            }};
        }
        let w = match out {
            DType::F32 => launch!(f32, "dino_weight_norm_fwd_f32"),
            DType::BF16 => launch!(half::bf16, "dino_weight_norm_fwd_bf16"),
            t => candle_core::bail!("weight norm on CUDA writes f32 or bf16, not {t:?}"),
        };
        Ok((w, lv.shape().clone()))
    }

    /// `[dv, dg]` in f32 from `dw` (f32 or bf16) and f32 `v` and `g`.
    pub(super) fn backward(
        dw: &CudaStorage,
        ldw: &Layout,
        v: &CudaStorage,
        lv: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = v.device();
        let (vs, gs, rows, d) = parameters(v, lv, g, lg)?;
        let (r, dd) = (rows as u32, d as u32);
        // SAFETY: the kernel writes every element: dv by each row's lanes, dg by its first lane.
        let out = unsafe { dev.alloc::<f32>(rows * d + rows)? };
        macro_rules! launch {
            ($t:ty, $name:literal) => {{
                let func = crate::ops::kernels::kernel!(dev, "weight_norm", $name)?;
                let dws = view::<$t>(dw, ldw, "weight norm gradient")?;
                let mut b = func.builder();
                b.arg(&dws).arg(&vs).arg(&gs).arg(&out).arg(&r).arg(&dd);
                // SAFETY: the arguments follow the kernel's signature for this gradient dtype.
                unsafe { b.launch(row_blocks(rows).into()) }.w()?;
            }};
        }
        match dw.dtype() {
            DType::F32 => launch!(f32, "dino_weight_norm_bwd_f32"),
            DType::BF16 => launch!(half::bf16, "dino_weight_norm_bwd_bf16"),
            t => candle_core::bail!("weight norm backward on CUDA takes an f32 or bf16 gradient, not {t:?}"),
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(rows * d + rows),
        ))
    }
}
