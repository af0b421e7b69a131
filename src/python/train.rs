//! `dino_rs._Trainer`: the Rust side of `dino_rs.Trainer` (python/dino_rs/trainer.py adds the
//! progress bar, history and checkpoint cadence). Every step runs with the GIL released; Ctrl-C
//! is noticed at step boundaries, so the weights are always those of a completed step.

use std::sync::Arc;

use candle_core::Tensor;
use pyo3::exceptions::{PyFloatingPointError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::data::PyMultiCropLoader;
use super::model::{parse_device, parse_dtype, PyDino};
use super::numpy::{f32_tensor, shape_str};
use crate::error::{Error, Result};
use crate::train::{DinoTrainer, EpochHooks, NonFiniteLoss, Number, StepStats, TrainConfig};

#[pyclass(name = "_Trainer", module = "dino_rs")]
pub struct PyTrainer {
    inner: DinoTrainer,
    model: Py<PyDino>,
}

fn stats_dict<'py>(py: Python<'py>, s: &StepStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("iteration", s.iteration)?;
    d.set_item("epoch", s.epoch)?;
    d.set_item("loss", s.loss)?;
    d.set_item("lr", s.lr)?;
    d.set_item("wd", s.wd)?;
    d.set_item("momentum", s.momentum)?;
    d.set_item("teacher_temp", s.teacher_temp)?;
    d.set_item("teacher_entropy", s.teacher_entropy)?;
    d.set_item("teacher_student_kl", s.teacher_student_kl())?;
    d.set_item("teacher_max_prob", s.teacher_max_prob)?;
    for (phase, seconds) in &s.phases {
        d.set_item(format!("time_{phase}"), seconds)?;
    }
    Ok(d)
}

fn non_finite(e: NonFiniteLoss) -> PyErr {
    PyFloatingPointError::new_err(format!(
        "non-finite DINO loss ({}) at iteration {}; the step was not applied, the weights are those from before it \
         (lower the learning rate or check the inputs)",
        e.loss, e.iteration
    ))
}

/// Crops as (views·B, 3, S, S): accepts the loader's (views, B, 3, S, S) too.
fn crops(x: Tensor) -> Result<Tensor> {
    match x.rank() {
        5 => {
            let (v, b, c, h, w) = x.dims5()?;
            Ok(x.reshape((v * b, c, h, w))?)
        }
        4 => Ok(x),
        _ => Err(Error::Shape(format!(
            "crops must be (views, B, 3, S, S) or (views·B, 3, S, S), got {:?}",
            x.dims()
        ))),
    }
}

/// `x` as (views·B, 3, S, S) crops, and B, after checking that it holds `views` views of B ≥ 1
/// images (`batch` of them when given) with 3 channels, as `what` says in the error; the loss would
/// otherwise fail later with a row-count or matmul error that names none of the arguments.
fn views_of(x: Tensor, name: &str, views: usize, batch: Option<usize>, what: &str) -> Result<(Tensor, usize)> {
    let b = match *x.dims() {
        [v, b, 3, _, _] if v == views => b,
        [rows, 3, _, _] if rows % views == 0 => rows / views,
        _ => 0,
    };
    if b == 0 || batch.is_some_and(|want| want != b) {
        return Err(Error::Shape(format!(
            "{name} must be ({views}, B, 3, S, S) or ({views}·B, 3, S, S) crops: {what}, got {}",
            shape_str(x.dims())
        )));
    }
    Ok((crops(x)?, b))
}

impl PyTrainer {
    /// The crops `step` was given, checked against the trainer: 2 global views and `n_local` local
    /// views of the same B ≥ 1 images. With n_local = 0 an empty locals array counts as none.
    fn step_crops(&self, globals: Tensor, locals: Option<Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let n_local = self.inner.config.n_local;
        let (g, b) = views_of(
            globals,
            "globals",
            2,
            None,
            "2 global views of B ≥ 1 images, 3 channels each",
        )?;
        // Checked here, so that a caller's crop size is a ValueError like the other shape errors,
        // not a failure of the step (RuntimeError).
        let fits = |t: &Tensor| self.inner.dino.vit.check_crop(t.dims()[2], t.dims()[3]);
        fits(&g)?;
        match (locals.filter(|l| n_local > 0 || l.elem_count() > 0), n_local) {
            (None, 0) => Ok((g, None)),
            (None, n) => Err(Error::Shape(format!(
                "this trainer was built for n_local={n} local views per image: pass locals ({n}, B, 3, L, L) \
                 as well as globals"
            ))),
            (Some(l), 0) => Err(Error::Shape(format!(
                "this trainer was built for n_local=0 local views: pass no locals, got {}",
                shape_str(l.dims())
            ))),
            (Some(l), n) => {
                let what = format!("n_local={n} local views of the same B={b} images as globals, 3 channels each");
                let l = views_of(l, "locals", n, Some(b), &what)?.0;
                fits(&l)?;
                Ok((g, Some(l)))
            }
        }
    }
}

