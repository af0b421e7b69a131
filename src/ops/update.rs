//! In-place parameter updates: AdamW (PyTorch's single-tensor arithmetic, operation for
//! operation) and the EMA teacher. Through candle each AdamW step was ~15 tensor operations per
//! parameter, each allocating a parameter-sized buffer; here it is three passes, in place, split
//! over the dino_rs pool on the CPU, three kernel launches on CUDA (src/ops/cuda/update.cu, the
//! same arithmetic rounded operation by operation, so both devices give the same bits).

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

use super::{f32_slice, fused, kernels_enabled, ELEMS_PER_TASK};

/// Whether the in-place kernels take `x`: f32 on the CPU (as [`fused`]) or, in a CUDA build, on a
/// CUDA device.
fn in_place(x: &Tensor) -> bool {
    fused(x)
        || (cfg!(feature = "cuda") && kernels_enabled() && x.device().is_cuda() && x.dtype() == candle_core::DType::F32)
}

fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: expected f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// The scalars of one AdamW step, already as PyTorch forms them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// 1 − lr·weight_decay
    pub decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// √(1 − β2^t)
    pub bias_correction2_sqrt: f64,
    pub eps: f64,
    /// lr / (1 − β1^t)
    pub step_size: f64,
}

/// AdamW on `param` with Adam moments `m`, `v` and gradient `grad`, all updated in place. Returns
/// false (and changes nothing) where the kernels do not apply (not f32 on the CPU or CUDA).
pub fn adamw_update(param: &Tensor, m: &Tensor, v: &Tensor, grad: &Tensor, s: AdamWStep) -> Result<bool> {
    if !(in_place(param) && in_place(grad)) {
        return Ok(false);
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
    Ok(true)
}

/// θ_t ← m·θ_t + (1 − m)·θ_s in place; false where the fused kernels do not apply.
pub fn ema_update(teacher: &Tensor, student: &Tensor, momentum: f64) -> Result<bool> {
    if !(in_place(teacher) && in_place(student)) {
        return Ok(false);
    }
    teacher.inplace_op2(&student.contiguous()?, &Ema { momentum })?;
    Ok(true)
}

/// DINO's per-parameter clipping in place, `grad · clip/(norm + 1e-6)` when that factor is below 1,
/// with the norm computed and used on the device (nothing read back). False where the kernels do
/// not apply.
pub fn clip_gradient(grad: &Tensor, clip: f64) -> Result<bool> {
    if !in_place(grad) || !grad.is_contiguous() {
        return Ok(false);
    }
    let norm = grad.sqr()?.sum_all()?.sqrt()?;
    grad.inplace_op2(&norm, &Clip { clip: clip as f32 })?;
    Ok(true)
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        cuda::launch("dino_adamw_m", dst, dl, &[(src, sl)], &[self.keep])
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        cuda::launch("dino_adamw_v", dst, dl, &[(src, sl)], &[self.beta2, self.one_minus])
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
        let [decay, inv_bc2, eps, step] = self.scalars();
        par_update(p, |at, c| {
            let n = c.len();
            param(c, &m[at..at + n], &v[at..at + n], decay, inv_bc2, eps, step)
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dl: &Layout,
        sm: &candle_core::CudaStorage,
        ml: &Layout,
        sv: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<()> {
        cuda::launch("dino_adamw_param", dst, dl, &[(sm, ml), (sv, vl)], &self.scalars())
    }
}

impl AdamWParam {
    /// decay, 1/√(1 − β2^t), eps and step size, as candle's `affine` casts them (x · (1/c) for a
    /// division by c).
    fn scalars(&self) -> [f32; 4] {
        let s = self.0;
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        let (m, w) = (self.momentum as f32, (1.0 - self.momentum) as f32);
        cuda::launch("dino_ema", dst, dl, &[(src, sl)], &[m, w])
    }
}

struct Clip {
    clip: f32,
}

impl Clip {
    fn coef(&self, norm: f32) -> f32 {
        self.clip / (norm + 1e-6)
    }
}

impl InplaceOp2 for Clip {
    fn name(&self) -> &'static str {
        "dino-clip"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout) -> Result<()> {
        let norm = f32_slice(src, sl, self.name())?;
        let &[norm] = norm else {
            candle_core::bail!("clip: the norm must be one value, got {}", norm.len());
        };
        let coef = self.coef(norm);
        if coef < 1.0 {
            for v in f32_slice_mut(dst, dl, self.name())? {
                *v *= coef;
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        cuda::launch_with_scalar_input("dino_clip", dst, dl, (src, sl), &[self.clip])
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Result};

    use super::super::cuda::{grid_stride, view};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/update.ptx"));

    /// Runs kernel `name` of update.cu over `dst` in place, reading `srcs` (each as long as `dst`),
    /// with the f32 `scalars` and the element count as its last arguments.
    pub(super) fn launch(
        name: &str,
        dst: &mut CudaStorage,
        dl: &Layout,
        srcs: &[(&CudaStorage, &Layout)],
        scalars: &[f32],
    ) -> Result<()> {
        run(name, dst, dl, srcs, dl.shape().elem_count(), scalars)
    }

    /// Like [`launch`] with one input holding a single value (read by every thread).
    pub(super) fn launch_with_scalar_input(
        name: &str,
        dst: &mut CudaStorage,
        dl: &Layout,
        src: (&CudaStorage, &Layout),
        scalars: &[f32],
    ) -> Result<()> {
        run(name, dst, dl, &[src], 1, scalars)
    }

    /// Each input must hold `input_len` elements.
    fn run(
        name: &str,
        dst: &mut CudaStorage,
        dl: &Layout,
        srcs: &[(&CudaStorage, &Layout)],
        input_len: usize,
        scalars: &[f32],
    ) -> Result<()> {
        let n = dl.shape().elem_count();
        let dev = dst.device.clone();
        let func = dev.get_or_load_custom_func(name, "dino_rs_update", PTX)?;
        let mut views = Vec::with_capacity(srcs.len());
        for (s, l) in srcs {
            if l.shape().elem_count() != input_len {
                candle_core::bail!(
                    "{name}: an input of {:?} where {input_len} elements are needed",
                    l.dims()
                );
            }
            views.push(view::<f32>(s, l, name)?);
        }
        let Some((a, b)) = dl.contiguous_offsets() else {
            candle_core::bail!("{name}: expected a contiguous tensor");
        };
        let mut out = dst.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
        let count = n as u32;
        let mut builder = func.builder();
        builder.arg(&mut out);
        for v in &views {
            builder.arg(v);
        }
        for x in scalars {
            builder.arg(x);
        }
        builder.arg(&count);
        // SAFETY: the arguments follow the kernel's signature (output, inputs, scalars, count),
        // and every input holds the elements the kernel reads.
        unsafe { builder.launch(grid_stride(n)) }.w()?;
        Ok(())
    }
}
