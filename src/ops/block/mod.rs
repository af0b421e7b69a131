//! A whole pre-norm transformer block, `y = x + keep₁·attn(norm1(x))`, then
//! `y + keep₂·mlp(norm2(y))`, as one graph node over the input and the block's twelve parameters
//! (concatenated, so that they are one operand).
//!
//! Built of one node per layer, a block had twenty activation-widths of graph edges (two for each
//! residual input, three for qkv, four each around the GELU, ...), and candle's backprop
//! zero-fills a gradient buffer for every edge and adds into it: a memset and an add per width,
//! single-threaded under the fork-safe `CANDLE_NUM_THREADS=1`. Here the backward pass is one
//! function that hands each gradient straight to the next kernel, leaving candle one edge per
//! block. The kernels are the per-layer ones (src/ops), called in the same order on the same
//! data, so the results are the same bit for bit.
//!
//! Kept for the backward pass, when something needs a gradient outside [`super::no_grad`]: qkv,
//! the attention probabilities, the attention output, the first residual sum and fc1's output
//! before its bias: the same tensors as the node of the other devices and dtypes
//! ([`portable`]). The two LayerNorm outputs and the GELU's output, which PyTorch keeps, are
//! recomputed from their inputs (an element- or row-wise pass each, against the backward's
//! matmuls); the GELU's alone is 4·C floats a token a block. A backward pass that finds nothing
//! kept reruns the forward pass.

pub mod pack;
pub(super) mod portable;

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::attention::{self, Dims};
use super::bias::column_sums;
use super::linear::{matmul, matmul_new, rows_forward};
use super::{f32_slice, gelu, layer_norm, residual};

/// The block's parameters in the order [`transformer_block`] takes them (official names).
pub const BLOCK_PARAMS: [&str; 12] = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
];

/// A block parameter's place in [`BLOCK_PARAMS`], in the packed layout and in every array of twelve
/// (named, so that code reads `p[Param::Fc1Weight]`, not `p[8]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Param {
    Norm1Weight,
    Norm1Bias,
    QkvWeight,
    QkvBias,
    ProjWeight,
    ProjBias,
    Norm2Weight,
    Norm2Bias,
    Fc1Weight,
    Fc1Bias,
    Fc2Weight,
    Fc2Bias,
}

impl<T> std::ops::Index<Param> for [T; 12] {
    type Output = T;
    fn index(&self, p: Param) -> &T {
        &self[p as usize]
    }
}

/// One transformer block on `x` (B, N, C) with the parameters named in [`BLOCK_PARAMS`], in that
/// order; `keep` holds the per-sample stochastic-depth scales (0 or 1/keep_prob) of the attention
/// and MLP branches, or None for 1. CPU and f32 only: see [`super::fused`].
pub fn transformer_block(
    x: &Tensor,
    params: [&Tensor; 12],
    num_heads: usize,
    eps: f64,
    keep: [Option<&[f32]>; 2],
) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    let hidden = params[Param::Fc1Weight].dim(0)?;
    let sizes = Sizes {
        c,
        hidden,
        heads: num_heads,
        eps: eps as f32,
        scale: ((c / num_heads.max(1)) as f32).powf(-0.5),
    };
    for ((p, name), want) in params.iter().zip(BLOCK_PARAMS).zip(sizes.shapes()) {
        if p.dims() != want.as_slice() {
            candle_core::bail!("transformer block: {name} is {:?}, expected {want:?}", p.dims());
        }
    }
    for k in keep.iter().flatten() {
        if k.len() != b {
            candle_core::bail!(
                "transformer block: {} stochastic-depth scales for a batch of {b}",
                k.len()
            );
        }
    }
    let (packed, _) = crate::ops::block::pack::packed(&params)?;
    let track = (x.track_op() || packed.track_op()) && super::grad_enabled();
    let op = BlockOp {
        sizes,
        keep: keep.map(|k| k.map(|s| Arc::new(s.to_vec()))),
        saved: track.then(Default::default),
    };
    x.contiguous()?.apply_op2(&packed, op)
}

/// Widths of one block, and its LayerNorm epsilon and attention scale.
#[derive(Clone, Copy)]
pub(super) struct Sizes {
    pub(super) c: usize,
    pub(super) hidden: usize,
    pub(super) heads: usize,
    pub(super) eps: f32,
    pub(super) scale: f32,
}

