//! Exact GELU, x·Φ(x) = x/2 · (1 + erf(x/√2)) (PyTorch's `nn.GELU()` default), with its
//! derivative Φ(x) + x·φ(x), on vectorised erf/exp.

pub(super) mod portable;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{f32_slice, fused, math, par_map, par_map2, rows_with_sums, ELEMS_PER_TASK, ROWS_PER_TASK};

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// Differentiable exact (erf) GELU.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(GeluOp)
}

avx2_multiversion! {
    fn forward(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + math::erf(v * FRAC_1_SQRT_2));
        }
    }
}

avx2_multiversion! {
    fn backward(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((o, &v), &gv) in dx.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + math::erf(v * FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * math::exp(-0.5 * v * v);
            *o = gv * (cdf + v * pdf);
        }
    }
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "dino-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        Ok((CpuStorage::F32(par_map(x, ELEMS_PER_TASK, forward)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?))
    }
}

struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "dino-gelu-erf-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        if x.len() != g.len() {
            candle_core::bail!("gelu backward: input {:?} but grad {:?}", l1.dims(), l2.dims());
        }
        Ok((
            CpuStorage::F32(par_map2(x, g, ELEMS_PER_TASK, backward)),
            l1.shape().clone(),
        ))
    }
}

/// `gelu_erf(x + bias)` over the last dimension in one pass (a linear layer's bias followed by its
/// activation, as in the ViT MLP and the DINO head); the backward recomputes `x + bias`.
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        // The bias belongs to a linear layer: under autocast it is added in bf16, as nn.Linear's.
        let bias = super::autocast::lower(bias)?;
        if let Some(y) = crate::ops::gelu::portable::bias_gelu(x, &bias)? {
            return Ok(y);
        }
        return gelu_erf(&x.broadcast_add(&bias)?);
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, BiasGelu)
}

avx2_multiversion! {
    fn bias_forward(x: &[f32], b: &[f32], y: &mut [f32]) {
        let d = b.len();
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            for i in 0..d {
                let v = xr[i] + b[i];
                yr[i] = 0.5 * v * (1.0 + math::erf(v * FRAC_1_SQRT_2));
            }
        }
    }
}

avx2_multiversion! {
    /// dx for these rows; their column sums (the bias gradient) added into `db`.
    fn bias_backward(x: &[f32], b: &[f32], g: &[f32], dx: &mut [f32], db: &mut [f32]) {
        let d = b.len();
        for ((xr, gr), dr) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            for i in 0..d {
                let v = xr[i] + b[i];
                let cdf = 0.5 * (1.0 + math::erf(v * FRAC_1_SQRT_2));
                let pdf = FRAC_1_SQRT_2PI * math::exp(-0.5 * v * v);
                dr[i] = gr[i] * (cdf + v * pdf);
                db[i] += dr[i];
            }
        }
    }
}

/// `gelu_erf(x + b)` over rows of `b.len()`, as a new buffer.
pub(super) fn bias_gelu_forward(x: &[f32], b: &[f32]) -> Vec<f32> {
    par_map(x, ROWS_PER_TASK * b.len(), |xc, yc| bias_forward(xc, b, yc))
}

/// dx of `gelu_erf(x + b)` for the gradient `g` into `dx`, and its column sums added into `db`.
pub(super) fn bias_gelu_backward(x: &[f32], b: &[f32], g: &[f32], dx: &mut [f32], db: &mut [f32]) {
    rows_with_sums(x, g, dx, b.len(), db, |xc, gc, dc, p| bias_backward(xc, b, gc, dc, p));
}

struct BiasGelu;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "dino-bias-gelu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, b) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        let d = b.len();
        if l1.dims().last() != Some(&d) || d == 0 {
            candle_core::bail!("bias gelu: input {:?} with bias {:?}", l1.dims(), l2.dims());
        }
        let y = bias_gelu_forward(x, b);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, b: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let d = b.elem_count();
        let flat = x.apply_op3_no_bwd(b, &grad.contiguous()?, &BiasGeluBackward)?;
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let db = flat.narrow(0, n, d)?.reshape(b.shape())?;
        Ok((Some(dx), Some(db)))
    }
}

/// `[dx (flattened) | dbias]` in one buffer.
struct BiasGeluBackward;

impl CustomOp3 for BiasGeluBackward {
    fn name(&self) -> &'static str {
        "dino-bias-gelu-backward"
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
        let x = f32_slice(s1, l1, self.name())?;
        let b = f32_slice(s2, l2, self.name())?;
        let g = f32_slice(s3, l3, self.name())?;
        let d = b.len();
        if x.len() != g.len() || d == 0 || x.len() % d != 0 {
            candle_core::bail!(
                "bias gelu backward: input {:?}, grad {:?}, bias {d}",
                l1.dims(),
                l3.dims()
            );
        }
        let n = x.len();
        let mut out = vec![0f32; n + d];
        let (dx, db) = out.split_at_mut(n);
        bias_gelu_backward(x, b, g, dx, db);
        Ok((CpuStorage::F32(out), Shape::from(n + d)))
    }
}
