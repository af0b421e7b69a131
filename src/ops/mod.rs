//! Fused CPU kernels, with their backward passes, for the element- and row-wise layers of a ViT:
//! LayerNorm, softmax over the last dimension and exact GELU. Composed out of candle ops these
//! allocate a tensor per intermediate and run single-threaded; here each is one pass per row (or
//! chunk) on the dino_rs pool, and the backward recomputes what it needs instead of keeping it.
//! On other devices or dtypes the composed versions are used (candle's fused `layer_norm` and
//! `softmax_last_dim` have no backward: docs/design.md, Gradients).
//!
//! Layout: one folder per op (`mod.rs` the public entry and the fused CPU kernel, `portable.rs`
//! the kernels for CUDA and the other dtypes), the CUDA sources in `cuda/`, the switches in
//! [`OpsPolicy`].
//!
//! One convention for a path that may not apply: a faster path returns `Result<Option<T>>`
//! (`T = ()` for the in-place updates), `Ok(None)` meaning "not for these inputs, device or
//! policy; nothing was done", and its caller falls back to the next path. An `Err` always means
//! the path applied and failed, so a fallback never hides a fault.

/// Runs `$f::<T>` on the contiguous slices of the CPU storages `$s` (all of one float dtype T),
/// then on the `$extra` arguments, and wraps the `Vec<T>` it returns as a storage of that dtype.
macro_rules! by_dtype {
    ($what:expr, $f:ident, [$( ($s:expr, $l:expr) ),+] $(, $extra:expr)*) => {{
        use candle_core::{CpuStorage, DType};
        let dtypes = [$( $s.dtype() ),+];
        let first = dtypes[0];
        if dtypes.iter().any(|&t| t != first) {
            candle_core::bail!("{}: the inputs must share a float dtype, got {dtypes:?}", $what);
        }
        match first {
            DType::F32 => CpuStorage::F32($f($( $crate::ops::contiguous($s.as_slice::<f32>()?, $l, $what)? ),+ $(, $extra)*)),
            DType::F64 => CpuStorage::F64($f($( $crate::ops::contiguous($s.as_slice::<f64>()?, $l, $what)? ),+ $(, $extra)*)),
            DType::BF16 => CpuStorage::BF16($f($( $crate::ops::contiguous($s.as_slice::<half::bf16>()?, $l, $what)? ),+ $(, $extra)*)),
            DType::F16 => CpuStorage::F16($f($( $crate::ops::contiguous($s.as_slice::<half::f16>()?, $l, $what)? ),+ $(, $extra)*)),
            other => candle_core::bail!("{}: expected a float dtype, got {other:?}", $what),
        }
    }};
}

mod attention;
pub mod autocast;
mod bias;
mod block;
mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
mod gelu;
#[cfg(feature = "cuda")]
mod kernels;
#[doc(hidden)]
pub mod launch;
mod layer_norm;
mod linear;
pub mod math;
mod optim;
mod parity;
mod pixels;
mod policy;
mod residual;
mod softmax;
mod weight_norm;

pub use attention::attention;
pub(crate) use attention::flash::split_heads;
pub use attention::flash::{attention_composed, flash_attention};
pub use attention::scores::attention_scores;
pub use bias::add_bias;
pub use block::pack;
pub use block::portable::transformer_block as transformer_block_portable;
pub(crate) use block::Param;
pub use block::{transformer_block, BLOCK_PARAMS};
pub use cross_entropy::{dino_cross_entropy, dino_loss_rows};
pub use gelu::{bias_gelu, gelu_erf};
pub use launch::{AdamWItem, AdamWStep};
pub use layer_norm::{layer_norm, layer_norm_lowered};
pub use linear::linear;
pub use linear::residual::linear_residual;
pub use optim::foreach::{adamw_foreach, clip_foreach, ema_foreach};
pub use optim::update::{adamw_update, ema_update};
pub use parity::kernel_parity;
pub use pixels::normalize_u8;
pub use policy::OpsPolicy;
pub use residual::{residual, residual_with_mask};
pub use softmax::{attention_probabilities, softmax_last_dim};
pub use weight_norm::{weight_norm, weight_norm_backward, weight_norm_to};

use candle_core::{backend::BackendStorage, bail, CpuStorage, Layout, Result, Tensor};
use rayon::prelude::*;

/// Rows per parallel task. Fixed (not derived from the thread count) so that reductions across
/// rows add up in the same order, and training is bit-for-bit repeatable, on any number of threads.
const ROWS_PER_TASK: usize = 64;
/// Elements per parallel task for element-wise kernels.
const ELEMS_PER_TASK: usize = 1 << 14;

thread_local! {
    static NO_GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the fused CPU kernels off on this thread, so that the CPU takes the path other
/// devices take: [`kernel_parity`] compares the two on the CPU.
fn portable<R>(f: impl FnOnce() -> R) -> R {
    OpsPolicy {
        fused_cpu: false,
        ..OpsPolicy::current()
    }
    .with(f)
}

/// Runs `f` with the fused ops keeping nothing for a backward pass, like `torch.no_grad()`: for
/// inference and the EMA teacher. Their parameters are `Var`s, so candle records the graph
/// anyway; without this, attention would also keep every block's probabilities until the output
/// is dropped. Thread-local: call it on the thread that runs the forward pass (inside
/// `parallel::install`, not around it). A backward pass through such a graph still works: it
/// recomputes what was not kept.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_GRAD.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(NO_GRAD.with(|g| g.replace(true)));
    f()
}