impl Sizes {
    /// The shapes of the parameters, in [`BLOCK_PARAMS`] order.
    pub(super) fn shapes(&self) -> [Vec<usize>; 12] {
        let (c, h) = (self.c, self.hidden);
        [
            vec![c],
            vec![c],
            vec![3 * c, c],
            vec![3 * c],
            vec![c, c],
            vec![c],
            vec![c],
            vec![c],
            vec![h, c],
            vec![h],
            vec![c, h],
            vec![c],
        ]
    }

    pub(super) fn param_count(&self) -> usize {
        self.shapes().iter().map(|s| s.iter().product::<usize>()).sum()
    }
}

/// The packed parameters cut into the twelve tensors, in [`BLOCK_PARAMS`] order.
fn split<'a>(sizes: &Sizes, mut p: &'a [f32]) -> [&'a [f32]; 12] {
    sizes.shapes().map(|s| {
        let (head, rest) = p.split_at(s.iter().product());
        p = rest;
        head
    })
}

/// A gradient buffer packed like the parameters, cut into ten: each LayerNorm's weight and bias
/// stay together, as `[d weight | d bias]`, the way the LayerNorm kernel writes them.
fn split_grads<'a>(sizes: &Sizes, mut p: &'a mut [f32]) -> [&'a mut [f32]; 10] {
    let len = sizes.shapes().map(|s| s.iter().product::<usize>());
    use Param::*;
    let merged = [
        len[Norm1Weight] + len[Norm1Bias],
        len[QkvWeight],
        len[QkvBias],
        len[ProjWeight],
        len[ProjBias],
        len[Norm2Weight] + len[Norm2Bias],
        len[Fc1Weight],
        len[Fc1Bias],
        len[Fc2Weight],
        len[Fc2Bias],
    ];
    merged.map(|l| {
        let (head, rest) = std::mem::take(&mut p).split_at_mut(l);
        p = rest;
        head
    })
}

/// What the backward pass needs from the forward pass (see the module comment).
struct Saved {
    qkv: Vec<f32>,
    probs: Vec<f32>,
    attn_out: Vec<f32>,
    y1: Vec<f32>,
    /// fc1's output before its bias and the GELU.
    fc1: Vec<f32>,
}

/// Tokens per slice of an inference batch (see [`Block::forward`]).
const INFERENCE_ROWS: usize = 2048;

/// The most tokens in one task of an inference batch shared out between threads (see
/// [`Block::forward_by_images`]): a slice's intermediates (fc1's output is 6 MB for ViT-S) stay in
/// the shared L3 cache from one kernel to the next.
const TASK_ROWS: usize = 1024;

#[derive(Clone, Copy)]
struct Block<'a> {
    sizes: Sizes,
    keep: &'a [Option<Arc<Vec<f32>>>; 2],
    b: usize,
    n: usize,
}

impl<'a> Block<'a> {
    /// The block for an input and packed parameters of these layouts, checked against `sizes`.
    fn new(sizes: Sizes, keep: &'a [Option<Arc<Vec<f32>>>; 2], lx: &Layout, lp: &Layout) -> Result<Self> {
        match lx.dims() {
            &[b, n, c] if c == sizes.c && n > 0 && lp.dims() == [sizes.param_count()] => {
                Ok(Block { sizes, keep, b, n })
            }
            d => candle_core::bail!("transformer block: input {d:?} with {:?} parameters", lp.dims()),
        }
    }

    fn keep(&self, i: usize) -> Option<&[f32]> {
        self.keep[i].as_deref().map(Vec::as_slice)
    }

