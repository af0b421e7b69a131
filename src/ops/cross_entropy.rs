//! The DINO loss's cross-entropy between teacher probabilities and the student's log-softmax,
//! summed over (teacher global view, other student view) pairs, as one graph node. Composed of
//! candle ops it was a log-softmax of five ops over all student rows, then a narrow, a product and
//! a sum per pair: in the backward pass each of the 14 narrows (2 globals + 6 locals) built a
//! full-size zero-padded gradient and added it up, on (ncrops·B, out_dim) = (512, 4096) for the
//! benchmark's recipe. Here one pass per student row computes its log-sum-exp and its terms, and
//! the backward writes each row's gradient once: (n·softmax − Σ q) / τ per row, with n its pairs.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, fused, math};

/// mean over pairs and samples of −Σ q·log_softmax(student / τ), with `student` (ncrops·B, K)
/// view-major (any float dtype; the loss is taken in f32 or wider) and `q` (2·B, K) the teacher
/// probabilities of the two global views. Each teacher
/// view is paired with every student view but its own. Differentiable in `student`.
pub fn dino_cross_entropy(student: &Tensor, q: &Tensor, ncrops: usize, student_temp: f64) -> Result<Tensor> {
    let op = CrossEntropy { ncrops, student_temp };
    // Half-precision logits are widened inside (the fused kernel takes f32 only).
    if !fused(student) {
        return op.portable(student, q);
    }
    student.contiguous()?.apply_op2(&q.detach().contiguous()?, op)
}

#[derive(Clone, Copy)]
struct CrossEntropy {
    ncrops: usize,
    student_temp: f64,
}

/// The batch size B and the number of (teacher, student) pairs, for `rows` student rows
/// (ncrops·B, view-major) and `teacher_rows` teacher rows (2·B).
pub fn dino_loss_rows(ncrops: usize, rows: usize, teacher_rows: usize) -> Result<(usize, usize)> {
    let b = rows / ncrops.max(1);
    if ncrops < 2 || b == 0 || b * ncrops != rows || teacher_rows != 2 * b {
        candle_core::bail!(
            "DINO loss expects student rows = ncrops·B ({ncrops}·B) and teacher rows = 2·B with B ≥ 1, got {rows} and {teacher_rows}"
        );
    }
    Ok((b, 2 * (ncrops - 1)))
}

/// The student (rows, K) and teacher (2·B, K) buffers of a forward or backward call, checked.
struct Operands<'a> {
    s: &'a [f32],
    q: &'a [f32],
    k: usize,
    b: usize,
    /// (teacher, student) view pairs.
    terms: usize,
}

