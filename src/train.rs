//! One DINO iteration as the official `train_one_epoch` does it: teacher on the global crops,
//! student on all crops, DINO loss, backward, per-parameter clipping, last layer frozen during
//! the first `freeze_last_layer` epochs, AdamW with scheduled lr / weight decay, EMA teacher with
//! scheduled momentum, centre update.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::loss::DinoLoss;
use crate::model::{HeadConfig, MultiCropWrapper, ParamStore, VitConfig};
use crate::optim::{clip_gradients, AdamW};
use crate::schedule::cosine_scheduler;
use crate::teacher::ema_update;

/// The training recipe (official `main_dino.py` defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Base learning rate for a total batch of 256 (scaled linearly with the batch size).
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: usize,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    pub momentum_teacher: f64,
    pub teacher_temp: f64,
    pub warmup_teacher_temp: f64,
    pub warmup_teacher_temp_epochs: usize,
    pub student_temp: f64,
    pub center_momentum: f64,
    /// Per-parameter gradient-norm clip; 0 disables.
    pub clip_grad: f64,
    pub freeze_last_layer: usize,
    pub batch_size: usize,
    pub niter_per_ep: usize,
    pub n_local: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            lr: 5e-4,
            min_lr: 1e-6,
            warmup_epochs: 10,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            momentum_teacher: 0.996,
            teacher_temp: 0.04,
            warmup_teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 0,
            student_temp: 0.1,
            center_momentum: 0.9,
            clip_grad: 3.0,
            freeze_last_layer: 1,
            batch_size: 64,
            niter_per_ep: 1,
            n_local: 8,
        }
    }
}

/// Student and EMA teacher (same architecture; the teacher has no stochastic depth).
pub struct Dino {
    pub vit: VitConfig,
    pub head: Option<HeadConfig>,
    pub student_store: ParamStore,
    pub teacher_store: ParamStore,
    pub student: MultiCropWrapper,
    pub teacher: MultiCropWrapper,
    pub device: Device,
}

impl Dino {
    /// A freshly initialised student (seeded) and a teacher starting as its copy; or both from
    /// `weights` (names `backbone.*` / `head.*`) when given.
    pub fn new(
        vit: VitConfig,
        head: Option<HeadConfig>,
        seed: u64,
        weights: Option<HashMap<String, Tensor>>,
        device: &Device,
    ) -> Result<Self> {
        let student_store = match weights {
            Some(w) => ParamStore::from_tensors(w, seed)?,
            None => ParamStore::new(seed),
        };
        let student = MultiCropWrapper::new(&vit, head.as_ref(), student_store.var_builder(device))?;
        let copies = student_store
            .tensors()
            .into_iter()
            .map(|(n, t)| Ok((n, t.copy()?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let teacher_store = ParamStore::from_tensors(copies, seed)?;
        let teacher_vit = VitConfig {
            drop_path_rate: 0.0,
            ..vit.clone()
        };
        let teacher = MultiCropWrapper::new(&teacher_vit, head.as_ref(), teacher_store.var_builder(device))?;
        Ok(Self {
            vit,
            head,
            student_store,
            teacher_store,
            student,
            teacher,
            device: device.clone(),
        })
    }

    /// Student parameters the optimiser updates (all but a fixed `weight_g`), in creation order.
    pub fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        self.student_store
            .vars()
            .into_iter()
            .filter(|(n, _)| {
                !(self.head.as_ref().is_some_and(|h| h.norm_last_layer) && n.ends_with("last_layer.weight_g"))
            })
            .collect()
    }
}

/// What one iteration did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    pub iteration: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub wd: f64,
    pub momentum: f64,
    pub teacher_temp: f64,
}

/// Gradients of one iteration, ready to be applied.
pub struct Computed {
    pub grads: HashMap<String, Tensor>,
    pub loss: f64,
    pub teacher_out: Tensor,
    pub epoch: usize,
}

/// A non-finite loss: the step was not applied.
#[derive(Debug, Clone, PartialEq)]
pub struct NonFiniteLoss {
    pub iteration: usize,
    pub loss: f64,
}

pub struct DinoTrainer {
    pub dino: Arc<Dino>,
    pub config: TrainConfig,
    pub loss: DinoLoss,
    pub optimizer: AdamW,
    pub lr_schedule: Vec<f64>,
    pub wd_schedule: Vec<f64>,
    pub momentum_schedule: Vec<f64>,
    pub iteration: usize,
    pub rng: ChaCha8Rng,
}

fn at(schedule: &[f64], it: usize) -> f64 {
    schedule[it.min(schedule.len().saturating_sub(1))]
}

impl DinoTrainer {
    pub fn new(dino: Arc<Dino>, config: TrainConfig, seed: u64) -> Result<Self> {
        let Some(head) = dino.head.as_ref() else {
            candle_core::bail!("this model has no DINO head (a backbone loaded on its own): it cannot be trained");
        };
        let c = &config;
        let lr = c.lr * c.batch_size as f64 / 256.0;
        let lr_schedule = cosine_scheduler(lr, c.min_lr, c.epochs, c.niter_per_ep, c.warmup_epochs, 0.0);
        let wd_schedule = cosine_scheduler(c.weight_decay, c.weight_decay_end, c.epochs, c.niter_per_ep, 0, 0.0);
        let momentum_schedule = cosine_scheduler(c.momentum_teacher, 1.0, c.epochs, c.niter_per_ep, 0, 0.0);
        let loss = DinoLoss::new(
            head.out_dim,
            2 + c.n_local,
            c.warmup_teacher_temp,
            c.teacher_temp,
            c.warmup_teacher_temp_epochs,
            c.epochs,
            c.student_temp,
            c.center_momentum,
            &dino.device,
        )?;
        let optimizer = AdamW::new(dino.trainable())?;
        let rng = ChaCha8Rng::seed_from_u64(crate::augment::multicrop::mix_seed(seed, 0xD1_7A7A));
        Ok(Self {
            dino,
            config,
            loss,
            optimizer,
            lr_schedule,
            wd_schedule,
            momentum_schedule,
            iteration: 0,
            rng,
        })
    }