    /// The gradient of residual branch `i` (0 attention, 1 MLP) from that of the block's sum: scaled
    /// per sample by the stochastic-depth factors, or `g` itself without them.
    fn branch_grad<'g>(&self, i: usize, g: &'g [f32]) -> std::borrow::Cow<'g, [f32]> {
        match self.keep(i) {
            Some(k) => std::borrow::Cow::Owned(residual::scale_samples(g, self.b, k)),
            None => std::borrow::Cow::Borrowed(g),
        }
    }

    fn dims(&self) -> Result<Dims> {
        Dims::new(&[self.b, self.n, 3 * self.sizes.c], self.sizes.heads)
    }

    /// The block's output, and what the backward pass needs when `save`.
    fn forward(&self, x: &[f32], p: [&[f32]; 12], save: bool) -> Result<(Vec<f32>, Option<Saved>)> {
        let inference = !save && self.keep.iter().all(Option::is_none);
        let threads = crate::parallel::num_threads();
        if inference && threads > 1 && self.b >= threads && !crate::parallel::is_alone() {
            return Ok((self.forward_by_images(x, p)?, None));
        }
        // With nothing to keep (inference, the teacher), a large batch goes through in slices of
        // about INFERENCE_ROWS tokens: the intermediates (fc1's is rows × hidden) then stay under
        // glibc's largest mmap threshold and are reused from the heap, where whole-batch buffers
        // (100 MB for 64 DINOv2 ViT-S images) were mapped afresh and zero-filled by the kernel in
        // every block (7% of a forward pass), and what one matmul writes is still in cache for the
        // next. Images are independent in a block, so the slices give the same values.
        let per_slice = (INFERENCE_ROWS / self.n).max(1);
        if inference && self.b > per_slice {
            let c = self.sizes.c;
            let mut y = Vec::with_capacity(x.len());
            for xs in x.chunks(per_slice * self.n * c) {
                let slice = Block {
                    b: xs.len() / (self.n * c),
                    ..*self
                };
                y.extend_from_slice(&slice.forward(xs, p, false)?.0);
            }
            return Ok((y, None));
        }
        let [n1w, n1b, qkv_w, qkv_b, proj_w, proj_b, n2w, n2b, fc1_w, fc1_b, fc2_w, fc2_b] = p;
        let Sizes { c, hidden, eps, .. } = self.sizes;
        let rows = self.b * self.n;
        let qkv = rows_forward(
            &layer_norm::forward(x, n1w, n1b, eps),
            qkv_w,
            Some(qkv_b),
            rows,
            c,
            3 * c,
        );
        let (attn_out, probs) = attention::forward(&qkv, self.dims()?, self.sizes.scale, save);
        let proj = rows_forward(&attn_out, proj_w, Some(proj_b), rows, c, c);
        let y1 = residual::add_scaled(x, &proj, self.b, self.keep(0));
        drop(proj);
        let fc1 = rows_forward(&layer_norm::forward(&y1, n2w, n2b, eps), fc1_w, None, rows, c, hidden);
        let h = gelu::bias_gelu_forward(&fc1, fc1_b);
        let fc2 = rows_forward(&h, fc2_w, Some(fc2_b), rows, hidden, c);
        drop(h);
        let y2 = residual::add_scaled(&y1, &fc2, self.b, self.keep(1));
        let saved = save.then_some(Saved {
            qkv,
            probs,
            attn_out,
            y1,
            fc1,
        });
        Ok((y2, saved))
    }

    /// Inference with the images shared out between the pool's threads: each thread takes slices
    /// of whole images through the block on its own ([`crate::parallel::alone`]), the next slice
    /// from a shared queue whenever it finishes one. Split layer by layer instead, each gemm gave
    /// each thread a fixed part and waited for the slowest at its end, and the element-wise passes
    /// between them had a barrier each: on a VM whose cores run at uneven speeds, both threads were
    /// busy only ~91% of a DINOv2 ViT-S/14 forward pass. The slices shrink towards the end of the
    /// queue (at most [`TASK_ROWS`] tokens, about a (2·threads)th of the images left), so that the
    /// threads run out of work close together. Images the threads cannot share (fewer than one per
    /// thread) go through split layer by layer afterwards. The values are the same either way:
    /// gemm's depth blocking depends on k, not on the rows or the threads (except for products of
    /// at most 64×64 outputs with k > 512, which a block only has at widths of 64 or less with an
    /// MLP more than 8 times as wide).
    fn forward_by_images(&self, x: &[f32], p: [&[f32]; 12]) -> Result<Vec<f32>> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let image = self.n * self.sizes.c;
        let mut y: Vec<f32> = Vec::with_capacity(x.len());
        // Sized inside the pool it runs on, which `set_num_threads` may have replaced meanwhile.
        let shared = crate::parallel::install(|| -> Result<usize> {
            let threads = rayon::current_num_threads();
            let shared = self.b / threads * threads;
            let most = (TASK_ROWS / self.n).max(1);
            let (mut input, mut out) = (&x[..shared * image], &mut y.spare_capacity_mut()[..shared * image]);
            let mut queue = Vec::new();
            while !input.is_empty() {
                let images = (input.len() / image).div_ceil(2 * threads).min(most);
                let (xs, rest) = input.split_at(images * image);
                let (ys, rest_out) = std::mem::take(&mut out).split_at_mut(images * image);
                (input, out) = (rest, rest_out);
                queue.push(Mutex::new(Some((xs, ys))));
            }
            let next = AtomicUsize::new(0);
            let failed = Mutex::new(None);
            rayon::broadcast(|_| {
                while let Some(task) = queue.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let Some((xs, ys)) = task.lock().unwrap_or_else(|e| e.into_inner()).take() else {
                        continue;
                    };
                    let slice = Block {
                        b: xs.len() / image,
                        ..*self
                    };
                    let result = match crate::parallel::alone(|| slice.forward(xs, p, false)) {
                        Ok((v, _)) if v.len() == ys.len() => {
                            for (o, v) in ys.iter_mut().zip(v) {
                                o.write(v);
                            }
                            continue;
                        }
                        Ok((v, _)) => candle_core::Error::Msg(format!(
                            "transformer block: {} outputs for a slice of {}",
                            v.len(),
                            ys.len()
                        )),
                        Err(e) => e,
                    };
                    failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(result);
                }
            });
            match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
                Some(e) => Err(e),
                None => Ok(shared),
            }
        })?;
        // SAFETY: every task ran without error and wrote its whole slice (its output's length was
        // checked); between them the slices cover the first `shared` images.
        unsafe { y.set_len(shared * image) };
        if shared < self.b {
            let rest = Block {
                b: self.b - shared,
                ..*self
            };
            y.extend_from_slice(&rest.forward(&x[shared * image..], p, false)?.0);
        }
        Ok(y)
    }

    /// `[dx | d params]` for the output gradient `g`, `dparams` packed like the parameters.
    fn backward(&self, x: &[f32], p: [&[f32]; 12], g: &[f32], s: &Saved) -> Result<Vec<f32>> {
        let [n1w, n1b, qkv_w, _, proj_w, _, n2w, n2b, fc1_w, fc1_b, fc2_w, _] = p;
        let Sizes { c, hidden, eps, .. } = self.sizes;
        let rows = self.b * self.n;
        // Zeroed: the bias, LayerNorm and dx parts are accumulated into.
        let mut out = vec![0f32; rows * c + self.sizes.param_count()];
        let (dx, dp) = out.split_at_mut(rows * c);
        let [dn1, dqkv_w, dqkv_b, dproj_w, dproj_b, dn2, dfc1_w, dfc1_b, dfc2_w, dfc2_b] = split_grads(&self.sizes, dp);

        // MLP branch: y2 = y1 + keep₂ · fc2(gelu(fc1(norm2(y1)))).
        let gb = self.branch_grad(1, g);
        column_sums(&gb, dfc2_b);
        // SAFETY (all `matmul` calls): each destination is a parameter's own (rows × cols) slice.
        let h = gelu::bias_gelu_forward(&s.fc1, fc1_b);
        unsafe { matmul(c, hidden, rows, &gb, true, &h, false, dfc2_w.as_mut_ptr(), false) };
        drop(h);
        let dh = matmul_new(rows, hidden, c, &gb, false, fc2_w, false);
        drop(gb);
        let mut da = vec![0f32; rows * hidden];
        gelu::bias_gelu_backward(&s.fc1, fc1_b, &dh, &mut da, dfc1_b);
        drop(dh);
        let z2 = layer_norm::forward(&s.y1, n2w, n2b, eps);
        unsafe { matmul(hidden, c, rows, &da, true, &z2, false, dfc1_w.as_mut_ptr(), false) };
        drop(z2);
        let dz2 = matmul_new(rows, c, hidden, &da, false, fc1_w, false);
        drop(da);
        dx.copy_from_slice(g);
        layer_norm::backward(&s.y1, n2w, &dz2, eps, dx, dn2);
        drop(dz2);

        // Attention branch: y1 = x + keep₁ · proj(attention(qkv(norm1(x)))); dx holds dy1.
        let gb = self.branch_grad(0, dx);
        column_sums(&gb, dproj_b);
        unsafe { matmul(c, c, rows, &gb, true, &s.attn_out, false, dproj_w.as_mut_ptr(), false) };
        let d_out = matmul_new(rows, c, c, &gb, false, proj_w, false);
        drop(gb);
        let probs = (!s.probs.is_empty()).then_some(s.probs.as_slice());
        let dqkv = attention::backward(&s.qkv, &d_out, self.dims()?, self.sizes.scale, probs);
        drop(d_out);
        column_sums(&dqkv, dqkv_b);
        let z1 = layer_norm::forward(x, n1w, n1b, eps);
        unsafe { matmul(3 * c, c, rows, &dqkv, true, &z1, false, dqkv_w.as_mut_ptr(), false) };
        drop(z1);
        let dz1 = matmul_new(rows, c, 3 * c, &dqkv, false, qkv_w, false);
        drop(dqkv);
        layer_norm::backward(x, n1w, &dz1, eps, dx, dn1);
        Ok(out)
    }
}

