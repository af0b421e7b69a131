//! One DINO iteration as the official `train_one_epoch` does it: teacher on the global crops,
//! student on all crops, DINO loss, backward, per-parameter clipping, last layer frozen during
//! the first `freeze_last_layer` epochs, AdamW with scheduled lr / weight decay, EMA teacher with
//! scheduled momentum, centre update.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::augment::normalize::{Normalize, Pixel};
use crate::config::AugmentConfig;
use crate::data::loader::{MultiCropLoader, Next};
use crate::data::Batch;
use crate::dino::Dino;
use crate::loss::DinoLoss;
use crate::optim::{clip_gradients, AdamW};
use crate::profile::{mark, Clock};
use crate::schedule::cosine_scheduler;
use crate::teacher::ema_update;

/// The training recipe (official `main_dino.py` defaults).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// 0: the official centering; n > 0: DINOv2's Sinkhorn-Knopp targets with n iterations
    /// ([`DinoLoss::sinkhorn_iterations`]). Absent from checkpoints written before it existed.
    #[serde(default)]
    pub sinkhorn_iterations: usize,
    /// Weight of DINOv2's KoLeo term ([`crate::loss::koleo_loss`]) on the student's global-crop
    /// CLS features, one term per global view; 0 (DINO's recipe) leaves it out, DINOv2 uses 0.1.
    /// Absent from checkpoints written before it existed.
    #[serde(default)]
    pub koleo_weight: f64,
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
            sinkhorn_iterations: 0,
            koleo_weight: 0.0,
            clip_grad: 3.0,
            freeze_last_layer: 1,
            batch_size: 64,
            niter_per_ep: 1,
            n_local: 8,
        }
    }
}

/// Most iterations (`epochs · niter_per_ep`) a configuration may ask for: the schedules hold one
/// f64 per iteration, and 2^25 (800 epochs of 40k iterations) is already 256 MiB of them.
pub const MAX_ITERATIONS: usize = 1 << 25;

/// A recipe option's value as a caller gives it: integer options take only `Int`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i64),
    Float(f64),
}