/// The Python side of an epoch: the step callback, and Ctrl-C noticed while waiting for the loader
/// and after every step (the GIL taken back for each).
struct PyHooks {
    callback: Option<Py<PyAny>>,
}

impl EpochHooks for PyHooks {
    type Error = PyErr;

    fn waiting(&mut self) -> PyResult<()> {
        Python::attach(|py| py.check_signals())
    }

    fn stepped(&mut self, stats: &StepStats) -> PyResult<()> {
        Python::attach(|py| {
            if let Some(cb) = &self.callback {
                cb.call1(py, (stats_dict(py, stats)?,))?;
            }
            py.check_signals()
        })
    }
}

impl From<NonFiniteLoss> for PyErr {
    fn from(e: NonFiniteLoss) -> PyErr {
        non_finite(e)
    }
}

#[pymethods]
impl PyTrainer {
    /// `config`: the recipe's options as `_train_config` returns them (checked again here, since
    /// a caller may pass any dict); the sizes come from the loader.
    #[new]
    #[pyo3(signature = (model, config, batch_size, niter_per_ep, n_local, dtype=None))]
    fn new(
        model: Bound<'_, PyDino>,
        config: &Bound<'_, PyDict>,
        batch_size: usize,
        niter_per_ep: usize,
        n_local: usize,
        dtype: Option<&str>,
    ) -> PyResult<Self> {
        let dtype = dtype.map(parse_dtype).transpose()?;
        let mut config = train_config(config)?;
        config.batch_size = batch_size;
        config.niter_per_ep = niter_per_ep;
        config.n_local = n_local;
        config.validate()?;
        let dino = model.get().inner.clone();
        if dino.head.is_none() {
            return Err(Error::invalid(crate::train::NO_HEAD).into());
        }
        let seed = model.get().seed;
        let mut inner = DinoTrainer::new(dino, config, seed).map_err(|e| PyErr::from(Error::from(e)))?;
        inner.dtype = dtype.unwrap_or(inner.dtype);
        Ok(Self {
            inner,
            model: model.unbind(),
        })
    }

