//! `x · Wᵀ (+ b)` as one graph node on every device the fused CPU kernel does not take (CUDA, other
//! dtypes, autocast): the backend's matmul (cuBLAS on CUDA) and bias add inside the node, and an
//! explicit backward pass.
//!
//! Composed of candle ops, a linear layer was a matmul node and a broadcast-add node. A candle node
//! keeps its inputs alive until the backward pass, needed or not, so the matmul's output before the
//! bias, which no gradient needs, stayed in memory next to the layer's output: for every linear
//! layer of the student, an activation-sized tensor more than PyTorch keeps (at ViT-S under
//! autocast, the qkv, proj and fc2 layers' pre-bias outputs are 10 bytes per token and channel per
//! block). This node keeps x, W and b, as nn.Linear does.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// `x · weightᵀ (+ bias)` for `x` (rows, in), weight (out, in), bias (out), one dtype and device.
pub fn linear_rows(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    match bias {
        Some(b) => x.apply_op3(weight, &b.contiguous()?, LinearNode),
        None => x.apply_op2(weight, LinearNode),
    }
}

struct LinearNode;

/// y = x · wᵀ (+ b) with the backend's own matmul and broadcast add, for any backend.
pub(crate) fn forward<S: BackendStorage>(
    x: &S,
    lx: &Layout,
    w: &S,
    lw: &Layout,
    bias: Option<(&S, &Layout)>,
) -> Result<(S, Shape)> {
    let (m, k) = lx.shape().dims2()?;
    let (n, k_w) = lw.shape().dims2()?;
    if k != k_w {
        candle_core::bail!("linear: input of {k} features, weight {:?}", lw.dims());
    }
    let y = x.matmul(w, (1, m, n, k), lx, &lw.transpose(0, 1)?)?;
    let shape = Shape::from((m, n));
    let y = match bias {
        Some((b, lb)) => {
            if lb.shape().elem_count() != n {
                candle_core::bail!("linear: bias {:?} for {n} outputs", lb.dims());
            }
            let lb = lb.broadcast_as((m, n))?;
            y.binary_impl::<candle_core::op::Add>(b, &Layout::contiguous(&shape), &lb)?
        }
        None => y,
    };
    Ok((y, shape))
}

/// dx = g · W (where x needs a gradient) and dW = gᵀ · x; the bias gradient is [`crate::ops::bias::bias_grad`].
pub(crate) fn backward(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
    grads(x, w, g, x.track_op())
}

/// [`backward`] with dx computed when `dx` says so, whatever `x`'s place in a graph.
pub(crate) fn grads(x: &Tensor, w: &Tensor, g: &Tensor, dx: bool) -> Result<(Option<Tensor>, Tensor)> {
    let g = g.to_dtype(x.dtype())?;
    let dx = if dx { Some(g.matmul(w)?) } else { None };
    Ok((dx, g.t()?.matmul(x)?))
}

impl CustomOp2 for LinearNode {
    fn name(&self) -> &'static str {
        "dino-linear-node"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        forward(x, lx, w, lw, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        forward(x, lx, w, lw, None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = backward(x, w, g)?;
        Ok((dx, Some(dw)))
    }
}

impl CustomOp3 for LinearNode {
    fn name(&self) -> &'static str {
        "dino-linear-node-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward(x, lx, w, lw, Some((b, lb)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        forward(x, lx, w, lw, Some((b, lb)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = backward(x, w, g)?;
        let db = crate::ops::bias::bias_grad(g, b.dtype())?;
        Ok((dx, Some(dw), Some(db.reshape(b.shape())?)))
    }
}