impl TrainConfig {
    /// The options a user sets (the recipe, with `main_dino.py`'s names), in order, with their
    /// values; the other fields (`batch_size`, `niter_per_ep`, `n_local`) come from the loader.
    /// Python's `dino_rs.TrainConfig`, `Trainer`, `DINOEmbedder` and `dino-rs train` take exactly
    /// these, with these defaults.
    pub fn recipe(&self) -> [(&'static str, Number); 16] {
        use Number::{Float, Int};
        let int = |v: usize| Int(v as i64);
        [
            ("epochs", int(self.epochs)),
            ("lr", Float(self.lr)),
            ("min_lr", Float(self.min_lr)),
            ("warmup_epochs", int(self.warmup_epochs)),
            ("weight_decay", Float(self.weight_decay)),
            ("weight_decay_end", Float(self.weight_decay_end)),
            ("momentum_teacher", Float(self.momentum_teacher)),
            ("teacher_temp", Float(self.teacher_temp)),
            ("warmup_teacher_temp", Float(self.warmup_teacher_temp)),
            ("warmup_teacher_temp_epochs", int(self.warmup_teacher_temp_epochs)),
            ("student_temp", Float(self.student_temp)),
            ("center_momentum", Float(self.center_momentum)),
            ("sinkhorn_iterations", int(self.sinkhorn_iterations)),
            ("koleo_weight", Float(self.koleo_weight)),
            ("clip_grad", Float(self.clip_grad)),
            ("freeze_last_layer", int(self.freeze_last_layer)),
        ]
    }

    /// Sets recipe option `name`.
    fn set(&mut self, name: &str, value: Number) -> crate::Result<()> {
        use crate::error::Error;
        let count = |v: Number| match v {
            Number::Int(i) => usize::try_from(i).map_err(|_| Error::invalid(format!("{name} must be >= 0, got {i}"))),
            Number::Float(f) => Err(Error::invalid(format!("{name} must be a whole number, got {f}"))),
        };
        let real = |v: Number| match v {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        };
        match name {
            "epochs" => self.epochs = count(value)?,
            "lr" => self.lr = real(value),
            "min_lr" => self.min_lr = real(value),
            "warmup_epochs" => self.warmup_epochs = count(value)?,
            "weight_decay" => self.weight_decay = real(value),
            "weight_decay_end" => self.weight_decay_end = real(value),
            "momentum_teacher" => self.momentum_teacher = real(value),
            "teacher_temp" => self.teacher_temp = real(value),
            "warmup_teacher_temp" => self.warmup_teacher_temp = real(value),
            "warmup_teacher_temp_epochs" => self.warmup_teacher_temp_epochs = count(value)?,
            "student_temp" => self.student_temp = real(value),
            "center_momentum" => self.center_momentum = real(value),
            "sinkhorn_iterations" => self.sinkhorn_iterations = count(value)?,
            "koleo_weight" => self.koleo_weight = real(value),
            "clip_grad" => self.clip_grad = real(value),
            "freeze_last_layer" => self.freeze_last_layer = count(value)?,
            _ => {
                let names: Vec<&str> = self.recipe().iter().map(|(n, _)| *n).collect();
                return Err(Error::invalid(format!(
                    "unknown training option {name:?}; the options are {}",
                    names.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The official recipe with `overrides` put over it, checked. A warm-up the caller did not set
    /// is the default's 10 epochs or all of `epochs` if fewer, so that a short run works with the
    /// defaults; one set longer than `epochs` is an error.
    pub fn from_overrides<'a>(overrides: impl IntoIterator<Item = (&'a str, Number)>) -> crate::Result<Self> {
        let mut config = Self::default();
        let mut warmup_set = false;
        for (name, value) in overrides {
            config.set(name, value)?;
            warmup_set |= name == "warmup_epochs";
        }
        if !warmup_set {
            config.warmup_epochs = config.warmup_epochs.min(config.epochs);
        }
        config.validate()?;
        Ok(config)
    }

    /// Every rule a configuration must meet, whether it comes from a user or from a file: values in
    /// their ranges, and the sizes the trainer allocates by within a real run's.
    pub fn validate(&self) -> crate::Result<()> {
        let finite_positive = |t: f64| t > 0.0 && t.is_finite();
        let total = self.epochs.checked_mul(self.niter_per_ep);
        let (epochs, niter) = (self.epochs, self.niter_per_ep);
        let rules: [(bool, String); 15] = [
            (epochs > 0, "epochs must be at least 1".into()),
            (self.batch_size > 0, "batch_size must be at least 1".into()),
            (
                niter > 0,
                format!("the loader must yield at least one batch per epoch (niter_per_ep ({niter}))"),
            ),
            (
                total.is_some_and(|t| t <= MAX_ITERATIONS),
                format!("epochs ({epochs}) times niter_per_ep ({niter}) must be at most {MAX_ITERATIONS} iterations"),
            ),
            (
                self.n_local <= 1024,
                format!("n_local ({}) must be at most 1024", self.n_local),
            ),
            (
                self.warmup_epochs <= epochs,
                format!(
                    "warmup_epochs ({}) must not exceed epochs ({epochs})",
                    self.warmup_epochs
                ),
            ),
            (
                finite_positive(self.lr) && self.min_lr >= 0.0 && self.min_lr.is_finite(),
                "lr must be positive and min_lr >= 0".into(),
            ),
            (
                [self.teacher_temp, self.warmup_teacher_temp, self.student_temp]
                    .into_iter()
                    .all(finite_positive),
                "temperatures must be positive and finite".into(),
            ),
            (
                (0.0..=1.0).contains(&self.momentum_teacher),
                "momentum_teacher must be in [0, 1]".into(),
            ),
            (
                (0.0..=1.0).contains(&self.center_momentum),
                "center_momentum must be in [0, 1]".into(),
            ),
            (
                self.sinkhorn_iterations <= crate::loss::MAX_SINKHORN_ITERATIONS,
                format!(
                    "sinkhorn_iterations must be at most {}, got {}",
                    crate::loss::MAX_SINKHORN_ITERATIONS,
                    self.sinkhorn_iterations
                ),
            ),
            (
                self.koleo_weight >= 0.0 && self.koleo_weight.is_finite(),
                format!("koleo_weight must be finite and >= 0, got {}", self.koleo_weight),
            ),
            (
                self.koleo_weight == 0.0 || self.batch_size >= 2,
                format!(
                    "koleo_weight needs batches of at least 2 images (a nearest neighbour), got batch_size {}",
                    self.batch_size
                ),
            ),
            (
                // An infinite weight decay only makes NaNs.
                [self.weight_decay, self.weight_decay_end]
                    .into_iter()
                    .all(|w| w >= 0.0 && w.is_finite()),
                "weight decay must be finite and >= 0".into(),
            ),
            // clip_grad may be infinite: no clipping.
            (self.clip_grad >= 0.0, "clip_grad must be >= 0".into()),
        ];
        match rules.iter().find(|(ok, _)| !ok) {
            Some((_, rule)) => Err(crate::Error::invalid(rule.clone())),
            None => Ok(()),
        }
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
    /// The teacher targets' mean entropy and largest probability ([`DinoLoss::teacher_stats`]).
    pub teacher_entropy: f64,
    pub teacher_max_prob: f64,
    /// Seconds per phase ([`crate::profile::PHASES`]) when [`DinoTrainer::profile`] is on; else empty.
    pub phases: Vec<(&'static str, f64)>,
}

impl StepStats {
    /// KL(teacher ‖ student) in nats: the loss less the targets' entropy.
    pub fn teacher_student_kl(&self) -> f64 {
        self.loss - self.teacher_entropy
    }
}

/// Gradients of one iteration, ready to be applied.
pub struct Computed {
    pub grads: HashMap<String, Tensor>,
    pub loss: f64,
    pub teacher_out: Tensor,
    pub epoch: usize,
    /// [`DinoLoss::teacher_stats`] of this iteration's targets.
    pub teacher: [f64; 2],
    /// The phases timed so far, when profiling.
    pub clock: Option<Clock>,
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
    /// Compute dtype of the forward passes: F32, or BF16 for mixed precision (f32 weights,
    /// gradients, optimiser state, loss and centre; [`crate::ops::autocast`]).
    pub dtype: DType,
    /// Time each phase of every step ([`crate::profile`]) into [`StepStats::phases`].
    pub profile: bool,
}

/// Why a backbone loaded on its own cannot be trained (bindings check first, to raise ValueError).
pub const NO_HEAD: &str = "this model has no DINO head (a backbone loaded on its own): it cannot be trained";

fn at(schedule: &[f64], it: usize) -> f64 {
    schedule[it.min(schedule.len().saturating_sub(1))]
}

impl DinoTrainer {
    pub fn new(dino: Arc<Dino>, config: TrainConfig, seed: u64) -> Result<Self> {
        let Some(head) = dino.head.as_ref() else {
            candle_core::bail!("{NO_HEAD}");
        };
        let c = &config;
        let lr = c.lr * c.batch_size as f64 / 256.0;
        let lr_schedule = cosine_scheduler(lr, c.min_lr, c.epochs, c.niter_per_ep, c.warmup_epochs, 0.0);
        let wd_schedule = cosine_scheduler(c.weight_decay, c.weight_decay_end, c.epochs, c.niter_per_ep, 0, 0.0);
        let momentum_schedule = cosine_scheduler(c.momentum_teacher, 1.0, c.epochs, c.niter_per_ep, 0, 0.0);
        let mut loss = DinoLoss::new(
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
        loss.sinkhorn_iterations = c.sinkhorn_iterations;
        let optimizer = AdamW::new(dino.trainable())?;
        let rng = ChaCha8Rng::seed_from_u64(crate::augment::multicrop::mix_seed(seed, 0xD1_7A7A));
        Ok(Self {
            dtype: dino.dtype,
            dino,
            config,
            loss,
            optimizer,
            lr_schedule,
            wd_schedule,
            momentum_schedule,
            iteration: 0,
            rng,
            profile: false,
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
        let mut clock = self.profile.then(|| Clock::start(&self.dino.device)).transpose()?;
        let autocast = |f: &mut dyn FnMut() -> Result<Tensor>| crate::ops::autocast::autocast(self.dtype, f);
        let teacher = &self.dino.teacher_nograd;
        let teacher_out = crate::ops::no_grad(|| autocast(&mut || teacher.forward_t::<ChaCha8Rng>(&[globals], None)))?
            .detach()
            .to_dtype(DType::F32)?;
        mark(&mut clock, "teacher_forward")?;
        let groups: Vec<&Tensor> = std::iter::once(globals).chain(locals).collect();
        let (student, rng) = (&self.dino.student, &mut self.rng);
        let Some(head) = student.head.as_ref() else {
            candle_core::bail!("{NO_HEAD}");
        };
        let last_layer = head.last_layer_leaf(self.dtype)?;
        // Each block's parameters packed once as a leaf of the graph (crate::ops::pack): their
        // gradients are cut from the packs' after the backward pass, like the last layer's.
        let ((feats, student_out), packs) = crate::ops::pack::leaves(|| {
            crate::ops::autocast::autocast(self.dtype, || {
                student.forward_with(&groups, Some(&mut *rng), Some(last_layer.as_tensor()))
            })
        })?;
        let student_out = student_out.to_dtype(DType::F32)?;
        mark(&mut clock, "student_forward")?;
        let loss = self.loss.loss(&student_out, &teacher_out, epoch)?;
        // As DINOv2: one term per global view (never between two crops of one image). A last
        // batch of one image (drop_last=False) has no neighbour, so no term.
        let b = globals.dim(0)? / 2;
        let koleo = (self.config.koleo_weight > 0.0 && b >= 2)
            .then(|| {
                crate::loss::koleo_loss(&feats.narrow(0, 0, b)?)? + crate::loss::koleo_loss(&feats.narrow(0, b, b)?)?
            })
            .transpose()?;
        drop(feats);
        // The loss, the KoLeo term and the teacher's measures read back together: one
        // synchronisation. The reported loss is DINO's alone, so that it less the targets'
        // entropy stays KL(teacher ‖ student); the KoLeo term is only minimised.
        let stats = self.loss.teacher_stats(&teacher_out, epoch)?;
        let mut parts = vec![loss.reshape(1)?, stats];
        parts.extend(koleo.as_ref().map(|k| k.reshape(1)).transpose()?);
        let read = Tensor::cat(&parts, 0)?.to_vec1::<f32>()?;
        let (value, teacher_stats) = (read[0] as f64, [read[1] as f64, read[2] as f64]);
        mark(&mut clock, "loss")?;
        if let Some(bad) = [value]
            .into_iter()
            .chain(read.get(3).map(|&k| k as f64))
            .find(|v| !v.is_finite())
        {
            return Ok(Err(NonFiniteLoss {
                iteration: it,
                loss: bad,
            }));
        }
        let loss = match koleo {
            Some(k) => (loss + (k * self.config.koleo_weight)?)?,
            None => loss,
        };
        let grad_store = loss.backward()?;
        let trainable = self.dino.trainable();
        let mut grads: HashMap<String, Tensor> = trainable
            .iter()
            .filter_map(|(n, v)| grad_store.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
            .collect();
        let names: HashMap<_, _> = trainable.iter().map(|(n, v)| (v.as_tensor().id(), n)).collect();
        for (id, g) in packs.grads(&grad_store)? {
            let Some(&name) = names.get(&id) else { continue };
            let sum = match grads.get(name) {
                Some(other) => (other + g)?,
                None => g,
            };
            grads.insert(name.clone(), sum);
        }
        let dw = grad_store.get(last_layer.as_tensor()).cloned();
        // The graph (every activation) goes before the weight norm's backward runs.
        drop((grad_store, loss, student_out, last_layer, packs));
        if let Some(dw) = dw {
            let (dv, dg) = head.last_layer_grads(&dw)?;
            for (n, v) in &trainable {
                if v.as_tensor().id() == head.weight_v().id() {
                    grads.insert(n.clone(), dv.clone());
                } else if v.as_tensor().id() == head.weight_g().id() {
                    grads.insert(n.clone(), dg.clone());
                }
            }
        }
        mark(&mut clock, "backward")?;
        if self.config.clip_grad > 0.0 {
            clip_gradients(&mut grads, self.config.clip_grad)?;
        }
        mark(&mut clock, "clip")?;
        Ok(Ok(Computed {
            grads,
            loss: value,
            teacher_out,
            epoch,
            teacher: teacher_stats,
            clock,
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
            teacher,
            mut clock,
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
        mark(&mut clock, "adamw")?;
        ema_update(&self.dino.teacher_store, &self.dino.student_store, m)?;
        mark(&mut clock, "ema")?;
        self.loss.update_center(&teacher_out)?;
        mark(&mut clock, "center")?;
        self.iteration += 1;
        Ok(StepStats {
            iteration: it,
            epoch,
            loss,
            lr,
            wd,
            momentum: m,
            teacher_temp: self.loss.teacher_temp(epoch),
            teacher_entropy: teacher[0],
            teacher_max_prob: teacher[1],
            phases: clock.map(|c| c.phases).unwrap_or_default(),
        })
    }

    /// One iteration on `globals` (2·B, 3, G, G) and `locals` (n_local·B, 3, L, L), crops view-major.
    /// A non-finite loss leaves every weight, the optimiser and the centre untouched.
    pub fn step(
        &mut self,
        globals: &Tensor,
        locals: Option<&Tensor>,
    ) -> Result<std::result::Result<StepStats, NonFiniteLoss>> {
        // On the dino_rs pool, candle's matmuls (gemm splits work over the current rayon pool) share
        // its threads with the fused kernels instead of competing from rayon's global pool.
        crate::parallel::install(|| match self.compute(globals, locals)? {
            Ok(c) => self.apply(c).map(Ok),
            Err(e) => Ok(Err(e)),
        })
    }
}

/// What one epoch of [`DinoTrainer::train_epoch`] did.
#[derive(Debug, Clone)]
pub struct EpochStats {
    pub steps: usize,
    /// The mean loss of the epoch's steps (NaN when there were none).
    pub loss: f64,
    /// Means over the steps of the teacher targets' entropy, KL(teacher ‖ student) and largest
    /// probability (NaN when there were no steps).
    pub teacher_entropy: f64,
    pub teacher_student_kl: f64,
    pub teacher_max_prob: f64,
    /// The last step's stats (its schedules' values).
    pub last: Option<StepStats>,
    /// Mean seconds per phase when profiling, "data" (waiting for the loader, then the upload)
    /// first; else empty.
    pub phases: Vec<(&'static str, f64)>,
    pub seconds: f64,
}

/// Where the caller takes part in an epoch: while the loader has no batch ready (every 50 ms: where
/// a Python caller notices Ctrl-C) and after every step. An error from either stops the epoch at
/// a step boundary; the steps done are kept.
pub trait EpochHooks {
    type Error: From<crate::Error> + From<NonFiniteLoss>;
    fn waiting(&mut self) -> std::result::Result<(), Self::Error>;
    fn stepped(&mut self, stats: &StepStats) -> std::result::Result<(), Self::Error>;
}

impl DinoTrainer {
    /// Trains epoch `epoch` of `loader` (whose shuffle it sets), the loader writing crops as `T`:
    /// normalised f32 for the CPU; u8 for a GPU, which normalises them itself from a quarter of
    /// the bytes. A trainer stopped mid-epoch resumes it: the batches already trained on are
    /// skipped, and since an epoch's order depends on (seed, epoch) only, the rest is the same.
    pub fn train_epoch<T: Pixel, H: EpochHooks>(
        &mut self,
        loader: &MultiCropLoader,
        epoch: u64,
        hooks: &mut H,
    ) -> std::result::Result<EpochStats, H::Error> {
        let aug = loader.augmenter().config().clone();
        let normalize = loader.augmenter().normalize();
        let start = Instant::now();
        let niter = self.config.niter_per_ep;
        let mut skip = self.iteration.saturating_sub(epoch as usize * niter).min(niter);
        let mut it = loader.iter_epoch_as::<T>(epoch);
        let (mut sum, mut steps, mut last) = (0.0, 0, None);
        let (mut entropy, mut max_prob) = (0.0, 0.0);
        let (mut times, mut profiled): (Vec<(&'static str, f64)>, usize) = (Vec::new(), 0);
        let mut waited = Duration::ZERO;
        loop {
            let t = Instant::now();
            let next = it.next_timeout(Duration::from_millis(50));
            waited += t.elapsed();
            let batch = match next {
                Next::Pending => {
                    hooks.waiting()?;
                    continue;
                }
                Next::Done => break,
                Next::Batch(b) => b?,
            };
            if skip > 0 {
                skip -= 1;
                waited = Duration::ZERO;
                continue;
            }
            let t = Instant::now();
            let dev = self.dino.device.clone();
            let (globals, locals) = batch_tensors(batch, &aug, normalize, &dev).map_err(crate::Error::from)?;
            if self.profile {
                dev.synchronize().map_err(crate::Error::from)?;
            }
            let data = (waited + t.elapsed()).as_secs_f64();
            waited = Duration::ZERO;
            let mut stats = self.step(&globals, locals.as_ref()).map_err(crate::Error::from)??;
            if self.profile {
                stats.phases.insert(0, ("data", data));
                if times.is_empty() {
                    times = stats.phases.iter().map(|&(p, _)| (p, 0.0)).collect();
                }
                for (total, (_, s)) in times.iter_mut().zip(&stats.phases) {
                    total.1 += s;
                }
                profiled += 1;
            }
            sum += stats.loss;
            entropy += stats.teacher_entropy;
            max_prob += stats.teacher_max_prob;
            steps += 1;
            hooks.stepped(&stats)?;
            last = Some(stats);
        }
        let mean = |total: f64| if steps > 0 { total / steps as f64 } else { f64::NAN };
        Ok(EpochStats {
            steps,
            loss: mean(sum),
            teacher_entropy: mean(entropy),
            teacher_student_kl: mean(sum - entropy),
            teacher_max_prob: mean(max_prob),
            last,
            phases: times.into_iter().map(|(p, t)| (p, t / profiled as f64)).collect(),
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// A batch's crops as normalised tensors on `dev` (u8 crops are normalised there).
fn batch_tensors<T: Pixel>(
    batch: Batch<T>,
    aug: &AugmentConfig,
    normalize: &Normalize,
    dev: &candle_core::Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, g, l) = (batch.len(), aug.global_size as usize, aug.local_size as usize);
    let globals = T::crops(batch.globals, (2 * b, 3, g, g), normalize, dev)?;
    let locals = if aug.n_local > 0 {
        Some(T::crops(batch.locals, (aug.n_local * b, 3, l, l), normalize, dev)?)
    } else {
        None
    };
    Ok((globals, locals))
}

impl DinoTrainer {
    /// Everything needed to continue exactly: both networks, Adam moments and step counts, the
    /// centre, the iteration, the stochastic-depth RNG position, and `extra` (caller's JSON).
    pub fn save(&self, path: &std::path::Path, extra: serde_json::Value) -> crate::Result<()> {
        let mut tensors = self.dino.named_tensors();
        let mut steps = serde_json::Map::new();
        for (name, m, v, t) in self.optimizer.state() {
            tensors.push((format!("optim.m.{name}"), m));
            tensors.push((format!("optim.v.{name}"), v));
            steps.insert(name, t.into());
        }
        tensors.push(("center".into(), self.loss.center.clone()));
        let rng = serde_json::json!({
            "seed": self.rng.get_seed().to_vec(),
            "stream": self.rng.get_stream(),
            "word_pos": self.rng.get_word_pos().to_string(),
        });
        let meta = serde_json::json!({
            "format": "dino_rs.trainer", "version": 1, "vit": self.dino.vit, "head": self.dino.head,
            "dtype": crate::ops::autocast::dtype_name(self.dtype),
            "train": self.config, "iteration": self.iteration, "optim_steps": steps, "rng": rng, "extra": extra,
        });
        crate::checkpoint::save(path, &tensors, &meta)
    }

    /// A trainer saved by [`DinoTrainer::save`], and its `extra` JSON. `dtype` overrides the saved
    /// compute dtype (for the trainer and its model).
    pub fn load(
        path: &std::path::Path,
        device: &candle_core::Device,
        dtype: Option<DType>,
    ) -> crate::Result<(Self, serde_json::Value)> {
        use crate::error::Error;
        let bad = |m: String| Error::checkpoint(path, m);
        let (mut tensors, meta) = crate::checkpoint::load(path)?;
        if meta["format"] != "dino_rs.trainer" {
            return Err(bad("not a dino_rs trainer checkpoint (saved by Trainer.save)".into()));
        }
        let config: TrainConfig = serde_json::from_value(meta["train"].clone()).map_err(|e| bad(e.to_string()))?;
        config
            .validate()
            .map_err(|e| bad(format!("invalid training configuration: {e}")))?;
        let center = tensors
            .remove("center")
            .ok_or_else(|| bad("the centre is missing".into()))?;
        let mut optim = Vec::new();
        let steps = meta["optim_steps"].as_object().cloned().unwrap_or_default();
        for (name, t) in steps {
            let m = tensors
                .remove(&format!("optim.m.{name}"))
                .ok_or_else(|| bad(format!("optimiser state of {name} missing")))?;
            let v = tensors
                .remove(&format!("optim.v.{name}"))
                .ok_or_else(|| bad(format!("optimiser state of {name} missing")))?;
            optim.push((
                name,
                m.to_device(device)?,
                v.to_device(device)?,
                t.as_u64().unwrap_or(0),
            ));
        }
        // Checkpoints from before mixed precision have no dtype: they trained in f32.
        let saved = match meta["dtype"].as_str() {
            None => DType::F32,
            Some(name) => {
                crate::ops::autocast::parse_dtype(name).ok_or_else(|| bad(format!("unknown compute dtype {name:?}")))?
            }
        };
        let dtype = dtype.unwrap_or(saved);
        let mut dino = crate::dino::Dino::from_saved(path, tensors, &meta, device)?;
        dino.dtype = dtype;
        let dino = Arc::new(dino);
        let mut trainer = Self::new(dino, config, 0)?;
        trainer.optimizer.load_state(optim).map_err(|e| bad(e.to_string()))?;
        if center.shape() != trainer.loss.center.shape() {
            return Err(bad(format!(
                "centre has shape {:?}, expected {:?}",
                center.dims(),
                trainer.loss.center.dims()
            )));
        }
        trainer.loss.center = center.to_device(device)?;
        trainer.iteration = meta["iteration"]
            .as_u64()
            .ok_or_else(|| bad("iteration missing".into()))? as usize;
        let seed: Vec<u8> = serde_json::from_value(meta["rng"]["seed"].clone()).map_err(|e| bad(e.to_string()))?;
        let seed: [u8; 32] = seed.try_into().map_err(|_| bad("bad RNG state".into()))?;
        trainer.rng = ChaCha8Rng::from_seed(seed);
        trainer.rng.set_stream(meta["rng"]["stream"].as_u64().unwrap_or(0));
        let pos: u128 = meta["rng"]["word_pos"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad RNG state".into()))?;
        trainer.rng.set_word_pos(pos);
        Ok((trainer, meta["extra"].clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::head::HeadConfig;
    use crate::model::vit::VitConfig;
    use candle_core::Device;

    /// `compute` takes the last layer's weight and each block's packed parameters as leaves and
    /// derives the parameters' gradients after the backward pass: they must be those of the graph
    /// through the weight norm and the packing, bit for bit.
    #[test]
    fn leaf_gradients_are_those_through_the_graph() -> Result<()> {
        for (norm_last_layer, dtype) in [(false, DType::F32), (true, DType::F32), (false, DType::BF16)] {
            let mut vit = VitConfig::custom(32, 2, 2, 4, 16);
            vit.drop_path_rate = 0.1;
            let head = HeadConfig {
                in_dim: 32,
                out_dim: 96,
                hidden_dim: 48,
                bottleneck_dim: 16,
                nlayers: 3,
                norm_last_layer,
                init: Default::default(),
            };
            let mut dino = Dino::new(vit, Some(head), 3, None, &Device::Cpu).map_err(candle_core::Error::wrap)?;
            dino.dtype = dtype;
            let config = TrainConfig {
                clip_grad: 0.0,
                batch_size: 2,
                n_local: 2,
                epochs: 2,
                niter_per_ep: 2,
                ..TrainConfig::default()
            };
            let mut trainer = DinoTrainer::new(Arc::new(dino), config, 5)?;
            let globals = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &Device::Cpu)?;
            let locals = Tensor::randn(0f32, 1.0, (4, 3, 8, 8), &Device::Cpu)?;
            let mut rng = trainer.rng.clone();
            let computed = match trainer.compute(&globals, Some(&locals))? {
                Ok(c) => c,
                Err(e) => candle_core::bail!("non-finite loss {e:?}"),
            };
            // The same step with the weight norm inside the graph (the head's plain forward).
            let student = &trainer.dino.student;
            let out =
                crate::ops::autocast::autocast(dtype, || student.forward_t(&[&globals, &locals], Some(&mut rng)))?
                    .to_dtype(DType::F32)?;
            let grads = trainer.loss.loss(&out, &computed.teacher_out, 0)?.backward()?;
            let head = student.head.as_ref().expect("a head");
            let mut checked = 0;
            for (name, var) in trainer.dino.trainable() {
                let want = grads.get(var.as_tensor()).expect("a gradient");
                let got = &computed.grads[&name];
                let diff = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert_eq!(diff, 0.0, "{name} ({dtype:?}, norm_last_layer {norm_last_layer})");
                let id = var.as_tensor().id();
                checked += usize::from(id == head.weight_v().id() || id == head.weight_g().id());
            }
            assert_eq!(checked, if norm_last_layer { 1 } else { 2 });
        }
        Ok(())
    }
}
