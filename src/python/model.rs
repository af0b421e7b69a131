//! `dino_rs.DINO`, `dino_rs.load_backbone`, `dino_rs.DINOLoss` and `dino_rs.cosine_scheduler`.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use numpy::PyArrayDyn;
use pyo3::exceptions::{PyFloatingPointError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use rayon::prelude::*;

use super::data::{dataset_of, PyArrayDataset, PyImageFolder};
use super::numpy::{batch_inputs, f32_array, f32_tensor, ImageInput};
use crate::augment::eval::EvalTransform;
use crate::config::{DEFAULT_MAX_PIXELS, IMAGENET_MEAN, IMAGENET_STD};
use crate::dino::{Dino, Features};
use crate::error::{Error, Result};
use crate::model::layout::Layout;
use crate::model::linear::LinearInit;
use crate::model::{HeadConfig, VitConfig};
use crate::parallel;

/// "cpu", "cuda", "cuda:N" or "auto" (CUDA when this build has it and a device opens).
pub fn parse_device(device: &str) -> PyResult<Device> {
    let cuda_index = match device {
        "cpu" => return Ok(Device::Cpu),
        "auto" => {
            #[cfg(feature = "cuda")]
            if let Ok(d) = crate::device::cuda(0) {
                return Ok(d);
            }
            return Ok(Device::Cpu);
        }
        "cuda" => 0,
        d if d.starts_with("cuda:") => d[5..].parse::<usize>().map_err(|_| {
            PyValueError::new_err(format!("device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {d:?}"))
        })?,
        d => {
            return Err(PyValueError::new_err(format!(
                "device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {d:?}"
            )))
        }
    };
    #[cfg(feature = "cuda")]
    {
        crate::device::cuda(cuda_index)
            .map_err(|e| PyRuntimeError::new_err(format!("cannot open CUDA device {cuda_index}: {e}")))
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(PyRuntimeError::new_err(format!(
            "device 'cuda:{cuda_index}' requested but this build of dino_rs has no CUDA support (build with the `cuda` feature)"
        )))
    }
}

/// "float32" or "bfloat16" (mixed precision: f32 weights, bf16 matmuls).
pub fn parse_dtype(dtype: &str) -> PyResult<DType> {
    crate::ops::autocast::parse_dtype(dtype)
        .ok_or_else(|| PyValueError::new_err(format!("dtype must be 'float32' or 'bfloat16', got {dtype:?}")))
}

fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        _ => "other".into(),
    }
}

/// A DINO model: a ViT student and its EMA teacher, each with a DINO head.
///
/// `arch` is "vit_tiny", "vit_small" or "vit_base" (the official presets); `embed_dim`, `depth`
/// and `num_heads` override the preset for a custom ViT. Weights are initialised from `seed`
/// (identical on every machine). Crops given to the methods are float32 (N, 3, H, W), already
/// normalised, with H and W multiples of `patch_size`. `dtype="bfloat16"` runs inference (and, by
/// default, training) in mixed precision: float32 weights, bfloat16 matmuls and attention,
/// LayerNorm and softmax in float32; outputs are float32. It is meant for GPUs (on the CPU it is
/// slower than float32).
#[pyclass(name = "DINO", module = "dino_rs", frozen)]
pub struct PyDino {
    pub inner: Arc<Dino>,
    pub seed: u64,
}

impl PyDino {
    fn eval_transform(&self) -> EvalTransform {
        EvalTransform::new(self.inner.vit.eval_size() as u32, IMAGENET_MEAN, IMAGENET_STD)
    }

