//! Multi-head scaled dot-product attention straight from the `qkv` projection, forward and
//! backward, one (image, head) pair per parallel task.
//!
//! Composed from candle ops, attention copied q, k and v out of the interleaved `qkv` layout,
//! ran each image's small matmuls one after another (candle loops over the batch), kept the
//! (B, heads, N, N) logits, probabilities and their intermediates for the backward pass, and
//! copied the output back into token order. Here the matmuls read `qkv` and write the output
//! through strides. Only the (B, heads, N, N) probabilities are kept for the backward pass (as
//! PyTorch keeps its softmax output), and only when `qkv` needs a gradient outside
//! [`super::no_grad`]: inference keeps nothing, and a backward pass that finds nothing kept (a
//! second one over the same graph) recomputes them one pair at a time.

pub(super) mod flash;
pub(super) mod scores;

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::{f32_slice, softmax};

/// `softmax(q·kᵀ·scale)·v` per head, for `qkv` (B, N, 3·C) laid out as the official
/// `qkv(x).reshape(B, N, 3, heads, C/heads)`; returns (B, N, C) with the heads side by side.
/// CPU and f32 only: see [`super::fused`].
pub fn attention(qkv: &Tensor, num_heads: usize, scale: f64) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(AttentionOp {
        heads: num_heads,
        scale: scale as f32,
        saved: (qkv.track_op() && super::grad_enabled()).then(Default::default),
    })
}

struct AttentionOp {
    heads: usize,
    scale: f32,
    /// The forward pass's probabilities, (B·heads, N, N), for the backward pass to take.
    saved: Option<Arc<Mutex<Vec<f32>>>>,
}

/// Sizes of one call: batch, tokens, channels C, heads, head dim.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) b: usize,
    pub(super) n: usize,
    pub(super) c: usize,
    heads: usize,
    hd: usize,
}

impl Dims {
    /// From the dimensions of `qkv`, (B, N, 3C).
    pub(super) fn new(dims: &[usize], heads: usize) -> Result<Self> {
        let &[b, n, c3] = dims else {
            candle_core::bail!("attention: qkv must be (B, N, 3C), got {dims:?}");
        };
        if heads == 0 || c3 % (3 * heads) != 0 || n == 0 {
            candle_core::bail!("attention: qkv {dims:?} does not split into 3 x {heads} heads");
        }
        Ok(Dims {
            b,
            n,
            c: c3 / 3,
            heads,
            hd: c3 / 3 / heads,
        })
    }
}

/// A raw pointer the parallel tasks share; each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: tasks write disjoint (image, head) column blocks; the buffer outlives the parallel loop.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method, so closures capture the whole (Sync) wrapper, not the bare pointer.
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// dst (m×n, strides rs/cs) = beta · lhs (m×k) · rhs (k×n), single-threaded (the parallelism is
/// across (image, head) pairs).
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        0.0,
        beta,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// Probabilities P = softmax(scale · q kᵀ) of one (image, head) pair into `p` (n×n), using `s` as scratch.
unsafe fn probabilities(qkv: &[f32], d: Dims, bi: usize, h: usize, scale: f32, s: &mut [f32], p: &mut [f32]) {
    let c3 = 3 * d.c;
    let base = qkv.as_ptr().add(bi * d.n * c3 + h * d.hd);
    let (q, k) = (base, base.add(d.c));
    mm(d.n, d.n, d.hd, s.as_mut_ptr(), d.n, q, c3, 1, k, 1, c3, scale);
    softmax::rows_forward(s, d.n, p);
}

/// The attention output (B, N, C) for `qkv` (B, N, 3C), and, with `keep`, the probabilities
/// (B·heads, N, N) for the backward pass (else an empty buffer).
pub(super) fn forward(qkv: &[f32], d: Dims, scale: f32, keep: bool) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0f32; d.b * d.n * d.c];
    let dst = SharedMut(out.as_mut_ptr());
    let c3 = 3 * d.c;
    let nn = d.n * d.n;
    let mut kept = vec![0f32; if keep { d.b * d.heads * nn } else { 0 }];
    let kept_ptr = SharedMut(kept.as_mut_ptr());
    crate::parallel::install(|| {
        (0..d.b * d.heads)
            .into_par_iter()
            .with_min_len(crate::parallel::min_len())
            .for_each_init(
                || (vec![0f32; nn], vec![0f32; nn]),
                |(s, scratch), bh| {
                    let (bi, h) = (bh / d.heads, bh % d.heads);
                    // SAFETY: indices stay inside qkv (B·N·3C), out (B·N·C) and kept (B·heads·N²);
                    // each pair writes only its own head's columns of its own image, and its own
                    // block of `kept`.
                    unsafe {
                        let p = if keep {
                            std::slice::from_raw_parts_mut(kept_ptr.ptr().add(bh * nn), nn)
                        } else {
                            scratch.as_mut_slice()
                        };
                        probabilities(qkv, d, bi, h, scale, s, p);
                        let v = qkv.as_ptr().add(bi * d.n * c3 + 2 * d.c + h * d.hd);
                        let o = dst.ptr().add(bi * d.n * d.c + h * d.hd);
                        mm(d.n, d.hd, d.n, o, d.c, p.as_ptr(), d.n, 1, v, c3, 1, 1.0);
                    }
                },
            )
    });
    (out, kept)
}

