//! AdamW as PyTorch computes it (`torch.optim.AdamW`, single-tensor path), with DINO's two
//! parameter groups: weights decay, biases and 1-D parameters (LayerNorm, …) do not. Learning
//! rate and weight decay are set per step from the schedules. Also DINO's per-parameter gradient
//! clipping (`utils.clip_gradients`).

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};

/// One optimised parameter and its Adam state.
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
    step: u64,
}

pub struct AdamW {
    slots: Vec<Slot>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// The official `get_params_groups` rule: no weight decay for biases and 1-D parameters.
pub fn decays(name: &str, var: &Var) -> bool {
    !(name.ends_with(".bias") || var.rank() <= 1)
}

impl AdamW {
    /// `params` in a stable order (name, variable); the decay group follows [`decays`].
    pub fn new(params: Vec<(String, Var)>) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let decay = decays(&name, &var);
                Ok(Slot {
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                    name,
                    var,
                    decay,
                    step: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    /// One update with `grads` by parameter name. Parameters without a gradient are skipped
    /// entirely (no decay, no state change), as PyTorch does for `grad is None`.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64, weight_decay: f64) -> Result<()> {
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let mut updates = Vec::with_capacity(self.slots.len());
        for (i, s) in self.slots.iter_mut().enumerate() {
            let Some(g) = grads.get(&s.name) else {
                continue;
            };
            s.step += 1;
            let wd = if s.decay { weight_decay } else { 0.0 };
            let step = crate::ops::AdamWStep {
                decay: 1.0 - lr * wd,
                beta1: b1,
                beta2: b2,
                bias_correction2_sqrt: (1.0 - b2.powi(s.step as i32)).sqrt(),
                eps,
                step_size: lr / (1.0 - b1.powi(s.step as i32)),
            };
            updates.push((i, g, step));
        }
        // The multi-tensor kernels read gradients as contiguous buffers (a copy only for one that
        // is not; clipping has already made them so).
        let contiguous = updates
            .iter()
            .map(|(_, g, _)| g.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let items: Vec<crate::ops::AdamWItem> = updates
            .iter()
            .zip(&contiguous)
            .map(|(&(i, _, step), grad)| {
                let s = &self.slots[i];
                crate::ops::AdamWItem {
                    param: s.var.as_tensor(),
                    m: &s.m,
                    v: &s.v,
                    grad,
                    step,
                }
            })
            .collect();
        if crate::ops::adamw_foreach(&items)?.is_some() {
            return Ok(());
        }
        drop(items);
        for (i, g, step) in updates {
            let s = &mut self.slots[i];
            if crate::ops::adamw_update(s.var.as_tensor(), &s.m, &s.v, g, step)?.is_some() {
                continue;
            }
            let p = (s.var.as_tensor() * step.decay)?;
            // lerp(m, g, 1 − β1) = m + (1 − β1)·(g − m)
            // Detached: the state must not keep a chain of autograd ops from step to step.
            s.m = (&s.m + ((g - &s.m)? * (1.0 - b1))?)?.detach();
            s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?.detach();
            let denom = ((s.v.sqrt()? / step.bias_correction2_sqrt)? + eps)?;
            let update = (s.m.div(&denom)? * step.step_size)?;
            s.var.set(&(p - update)?)?;
        }
        Ok(())
    }

    /// Adam moments and step counts by parameter name, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor, Tensor, u64)> {
        self.slots
            .iter()
            .map(|s| (s.name.clone(), s.m.clone(), s.v.clone(), s.step))
            .collect()
    }

    /// Restores [`AdamW::state`] output; unknown names are an error.
    pub fn load_state(&mut self, state: Vec<(String, Tensor, Tensor, u64)>) -> Result<()> {
        let mut by_name: HashMap<String, (Tensor, Tensor, u64)> =
            state.into_iter().map(|(n, m, v, t)| (n, (m, v, t))).collect();
        for s in self.slots.iter_mut() {
            if let Some((m, v, t)) = by_name.remove(&s.name) {
                if m.shape() != s.var.shape() || v.shape() != s.var.shape() {
                    candle_core::bail!("optimiser state for {} has the wrong shape", s.name);
                }
                (s.m, s.v, s.step) = (m, v, t);
            }
        }
        if let Some(name) = by_name.keys().next() {
            candle_core::bail!("optimiser state for unknown parameter {name}");
        }
        Ok(())
    }
}

/// Scales each gradient whose L2 norm exceeds `clip` down to `clip` (coefficient clip/(norm+1e-6)).
///
/// On the CPU the norm is read and the multiply skipped when it is not needed. Elsewhere nothing
/// is read back: the official code's per-parameter `.item()` drains a GPU's queue once per
/// parameter, so the coefficient min(1, clip/(norm+1e-6)) stays on the device, and a factor of
/// exactly 1 leaves a gradient as it was. On CUDA all gradients are clipped in two launches
/// ([`crate::ops::clip_foreach`]).
pub fn clip_gradients(grads: &mut HashMap<String, Tensor>, clip: f64) -> Result<()> {
    if grads.values().next().is_some_and(|g| !g.device().is_cpu()) {
        for g in grads.values_mut() {
            // In place below: a gradient laid out otherwise gets a copy of its own first.
            *g = g.contiguous()?;
        }
        if crate::ops::clip_foreach(&grads.values().collect::<Vec<_>>(), clip)?.is_some() {
            return Ok(());
        }
    }
    for g in grads.values_mut() {
        *g = if g.device().is_cpu() {
            clip_read_back(g, clip)?
        } else {
            clip_composed(g, clip)?
        };
    }
    Ok(())
}

fn clip_read_back(g: &Tensor, clip: f64) -> Result<Tensor> {
    let norm = g.sqr()?.sum_all()?.sqrt()?.to_dtype(candle_core::DType::F64)?;
    let coef = clip / (norm.to_scalar::<f64>()? + 1e-6);
    if coef < 1.0 {
        g * coef
    } else {
        Ok(g.clone())
    }
}

fn clip_composed(g: &Tensor, clip: f64) -> Result<Tensor> {
    let norm = g.sqr()?.sum_all()?.sqrt()?;
    let coef = ((norm + 1e-6)?.recip()? * clip)?.clamp(0.0, 1.0)?;
    g.broadcast_mul(&coef)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_on_the_device_equals_clipping_with_the_norm_read_back() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let g = Tensor::arange(0f32, 12.0, &dev)?.reshape((3, 4))?.affine(0.37, -1.9)?;
        let norm = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
        let values = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
        for clip in [norm * 0.25, norm * 0.999, norm * 1.5, 1e9] {
            let reference = values(&clip_read_back(&g, clip)?)?;
            // The candle-op version (devices without the kernels); CUDA's kernels are checked
            // against the CPU by tests/python/test_gpu.py.
            for (how, a) in [("composed", values(&clip_composed(&g, clip)?)?)] {
                for (x, y) in a.iter().zip(&reference) {
                    assert!(
                        (x - y).abs() <= 1e-6 * y.abs(),
                        "{how}, clip {clip}: {a:?} against {reference:?}"
                    );
                }
                let clipped: f32 = a.iter().map(|v| v * v).sum::<f32>().sqrt();
                assert!(
                    clipped <= clip.min(norm) as f32 * 1.000_01,
                    "{how}: norm {clipped} after clipping at {clip}"
                );
                if clip >= norm {
                    assert_eq!(a, values(&g)?, "{how}: a factor of 1 changes nothing");
                }
            }
            assert!(
                clip >= norm || reference != values(&g)?,
                "clipping at {clip} < {norm} changes the gradient"
            );
        }
        Ok(())
    }
}