    /// Features of images decoded and eval-transformed in chunks of `batch_size` (GIL released).
    /// Features of images `start..end` (one batch), eval transform included.
    fn embed_range(
        &self,
        load: &(dyn Fn(usize) -> Result<image::RgbImage> + Sync),
        start: usize,
        end: usize,
        kind: Features,
    ) -> Result<Vec<f32>> {
        let t = self.eval_transform();
        let s = t.size as usize;
        let mut pixels = vec![0f32; (end - start) * 3 * s * s];
        parallel::install(|| {
            pixels
                .par_chunks_mut(3 * s * s)
                .enumerate()
                .try_for_each(|(i, chunk)| -> Result<()> {
                    t.apply(&load(start + i)?, chunk);
                    Ok(())
                })
        })?;
        let crops = Tensor::from_vec(pixels, (end - start, 3, s, s), &self.inner.device)?;
        Ok(self
            .inner
            .features_of(&crops, true, kind)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// All `n` images batch by batch, the GIL released for each batch and taken back in between to
    /// update the progress bar and notice Ctrl-C.
    fn embed_images(
        &self,
        py: Python<'_>,
        load: &(dyn Fn(usize) -> Result<image::RgbImage> + Sync),
        n: usize,
        batch_size: usize,
        progress: Option<bool>,
        kind: Features,
    ) -> PyResult<Vec<f32>> {
        let bar = progress_bar(py, n, batch_size, progress)?;
        let mut out = Vec::with_capacity(n * self.inner.vit.embed_dim);
        let run = (|| -> PyResult<()> {
            for start in (0..n).step_by(batch_size) {
                let end = (start + batch_size).min(n);
                out.extend(py.detach(|| self.embed_range(load, start, end, kind))?);
                if let Some(b) = &bar {
                    b.call_method1("update", (end - start,))?;
                }
                py.check_signals()?;
            }
            Ok(())
        })();
        if let Some(b) = &bar {
            b.call_method0("close")?;
        }
        run.map(|()| out)
    }
}

/// `out` (computed from `crops`) as flat data and shape, refusing non-finite values: the crops were
/// checked finite on the way in, but finite crops far outside the normalised range overflow
/// float32 inside the network (so do non-finite weights), and NaN must not pass for a result.
fn finite_output(out: &Tensor, crops: &Tensor) -> PyResult<(Vec<f32>, Vec<usize>)> {
    let data = out
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(Error::from)?;
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        let crop = i / (data.len() / out.dims()[0]).max(1);
        let largest = crops
            .abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>())
            .map_err(Error::from)?;
        return Err(PyFloatingPointError::new_err(format!(
            "non-finite output for crops of shape {:?} (first at crop {crop}): the crops are finite, but their \
             largest |value| {largest:.1e} overflows float32 inside the model (crops are expected normalised, \
             mean 0 and std 1), or the model's weights are not finite",
            crops.dims()
        )));
    }
    Ok((data, out.dims().to_vec()))
}

/// A tqdm.auto bar for `n` images: always with `Some(true)`, never with `Some(false)`, and by
/// default when there are more than four batches. None when tqdm is not installed.
fn progress_bar<'py>(
    py: Python<'py>,
    n: usize,
    batch_size: usize,
    progress: Option<bool>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    if !progress.unwrap_or(n > 4 * batch_size) {
        return Ok(None);
    }
    let Ok(tqdm) = py.import("tqdm.auto") else {
        return Ok(None);
    };
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("total", n)?;
    kwargs.set_item("desc", "embed")?;
    kwargs.set_item("unit", "img")?;
    kwargs.set_item("leave", false)?;
    Ok(Some(tqdm.getattr("tqdm")?.call((), Some(&kwargs))?))
}

