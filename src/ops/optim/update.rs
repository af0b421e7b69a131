//! In-place parameter updates on the CPU: AdamW (PyTorch's single-tensor arithmetic, operation for
//! operation) and the EMA teacher. Through candle each AdamW step was ~15 tensor operations per
//! parameter, each allocating a parameter-sized buffer; here it is three passes, in place, split
//! over the dino_rs pool. On CUDA, [`crate::ops::optim::foreach`] updates all parameters in one launch with the
//! same arithmetic.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

use crate::ops::launch::AdamWStep;
use crate::ops::{f32_slice, fused, ELEMS_PER_TASK};

fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: expected f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// AdamW on `param` with Adam moments `m`, `v` and gradient `grad`, all updated in place. Returns
/// `None` (and changes nothing) where the kernels do not apply (see [`fused`]).
pub fn adamw_update(param: &Tensor, m: &Tensor, v: &Tensor, grad: &Tensor, s: AdamWStep) -> Result<Option<()>> {
    if !(fused(param) && fused(grad)) {
        return Ok(None);
    }
    let grad = grad.contiguous()?;
    m.inplace_op2(
        &grad,
        &FirstMoment {
            keep: (1.0 - s.beta1) as f32,
        },
    )?;
    v.inplace_op2(
        &grad,
        &SecondMoment {
            beta2: s.beta2 as f32,
            one_minus: (1.0 - s.beta2) as f32,
        },
    )?;
    param.inplace_op3(m, v, &AdamWParam(s))?;
    Ok(Some(()))
}

/// θ_t ← m·θ_t + (1 − m)·θ_s in place; `None` where the fused kernels do not apply.
pub fn ema_update(teacher: &Tensor, student: &Tensor, momentum: f64) -> Result<Option<()>> {
    if !(fused(teacher) && fused(student)) {
        return Ok(None);
    }
    teacher.inplace_op2(&student.contiguous()?, &Ema { momentum })?;
    Ok(Some(()))
}

fn par_update(dst: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    crate::parallel::install(|| {
        dst.par_chunks_mut(ELEMS_PER_TASK)
            .enumerate()
            .for_each(|(i, c)| f(i * ELEMS_PER_TASK, c))
    })
}

avx2_multiversion! {
    fn lerp(m: &mut [f32], g: &[f32], w: f32) {
        // PyTorch: m.lerp_(g, 1 − β1) = m + w·(g − m)
        for (a, &b) in m.iter_mut().zip(g) {
            *a += (b - *a) * w;
        }
    }
}

avx2_multiversion! {
    fn second(v: &mut [f32], g: &[f32], b2: f32, w: f32) {
        for (a, &b) in v.iter_mut().zip(g) {
            *a = *a * b2 + b * b * w;
        }
    }
}

avx2_multiversion! {
    fn param(p: &mut [f32], m: &[f32], v: &[f32], decay: f32, inv_bc2: f32, eps: f32, step: f32) {
        for ((x, &mv), &vv) in p.iter_mut().zip(m).zip(v) {
            let denom = vv.sqrt() * inv_bc2 + eps;
            *x = *x * decay - (mv / denom) * step;
        }
    }
}

avx2_multiversion! {
    fn ema(t: &mut [f32], s: &[f32], m: f32, w: f32) {
        for (a, &b) in t.iter_mut().zip(s) {
            *a = *a * m + b * w;
        }
    }
}

struct FirstMoment {
    keep: f32,
}

impl InplaceOp2 for FirstMoment {
    fn name(&self) -> &'static str {
        "dino-adamw-m"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout) -> Result<()> {
        let g = f32_slice(src, sl, self.name())?;
        let m = f32_slice_mut(dst, dl, self.name())?;
        if m.len() != g.len() {
            candle_core::bail!("adamw: moment of {} elements, gradient of {}", m.len(), g.len());
        }
        par_update(m, |at, c| lerp(c, &g[at..at + c.len()], self.keep));
        Ok(())
    }
}

struct SecondMoment {
    beta2: f32,
    one_minus: f32,
}

impl InplaceOp2 for SecondMoment {
    fn name(&self) -> &'static str {
        "dino-adamw-v"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout) -> Result<()> {
        let g = f32_slice(src, sl, self.name())?;
        let v = f32_slice_mut(dst, dl, self.name())?;
        if v.len() != g.len() {
            candle_core::bail!("adamw: moment of {} elements, gradient of {}", v.len(), g.len());
        }
        par_update(v, |at, c| second(c, &g[at..at + c.len()], self.beta2, self.one_minus));
        Ok(())
    }
}

struct AdamWParam(AdamWStep);

impl InplaceOp3 for AdamWParam {
    fn name(&self) -> &'static str {
        "dino-adamw-param"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        sm: &CpuStorage,
        ml: &Layout,
        sv: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let m = f32_slice(sm, ml, self.name())?;
        let v = f32_slice(sv, vl, self.name())?;
        let p = f32_slice_mut(dst, dl, self.name())?;
        if p.len() != m.len() || p.len() != v.len() {
            candle_core::bail!(
                "adamw: parameter of {} elements, moments of {} and {}",
                p.len(),
                m.len(),
                v.len()
            );
        }
        let [decay, inv_bc2, eps, step] = self.0.kernel_scalars();
        par_update(p, |at, c| {
            let n = c.len();
            param(c, &m[at..at + n], &v[at..at + n], decay, inv_bc2, eps, step)
        });
        Ok(())
    }
}

impl AdamWStep {
    /// decay, 1/√(1 − β2^t), eps and step size in f32, as the kernels take them (and as candle's
    /// `affine` casts them: x · (1/c) for a division by c).
    pub(crate) fn kernel_scalars(&self) -> [f32; 4] {
        let s = self;
        [
            s.decay as f32,
            (1.0 / s.bias_correction2_sqrt) as f32,
            s.eps as f32,
            s.step_size as f32,
        ]
    }
}

struct Ema {
    momentum: f64,
}

impl InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "dino-ema"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout) -> Result<()> {
        let s = f32_slice(src, sl, self.name())?;
        let t = f32_slice_mut(dst, dl, self.name())?;
        if t.len() != s.len() {
            candle_core::bail!("ema: teacher of {} elements, student of {}", t.len(), s.len());
        }
        let (m, w) = (self.momentum as f32, (1.0 - self.momentum) as f32);
        par_update(t, |at, c| ema(c, &s[at..at + c.len()], m, w));
        Ok(())
    }
}
