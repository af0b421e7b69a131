//! The DINO loss (official `DINOLoss`): cross-entropy between the sharpened, centred teacher
//! distribution of each global view and the student distribution of every other view, averaged
//! over view pairs and the batch; the centre follows an EMA of the teacher's batch mean.
//! Optionally the teacher's targets come from DINOv2's Sinkhorn-Knopp centering instead
//! ([`DinoLoss::sinkhorn_iterations`]), and DINOv2's KoLeo regulariser ([`koleo_loss`]) spreads
//! the student's features.

use candle_core::{Result, Tensor};

use crate::ops::at_least_f32;
use crate::schedule::teacher_temp_schedule;

/// Most Sinkhorn-Knopp iterations a loss takes (DINOv2 uses 3): each is two passes over the
/// (batch, out_dim) targets, and a huge count would stall every step.
pub const MAX_SINKHORN_ITERATIONS: usize = 1000;

#[derive(Debug, Clone)]
pub struct DinoLoss {
    pub ncrops: usize,
    pub student_temp: f64,
    pub center_momentum: f64,
    teacher_temps: Vec<f64>,
    /// (1, out_dim), starts at zero.
    pub center: Tensor,
    /// 0 (the official DINO): the targets are softmax((t − c)/τ) with the EMA centre c. n > 0:
    /// DINOv2's Sinkhorn-Knopp centering, n iterations (DINOv2 uses 3): exp(t/τ) over the batch's
    /// teacher outputs scaled, alternately, so that every prototype gets 1/K of the total and every
    /// sample 1/B; the centre is then neither used nor updated, as in DINOv2.
    pub sinkhorn_iterations: usize,
}

impl DinoLoss {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        out_dim: usize,
        ncrops: usize,
        warmup_teacher_temp: f64,
        teacher_temp: f64,
        warmup_teacher_temp_epochs: usize,
        nepochs: usize,
        student_temp: f64,
        center_momentum: f64,
        device: &candle_core::Device,
    ) -> Result<Self> {
        if ncrops < 2 {
            candle_core::bail!("DINO loss needs at least the 2 global crops, got ncrops={ncrops}");
        }
        Ok(Self {
            ncrops,
            student_temp,
            center_momentum,
            teacher_temps: teacher_temp_schedule(
                warmup_teacher_temp,
                teacher_temp,
                warmup_teacher_temp_epochs,
                nepochs,
            ),
            center: Tensor::zeros((1, out_dim), candle_core::DType::F32, device)?,
            sinkhorn_iterations: 0,
        })
    }

    /// The teacher's targets for `teacher_out` (2·B, K), detached: softmax((t − c)/τ), or the
    /// Sinkhorn-Knopp assignment.
    pub fn targets(&self, teacher_out: &Tensor, epoch: usize) -> Result<Tensor> {
        let t = at_least_f32(teacher_out)?.detach();
        let temp = self.teacher_temp(epoch);
        if self.sinkhorn_iterations > 0 {
            return sinkhorn_knopp(&t, temp, self.sinkhorn_iterations);
        }
        // One kernel where candle's composed softmax was five ops over (2·B, out_dim).
        crate::ops::softmax_last_dim(&(t.broadcast_sub(&self.center)? / temp)?)
    }

    /// The teacher temperature used at `epoch` (the last value past the schedule's end).
    pub fn teacher_temp(&self, epoch: usize) -> f64 {
        *self
            .teacher_temps
            .get(epoch)
            .or(self.teacher_temps.last())
            .unwrap_or(&0.04)
    }

    /// The loss for student outputs `(ncrops·B, D)` and teacher outputs `(2·B, D)`; differentiable
    /// in the student only. Does not touch the centre: call [`DinoLoss::update_center`] after.
    pub fn loss(&self, student_out: &Tensor, teacher_out: &Tensor, epoch: usize) -> Result<Tensor> {
        // Checked before the teacher's softmax, which would accept any row count.
        crate::ops::dino_loss_rows(self.ncrops, student_out.dims2()?.0, teacher_out.dim(0)?)?;
        // Never in half precision: bf16 logits from a mixed-precision forward are widened first
        // (the student's inside the loss, which then keeps them in bf16 for the backward pass).
        let q = self.targets(teacher_out, epoch)?;
        crate::ops::dino_cross_entropy(student_out, &q, self.ncrops, self.student_temp)
    }

    /// The teacher's targets `q = softmax((t − c)/τ)` over a batch, as the two measures the DINO
    /// paper explains collapse with: their mean entropy (nats; ln K for uniform targets, the
    /// collapse centering alone drives to) and their mean largest probability (1 when one
    /// dimension takes everything, the collapse sharpening alone drives to). Taken with the centre
    /// the loss used, before [`DinoLoss::update_center`]. The loss is the mean cross-entropy
    /// H(q) + KL(q‖p) over the same targets, so KL(teacher ‖ student) = loss − entropy.
    /// Returns `[entropy, max_prob]` as an f32 tensor on the device, for the caller to read back
    /// with whatever else it reads (the trainer: with the loss, one synchronisation a step).
    pub fn teacher_stats(&self, teacher_out: &Tensor, epoch: usize) -> Result<Tensor> {
        if self.sinkhorn_iterations > 0 {
            // The targets themselves (0 · ln 0 taken as 0).
            let q = self.targets(teacher_out, epoch)?;
            let log_q = q.maximum(f32::MIN_POSITIVE)?.log()?;
            let entropy = (&q * log_q)?.sum(1)?.neg()?.mean(0)?;
            let max_prob = q.max_keepdim(1)?.mean_all()?;
            return Tensor::stack(&[entropy, max_prob], 0);
        }
        let z = (at_least_f32(teacher_out)?.broadcast_sub(&self.center)? / self.teacher_temp(epoch))?;
        let z = z.broadcast_sub(&z.max_keepdim(1)?)?;
        // Σ exp(z − max): its inverse is the largest probability.
        let sum = z.exp()?.sum_keepdim(1)?;
        let log_q = z.broadcast_sub(&sum.log()?)?;
        let entropy = (log_q.exp()? * &log_q)?.sum(1)?.neg()?.mean(0)?;
        let max_prob = sum.recip()?.mean_all()?;
        Tensor::stack(&[entropy, max_prob], 0)
    }

    /// center ← m·center + (1 − m)·mean(teacher_out over the batch).
    pub fn update_center(&mut self, teacher_out: &Tensor) -> Result<()> {
        if self.sinkhorn_iterations > 0 {
            return Ok(());
        }
        let batch_center = at_least_f32(&teacher_out.detach())?.sum_keepdim(0)? / teacher_out.dim(0)? as f64;
        self.center = ((&self.center * self.center_momentum)? + (batch_center? * (1.0 - self.center_momentum))?)?;
        Ok(())
    }

    /// The loss followed by the centre update, as the official `forward` does.
    pub fn forward(&mut self, student_out: &Tensor, teacher_out: &Tensor, epoch: usize) -> Result<Tensor> {
        let loss = self.loss(student_out, teacher_out, epoch)?;
        self.update_center(teacher_out)?;
        Ok(loss)
    }
}

