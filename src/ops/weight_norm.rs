//! The weight-normalised last layer's weight, w = g · v / ‖v‖ (norm over each output row), as one
//! graph node, forward on any backend and backward by its formula.
//!
//! Composed of candle ops (a square, a row sum, a root, a division and a product) the graph kept
//! v² and w itself until the backward pass, each the size of the weight: at out_dim 65,536 and a
//! bottleneck of 256, 64 MB apiece, plus the f32 w under autocast's bf16 cast, and its backward
//! went through five nodes of that size. PyTorch's `_weight_norm` keeps v, g and the row norms. So
//! does this node (v and g are parameters, alive anyway; the norms are recomputed), and under
//! autocast it writes the bf16 weight the matmul takes itself.

use candle_core::backend::BackendStorage;
use candle_core::op::{Div, Mul, ReduceOp, Sqr, Sqrt};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// g · v / ‖v‖ for `v` (out, in) and `g` (out, 1), differentiable in both.
pub fn weight_norm(v: &Tensor, g: &Tensor) -> Result<Tensor> {
    weight_norm_to(v, g, None)
}

/// [`weight_norm`] written as `out` (bf16 for a bf16 matmul under autocast): a separate cast would
/// keep the f32 weight until the backward pass.
pub fn weight_norm_to(v: &Tensor, g: &Tensor, out: Option<DType>) -> Result<Tensor> {
    let (rows, _) = v.dims2()?;
    if g.dims() != [rows, 1] || g.dtype() != v.dtype() {
        candle_core::bail!(
            "weight norm: v {:?} {:?} with g {:?} {:?}",
            v.dims(),
            v.dtype(),
            g.dims(),
            g.dtype()
        );
    }
    let out = out.filter(|&t| t != v.dtype());
    v.contiguous()?.apply_op2(&g.contiguous()?, WeightNorm { out })
}

struct WeightNorm {
    /// The output's dtype where it is not the parameters'.
    out: Option<DType>,
}

/// The same operations as the composed `v · (g / sqrt(Σ v²))`, so the same values, on any backend;
/// the squares are freed before it returns.
fn forward<S: BackendStorage>(v: &S, lv: &Layout, g: &S, lg: &Layout, dtype: Option<DType>) -> Result<(S, Shape)> {
    let (out, inp) = lv.shape().dims2()?;
    let rows = Layout::contiguous((out, 1));
    let sums = v
        .unary_impl::<Sqr>(lv)?
        .reduce_op(ReduceOp::Sum, &Layout::contiguous((out, inp)), &[1])?;
    let factor = g.binary_impl::<Div>(&sums.unary_impl::<Sqrt>(&rows)?, lg, &rows)?;
    let w = v.binary_impl::<Mul>(&factor, lv, &rows.broadcast_as((out, inp))?)?;
    let w = match dtype {
        Some(t) => w.to_dtype(&Layout::contiguous((out, inp)), t)?,
        None => w,
    };
    Ok((w, Shape::from((out, inp))))
}

impl CustomOp2 for WeightNorm {
    fn name(&self) -> &'static str {
        "dino-weight-norm"
    }

    fn cpu_fwd(&self, v: &CpuStorage, lv: &Layout, g: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        forward(v, lv, g, lg, self.out)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        v: &candle_core::CudaStorage,
        lv: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        forward(v, lv, g, lg, self.out)
    }

    /// With n = ‖v‖ per row and dw the output gradient: dg = Σ dw·v / n, and
    /// dv = (g/n) · (dw − v · Σ(dw·v) / n²).
    fn bwd(&self, v: &Tensor, g: &Tensor, _w: &Tensor, dw: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dw = dw.to_dtype(v.dtype())?;
        let n = v.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        let dot = (&dw * v)?.sum_keepdim(D::Minus1)?;
        let dg = dot.broadcast_div(&n)?;
        let dv = dw
            .broadcast_sub(&v.broadcast_mul(&dot.broadcast_div(&n.sqr()?)?)?)?
            .broadcast_mul(&g.broadcast_div(&n)?)?;
        Ok((Some(dv), Some(dg)))
    }
}