    /// One iteration on `globals` (2·B, 3, G, G) and `locals` (n_local·B, 3, L, L), crops view-major.
    /// Forward, loss, backward and clipping for the next iteration, without changing anything.
    /// The gradients are those after clipping and before the frozen last layer is dropped.
    pub fn compute(
        &mut self,
        globals: &Tensor,
        locals: Option<&Tensor>,
    ) -> Result<std::result::Result<Computed, NonFiniteLoss>> {
        let it = self.iteration;
        let epoch = it / self.config.niter_per_ep.max(1);
        let teacher_out = self.dino.teacher.forward_t::<ChaCha8Rng>(&[globals], None)?.detach();
        let groups: Vec<&Tensor> = std::iter::once(globals).chain(locals).collect();
        let student_out = self.dino.student.forward_t(&groups, Some(&mut self.rng))?;
        let loss = self.loss.loss(&student_out, &teacher_out, epoch)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Ok(Err(NonFiniteLoss {
                iteration: it,
                loss: value,
            }));
        }
        let grad_store = loss.backward()?;
        let mut grads: HashMap<String, Tensor> = self
            .dino
            .trainable()
            .into_iter()
            .filter_map(|(n, v)| grad_store.get(v.as_tensor()).map(|g| (n, g.clone())))
            .collect();
        if self.config.clip_grad > 0.0 {
            clip_gradients(&mut grads, self.config.clip_grad)?;
        }
        Ok(Ok(Computed {
            grads,
            loss: value,
            teacher_out,
            epoch,
        }))
    }

    /// Applies [`DinoTrainer::compute`]'s result: AdamW, EMA teacher, centre, next iteration.
    pub fn apply(&mut self, computed: Computed) -> Result<StepStats> {
        let it = self.iteration;
        let Computed {
            mut grads,
            loss,
            teacher_out,
            epoch,
        } = computed;
        let (lr, wd, m) = (
            at(&self.lr_schedule, it),
            at(&self.wd_schedule, it),
            at(&self.momentum_schedule, it),
        );
        if epoch < self.config.freeze_last_layer {
            grads.retain(|n, _| !n.contains("last_layer"));
        }
        self.optimizer.step(&grads, lr, wd)?;
        ema_update(&self.dino.teacher_store, &self.dino.student_store, m)?;
        self.loss.update_center(&teacher_out)?;
        self.iteration += 1;
        Ok(StepStats {
            iteration: it,
            epoch,
            loss,
            lr,
            wd,
            momentum: m,
            teacher_temp: self.loss.teacher_temp(epoch),
        })
    }

    /// One iteration on `globals` (2·B, 3, G, G) and `locals` (n_local·B, 3, L, L), crops view-major.
    /// A non-finite loss leaves every weight, the optimiser and the centre untouched.
    pub fn step(
        &mut self,
        globals: &Tensor,
        locals: Option<&Tensor>,
    ) -> Result<std::result::Result<StepStats, NonFiniteLoss>> {
        match self.compute(globals, locals)? {
            Ok(c) => self.apply(c).map(Ok),
            Err(e) => Ok(Err(e)),
        }
    }
}