struct BlockOp {
    sizes: Sizes,
    keep: [Option<Arc<Vec<f32>>>; 2],
    saved: Option<Arc<Mutex<Option<Saved>>>>,
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        "dino-transformer-block"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sp: &CpuStorage, lp: &Layout) -> Result<(CpuStorage, Shape)> {
        let block = Block::new(self.sizes, &self.keep, lx, lp)?;
        let (x, p) = (f32_slice(sx, lx, self.name())?, f32_slice(sp, lp, self.name())?);
        let (y, saved) = block.forward(x, split(&self.sizes, p), self.saved.is_some())?;
        if let Some(slot) = &self.saved {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = saved;
        }
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, packed: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .as_ref()
            .and_then(|m| m.lock().unwrap_or_else(|e| e.into_inner()).take());
        let op = BlockBackward {
            sizes: self.sizes,
            keep: self.keep.clone(),
            saved: Mutex::new(saved),
        };
        let flat = x.apply_op3_no_bwd(packed, &grad.contiguous()?, &op)?;
        let n = x.elem_count();
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let dp = flat.narrow(0, n, packed.elem_count())?;
        Ok((Some(dx), Some(dp)))
    }
}

struct BlockBackward {
    sizes: Sizes,
    keep: [Option<Arc<Vec<f32>>>; 2],
    /// Taken from the forward pass; recomputed when absent.
    saved: Mutex<Option<Saved>>,
}