/// DINOv2's `sinkhorn_knopp_teacher` on `t` (B, K), one process: Q = exp(t/τ) normalised to sum
/// 1, then `iterations` times each prototype's column scaled to total 1/K and each sample's row to
/// 1/B; returned ×B, so each row is a distribution. In f64, and from exp(t/τ − max): the
/// reference's exp(t/τ) overflows float32 once t/τ passes 88 (logits near 1 at τ = 0.01, which the
/// small-data recipe uses), and a prototype whose every exp underflows would divide 0 by 0. The
/// global factor cancels in the first normalisation; a column that still sums to zero stays zero.
fn sinkhorn_knopp(t: &Tensor, temp: f64, iterations: usize) -> Result<Tensor> {
    let (b, k) = t.dims2()?;
    let z = (t.to_dtype(candle_core::DType::F64)? / temp)?;
    let mut q = z.broadcast_sub(&z.max_keepdim(1)?.max_keepdim(0)?)?.exp()?;
    q = q.broadcast_div(&q.sum_all()?.reshape((1, 1))?)?;
    for _ in 0..iterations {
        q = (q.broadcast_div(&q.sum_keepdim(0)?.maximum(f64::MIN_POSITIVE)?)? / k as f64)?;
        q = (q.broadcast_div(&q.sum_keepdim(1)?.maximum(f64::MIN_POSITIVE)?)? / b as f64)?;
    }
    (q * b as f64)?.to_dtype(t.dtype())
}