#[pymethods]
impl PyDino {
    #[new]
    #[pyo3(signature = (arch="vit_small", patch_size=16, img_size=224, out_dim=65536, hidden_dim=2048,
        bottleneck_dim=256, norm_last_layer=true, drop_path_rate=0.1, device="auto", seed=0,
        embed_dim=None, depth=None, num_heads=None, nlayers=3, dtype="float32", init="dino"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        arch: &str,
        patch_size: usize,
        img_size: usize,
        out_dim: usize,
        hidden_dim: usize,
        bottleneck_dim: usize,
        norm_last_layer: bool,
        drop_path_rate: f64,
        device: &str,
        seed: u64,
        embed_dim: Option<usize>,
        depth: Option<usize>,
        num_heads: Option<usize>,
        nlayers: usize,
        dtype: &str,
        init: &str,
    ) -> PyResult<Self> {
        let dtype = parse_dtype(dtype)?;
        let init = LinearInit::parse(init)
            .ok_or_else(|| PyValueError::new_err(format!("init must be 'dino' or 'torch', got {init:?}")))?;
        let mut vit = VitConfig::preset(arch, patch_size).ok_or_else(|| {
            PyValueError::new_err(format!(
                "arch must be 'vit_tiny', 'vit_small' or 'vit_base', got {arch:?}"
            ))
        })?;
        vit.img_size = img_size;
        vit.drop_path_rate = drop_path_rate;
        vit.embed_dim = embed_dim.unwrap_or(vit.embed_dim);
        vit.depth = depth.unwrap_or(vit.depth);
        vit.num_heads = num_heads.unwrap_or(vit.num_heads);
        vit.init = init;
        vit.validate()?;
        if out_dim == 0 || hidden_dim == 0 || bottleneck_dim == 0 || nlayers == 0 {
            return Err(PyValueError::new_err(
                "out_dim, hidden_dim, bottleneck_dim and nlayers must be positive",
            ));
        }
        let head = HeadConfig {
            in_dim: vit.embed_dim,
            out_dim,
            hidden_dim,
            bottleneck_dim,
            nlayers,
            norm_last_layer,
            init,
        };
        head.validate()?;
        let device = parse_device(device)?;
        let mut dino = py
            .detach(move || Dino::new(vit, Some(head), seed, None, &device))
            .map_err(Error::from)?;
        dino.dtype = dtype;
        Ok(Self {
            inner: Arc::new(dino),
            seed,
        })
    }

    /// Features of normalised float32 crops (N, 3, H, W); teacher by default. `features`: "cls"
    /// (N, embed_dim), "patch" (N, patches, embed_dim) or "cls+avgpool" (N, 2·embed_dim).
    #[pyo3(signature = (crops, teacher=true, batch_size=256, features="cls"))]
    fn forward_backbone<'py>(
        &self,
        py: Python<'py>,
        crops: &Bound<'py, PyAny>,
        teacher: bool,
        batch_size: usize,
        features: &str,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        if batch_size == 0 {
            return Err(PyValueError::new_err("batch_size must be at least 1"));
        }
        let kind = parse_features(features)?;
        let x = f32_tensor(crops, "crops", &self.inner.device)?;
        let input = x.clone();
        let dino = self.inner.clone();
        let out = py.detach(move || -> Result<Tensor> {
            let n = x.dims().first().copied().unwrap_or(0);
            if x.rank() != 4 {
                return Err(Error::Shape(format!("crops must be (N, 3, H, W), got {:?}", x.dims())));
            }
            let parts = (0..n)
                .step_by(batch_size.max(1))
                .map(|s| dino.features_of(&x.narrow(0, s, batch_size.min(n - s))?, teacher, kind))
                .collect::<Result<Vec<_>>>()?;
            if parts.is_empty() {
                return dino.features_of(&x, teacher, kind);
            }
            Ok(Tensor::cat(&parts, 0)?)
        })?;
        let (data, shape) = finite_output(&out, &input)?;
        f32_array(py, data, &shape)
    }

    /// Last-block CLS→patch attention (N, heads, H/p, W/p) of normalised crops.
    #[pyo3(signature = (crops, teacher=true))]
    fn attention<'py>(
        &self,
        py: Python<'py>,
        crops: &Bound<'py, PyAny>,
        teacher: bool,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let x = f32_tensor(crops, "crops", &self.inner.device)?;
        let input = x.clone();
        let dino = self.inner.clone();
        let out = py.detach(move || dino.attention(&x, teacher))?;
        let (data, shape) = finite_output(&out, &input)?;
        f32_array(py, data, &shape)
    }

    /// Teacher CLS features (N, embed_dim) with DINO's eval transform (resize to 256/224 of
    /// img_size, bicubic; centre crop; normalise). `images`: uint8 array batch, list of arrays or
    /// paths, an ImageFolder or an ArrayDataset. `progress`: a tqdm bar (True / False; default:
    /// when there are more than four batches and tqdm is installed). Ctrl-C stops between batches.
    #[pyo3(signature = (images, batch_size=128, progress=None, features="cls"))]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        batch_size: usize,
        progress: Option<bool>,
        features: &str,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        if batch_size == 0 {
            return Err(PyValueError::new_err("batch_size must be at least 1"));
        }
        let kind = parse_features(features)?;
        let size = self.inner.vit.eval_size();
        let (data, n) = if images.cast::<PyImageFolder>().is_ok() || images.cast::<PyArrayDataset>().is_ok() {
            let ds = dataset_of(images)?;
            let n = ds.len();
            (
                self.embed_images(py, &|i| ds.load(i), n, batch_size, progress, kind)?,
                n,
            )
        } else {
            let inputs: Vec<std::sync::Mutex<Option<ImageInput>>> = batch_inputs(images)?
                .into_iter()
                .map(|i| std::sync::Mutex::new(Some(i)))
                .collect();
            let n = inputs.len();
            let load = |i: usize| {
                let input = inputs[i]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .expect("each image is loaded once");
                input.load(DEFAULT_MAX_PIXELS)
            };
            (self.embed_images(py, &load, n, batch_size, progress, kind)?, n)
        };
        let mut shape = vec![n];
        shape.extend(kind.shape(&self.inner.vit, size, size));
        f32_array(py, data, &shape)
    }

    /// Saves student, teacher and configuration to a safetensors file.
    fn save(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        Ok(py.detach(|| self.inner.save(&path))?)
    }

    /// Loads a model written by `save` (or a Trainer checkpoint).
    #[staticmethod]
    #[pyo3(signature = (path, device="auto", dtype="float32"))]
    fn load(py: Python<'_>, path: std::path::PathBuf, device: &str, dtype: &str) -> PyResult<Self> {
        let (device, dtype) = (parse_device(device)?, parse_dtype(dtype)?);
        let mut dino = py.detach(|| Dino::load(&path, &device))?;
        dino.dtype = dtype;
        Ok(Self {
            inner: Arc::new(dino),
            seed: 0,
        })
    }

    /// Writes the teacher backbone as safetensors in a published key layout: "official"
    /// (facebookresearch's names, which timm's DINO models share), "timm", or "hf" (a folder
    /// with transformers' model.safetensors and config.json).
    #[pyo3(signature = (path, layout="official"))]
    fn export_backbone(&self, py: Python<'_>, path: std::path::PathBuf, layout: &str) -> PyResult<()> {
        let layout = Layout::parse(layout).ok_or_else(|| {
            PyValueError::new_err(format!("layout must be 'official', 'timm' or 'hf', got {layout:?}"))
        })?;
        Ok(py.detach(|| self.inner.export_backbone(&path, layout))?)
    }

    /// "dino" or "dinov2": which published family the backbone's architecture follows.
    #[getter]
    fn family(&self) -> &'static str {
        self.inner.vit.family.name()
    }

    /// DINOv2's register tokens (0 for DINO).
    #[getter]
    fn num_register_tokens(&self) -> usize {
        self.inner.vit.num_register_tokens
    }

    #[getter]
    fn embed_dim(&self) -> usize {
        self.inner.vit.embed_dim
    }
    #[getter]
    fn depth(&self) -> usize {
        self.inner.vit.depth
    }
    #[getter]
    fn num_heads(&self) -> usize {
        self.inner.vit.num_heads
    }
    #[getter]
    fn patch_size(&self) -> usize {
        self.inner.vit.patch_size
    }
    #[getter]
    fn img_size(&self) -> usize {
        self.inner.vit.img_size
    }
    #[getter]
    fn out_dim(&self) -> Option<usize> {
        self.inner.head.as_ref().map(|h| h.out_dim)
    }
    #[getter]
    fn device(&self) -> String {
        device_name(&self.inner.device)
    }
    /// The compute dtype of inference ("float32" or "bfloat16"); the weights are float32 either way.
    #[getter]
    fn dtype(&self) -> &'static str {
        crate::ops::autocast::dtype_name(self.inner.dtype)
    }
    /// The architecture as a dict (`vit` and `head` entries).
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let json = serde_json::json!({"vit": self.inner.vit, "head": self.inner.head}).to_string();
        py.import("json")?.call_method1("loads", (json,))
    }
    fn __repr__(&self) -> String {
        let v = &self.inner.vit;
        format!(
            "DINO(embed_dim={}, depth={}, num_heads={}, patch_size={}, img_size={}, out_dim={}, device={:?}, dtype={:?})",
            v.embed_dim,
            v.depth,
            v.num_heads,
            v.patch_size,
            v.img_size,
            self.out_dim().map_or("None".to_string(), |d| d.to_string()),
            self.device(),
            self.dtype()
        )
    }
}

/// A backbone from official DINO weights (a `.pth` state dict such as dino_deitsmall16_pretrain.pth,
/// a full training checkpoint, or safetensors with the same keys), read without torch. The
/// architecture is inferred from the shapes; `num_heads` defaults to embed_dim // 64. The model
/// can embed and show attention but has no head to train.
#[pyfunction]
#[pyo3(signature = (path, num_heads=None, device="auto", dtype="float32"))]
pub fn load_backbone(
    py: Python<'_>,
    path: std::path::PathBuf,
    num_heads: Option<usize>,
    device: &str,
    dtype: &str,
) -> PyResult<PyDino> {
    let (device, dtype) = (parse_device(device)?, parse_dtype(dtype)?);
    let mut dino = py.detach(|| Dino::load_backbone(&path, num_heads, &device))?;
    dino.dtype = dtype;
    Ok(PyDino {
        inner: Arc::new(dino),
        seed: 0,
    })
}

fn parse_features(name: &str) -> PyResult<Features> {
    Features::parse(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "features must be 'cls', 'patch' or 'cls+avgpool', got {name:?}"
        ))
    })
}