impl CustomOp3 for BlockBackward {
    fn name(&self) -> &'static str {
        "dino-transformer-block-backward"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let block = Block::new(self.sizes, &self.keep, lx, lp)?;
        if lg.dims() != lx.dims() {
            candle_core::bail!(
                "transformer block backward: input {:?} but grad {:?}",
                lx.dims(),
                lg.dims()
            );
        }
        let x = f32_slice(sx, lx, self.name())?;
        let p = split(&self.sizes, f32_slice(sp, lp, self.name())?);
        let g = f32_slice(sg, lg, self.name())?;
        let taken = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let saved = match taken {
            Some(s) => s,
            None => block.forward(x, p, true)?.1.expect("saved when asked"),
        };
        let out = block.backward(x, p, g, &saved)?;
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod param_names {
    use super::Param::*;
    use super::*;

    #[test]
    fn each_named_parameter_is_its_official_name() {
        let named = [
            (Norm1Weight, "norm1.weight"),
            (Norm1Bias, "norm1.bias"),
            (QkvWeight, "attn.qkv.weight"),
            (QkvBias, "attn.qkv.bias"),
            (ProjWeight, "attn.proj.weight"),
            (ProjBias, "attn.proj.bias"),
            (Norm2Weight, "norm2.weight"),
            (Norm2Bias, "norm2.bias"),
            (Fc1Weight, "mlp.fc1.weight"),
            (Fc1Bias, "mlp.fc1.bias"),
            (Fc2Weight, "mlp.fc2.weight"),
            (Fc2Bias, "mlp.fc2.bias"),
        ];
        for (param, name) in named {
            assert_eq!(BLOCK_PARAMS[param], name);
        }
    }
}
