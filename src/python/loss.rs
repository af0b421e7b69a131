//! `dino_rs.DINOLoss` and `dino_rs.cosine_scheduler`: the loss and schedules on NumPy arrays.

use candle_core::Device;
use numpy::{IntoPyArray, PyArray1, PyArrayDyn};
use pyo3::exceptions::{PyFloatingPointError, PyValueError};
use pyo3::prelude::*;

use super::numpy::{f32_tensor, tensor_array};
use crate::error::Error;
use crate::loss::DinoLoss;

/// The DINO loss with centring, on NumPy arrays: `loss(student_out (ncrops·B, D), teacher_out
/// (2·B, D), epoch)` returns the loss and updates `center` (1, D) as the official `DINOLoss` does.
#[pyclass(name = "DINOLoss", module = "dino_rs")]
pub struct PyDinoLoss {
    inner: DinoLoss,
}

#[pymethods]
impl PyDinoLoss {
    #[new]
    #[pyo3(signature = (out_dim, ncrops, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
        nepochs=100, student_temp=0.1, center_momentum=0.9, sinkhorn_iterations=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        out_dim: usize,
        ncrops: usize,
        warmup_teacher_temp: f64,
        teacher_temp: f64,
        warmup_teacher_temp_epochs: usize,
        nepochs: usize,
        student_temp: f64,
        center_momentum: f64,
        sinkhorn_iterations: usize,
    ) -> PyResult<Self> {
        for (name, v) in [
            ("warmup_teacher_temp", warmup_teacher_temp),
            ("teacher_temp", teacher_temp),
            ("student_temp", student_temp),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(PyValueError::new_err(format!("{name} must be positive, got {v}")));
            }
        }
        if sinkhorn_iterations > crate::loss::MAX_SINKHORN_ITERATIONS {
            return Err(PyValueError::new_err(format!(
                "sinkhorn_iterations must be at most {}, got {sinkhorn_iterations}",
                crate::loss::MAX_SINKHORN_ITERATIONS
            )));
        }
        if !(0.0..=1.0).contains(&center_momentum) || out_dim == 0 || nepochs == 0 {
            return Err(PyValueError::new_err(
                "center_momentum must be in [0, 1]; out_dim and nepochs positive",
            ));
        }
        let mut inner = DinoLoss::new(
            out_dim,
            ncrops,
            warmup_teacher_temp,
            teacher_temp,
            warmup_teacher_temp_epochs,
            nepochs,
            student_temp,
            center_momentum,
            &Device::Cpu,
        )
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
        inner.sinkhorn_iterations = sinkhorn_iterations;
        Ok(Self { inner })
    }

    fn __call__(
        &mut self,
        student_out: &Bound<'_, PyAny>,
        teacher_out: &Bound<'_, PyAny>,
        epoch: usize,
    ) -> PyResult<f64> {
        let s = f32_tensor(student_out, "student_out", &Device::Cpu)?;
        let t = f32_tensor(teacher_out, "teacher_out", &Device::Cpu)?;
        let d = self.inner.center.dim(1).map_err(Error::from)?;
        if s.rank() != 2 || t.rank() != 2 || s.dim(1).ok() != Some(d) || t.dim(1).ok() != Some(d) {
            return Err(PyValueError::new_err(format!(
                "student_out and teacher_out must be 2-D with {d} columns, got {:?} and {:?}",
                s.dims(),
                t.dims()
            )));
        }
        let loss = self
            .inner
            .loss(&s, &t, epoch)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let value = loss.to_scalar::<f32>().map_err(Error::from)? as f64;
        // Finite outputs can still overflow (logits / student_temp beyond float32): say so, as
        // Trainer.step does, rather than return NaN; the centre only moves after a finite loss.
        if !value.is_finite() {
            return Err(PyFloatingPointError::new_err(format!(
                "non-finite DINO loss ({value}) at epoch {epoch} from finite student_out {:?} and teacher_out {:?}; \
                 the centre was not updated (outputs this large overflow float32)",
                s.dims(),
                t.dims()
            )));
        }
        self.inner.update_center(&t).map_err(Error::from)?;
        Ok(value)
    }

    #[getter]
    fn center<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        tensor_array(py, &self.inner.center)
    }

    /// The teacher temperature at `epoch`.
    fn teacher_temp(&self, epoch: usize) -> f64 {
        self.inner.teacher_temp(epoch)
    }
}

/// The official `utils.cosine_scheduler`: one value per iteration, linear warm-up from
/// `start_warmup_value`, then a half cosine from `base_value` to `final_value`.
#[pyfunction]
#[pyo3(signature = (base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0))]
pub fn cosine_scheduler<'py>(
    py: Python<'py>,
    base_value: f64,
    final_value: f64,
    epochs: usize,
    niter_per_ep: usize,
    warmup_epochs: usize,
    start_warmup_value: f64,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    if warmup_epochs > epochs {
        return Err(PyValueError::new_err(format!(
            "warmup_epochs ({warmup_epochs}) exceeds epochs ({epochs})"
        )));
    }
    Ok(crate::schedule::cosine_scheduler(
        base_value,
        final_value,
        epochs,
        niter_per_ep,
        warmup_epochs,
        start_warmup_value,
    )
    .into_pyarray(py))
}
