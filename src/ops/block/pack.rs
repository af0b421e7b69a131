//! A transformer block's twelve parameters as one flat f32 tensor: the second operand of its graph
//! node ([`crate::ops::transformer_block`] on the CPU, [`crate::ops::transformer_block_portable`] elsewhere).
//!
//! Packed by a concatenation, the parameters' gradients come back through candle's backprop,
//! which zero-fills a buffer and adds into it for every edge: the concatenation's twelve and the
//! four weight matrices' flattens, 32 launches a block a step on a GPU (each a few microseconds of
//! host time) besides the narrows. A training step packs them inside [`leaves`] instead: each
//! pack is then a leaf of the step's graph, a copy of the parameters made once per scope, and the
//! step cuts its gradient into the parameters' after the backward pass ([`Leaves::grads`]: views,
//! no copies), as it does for the head's last layer.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Shape, Tensor, TensorId, Var};

struct Leaf {
    params: Vec<(TensorId, Shape)>,
    /// The matmuls' dtype the pack was made for (none: f32).
    low: Option<DType>,
    var: Var,
    /// `var` detached, in `low`.
    low_copy: Tensor,
}

thread_local! {
    /// The packs made so far inside [`leaves`]; none outside it.
    static LEAVES: RefCell<Option<Vec<Leaf>>> = const { RefCell::new(None) };
}

/// The packs made as leaves inside [`leaves`], each with its parameters' ids and shapes (their
/// low-precision copies are dropped with the scope: the block nodes keep theirs).
pub struct Leaves(Vec<(Var, Vec<(TensorId, Shape)>)>);

/// Runs `f` (on this thread) with each block's parameters packed as a leaf of the graph, once per
/// scope and matmul dtype, so that the student's crop resolutions share one. The parameters
/// themselves then receive no gradient from the backward pass: [`Leaves::grads`] gives them.
pub fn leaves<R>(f: impl FnOnce() -> Result<R>) -> Result<(R, Leaves)> {
    struct Restore(Option<Vec<Leaf>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            LEAVES.with(|l| *l.borrow_mut() = self.0.take());
        }
    }
    let outer = Restore(LEAVES.with(|l| l.borrow_mut().replace(Vec::new())));
    let r = f();
    let made = LEAVES.with(|l| l.borrow_mut().take()).unwrap_or_default();
    drop(outer);
    Ok((r?, Leaves(made.into_iter().map(|l| (l.var, l.params)).collect())))
}

impl Leaves {
    /// Each packed parameter's gradient, a view of its pack's, with the parameter's id; nothing
    /// for a pack that no gradient reached. A parameter packed for two dtypes comes twice.
    pub fn grads(&self, store: &GradStore) -> Result<Vec<(TensorId, Tensor)>> {
        let mut out = Vec::new();
        for (var, params) in &self.0 {
            let Some(g) = store.get(var.as_tensor()) else {
                continue;
            };
            let mut at = 0;
            for (id, shape) in params {
                let n = shape.elem_count();
                out.push((*id, g.narrow(0, at, n)?.reshape(shape)?));
                at += n;
            }
        }
        Ok(out)
    }
}

/// `params` as one flat f32 tensor for a block node (a leaf inside [`leaves`], else a graph node
/// over them), and that tensor detached and in the matmuls' dtype under autocast.
pub(crate) fn packed(params: &[&Tensor]) -> Result<(Tensor, Tensor)> {
    let low = crate::ops::autocast::active();
    let found = LEAVES.with(|l| -> Result<Option<(Tensor, Tensor)>> {
        let mut l = l.borrow_mut();
        let Some(made) = l.as_mut() else {
            return Ok(None);
        };
        let same = |leaf: &&Leaf| {
            leaf.low == low
                && leaf.params.len() == params.len()
                && leaf.params.iter().zip(params).all(|(a, p)| a.0 == p.id())
        };
        if let Some(leaf) = made.iter().find(same) {
            return Ok(Some((leaf.var.as_tensor().clone(), leaf.low_copy.clone())));
        }
        let leaf = leaf(params, low)?;
        let found = (leaf.var.as_tensor().clone(), leaf.low_copy.clone());
        made.push(leaf);
        Ok(Some(found))
    })?;
    match found {
        Some(p) => Ok(p),
        None => crate::ops::autocast::packed(params),
    }
}

fn leaf(params: &[&Tensor], low: Option<DType>) -> Result<Leaf> {
    let len = params.iter().map(|p| p.elem_count()).sum::<usize>();
    let device = params.first().map_or(candle_core::Device::Cpu, |p| p.device().clone());
    let var = Var::zeros(len, DType::F32, &device)?;
    let mut at = 0;
    for p in params {
        let flat = p.detach().to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
        var.as_tensor().slice_set(&flat, 0, at)?;
        at += flat.elem_count();
    }
    let low_copy = match low {
        Some(low) => var.as_tensor().detach().to_dtype(low)?,
        None => var.as_tensor().detach(),
    };
    Ok(Leaf {
        params: params.iter().map(|p| (p.id(), p.shape().clone())).collect(),
        low,
        var,
        low_copy,
    })
}

