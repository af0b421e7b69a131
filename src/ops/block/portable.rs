//! A whole pre-norm transformer block as one graph node on every device and dtype the fused CPU
//! block ([`crate::ops::transformer_block`]) does not take: CUDA, bf16 autocast, the composed CPU path.
//! The forward pass runs the per-layer ops (LayerNorm, linear, attention, GELU, linear with the
//! residual update) outside candle's graph; the backward pass calls their backward functions in
//! turn, handing each gradient straight to the next.
//!
//! Layer by layer, a block has ~18 activation widths of graph edges (qkv three, fc1's output and
//! the GELU's four each, the stream two per residual, ...), and candle's backprop zero-fills a
//! gradient buffer for each and adds into it: on a GPU a memset and an add per edge, about 70
//! activation widths of memory traffic a block. Here candle sees two edges per block, its input
//! and its packed parameters; in a training step the student's crop resolutions share one packed
//! tensor, a leaf of the graph ([`crate::ops::block::pack`]), and under autocast otherwise, so each
//! parameter's own edges come once a step, or not at all.
//!
//! Kept for the backward pass, and dropped as soon as the block's backward has run: qkv, the
//! attention output with the rows' log-sum-exps (flash attention) or the probabilities (composed
//! attention), the first residual sum and fc1's output before its bias. The two LayerNorm outputs
//! and the GELU's output, which PyTorch keeps, are recomputed (an element- or row-wise kernel
//! each): six activation widths less a block. A backward pass that finds nothing kept (a second
//! one) reruns the forward pass.
//!
//! The values are the per-layer path's bit for bit: the same kernels on the same data. One
//! difference under autocast: the per-layer path casts each weight to bf16 once per forward pass
//! and sums the two crop resolutions' gradients of that cast in bf16; here each resolution's
//! gradient is taken to f32 first, so they add up in f32.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use crate::ops::attention::flash::{self as flash, Stats};
use crate::ops::attention::scores as attention_scores;
use crate::ops::block::Param::{self, *};
use crate::ops::block::Sizes;
use crate::ops::gelu::portable as gelu_portable;
use crate::ops::layer_norm::portable as layer_norm;
use crate::ops::linear::portable as linear_portable;
use crate::ops::linear::residual::LinearResidual;
use crate::ops::residual::portable as residual_portable;