/// d qkv for the output gradient `g` (B, N, C), from the forward pass's probabilities or, without
/// them, recomputing each pair's.
pub(super) fn backward(qkv: &[f32], g: &[f32], d: Dims, scale: f32, probs: Option<&[f32]>) -> Vec<f32> {
    let c3 = 3 * d.c;
    let mut dqkv = vec![0f32; qkv.len()];
    let dst = SharedMut(dqkv.as_mut_ptr());
    let nn = d.n * d.n;
    crate::parallel::install(|| {
        (0..d.b * d.heads)
            .into_par_iter()
            .with_min_len(crate::parallel::min_len())
            .for_each_init(
                || (vec![0f32; nn], vec![0f32; nn], vec![0f32; nn], vec![0f32; nn]),
                |(s, scratch, dp, ds), bh| {
                    let (bi, h) = (bh / d.heads, bh % d.heads);
                    // SAFETY: as in the forward pass; each pair writes its head's columns of the
                    // q, k and v thirds of its own image's rows.
                    unsafe {
                        let p: &[f32] = match probs {
                            Some(all) => &all[bh * nn..(bh + 1) * nn],
                            None => {
                                probabilities(qkv, d, bi, h, scale, s, scratch);
                                scratch
                            }
                        };
                        let base = bi * d.n * c3 + h * d.hd;
                        let (q, k, v) = (
                            qkv.as_ptr().add(base),
                            qkv.as_ptr().add(base + d.c),
                            qkv.as_ptr().add(base + 2 * d.c),
                        );
                        let go = g.as_ptr().add(bi * d.n * d.c + h * d.hd);
                        let (dq, dk, dv) = (
                            dst.ptr().add(base),
                            dst.ptr().add(base + d.c),
                            dst.ptr().add(base + 2 * d.c),
                        );
                        // dV = Pᵀ·dO
                        mm(d.n, d.hd, d.n, dv, c3, p.as_ptr(), 1, d.n, go, d.c, 1, 1.0);
                        // dP = dO·Vᵀ, then through the softmax
                        mm(d.n, d.n, d.hd, dp.as_mut_ptr(), d.n, go, d.c, 1, v, 1, c3, 1.0);
                        softmax::rows_backward(p, dp, d.n, ds);
                        // dQ = scale·dS·K, dK = scale·dSᵀ·Q
                        mm(d.n, d.hd, d.n, dq, c3, ds.as_ptr(), d.n, 1, k, c3, 1, scale);
                        mm(d.n, d.hd, d.n, dk, c3, ds.as_ptr(), 1, d.n, q, c3, 1, scale);
                    }
                },
            )
    });
    dqkv
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "dino-attention"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(st, l, self.name())?;
        let d = Dims::new(l.dims(), self.heads)?;
        let (out, kept) = forward(qkv, d, self.scale, self.saved.is_some());
        if let Some(saved) = &self.saved {
            *saved.lock().unwrap_or_else(|e| e.into_inner()) = kept;
        }
        Ok((CpuStorage::F32(out), Shape::from((d.b, d.n, d.c))))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let probs = self
            .saved
            .as_ref()
            .map(|m| std::mem::take(&mut *m.lock().unwrap_or_else(|e| e.into_inner())))
            .filter(|p| !p.is_empty());
        let op = AttentionBackward {
            heads: self.heads,
            scale: self.scale,
            probs,
        };
        Ok(Some(qkv.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

struct AttentionBackward {
    heads: usize,
    scale: f32,
    /// The forward pass's probabilities; recomputed per pair when absent.
    probs: Option<Vec<f32>>,
}

impl CustomOp2 for AttentionBackward {
    fn name(&self) -> &'static str {
        "dino-attention-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        let d = Dims::new(l1.dims(), self.heads)?;
        if l2.dims() != [d.b, d.n, d.c] {
            candle_core::bail!("attention backward: qkv {:?} but grad {:?}", l1.dims(), l2.dims());
        }
        let dqkv = backward(qkv, g, d, self.scale, self.probs.as_deref());
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}
