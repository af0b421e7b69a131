//! The DINO loss (official `DINOLoss`): cross-entropy between the sharpened, centred teacher
//! distribution of each global view and the student distribution of every other view, averaged
//! over view pairs and the batch; the centre follows an EMA of the teacher's batch mean.

use candle_core::{Result, Tensor};

use crate::ops::at_least_f32;
use crate::schedule::teacher_temp_schedule;

#[derive(Debug, Clone)]
pub struct DinoLoss {
    pub ncrops: usize,
    pub student_temp: f64,
    pub center_momentum: f64,
    teacher_temps: Vec<f64>,
    /// (1, out_dim), starts at zero.
    pub center: Tensor,
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
        })
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
        let teacher_out = &at_least_f32(teacher_out)?;
        // One kernel where candle's composed softmax was five ops over (2·B, out_dim).
        let q = crate::ops::softmax_last_dim(
            &(teacher_out.broadcast_sub(&self.center)? / self.teacher_temp(epoch))?.detach(),
        )?;
        crate::ops::dino_cross_entropy(student_out, &q, self.ncrops, self.student_temp)
    }

    /// center ← m·center + (1 − m)·mean(teacher_out over the batch).
    pub fn update_center(&mut self, teacher_out: &Tensor) -> Result<()> {
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