/// Whether ops may keep buffers for a backward pass (false inside [`no_grad`]).
fn grad_enabled() -> bool {
    !NO_GRAD.with(|g| g.get())
}

/// Whether the fused kernels apply to `x` (CPU, f32, outside [`autocast::autocast`], and on in
/// the [`OpsPolicy`]); elsewhere callers compose candle ops.
pub fn fused(x: &Tensor) -> bool {
    let policy = OpsPolicy::current();
    policy.kernels
        && policy.fused_cpu
        && x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && autocast::active().is_none()
}

/// Whether dino_rs's own kernels may run ([`OpsPolicy::kernels`]): off, the CUDA multi-tensor
/// updates and the other CUDA kernels give way to candle ops too.
fn kernels_enabled() -> bool {
    OpsPolicy::current().kernels
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: expected f32, got {:?}", s.dtype());
    };
    contiguous(v, l, op)
}

/// `t` in f32 if it is half precision (bf16, f16); f32 and f64 as they are. For the sums and
/// statistics that must not be taken in half precision (loss, gradients, normalisation).
pub fn at_least_f32(t: &Tensor) -> Result<Tensor> {
    match t.dtype() {
        candle_core::DType::BF16 | candle_core::DType::F16 => t.to_dtype(candle_core::DType::F32),
        _ => Ok(t.clone()),
    }
}

/// `mask` (one value per sample) shaped (B, 1, …, 1) to broadcast over a rank-`rank` batch.
fn per_sample(mask: &Tensor, rank: usize) -> Result<Tensor> {
    let mut shape = vec![1; rank.max(1)];
    shape[0] = mask.elem_count();
    mask.reshape(shape)
}

/// The elements of `v` that the contiguous layout `l` covers.
fn contiguous<'a, T>(v: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{op}: expected a contiguous tensor"),
    }
}

/// Runs `f(input_chunk, output_chunk)` over matching chunks of `chunk` elements (a whole number of
/// rows for row-wise kernels) on the dino_rs pool.
fn par_map(x: &[f32], chunk: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    if x.len() <= chunk || crate::parallel::is_alone() {
        f(x, &mut y);
        return y;
    }
    crate::parallel::install(|| {
        x.par_chunks(chunk)
            .zip(y.par_chunks_mut(chunk))
            .for_each(|(xc, yc)| f(xc, yc))
    });
    y
}

/// Like [`par_map`] with a second input of the same length.
fn par_map2(a: &[f32], b: &[f32], chunk: usize, f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut y = vec![0f32; a.len()];
    if a.len() <= chunk || crate::parallel::is_alone() {
        f(a, b, &mut y);
        return y;
    }
    crate::parallel::install(|| {
        a.par_chunks(chunk)
            .zip(b.par_chunks(chunk))
            .zip(y.par_chunks_mut(chunk))
            .for_each(|((ac, bc), yc)| f(ac, bc, yc))
    });
    y
}

/// A backward pass over rows of width `d` that also sums something across rows (a weight or bias
/// gradient): `f(x rows, grad rows, dx rows, partial)` runs on tasks of [`ROWS_PER_TASK`] rows, each
/// with its own zeroed `sums.len()`-long partial, and the partials are added into `sums` in task
/// order, so the result is the same for any number of threads.
fn rows_with_sums(
    x: &[f32],
    g: &[f32],
    dx: &mut [f32],
    d: usize,
    sums: &mut [f32],
    f: impl Fn(&[f32], &[f32], &mut [f32], &mut [f32]) + Sync,
) {
    let rows = ROWS_PER_TASK * d;
    let width = sums.len();
    let partials: Vec<Vec<f32>> = crate::parallel::install(|| {
        x.par_chunks(rows)
            .zip(g.par_chunks(rows))
            .zip(dx.par_chunks_mut(rows))
            .map(|((xc, gc), dc)| {
                let mut p = vec![0f32; width];
                f(xc, gc, dc, &mut p);
                p
            })
            .collect()
    });
    for p in partials {
        for (o, v) in sums.iter_mut().zip(p) {
            *o += v;
        }
    }
}

/// Applies `f` to every row of `d` values in f64, writing `T` (the row loops of the portable
/// LayerNorm and softmax on the CPU, for dtypes other than f32).
pub(crate) fn map_rows<T: candle_core::WithDType>(x: &[T], d: usize, mut f: impl FnMut(&[f64], &mut [f64])) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    let (mut row, mut res) = (vec![0f64; d], vec![0f64; d]);
    for chunk in x.chunks_exact(d) {
        for (r, v) in row.iter_mut().zip(chunk) {
            *r = candle_core::WithDType::to_f64(*v);
        }
        f(&row, &mut res);
        out.extend(res.iter().map(|&v| <T as candle_core::WithDType>::from_f64(v)));
    }
    out
}

/// The length of the last dimension, which a row op needs positive.
pub(crate) fn last_dim(l: &Layout, what: &str) -> Result<usize> {
    match l.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("{what}: no last dimension in {:?}", l.dims()),
    }
}