impl<'a> Operands<'a> {
    fn new(
        ncrops: usize,
        (ss, ls): (&'a CpuStorage, &Layout),
        (sq, lq): (&'a CpuStorage, &Layout),
        op: &str,
    ) -> Result<Self> {
        let (s, q) = (f32_slice(ss, ls, op)?, f32_slice(sq, lq, op)?);
        let (rows, k) = ls.shape().dims2()?;
        if lq.dims().len() != 2 || lq.dims()[1] != k {
            candle_core::bail!("DINO loss: student {:?} and teacher {:?} outputs", ls.dims(), lq.dims());
        }
        let (b, terms) = dino_loss_rows(ncrops, rows, lq.dims()[0])?;
        Ok(Self { s, q, k, b, terms })
    }
}

avx2_multiversion! {
    /// z = x / temp into `z` (divided, as the official loss does); returns log Σ exp(z).
    fn scaled_lse(x: &[f32], temp: f32, z: &mut [f32]) -> f32 {
        let mut max = f32::NEG_INFINITY;
        for (zv, &xv) in z.iter_mut().zip(x) {
            *zv = xv / temp;
            max = max.max(*zv);
        }
        let mut acc = [0f32; 8];
        for (i, &zv) in z.iter().enumerate() {
            acc[i % 8] += math::exp(zv - max);
        }
        max + acc.iter().sum::<f32>().ln()
    }
}

avx2_multiversion! {
    /// −Σ q·(z − lse).
    fn term(q: &[f32], z: &[f32], lse: f32) -> f32 {
        let mut acc = [0f32; 8];
        for (i, (&qv, &zv)) in q.iter().zip(z).enumerate() {
            acc[i % 8] += qv * (zv - lse);
        }
        -acc.iter().sum::<f32>()
    }
}

avx2_multiversion! {
    /// dx = scale · (Σ_t Q_t · softmax(z) − Σ_t q_t), with Q_t = Σ q_t (1 up to rounding).
    fn row_grad(z: &[f32], lse: f32, qs: &[&[f32]], scale: f32, dx: &mut [f32]) {
        let mass: f32 = qs.iter().map(|q| q.iter().sum::<f32>()).sum();
        for (o, &zv) in dx.iter_mut().zip(z) {
            *o = mass * math::exp(zv - lse);
        }
        for q in qs {
            for (o, &qv) in dx.iter_mut().zip(*q) {
                *o -= qv;
            }
        }
        for o in dx.iter_mut() {
            *o *= scale;
        }
    }
}

impl CrossEntropy {
    /// The teacher rows paired with student row `r`: both globals' for a local view, the other
    /// global's for a global view.
    fn teachers<'a>(&self, q: &'a [f32], k: usize, b: usize, r: usize) -> Vec<&'a [f32]> {
        let (view, i) = (r / b, r % b);
        (0..2)
            .filter(|&t| t != view)
            .map(|t| &q[(t * b + i) * k..(t * b + i + 1) * k])
            .collect()
    }

    /// The same loss in candle ops, for devices and dtypes without the fused kernel. Each student
    /// row r has teacher weights W_r (the other global's q for a global view, both globals' summed
    /// for a local one), and −Σ W_r·log_softmax(z_r) = Σ W_r · lse_r − Σ W_r·z_r, z = x / τ. So the
    /// loss is two full-size products and a log-sum-exp, and its backward W_r·... − softmax terms
    /// come out of a handful of full-size ops. (One narrow per (teacher, student) pair, as the
    /// official loop writes it, gave the backward pass a zero-padded full-size gradient per pair:
    /// 14 of (640, 65536) for ViT-S's recipe.)
    /// Each student row's teacher weights W (rows, K): the other global's q for a global view, both
    /// globals' summed for a local one.
    fn weights(&self, q: &Tensor, b: usize) -> Result<Tensor> {
        let (q0, q1) = (q.narrow(0, 0, b)?, q.narrow(0, b, b)?);
        let both = (&q0 + &q1)?;
        let mut weights = vec![q1, q0];
        weights.extend(std::iter::repeat_n(both, self.ncrops - 2));
        Tensor::cat(&weights, 0)
    }

    /// Off the fused CPU path: the value from candle ops on detached operands, so that none of
    /// their (rows, K) intermediates is kept, and one graph node over the student output that
    /// keeps only it (in its own dtype) and the teacher probabilities. Composed, the loss kept
    /// about six student-sized f32 tensors until the backward pass: at ViT-S's recipe (640 rows
    /// of 65,536) over 1 GB, where PyTorch keeps its log-softmax outputs.
    fn portable(&self, student: &Tensor, q: &Tensor) -> Result<Tensor> {
        let q = super::at_least_f32(&q.detach())?;
        let value = self.composed(&super::at_least_f32(&student.detach())?, &q)?;
        student.apply_op2(&value, LossNode { op: *self, q })
    }

