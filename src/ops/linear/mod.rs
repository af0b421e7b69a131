//! `x · Wᵀ (+ b)`, nn.Linear, as one graph node. Composed of candle ops it was a reshape to rows,
//! a transposed view of the weight, a matmul, a bias add and a reshape back: candle's backprop
//! zero-fills a gradient buffer for every node's input and adds into it, so each of those views
//! cost an activation-sized memset and add in the backward pass, and every matmul output was
//! zero-filled before being overwritten. Here the forward is one gemm onto rows pre-filled with the
//! bias, the backward two gemms (dx = g·W, dW = gᵀ·x) into uninitialised buffers and a row sum
//! (db); dx is skipped when `x` needs no gradient (the patch embedding's pixels). Elsewhere (CUDA,
//! autocast, other dtypes) the layer is one node too, with the backend's matmul
//! ([`portable`]).

pub(super) mod portable;
pub(super) mod residual;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::bias::SumRows;
use super::{f32_slice, fused, ROWS_PER_TASK};

/// `x · weightᵀ (+ bias)` over the last dimension of `x` (any rank); weight (out, in).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if !fused(x) {
        return composed(x, weight, bias);
    }
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, Linear),
        None => x.apply_op2(&w, Linear),
    }
}

fn composed(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    use super::autocast::lower;
    let (x, weight, bias) = (lower(x)?, lower(weight)?, bias.map(lower).transpose()?);
    let dims = x.dims();
    let Some(&k) = dims.last() else {
        candle_core::bail!("linear: a scalar has no features");
    };
    // A broadcast (batched) matmul would give the weight a per-batch gradient to sum afterwards.
    let rows = x.contiguous()?.reshape((x.elem_count() / k.max(1), k))?;
    let y = if rows.dim(0)? > 0 && k > 0 {
        crate::ops::linear::portable::linear_rows(&rows, &weight, bias.as_ref())?
    } else {
        // Nothing to multiply: candle's matmul makes the empty (or zero) result.
        let y = rows.matmul(&weight.t()?)?;
        match &bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }
    };
    let mut out = dims.to_vec();
    *out.last_mut().expect("checked non-empty above") = weight.dim(0)?;
    y.reshape(out)
}

/// The largest product (m·n outputs) gemm gives to its dot-product kernels.
const SMALL_PRODUCT: usize = 16 * 16;