/// `parts` flattened, in f32, one after another: a block's parameter gradients packed as its
/// parameters are. On CUDA one launch (src/ops/cuda/pack.cu) where candle takes a cast for each
/// bf16 part and a copy for each part.
pub fn flat_f32(parts: &[Tensor]) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(t) = cuda::flat_f32(parts)? {
        return Ok(t);
    }
    let flat: Vec<Tensor> = parts
        .iter()
        .map(|t| t.flatten_all()?.to_dtype(DType::F32))
        .collect::<Result<_>>()?;
    Tensor::cat(&flat, 0)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{DType, Result, Tensor};

    use crate::ops::cuda::device_ptr;
    use crate::ops::launch::{self, PackParts, PACK_PARTS};

    // SAFETY: `#[repr(C)]` plain data laid out as pack.cu's PackParts (launch.rs).
    unsafe impl DeviceRepr for PackParts {}

    /// [`super::flat_f32`] in one launch, where it applies (contiguous f32 or bf16 parts on one
    /// CUDA device, at most [`PACK_PARTS`]).
    pub(super) fn flat_f32(parts: &[Tensor]) -> Result<Option<Tensor>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let applies = crate::ops::kernels_enabled()
            && parts.len() <= PACK_PARTS
            && parts.iter().all(|t| {
                t.device().same_device(first.device())
                    && t.device().is_cuda()
                    && matches!(t.dtype(), DType::F32 | DType::BF16)
                    && t.is_contiguous()
            });
        if !applies {
            return Ok(None);
        }
        let dev = first.device().as_cuda_device()?;
        let records = parts
            .iter()
            .map(|t| Ok((device_ptr(t)?, t.elem_count(), t.dtype() == DType::BF16)))
            .collect::<Result<Vec<_>>>()?;
        let (args, total, grid) = launch::pack_parts(&records)?;
        if total == 0 {
            return Ok(None);
        }
        // SAFETY: the kernel writes every element: the parts' lengths add up to `total`.
        let out = unsafe { dev.alloc::<f32>(total) }?;
        let func = crate::ops::kernels::kernel!(dev, "pack", "dino_pack_f32")?;
        let mut builder = func.builder();
        builder.arg(&args).arg(&out);
        // SAFETY: the arguments follow dino_pack_f32's signature; each part's address holds its n
        // values (the parts stay alive past the launch: their storage is freed in stream order).
        unsafe { builder.launch(grid.into()) }.w()?;
        Ok(Some(crate::device::on_device(out, dev, total)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor, Var};

    /// A pack made as a leaf gives each parameter the gradient the graph through a concatenation
    /// gives it, bit for bit, shared by two uses and kept apart per matmul dtype.
    #[test]
    fn leaves_give_the_gradients_of_a_packed_graph() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::new(&[1f32, -2.0, 3.0], &dev)?;
        let w = Var::new(&[[0.5f32, 4.0], [-1.5, 2.5]], &dev)?;
        let params = [a.as_tensor(), w.as_tensor()];
        let r1 = Tensor::new(&[0.3f32, -0.7, 1.1, 2.0, -0.25, 0.9, 1.7], &dev)?;
        let r2 = Tensor::new(&[-1.3f32, 0.2, 0.6, -2.0, 1.25, 0.4, -0.1], &dev)?;
        // Two uses of the pack, as the student's two crop resolutions.
        let loss = |p: &Tensor| -> Result<Tensor> { ((p * &r1)?.sum_all()? + (p.sqr()? * &r2)?.sum_all()?)? + 1.0 };

        let (packed, low) = super::packed(&params)?;
        assert_eq!((packed.dims(), low.dtype()), ([7].as_slice(), DType::F32));
        let want = loss(&packed)?.backward()?;

        let ((first, again), leaves) = super::leaves(|| Ok((super::packed(&params)?, super::packed(&params)?)))?;
        assert_eq!(first.0.id(), again.0.id(), "one pack a scope");
        assert!(first.0.is_variable());
        assert_eq!(first.0.to_vec1::<f32>()?, packed.to_vec1::<f32>()?);
        let store = loss(&first.0)?.backward()?;
        assert!(
            store.get(&a).is_none() && store.get(&w).is_none(),
            "the parameters are behind the leaf"
        );
        let got = leaves.grads(&store)?;
        assert_eq!(got.len(), 2);
        for ((id, g), p) in got.iter().zip(params) {
            assert_eq!(*id, p.id());
            assert_eq!(g.dims(), p.dims());
            let want = want.get(p).expect("a gradient").flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(g.flatten_all()?.to_vec1::<f32>()?, want);
        }
        // Outside the scope packs are graph nodes again; under autocast a leaf per dtype.
        assert!(!super::packed(&params)?.0.is_variable());
        let (ids, leaves) = super::leaves(|| {
            let f32_pack = super::packed(&params)?.0.id();
            let (bf16_pack, low) = crate::ops::autocast::autocast(DType::BF16, || super::packed(&params))?;
            assert_eq!(low.dtype(), DType::BF16);
            Ok((f32_pack, bf16_pack.id()))
        })?;
        assert_ne!(ids.0, ids.1);
        assert_eq!(leaves.0.len(), 2);
        Ok(())
    }
}