    /// The loss composed of candle ops, for f32 (or wider) operands.
    fn composed(&self, student: &Tensor, q: &Tensor) -> Result<Tensor> {
        use candle_core::D;
        let (b, terms) = dino_loss_rows(self.ncrops, student.dim(0)?, q.dim(0)?)?;
        let q = q.detach();
        let w = self.weights(&q, b)?;
        let z = (student / self.student_temp)?;
        // The max only shifts the exponent: detached, its gradient (which cancels) is not taken.
        let max = z.max_keepdim(D::Minus1)?.detach();
        let lse = (z.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
        let mass = w.sum_keepdim(D::Minus1)?;
        // Row by row before the sum: the two sides are large next to their difference.
        let per_row = ((mass * lse)? - (w * z)?.sum_keepdim(D::Minus1)?)?;
        per_row.sum_all()? / (b * terms) as f64
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "dino-cross-entropy"
    }

    fn cpu_fwd(&self, ss: &CpuStorage, ls: &Layout, sq: &CpuStorage, lq: &Layout) -> Result<(CpuStorage, Shape)> {
        let Operands { s, q, k, b, terms } = Operands::new(self.ncrops, (ss, ls), (sq, lq), self.name())?;
        // One value per row, added up in row order afterwards: the same sum on any thread count.
        let per_row: Vec<f32> = crate::parallel::install(|| {
            s.par_chunks(k)
                .enumerate()
                .map_init(
                    || vec![0f32; k],
                    |z, (r, x)| {
                        let lse = scaled_lse(x, self.student_temp as f32, z);
                        self.teachers(q, k, b, r).iter().map(|qt| term(qt, z, lse)).sum::<f32>()
                    },
                )
                .collect()
        });
        let total = per_row.iter().sum::<f32>() / (b * terms) as f32;
        Ok((CpuStorage::F32(vec![total]), Shape::from(())))
    }

    fn bwd(
        &self,
        student: &Tensor,
        q: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let ds = student.apply_op2_no_bwd(q, &Backward { op: *self, grad: g })?;
        Ok((Some(ds), None))
    }
}

struct Backward {
    op: CrossEntropy,
    grad: f32,
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "dino-cross-entropy-backward"
    }

    fn cpu_fwd(&self, ss: &CpuStorage, ls: &Layout, sq: &CpuStorage, lq: &Layout) -> Result<(CpuStorage, Shape)> {
        let Operands { s, q, k, b, terms } = Operands::new(self.op.ncrops, (ss, ls), (sq, lq), self.name())?;
        let scale = self.grad / (self.op.student_temp as f32 * (b * terms) as f32);
        let mut ds = vec![0f32; s.len()];
        crate::parallel::install(|| {
            s.par_chunks(k).zip(ds.par_chunks_mut(k)).enumerate().for_each_init(
                || vec![0f32; k],
                |z, (r, (x, dx))| {
                    let lse = scaled_lse(x, self.op.student_temp as f32, z);
                    row_grad(z, lse, &self.op.teachers(q, k, b, r), scale, dx);
                },
            )
        });
        Ok((CpuStorage::F32(ds), ls.shape().clone()))
    }
}

/// The loss's graph node off the fused CPU path: its value computed beforehand (the second
/// operand, passed through), its backward the row formula
/// dx = (Σ W · softmax(x/τ) − W) / (τ · B · pairs), on the kept student output and teacher q.
struct LossNode {
    op: CrossEntropy,
    q: Tensor,
}

/// A copy of the (scalar) value, on any backend.
fn pass_through<S: candle_core::backend::BackendStorage>(value: &S, l: &Layout) -> Result<(S, Shape)> {
    Ok((value.affine(l, 1.0, 0.0)?, l.shape().clone()))
}

impl CustomOp2 for LossNode {
    fn name(&self) -> &'static str {
        "dino-cross-entropy-node"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, value: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        pass_through(value, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        value: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        pass_through(value, l)
    }

    fn bwd(
        &self,
        student: &Tensor,
        _value: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use candle_core::D;
        let CrossEntropy { ncrops, student_temp } = self.op;
        let (b, terms) = dino_loss_rows(ncrops, student.dim(0)?, self.q.dim(0)?)?;
        let w = self.op.weights(&self.q, b)?;
        let z = (super::at_least_f32(student)? / student_temp)?;
        let mass = w.sum_keepdim(D::Minus1)?;
        let dz = (super::softmax_last_dim(&z)?.broadcast_mul(&mass)? - w)?;
        let scale = (grad.to_dtype(z.dtype())?.reshape((1, 1))? / (student_temp * (b * terms) as f64))?;
        Ok((Some(dz.broadcast_mul(&scale)?.to_dtype(student.dtype())?), None))
    }
}