/// dst (m×n, row-major) = [dst +] a · b, with `a` stored (m, k) or, transposed, (k, m), and `b`
/// stored (k, n) or, transposed, (n, k); on the dino_rs pool. Without `accumulate` dst is only
/// written, never read, so it may be uninitialised.
///
/// # Safety
/// `dst` must be valid for m·n writes (and reads with `accumulate`).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    dst: *mut f32,
    accumulate: bool,
) {
    assert!(a.len() >= m * k && b.len() >= k * n);
    if (m == 1 || m * n <= SMALL_PRODUCT) && k > 2 {
        // gemm sums a one-row product with its gemv and one of at most 16×16 outputs with
        // dot-product kernels, both in another order than the tile kernels it uses for larger
        // ones: a row's result would depend on how many rows came with it (one image's CLS row
        // alone would not match the same row in a batch). Zero rows added keep such a product on
        // the tile kernels; it is small, so the copies cost little.
        let rows = (SMALL_PRODUCT / n.max(1) + 1).max(2);
        let mut padded = vec![0.0f32; rows * k];
        for (r, out) in padded.chunks_exact_mut(k).take(m).enumerate() {
            for (j, v) in out.iter_mut().enumerate() {
                *v = if a_t { a[j * m + r] } else { a[r * k + j] };
            }
        }
        let mut out = vec![0.0f32; rows * n];
        if accumulate {
            // SAFETY: with `accumulate` the caller makes dst valid for m·n reads.
            out[..m * n].copy_from_slice(std::slice::from_raw_parts(dst, m * n));
        }
        matmul(rows, n, k, &padded, false, b, b_t, out.as_mut_ptr(), accumulate);
        std::ptr::copy_nonoverlapping(out.as_ptr(), dst, m * n);
        return;
    }
    let (a_rs, a_cs) = if a_t { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if b_t { (1, k) } else { (n, 1) };
    let dst = SendPtr(dst);
    let alone = crate::parallel::is_alone();
    crate::parallel::install(move || {
        let threads = rayon::current_num_threads();
        let par = if threads > 1 && !alone {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        gemm(
            m,
            n,
            k,
            dst.get(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    });
}

/// The output pointer, moved into the pool's closure (the gemm writes it from the pool's threads).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only the gemm call writes through it, while the caller waits for that call.
unsafe impl Send for SendPtr {}

impl SendPtr {
    /// Through a method, so the closure captures the whole (Send) wrapper, not the bare pointer.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `a · b` (see [`matmul`]) into a new m×n buffer, without zero-filling it first.
pub(super) fn matmul_new(m: usize, n: usize, k: usize, a: &[f32], a_t: bool, b: &[f32], b_t: bool) -> Vec<f32> {
    let mut v = Vec::with_capacity(m * n);
    // SAFETY: the capacity holds m·n elements; the gemm (without accumulate) writes every one of
    // them before the length makes them readable.
    unsafe {
        matmul(m, n, k, a, a_t, b, b_t, v.as_mut_ptr(), false);
        v.set_len(m * n);
    }
    v
}

/// The (rows, in, out) of a linear layer, checked.
fn dims(lx: &Layout, lw: &Layout) -> Result<(usize, usize, usize)> {
    let (x, w) = (lx.dims(), lw.dims());
    match (x.last(), w) {
        (Some(&k), &[n, wk]) if k == wk && k > 0 => Ok((lx.shape().elem_count() / k, k, n)),
        _ => candle_core::bail!("linear: input {x:?} with weight {w:?}"),
    }
}

fn forward(
    sx: &CpuStorage,
    lx: &Layout,
    sw: &CpuStorage,
    lw: &Layout,
    bias: Option<&[f32]>,
) -> Result<(CpuStorage, Shape)> {
    let (rows, k, n) = dims(lx, lw)?;
    let (x, w) = (f32_slice(sx, lx, "linear")?, f32_slice(sw, lw, "linear")?);
    if let Some(b) = bias.filter(|b| b.len() != n) {
        candle_core::bail!("linear: bias of {} for {n} outputs", b.len());
    }
    let y = rows_forward(x, w, bias, rows, k, n);
    let mut out = lx.dims().to_vec();
    *out.last_mut().expect("dims checked") = n;
    Ok((CpuStorage::F32(y), Shape::from(out)))
}

/// `x · wᵀ (+ bias)` for `rows` rows of `k` inputs and a weight (n, k), as a new (rows, n) buffer.
pub(super) fn rows_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, rows: usize, k: usize, n: usize) -> Vec<f32> {
    let Some(b) = bias else {
        return matmul_new(rows, n, k, x, false, w, true);
    };
    let mut y = Vec::with_capacity(rows * n);
    crate::parallel::install(|| {
        y.spare_capacity_mut()[..rows * n]
            .par_chunks_mut(ROWS_PER_TASK * n)
            .with_min_len(crate::parallel::min_len())
            .for_each(|c| {
                for r in c.chunks_exact_mut(n) {
                    for (o, &v) in r.iter_mut().zip(b) {
                        o.write(v);
                    }
                }
            })
    });
    // SAFETY: every row was just written with the bias; the gemm then adds onto them.
    unsafe {
        y.set_len(rows * n);
        matmul(rows, n, k, x, false, w, true, y.as_mut_ptr(), true);
    }
    y
}

/// (dx, dW) for y = x · Wᵀ: dx = g · W (None when `x` needs no gradient), dW = gᵀ · x.
fn backward(x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
    let g = grad.contiguous()?;
    let dx = if x.track_op() {
        Some(g.apply_op2_no_bwd(w, &Backward::Input)?.reshape(x.shape())?)
    } else {
        None
    };
    Ok((dx, g.apply_op2_no_bwd(x, &Backward::Weight)?))
}

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "dino-linear"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        forward(sx, lx, sw, lw, None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = backward(x, w, grad)?;
        Ok((dx, Some(dw)))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "dino-linear-bias"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward(sx, lx, sw, lw, Some(f32_slice(sb, lb, "linear")?))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = backward(x, w, grad)?;
        let db = grad.contiguous()?.apply_op1_no_bwd(&SumRows { d: b.elem_count() })?;
        Ok((dx, Some(dw), Some(db.reshape(b.shape())?)))
    }
}

/// The two gemms of the backward pass, on the gradient g (rows, out) and a second operand.
enum Backward {
    /// dx (rows, in) = g · W, with W (out, in).
    Input,
    /// dW (out, in) = gᵀ · x, with x (rows, in).
    Weight,
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "dino-linear-backward"
    }

    fn cpu_fwd(&self, sg: &CpuStorage, lg: &Layout, so: &CpuStorage, lo: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, other) = (f32_slice(sg, lg, self.name())?, f32_slice(so, lo, self.name())?);
        let n = *lg.dims().last().unwrap_or(&0);
        if n == 0 {
            candle_core::bail!("linear backward: gradient {:?}", lg.dims());
        }
        let rows = g.len() / n;
        match self {
            Backward::Input => {
                let k = other.len() / n;
                if lo.dims() != [n, k] {
                    candle_core::bail!("linear backward: gradient {:?} with weight {:?}", lg.dims(), lo.dims());
                }
                let dx = matmul_new(rows, k, n, g, false, other, false);
                Ok((CpuStorage::F32(dx), Shape::from((rows, k))))
            }
            Backward::Weight => {
                let k = *lo.dims().last().unwrap_or(&0);
                if k == 0 || other.len() != rows * k {
                    candle_core::bail!("linear backward: gradient {:?} with input {:?}", lg.dims(), lo.dims());
                }
                let dw = matmul_new(n, k, rows, g, true, other, false);
                Ok((CpuStorage::F32(dw), Shape::from((n, k))))
            }
        }
    }
}