/// DINOv2's KoLeo regulariser (`KoLeoLoss`, after Sablayrolles et al. 2018, "Spreading vectors
/// for similarity search"): the mean of −log of each L2-normalised row's distance to its nearest
/// other row, for `x` (B, D). Minimising it pushes the features of different images apart (a
/// Kozachenko-Leonenko estimate of their differential entropy, negated). As DINOv2: in f32,
/// normalised with `max(‖x‖, 1e-8)`, distances `‖a − b + 1e-8‖` (PyTorch's `pairwise_distance`),
/// `log(d + 1e-8)`; the nearest neighbour is picked on the normalised rows with no gradient.
pub fn koleo_loss(x: &Tensor) -> Result<Tensor> {
    const EPS: f64 = 1e-8;
    let x = at_least_f32(x)?;
    let n = x.dim(0)?;
    if n < 2 {
        candle_core::bail!("the KoLeo loss needs at least 2 rows (a nearest neighbour), got {n}");
    }
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(EPS)?;
    let x = x.broadcast_div(&norm)?;
    let dots = x.detach().matmul(&x.detach().t()?)?;
    // Each row's own product set to −1 (below any other's) so the neighbour is another row.
    let eye = Tensor::eye(n, dots.dtype(), dots.device())?;
    let dots = ((dots * (1.0 - &eye)?)? - eye)?;
    let nearest = x.index_select(&dots.argmax(1)?, 0)?;
    let dist = ((x - nearest)? + EPS)?.sqr()?.sum(1)?.sqrt()?;
    (dist + EPS)?.log()?.neg()?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn loss(k: usize, ncrops: usize) -> DinoLoss {
        DinoLoss::new(k, ncrops, 0.04, 0.04, 0, 1, 0.1, 0.9, &Device::Cpu).unwrap()
    }

    fn stats(l: &DinoLoss, t: &Tensor) -> Result<[f64; 2]> {
        let v = l.teacher_stats(t, 0)?.to_vec1::<f32>()?;
        Ok([v[0] as f64, v[1] as f64])
    }

    /// Entropy and largest probability of softmax(row / τ), in f64.
    fn reference(rows: &[Vec<f64>], tau: f64) -> (f64, f64, Vec<Vec<f64>>) {
        let (mut h, mut pmax, mut qs) = (0.0, 0.0, Vec::new());
        for r in rows {
            let m = r.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = r.iter().map(|v| ((v - m) / tau).exp()).collect();
            let s: f64 = e.iter().sum();
            let q: Vec<f64> = e.iter().map(|v| v / s).collect();
            h -= q.iter().filter(|&&p| p > 0.0).map(|p| p * p.ln()).sum::<f64>();
            pmax += q.iter().cloned().fold(0.0, f64::max);
            qs.push(q);
        }
        let n = rows.len() as f64;
        (h / n, pmax / n, qs)
    }

    #[test]
    fn koleo_matches_dinov2() -> Result<()> {
        // tests/fixtures/make_koleo_fixture.py: DINOv2's KoLeoLoss and its gradient, in float64,
        // on float32 values; dino_rs computes in f32 as the trainer does.
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../tests/fixtures/koleo/koleo.json")).expect("fixture JSON");
        let rows = |v: &serde_json::Value| -> Vec<Vec<f64>> {
            let rows = v.as_array().expect("rows");
            rows.iter()
                .map(|r| {
                    r.as_array()
                        .expect("row")
                        .iter()
                        .map(|x| x.as_f64().expect("number"))
                        .collect()
                })
                .collect()
        };
        let cases = fixture["cases"].as_array().expect("cases");
        assert_eq!(cases.len(), 4);
        for case in cases {
            let name = case["name"].as_str().expect("name");
            let x = rows(&case["x"]);
            let (b, d) = (x.len(), x[0].len());
            let flat: Vec<f32> = x.iter().flatten().map(|&v| v as f32).collect();
            let var = candle_core::Var::from_vec(flat, (b, d), &Device::Cpu)?;
            let loss = koleo_loss(var.as_tensor())?;
            let value = loss.to_scalar::<f32>()? as f64;
            let want = case["loss"].as_f64().expect("loss");
            assert!(
                (value - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{name}: loss {value} vs {want}"
            );
            let grad = loss
                .backward()?
                .get(var.as_tensor())
                .expect("a gradient")
                .to_vec2::<f32>()?;
            let want = rows(&case["grad"]);
            let scale = want.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
            for (g, w) in grad.iter().flatten().zip(want.iter().flatten()) {
                assert!(
                    (*g as f64 - w).abs() <= 1e-4 * scale,
                    "{name}: gradient {g} vs {w} (scale {scale})"
                );
            }
        }
        // One row has no neighbour.
        assert!(koleo_loss(&Tensor::ones((1, 4), DType::F32, &Device::Cpu)?).is_err());
        Ok(())
    }

    #[test]
    fn teacher_stats_are_the_targets_entropy_and_largest_probability() -> Result<()> {
        let (b, k) = (3, 7);
        let rows: Vec<Vec<f64>> = (0..2 * b)
            .map(|i| (0..k).map(|j| ((i * k + j) as f64 * 0.731).sin() * 0.1).collect())
            .collect();
        let flat: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
        let t = Tensor::from_vec(flat, (2 * b, k), &Device::Cpu)?;
        let l = loss(k, 2);
        let [h, pmax] = stats(&l, &t)?;
        let (want_h, want_pmax, qs) = reference(&rows, 0.04);
        assert!(
            (h - want_h).abs() < 1e-5 && (pmax - want_pmax).abs() < 1e-6,
            "{h} {want_h} {pmax} {want_pmax}"
        );
        // loss − entropy is KL(q ‖ p), here with the student's p = softmax(s / 0.1) explicit.
        let s_rows: Vec<Vec<f64>> = (0..2 * b)
            .map(|i| (0..k).map(|j| ((i + 3 * j) as f64 * 0.37).cos() * 0.3).collect())
            .collect();
        let s_flat: Vec<f32> = s_rows.iter().flatten().map(|&v| v as f32).collect();
        let s = Tensor::from_vec(s_flat, (2 * b, k), &Device::Cpu)?;
        let value = l.loss(&s, &t, 0)?.to_scalar::<f32>()? as f64;
        let (_, _, ps) = reference(&s_rows, 0.1);
        // Pairs (teacher view, other student view), as the loss takes them.
        let (mut kl, mut pairs) = (0.0, 0.0);
        for tv in 0..2 {
            for sv in (0..2).filter(|&v| v != tv) {
                for i in 0..b {
                    let (q, p) = (&qs[tv * b + i], &ps[sv * b + i]);
                    kl += q.iter().zip(p).map(|(q, p)| q * (q.ln() - p.ln())).sum::<f64>();
                }
                pairs += b as f64;
            }
        }
        assert!(
            ((value - h) - kl / pairs).abs() < 1e-4,
            "{} vs {}",
            value - h,
            kl / pairs
        );
        Ok(())
    }

    /// DINOv2's `sinkhorn_knopp_teacher` as written (no shift by the maximum), in f64.
    fn sinkhorn_reference(rows: &[Vec<f64>], tau: f64, iterations: usize) -> Vec<Vec<f64>> {
        let (b, k) = (rows.len(), rows[0].len());
        let mut q: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| r.iter().map(|v| (v / tau).exp()).collect())
            .collect();
        let total: f64 = q.iter().flatten().sum();
        q.iter_mut().flatten().for_each(|v| *v /= total);
        for _ in 0..iterations {
            for j in 0..k {
                let col: f64 = q.iter().map(|r| r[j]).sum();
                q.iter_mut().for_each(|r| r[j] /= col * k as f64);
            }
            for r in q.iter_mut() {
                let row: f64 = r.iter().sum();
                r.iter_mut().for_each(|v| *v /= row * b as f64);
            }
        }
        q.iter_mut().flatten().for_each(|v| *v *= b as f64);
        q
    }

    #[test]
    fn sinkhorn_knopp_targets_are_dinov2s() -> Result<()> {
        let (b, k) = (6, 9);
        let rows: Vec<Vec<f64>> = (0..b)
            .map(|i| (0..k).map(|j| ((i * k + j) as f64 * 1.37).sin()).collect())
            .collect();
        let flat: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
        let t = Tensor::from_vec(flat, (b, k), &Device::Cpu)?;
        let mut l = loss(k, 2);
        for iterations in [1, 3, 300] {
            l.sinkhorn_iterations = iterations;
            let got = l.targets(&t, 0)?.to_vec2::<f32>()?;
            let rows32: Vec<Vec<f64>> = rows
                .iter()
                .map(|r| r.iter().map(|&v| v as f32 as f64).collect())
                .collect();
            let want = sinkhorn_reference(&rows32, 0.04, iterations);
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((*g as f64 - w).abs() < 1e-6, "{iterations} iterations: {g} vs {w}");
            }
            // Every row is a distribution; after many iterations every prototype has B/K of the mass.
            for r in &got {
                assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
            if iterations == 300 {
                for j in 0..k {
                    let col: f32 = got.iter().map(|r| r[j]).sum();
                    assert!((col - b as f32 / k as f32).abs() < 1e-4, "prototype {j}: {col}");
                }
            }
        }
        // The centre is left alone.
        l.update_center(&t)?;
        assert_eq!(l.center.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn the_two_collapses_read_as_the_paper_says() -> Result<()> {
        let k = 16;
        // Uniform: every output equal (what centering alone drives to): entropy ln K, max 1/K.
        let [h, pmax] = stats(&loss(k, 2), &Tensor::ones((4, k), DType::F32, &Device::Cpu)?)?;
        assert!((h - (k as f64).ln()).abs() < 1e-5 && (pmax - 1.0 / k as f64).abs() < 1e-6);
        // One dimension dominates (sharpening alone): entropy 0, max 1.
        let mut v = vec![0f32; 4 * k];
        for r in 0..4 {
            v[r * k + 5] = 10.0;
        }
        let [h, pmax] = stats(&loss(k, 2), &Tensor::from_vec(v, (4, k), &Device::Cpu)?)?;
        assert!(h < 1e-6 && (pmax - 1.0).abs() < 1e-6, "{h} {pmax}");
        Ok(())
    }
}
