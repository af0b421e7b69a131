//! Mixed precision as PyTorch's autocast does it: parameters, gradients and optimiser state stay
//! f32; inside [`autocast`] the matmuls (linear layers, attention) take bf16 operands and give
//! bf16 results, while LayerNorm, softmax and L2 normalisation run in f32, and a residual sum takes
//! the wider dtype of its two sides (so the residual stream stays f32). Element-wise ops (GELU,
//! bias) run in their input's dtype. The loss and the centre are computed outside, in f32.
//!
//! The setting is thread-local like [`super::no_grad`]: enter it on the thread that runs the
//! forward pass (inside `parallel::install`). The backward pass needs no context: each cast is a
//! graph node whose gradient is cast back, so the f32 parameters receive f32 gradients.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, TensorId};

thread_local! {
    static LOW: Cell<Option<DType>> = const { Cell::new(None) };
    /// Each parameter's low-precision copy, made once per context: the student's backbone runs
    /// once per crop resolution, and PyTorch's autocast keeps the same cache for leaf weights.
    static CASTS: RefCell<HashMap<TensorId, Tensor>> = RefCell::new(HashMap::new());
    /// Each transformer block's packed parameters ([`packed`]), made once per context likewise.
    static PACKS: RefCell<HashMap<Vec<TensorId>, (Tensor, Tensor)>> = RefCell::new(HashMap::new());
}

/// Runs `f` with matmuls in `dtype` (bf16 or f16). `DType::F32` (or any non-half dtype) runs `f`
/// as it is, so callers can pass the configured compute dtype unconditionally.
pub fn autocast<R>(dtype: DType, f: impl FnOnce() -> R) -> R {
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return f();
    }
    type Packs = HashMap<Vec<TensorId>, (Tensor, Tensor)>;
    struct Restore(Option<DType>, HashMap<TensorId, Tensor>, Packs);
    impl Drop for Restore {
        fn drop(&mut self) {
            LOW.with(|l| l.set(self.0));
            CASTS.with(|c| *c.borrow_mut() = std::mem::take(&mut self.1));
            PACKS.with(|c| *c.borrow_mut() = std::mem::take(&mut self.2));
        }
    }
    let _restore = Restore(
        LOW.with(|l| l.replace(Some(dtype))),
        CASTS.with(|c| std::mem::take(&mut *c.borrow_mut())),
        PACKS.with(|c| std::mem::take(&mut *c.borrow_mut())),
    );
    f()
}

/// The low-precision dtype when inside [`autocast`].
pub fn active() -> Option<DType> {
    LOW.with(|l| l.get())
}

fn is_float(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16)
}

/// `t` as a matmul operand: in the low dtype under [`autocast`], unchanged otherwise.
pub fn lower(t: &Tensor) -> Result<Tensor> {
    match active() {
        Some(low) if is_float(t) && t.dtype() != low => {
            if !t.is_variable() {
                return t.to_dtype(low);
            }
            let id = t.id();
            if let Some(c) = CASTS.with(|c| c.borrow().get(&id).cloned()) {
                return Ok(c);
            }
            let c = t.to_dtype(low)?;
            CASTS.with(|m| m.borrow_mut().insert(id, c.clone()));
            Ok(c)
        }
        _ => Ok(t.clone()),
    }
}

/// `params` flattened into one tensor (a graph node over them), and that tensor detached and in
/// the low dtype: under [`autocast`] made once per context, like [`lower`]'s casts, so that the
/// student's crop resolutions share one (one gradient edge per parameter a step, not one per
/// resolution, and one cast); outside it, made anew (and not cast).
pub(crate) fn packed(params: &[&Tensor]) -> Result<(Tensor, Tensor)> {
    let make = |low: Option<DType>| -> Result<(Tensor, Tensor)> {
        let flat: Vec<Tensor> = params.iter().map(|p| p.flatten_all()).collect::<Result<_>>()?;
        let packed = Tensor::cat(&flat, 0)?;
        let detached = match low {
            Some(low) => packed.detach().to_dtype(low)?,
            None => packed.detach(),
        };
        Ok((packed, detached))
    };
    let Some(low) = active() else {
        return make(None);
    };
    let key: Vec<TensorId> = params.iter().map(|p| p.id()).collect();
    if let Some(p) = PACKS.with(|c| c.borrow().get(&key).cloned()) {
        return Ok(p);
    }
    let p = make(Some(low))?;
    PACKS.with(|c| c.borrow_mut().insert(key, p.clone()));
    Ok(p)
}

/// `t` in f32 for the ops autocast runs in f32 (normalisations, softmax); unchanged outside.
pub fn widen(t: &Tensor) -> Result<Tensor> {
    match active() {
        Some(_) if is_float(t) && t.dtype() != DType::F32 => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    }
}

/// `b` in `a`'s dtype when `a`'s is the wider, as PyTorch's type promotion does for `a + b`.
pub fn promote_to(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let rank = |d: DType| match d {
        DType::F64 => 3,
        DType::F32 => 2,
        DType::BF16 | DType::F16 => 1,
        _ => 0,
    };
    if a.dtype() != b.dtype() && rank(a.dtype()) > rank(b.dtype()) {
        b.to_dtype(a.dtype())
    } else {
        Ok(b.clone())
    }
}

/// Parses "float32" / "bfloat16" (and their short names) into the compute dtype.
pub fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "float32" | "f32" | "fp32" => Some(DType::F32),
        "bfloat16" | "bf16" => Some(DType::BF16),
        _ => None,
    }
}

/// The name [`parse_dtype`] reads back.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor, Var};

    #[test]
    fn a_context_packs_parameters_once() -> Result<()> {
        let a = Var::new(&[1f32, 2.0], &Device::Cpu)?;
        let b = Var::new(&[[3f32, 4.0], [5.0, 6.0]], &Device::Cpu)?;
        let params = [a.as_tensor(), b.as_tensor()];
        let ids = |(p, l): (Tensor, Tensor)| (p.id(), l.id(), l.dtype(), l.to_vec1::<half::bf16>().ok());
        super::autocast(DType::BF16, || -> Result<()> {
            let (first, again) = (ids(super::packed(&params)?), ids(super::packed(&params)?));
            assert_eq!(first, again);
            assert_eq!(first.2, DType::BF16);
            let want: Vec<half::bf16> = [1f32, 2.0, 3.0, 4.0, 5.0, 6.0].map(half::bf16::from_f32).to_vec();
            assert_eq!(first.3, Some(want));
            // Another parameter list is another pack.
            assert_ne!(ids(super::packed(&params[..1])?).0, first.0);
            Ok(())
        })?;
        // Outside autocast: made anew each time, in f32.
        let (p1, l1) = super::packed(&params)?;
        assert_ne!(p1.id(), super::packed(&params)?.0.id());
        assert_eq!(l1.dtype(), DType::F32);
        Ok(())
    }
}
