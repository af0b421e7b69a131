//! Exact GELU, x·Φ(x) = x/2 · (1 + erf(x/√2)) (PyTorch's `nn.GELU()` default), with its
//! derivative Φ(x) + x·φ(x), on vectorised erf/exp.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{f32_slice, fused, math, par_map, par_map2, ELEMS_PER_TASK};

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