    /// One iteration on globals (2, B, 3, G, G) and locals (n_local, B, 3, L, L) float32 crops.
    #[pyo3(signature = (globals, locals=None))]
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        globals: &Bound<'py, PyAny>,
        locals: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let dev = self.inner.dino.device.clone();
        let g = f32_tensor(globals, "globals", &dev)?;
        let l = locals.map(|l| f32_tensor(l, "locals", &dev)).transpose()?;
        let (g, l) = self.step_crops(g, l)?;
        let inner = &mut self.inner;
        let out = py
            .detach(move || inner.step(&g, l.as_ref()))
            .map_err(|e| PyErr::from(Error::from(e)))?;
        match out {
            Ok(stats) => stats_dict(py, &stats),
            Err(e) => Err(non_finite(e)),
        }
    }

    /// Trains one epoch on `loader` (epoch number `epoch` sets its shuffle). `callback(stats)` is
    /// called after every step. Returns the epoch's mean loss and last schedule values.
    #[pyo3(signature = (loader, epoch, callback=None))]
    fn train_epoch<'py>(
        &mut self,
        py: Python<'py>,
        loader: &Bound<'py, PyMultiCropLoader>,
        epoch: u64,
        callback: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let rust_loader = loader.borrow().inner.clone();
        let mut hooks = PyHooks {
            callback: callback.map(Bound::unbind),
        };
        let inner = &mut self.inner;
        // A GPU gets the crops as u8 (a quarter of the bytes to copy each step) and normalises
        // them itself; the CPU takes them normalised from the augmenter.
        let stats = py.detach(|| {
            if inner.dino.device.is_cpu() {
                inner.train_epoch::<f32, _>(&rust_loader, epoch, &mut hooks)
            } else {
                inner.train_epoch::<u8, _>(&rust_loader, epoch, &mut hooks)
            }
        })?;
        let d = PyDict::new(py);
        d.set_item("epoch", epoch)?;
        d.set_item("steps", stats.steps)?;
        d.set_item("loss", stats.loss)?;
        d.set_item("teacher_entropy", stats.teacher_entropy)?;
        d.set_item("teacher_student_kl", stats.teacher_student_kl)?;
        d.set_item("teacher_max_prob", stats.teacher_max_prob)?;
        if let Some(s) = stats.last {
            d.set_item("lr", s.lr)?;
            d.set_item("wd", s.wd)?;
            d.set_item("momentum", s.momentum)?;
            d.set_item("teacher_temp", s.teacher_temp)?;
        }
        for (phase, mean) in stats.phases {
            d.set_item(format!("time_{phase}"), mean)?;
        }
        d.set_item("seconds", stats.seconds)?;
        Ok(d)
    }

    /// Writes a resumable checkpoint; `extra` is a JSON string stored with it.
    #[pyo3(signature = (path, extra="{}"))]
    fn save(&self, py: Python<'_>, path: std::path::PathBuf, extra: &str) -> PyResult<()> {
        let extra: serde_json::Value = serde_json::from_str(extra).map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(py.detach(|| self.inner.save(&path, extra))?)
    }

    /// Loads a checkpoint written by `save`: returns (trainer, model, extra JSON string).
    #[staticmethod]
    #[pyo3(signature = (path, device="auto", dtype=None))]
    fn load(
        py: Python<'_>,
        path: std::path::PathBuf,
        device: &str,
        dtype: Option<&str>,
    ) -> PyResult<(Self, Py<PyDino>, String)> {
        let (device, dtype) = (parse_device(device)?, dtype.map(parse_dtype).transpose()?);
        let (inner, extra) = py.detach(|| DinoTrainer::load(&path, &device, dtype))?;
        let model = Py::new(
            py,
            PyDino {
                inner: Arc::clone(&inner.dino),
                seed: 0,
            },
        )?;
        Ok((
            Self {
                inner,
                model: model.clone_ref(py),
            },
            model,
            extra.to_string(),
        ))
    }

    #[getter]
    fn iteration(&self) -> usize {
        self.inner.iteration
    }
    /// The compute dtype of the training forward passes ("float32" or "bfloat16").
    #[getter]
    fn dtype(&self) -> &'static str {
        crate::ops::autocast::dtype_name(self.inner.dtype)
    }
    /// Whether steps are profiled: each step's dict then has `time_<phase>` (seconds, with the
    /// device synchronised at every phase boundary) and `train_epoch`'s dict their means.
    #[getter]
    fn get_profile(&self) -> bool {
        self.inner.profile
    }
    #[setter]
    fn set_profile(&mut self, on: bool) {
        self.inner.profile = on;
    }
    #[getter]
    fn niter_per_ep(&self) -> usize {
        self.inner.config.niter_per_ep
    }
    #[getter]
    fn model(&self, py: Python<'_>) -> Py<PyDino> {
        self.model.clone_ref(py)
    }
    /// The training recipe as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let json = serde_json::to_string(&self.inner.config).map_err(|e| PyValueError::new_err(e.to_string()))?;
        py.import("json")?.call_method1("loads", (json,))
    }
}

/// A dict of recipe options as the core takes them: ints and floats (not bools), by name.
fn recipe_overrides(d: &Bound<'_, PyDict>) -> PyResult<Vec<(String, Number)>> {
    d.iter()
        .map(|(k, v)| {
            let name: String = k
                .extract()
                .map_err(|_| PyValueError::new_err(format!("training option names must be strings, got {k}")))?;
            let value = if v.is_instance_of::<pyo3::types::PyBool>() {
                None
            } else if v.is_instance_of::<pyo3::types::PyInt>() {
                Some(Number::Int(v.extract().map_err(|_| {
                    PyValueError::new_err(format!("{name} is out of range: {v}"))
                })?))
            } else {
                v.extract::<f64>().ok().map(Number::Float)
            };
            let value = value.ok_or_else(|| {
                PyValueError::new_err(format!(
                    "{name} must be a number, got {}",
                    v.get_type().name().map(|n| n.to_string()).unwrap_or_default()
                ))
            })?;
            Ok((name, value))
        })
        .collect()
}

/// `config` from `overrides`.
fn train_config(d: &Bound<'_, PyDict>) -> PyResult<TrainConfig> {
    let overrides = recipe_overrides(d)?;
    Ok(TrainConfig::from_overrides(
        overrides.iter().map(|(n, v)| (n.as_str(), *v)),
    )?)
}

/// The training recipe: the official defaults (src/train.rs) with `overrides` put over them,
/// checked, as a dict of every recipe option. `dino_rs.TrainConfig` is built on it.
#[pyfunction]
pub fn _train_config<'py>(py: Python<'py>, overrides: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
    let config = train_config(overrides)?;
    let out = PyDict::new(py);
    for (name, value) in config.recipe() {
        match value {
            Number::Int(i) => out.set_item(name, i)?,
            Number::Float(f) => out.set_item(name, f)?,
        }
    }
    Ok(out)
}