/// One transformer block on `x` (B, N, C) f32 with the parameters of
/// [`crate::ops::BLOCK_PARAMS`] (f32, in that order) and the drop-path masks of its two branches ((B,)
/// f32, 0 or 1/keep), in bf16 under autocast. `None` where the node does not apply (the fused CPU
/// path, nothing needing a gradient, other dtypes or shapes): then run the block layer by layer.
pub fn transformer_block(
    x: &Tensor,
    params: [&Tensor; 12],
    num_heads: usize,
    eps: f64,
    masks: Option<[&Tensor; 2]>,
) -> Result<Option<Tensor>> {
    let needs_grad = x.track_op() || params.iter().any(|p| p.track_op());
    if crate::ops::fused(x)
        || !crate::ops::grad_enabled()
        || !needs_grad
        || !crate::ops::OpsPolicy::current().block_node
    {
        return Ok(None);
    }
    let low = crate::ops::autocast::active().unwrap_or(DType::F32);
    let Ok((b, n, c)) = x.dims3() else {
        return Ok(None);
    };
    let hidden = params[Fc1Weight].dims().first().copied().unwrap_or(0);
    if x.dtype() != DType::F32 || !matches!(low, DType::F32 | DType::BF16) || b * n == 0 {
        return Ok(None);
    }
    if num_heads == 0 || !c.is_multiple_of(num_heads) || hidden == 0 {
        return Ok(None);
    }
    let scale = ((c / num_heads) as f64).powf(-0.5);
    let sizes = Sizes {
        c,
        hidden,
        heads: num_heads,
        eps: eps as f32,
        scale: scale as f32,
    };
    let shapes_ok = params
        .iter()
        .zip(sizes.shapes())
        .all(|(p, want)| p.dims() == want.as_slice() && p.dtype() == DType::F32);
    let masks_ok = masks.is_none_or(|m| m.iter().all(|t| t.dtype() == DType::F32 && t.dims() == [b]));
    if !shapes_ok || !masks_ok {
        return Ok(None);
    }
    let (packed, low_packed) = crate::ops::block::pack::packed(&params)?;
    let x = x.contiguous()?;
    let node = BlockNode {
        sizes,
        eps,
        scale,
        low,
        masks: masks.map(|m| m.map(Tensor::clone)),
        saved: Mutex::new(None),
        hidden: Mutex::new(None),
    };
    let (saved, hidden) = node.forward(&x.detach(), &packed.detach(), low_packed)?;
    *lock(&node.saved) = Some(saved);
    *lock(&node.hidden) = Some(hidden);
    Ok(Some(x.apply_op2(&packed, node)?))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct BlockNode {
    sizes: Sizes,
    eps: f64,
    scale: f64,
    /// The matmuls' dtype: bf16 under autocast, f32 otherwise.
    low: DType,
    masks: Option<[Tensor; 2]>,
    /// Set by [`transformer_block`], taken by the backward pass.
    saved: Mutex<Option<Saved>>,
    /// The GELU's output, set by [`transformer_block`] and taken by the node's forward pass
    /// (fc2's input; recomputed in the backward pass instead of kept).
    hidden: Mutex<Option<Tensor>>,
}

/// What the backward pass needs from the forward pass (see the module comment).
struct Saved {
    /// The parameters in the matmuls' dtype.
    low: Tensor,
    qkv: Tensor,
    attention: Attention,
    /// The attention output (B, N, C): proj's input.
    attended: Tensor,
    /// The stream after the attention branch.
    x1: Tensor,
    /// fc1's output before its bias, (B·N, hidden).
    fc1: Tensor,
}

enum Attention {
    Flash(Stats),
    Composed { probs: Tensor },
}

/// Views of a packed parameter tensor, one per [`crate::ops::BLOCK_PARAMS`] entry, and where each
/// starts in it.
struct Params {
    p: [Tensor; 12],
    offsets: [usize; 12],
}

impl Params {
    fn new(packed: &Tensor, sizes: &Sizes) -> Result<Self> {
        let shapes = sizes.shapes();
        let mut offsets = [0; 12];
        let mut at = 0;
        for (o, s) in offsets.iter_mut().zip(&shapes) {
            *o = at;
            at += s.iter().product::<usize>();
        }
        let mut p = Vec::with_capacity(12);
        for (s, &o) in shapes.iter().zip(&offsets) {
            p.push(packed.narrow(0, o, s.iter().product())?.reshape(s.as_slice())?);
        }
        let p = p
            .try_into()
            .map_err(|_| candle_core::Error::Msg("twelve parameters".into()))?;
        Ok(Self { p, offsets })
    }

    /// A linear layer's weight and bias (`weight` and the parameter after it) as the one flat
    /// tensor that [`LinearResidual`] takes, a view of `packed`'s layout `l`.
    fn weight_and_bias(&self, weight: Param, l: &Layout) -> Layout {
        let i = weight as usize;
        let len = self.p[i].elem_count() + self.p[i + 1].elem_count();
        Layout::contiguous_with_offset(len, l.start_offset() + self.offsets[i])
    }
}

impl BlockNode {
    /// The forward pass up to fc2, outside any graph, with the parameters `packed` and, in the
    /// matmuls' dtype, `low`: what the backward pass keeps, and the GELU's output.
    fn forward(&self, x: &Tensor, packed: &Tensor, low: Tensor) -> Result<(Saved, Tensor)> {
        let (b, n, c) = x.dims3()?;
        let rows = b * n;
        let p32 = Params::new(packed, &self.sizes)?;
        let pl = Params::new(&low, &self.sizes)?;
        let z1 = layer_norm::layer_norm_to(x, &p32.p[Norm1Weight], &p32.p[Norm1Bias], self.eps, Some(self.low))?;
        let qkv = linear_portable::linear_rows(&z1.reshape((rows, c))?, &pl.p[QkvWeight], Some(&pl.p[QkvBias]))?;
        drop(z1);
        let qkv = qkv.reshape((b, n, 3 * c))?;
        let (attended, attention) = match flash::forward_keeping(&qkv, self.sizes.heads, self.scale)? {
            Some((out, stats)) => (out, Attention::Flash(stats)),
            None => {
                let (out, probs) = crate::ops::attention_composed(&qkv, self.sizes.heads, self.scale)?;
                (out, Attention::Composed { probs })
            }
        };
        let proj = LinearResidual {
            out: c,
            mask: self.mask(0),
        };
        let x1 = x.apply_op3_no_bwd(
            &attended.reshape((rows, c))?,
            &low.narrow(0, pl.offsets[ProjWeight], c * c + c)?,
            &proj,
        )?;
        let z2 = layer_norm::layer_norm_to(&x1, &p32.p[Norm2Weight], &p32.p[Norm2Bias], self.eps, Some(self.low))?;
        let fc1 = linear_portable::linear_rows(&z2.reshape((rows, c))?, &pl.p[Fc1Weight], None)?;
        drop(z2);
        let hidden = gelu_applied(gelu_portable::bias_gelu(&fc1, &pl.p[Fc1Bias])?)?;
        let saved = Saved {
            low,
            qkv,
            attention,
            attended,
            x1,
            fc1,
        };
        Ok((saved, hidden))
    }

    fn mask(&self, i: usize) -> Option<Tensor> {
        self.masks.as_ref().map(|m| m[i].clone())
    }

    /// fc2 and the second residual update: the block's output, from what [`Self::forward`] left.
    fn output<S>(&self, run: impl FnOnce(&LinearResidual, [(&Storage, &Layout); 3]) -> Result<S>) -> Result<S> {
        let saved = lock(&self.saved);
        let hidden = lock(&self.hidden).take();
        let (Some(s), Some(hidden)) = (saved.as_ref(), hidden) else {
            candle_core::bail!("transformer block: one forward pass per node");
        };
        let pl = Params::new(&s.low, &self.sizes)?;
        let (sx, lx) = s.x1.storage_and_layout();
        let (sh, lh) = hidden.storage_and_layout();
        let (sp, lp) = s.low.storage_and_layout();
        let fc2 = LinearResidual {
            out: self.sizes.c,
            mask: self.mask(1),
        };
        run(
            &fc2,
            [(&*sx, lx), (&*sh, lh), (&*sp, &pl.weight_and_bias(Fc2Weight, lp))],
        )
    }

    /// `[dx, d params (packed, f32)]` for the output gradient `g`.
    fn backward(&self, x: &Tensor, packed: &Tensor, g: &Tensor, s: &Saved) -> Result<(Tensor, Tensor)> {
        let (b, n, c) = x.dims3()?;
        let (rows, heads, eps, low) = (b * n, self.sizes.heads, self.eps, self.low);
        let p32 = Params::new(packed, &self.sizes)?;
        let pl = Params::new(&s.low, &self.sizes)?;
        let bias_grad = |g: &Tensor| crate::ops::bias::bias_grad(g, low);

        // MLP branch: y = x1 + mask₂ · fc2(gelu(fc1(norm2(x1)))).
        let g2 = residual_portable::branch_grad(g, low, self.mask(1).as_ref())?.reshape((rows, c))?;
        let hidden = gelu_applied(gelu_portable::bias_gelu(&s.fc1, &pl.p[Fc1Bias])?)?;
        let (dh, dfc2_w) = linear_portable::grads(&hidden, &pl.p[Fc2Weight], &g2, true)?;
        drop(hidden);
        let dfc2_b = bias_grad(&g2)?;
        drop(g2);
        let (dfc1, dfc1_b) = gelu_portable::backward_tensors(&s.fc1, &pl.p[Fc1Bias], &required(dh)?)?;
        let z2 = layer_norm::layer_norm_to(&s.x1, &p32.p[Norm2Weight], &p32.p[Norm2Bias], eps, Some(low))?
            .reshape((rows, c))?;
        let (dz2, dfc1_w) = linear_portable::grads(&z2, &pl.p[Fc1Weight], &dfc1, true)?;
        drop((z2, dfc1));
        let dz2 = required(dz2)?.reshape((b, n, c))?;
        let (dx1, dn2_w, dn2_b) =
            layer_norm::layer_norm_backward(&s.x1, &p32.p[Norm2Weight], &p32.p[Norm2Bias], &dz2, eps)?;
        let dx1 = (g + dx1)?;

        // Attention branch: x1 = x + mask₁ · proj(attention(qkv(norm1(x)))).
        let g1 = residual_portable::branch_grad(&dx1, low, self.mask(0).as_ref())?.reshape((rows, c))?;
        let (dattended, dproj_w) =
            linear_portable::grads(&s.attended.reshape((rows, c))?, &pl.p[ProjWeight], &g1, true)?;
        let dproj_b = bias_grad(&g1)?;
        drop(g1);
        let dattended = required(dattended)?.reshape((b, n, c))?;
        let dqkv = match &s.attention {
            Attention::Flash(stats) => flash::backward_kept(&s.qkv, &s.attended, &dattended, stats, heads, self.scale)?,
            Attention::Composed { probs } => composed_attention_backward(&s.qkv, probs, &dattended, heads, self.scale)?,
        };
        drop(dattended);
        let dqkv = dqkv.reshape((rows, 3 * c))?;
        let dqkv_b = bias_grad(&dqkv)?;
        let z1 =
            layer_norm::layer_norm_to(x, &p32.p[Norm1Weight], &p32.p[Norm1Bias], eps, Some(low))?.reshape((rows, c))?;
        let (dz1, dqkv_w) = linear_portable::grads(&z1, &pl.p[QkvWeight], &dqkv, true)?;
        drop((z1, dqkv));
        let dz1 = required(dz1)?.reshape((b, n, c))?;
        let (dx, dn1_w, dn1_b) = layer_norm::layer_norm_backward(x, &p32.p[Norm1Weight], &p32.p[Norm1Bias], &dz1, eps)?;
        let dx = (dx1 + dx)?;

        let grads = [
            dn1_w, dn1_b, dqkv_w, dqkv_b, dproj_w, dproj_b, dn2_w, dn2_b, dfc1_w, dfc1_b, dfc2_w, dfc2_b,
        ];
        Ok((dx, crate::ops::block::pack::flat_f32(&grads)?))
    }
}

/// The block node is only chosen where its kernels apply ([`transformer_block`]'s checks), so a
/// GELU that does not is a bug, reported rather than papered over by a slower path.
fn gelu_applied(t: Option<Tensor>) -> Result<Tensor> {
    t.ok_or_else(|| candle_core::Error::Msg("transformer block: the GELU kernel does not take these inputs".into()))
}

fn required(t: Option<Tensor>) -> Result<Tensor> {
    t.ok_or_else(|| candle_core::Error::Msg("transformer block: a gradient was not computed".into()))
}

/// The gradient of `qkv` (B, N, 3·C) through [`crate::ops::attention_composed`], from its
/// probabilities and the output gradient (B, N, C): the steps candle's backprop takes through
/// that function's ops, without the zero-filled buffers.
fn composed_attention_backward(
    qkv: &Tensor,
    probs: &Tensor,
    grad: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, n, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let (q, k, v) = flash::head_major(qkv, heads)?;
    let d_out = grad.reshape((b, n, heads, c / heads))?.transpose(1, 2)?.contiguous()?;
    let d_probs = d_out.matmul(&v.t()?)?;
    let dv = probs.t()?.matmul(&d_out)?;
    drop(d_out);
    let (dq, dk) = attention_scores::backward(&q, &k, probs, &d_probs, scale)?;
    Tensor::stack(&[dq, dk, dv], 0)?
        .permute((1, 3, 0, 2, 4))?
        .reshape((b, n, c3))
}

impl CustomOp2 for BlockNode {
    fn name(&self) -> &'static str {
        "dino-transformer-block-portable"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _lx: &Layout, _p: &CpuStorage, _lp: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output(|fc2, [(sx, lx), (sh, lh), (sp, lp)]| match (sx, sh, sp) {
            (Storage::Cpu(sx), Storage::Cpu(sh), Storage::Cpu(sp)) => fc2.cpu_fwd(sx, lx, sh, lh, sp, lp),
            _ => candle_core::bail!("transformer block: the kept tensors are not on the CPU"),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _lx: &Layout,
        _p: &candle_core::CudaStorage,
        _lp: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output(|fc2, [(sx, lx), (sh, lh), (sp, lp)]| match (sx, sh, sp) {
            (Storage::Cuda(sx), Storage::Cuda(sh), Storage::Cuda(sp)) => fc2.cuda_fwd(sx, lx, sh, lh, sp, lp),
            _ => candle_core::bail!("transformer block: the kept tensors are not on the GPU"),
        })
    }

    fn bwd(&self, x: &Tensor, packed: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached, so that the gradients built from them carry no graph of their own.
        let (x, packed) = (x.detach(), packed.detach());
        let taken = lock(&self.saved).take();
        let saved = match taken {
            Some(s) => s,
            None => self.forward(&x, &packed, packed.to_dtype(self.low)?)?.0,
        };
        let (dx, dp) = self.backward(&x, &packed, &grad.detach().contiguous()?, &saved)?;
        Ok((Some(dx), Some(dp)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor, Var};
    use rand::{Rng, SeedableRng};

    use crate::model::block::{Block, DropPathMasks};

    fn rand(rng: &mut rand_chacha::ChaCha8Rng, shape: &[usize], offset: f32) -> Result<Tensor> {
        let v: Vec<f32> = (0..shape.iter().product())
            .map(|_| offset + rng.random::<f32>() - 0.5)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// The value and the gradients (input first, then the parameters) of Σ block(x)·r.
    fn grads(x: &Var, params: &[Var], r: &Tensor, f: impl Fn() -> Result<Tensor>) -> Result<Vec<Tensor>> {
        let y = f()?;
        let g = (&y * r)?.sum_all()?.backward()?;
        let mut out = vec![y];
        for v in std::iter::once(x).chain(params) {
            out.push(g.get(v.as_tensor()).expect("a gradient").clone());
        }
        Ok(out)
    }

    #[test]
    fn equals_its_layers_bit_for_bit_on_the_composed_f32_path() -> Result<()> {
        // The path CUDA takes in f32, run on the CPU with the fused kernels off.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20);
        let (b, n, c, heads, hidden) = (3, 6, 12, 3, 40);
        let sizes = super::Sizes {
            c,
            hidden,
            heads,
            eps: 0.0,
            scale: 0.0,
        };
        let params: Vec<Var> = sizes
            .shapes()
            .iter()
            .enumerate()
            .map(|(i, s)| Var::from_tensor(&rand(&mut rng, s, if i == 0 || i == 6 { 1.0 } else { 0.0 })?))
            .collect::<Result<_>>()?;
        let map = crate::ops::BLOCK_PARAMS
            .iter()
            .zip(&params)
            .map(|(name, p)| (name.to_string(), p.as_tensor().clone()))
            .collect();
        let vit = crate::model::VitConfig {
            mlp_ratio: hidden as f64 / c as f64,
            ..crate::model::VitConfig::custom(c, 1, heads, 1, 1)
        };
        let block = Block::new(&vit, candle_nn::VarBuilder::from_tensors(map, DType::F32, &Device::Cpu))?;
        let x = Var::from_tensor(&rand(&mut rng, &[b, n, c], 0.0)?)?;
        let r = rand(&mut rng, &[b, n, c], 0.0)?;
        let keep = [vec![1.25f32, 0.0, 1.25], vec![0.0f32, 2.0, 2.0]];
        let masks = DropPathMasks {
            attn: keep[0].clone(),
            mlp: keep[1].clone(),
            on_device: Some([
                Tensor::new(keep[0].as_slice(), &Device::Cpu)?,
                Tensor::new(keep[1].as_slice(), &Device::Cpu)?,
            ]),
        };
        let p: Vec<&Tensor> = params.iter().map(|v| v.as_tensor()).collect();
        for m in [None, Some(&masks)] {
            let dev = m.and_then(|m| m.on_device.as_ref()).map(|[a, b]| [a, b]);
            crate::ops::portable(|| -> Result<()> {
                let node = grads(&x, &params, &r, || {
                    let p: [&Tensor; 12] = std::array::from_fn(|i| p[i]);
                    Ok(super::transformer_block(&x, p, heads, 1e-6, dev)?.expect("the node applies"))
                })?;
                let layers = grads(&x, &params, &r, || block.forward_layers(&x, m))?;
                for (i, (a, b)) in node.iter().zip(&layers).enumerate() {
                    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    let size = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    assert!(size > 0.0, "output {i} is zero, masks {}", m.is_some());
                    assert_eq!(
                        diff,
                        0.0,
                        "output {i} (0: value, 1: dx, then the parameters), masks {}",
                        m.is_some()
                    );
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}
