//! `dino_rs.MultiCropAugmenter`.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use rand::Rng;
use rayon::prelude::*;

use super::numpy::{batch_inputs, f32_array, image_input, ImageInput};
use crate::augment::{MultiCropAugmenter, ViewKind};
use crate::config::{AugmentConfig, DEFAULT_MAX_PIXELS, IMAGENET_MEAN, IMAGENET_STD};
use crate::error::Result;
use crate::parallel;

/// A fresh seed when the caller gave none.
pub fn seed_or_random(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| rand::rng().random())
}

/// Decodes `inputs` on the dino_rs pool (in order; the first failure wins).
pub fn decode_all(inputs: Vec<ImageInput>, max_pixels: u64) -> Result<Vec<image::RgbImage>> {
    parallel::install(|| inputs.into_par_iter().map(|i| i.load(max_pixels)).collect())
}

/// DINO's multi-crop augmentation (DataAugmentationDINO), every knob a parameter, official defaults.
///
/// Two global views (`global_size` px, area `global_scale`) and `n_local` local views (`local_size`
/// px, area `local_scale`). Each: RandomResizedCrop (bicubic, aspect `ratio`), horizontal flip
/// (`flip_p`), ColorJitter(`brightness`, `contrast`, `saturation`, `hue`) with `color_jitter_p`,
/// grayscale (`grayscale_p`), Gaussian blur with sigma in `blur_sigma` and probability
/// `blur_p` = (global 1, global 2, locals), solarize (`solarize_p`, global 2 only), then
/// normalisation with `mean`/`std` to float32 (3, S, S). Files above `max_pixels` are refused.
///
/// Call it on one image (uint8 array or path) for a list of views, or use `batch`.
/// A `seed` makes the output byte-identical whatever the thread count.
#[pyclass(name = "MultiCropAugmenter", module = "dino_rs", frozen)]
pub struct PyMultiCropAugmenter {
    pub inner: Arc<MultiCropAugmenter>,
}

#[pymethods]
impl PyMultiCropAugmenter {
    #[new]
    #[pyo3(signature = (
        global_size=224, local_size=96, n_local=8, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
        flip_p=0.5, color_jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
        grayscale_p=0.2, blur_p=(1.0, 0.1, 0.5), blur_sigma=(0.1, 2.0), solarize_p=0.2,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, ratio=(3.0 / 4.0, 4.0 / 3.0), max_pixels=DEFAULT_MAX_PIXELS
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        global_size: u32,
        local_size: u32,
        n_local: usize,
        global_scale: (f32, f32),
        local_scale: (f32, f32),
        flip_p: f32,
        color_jitter_p: f32,
        brightness: f32,
        contrast: f32,
        saturation: f32,
        hue: f32,
        grayscale_p: f32,
        blur_p: (f32, f32, f32),
        blur_sigma: (f32, f32),
        solarize_p: f32,
        mean: [f32; 3],
        std: [f32; 3],
        ratio: (f32, f32),
        max_pixels: u64,
    ) -> PyResult<Self> {
        let config = AugmentConfig {
            global_size,
            local_size,
            n_local,
            global_scale,
            local_scale,
            ratio,
            flip_p,
            color_jitter_p,
            brightness,
            contrast,
            saturation,
            hue,
            grayscale_p,
            blur_p,
            blur_sigma,
            solarize_p,
            mean,
            std,
            max_pixels,
        };
        Ok(Self {
            inner: Arc::new(MultiCropAugmenter::new(config)?),
        })
    }

    /// The 2 + n_local views of one image (uint8 array or path), globals first, each float32 (3, S, S).
    #[pyo3(signature = (image, seed=None))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
        seed: Option<u64>,
    ) -> PyResult<Bound<'py, PyList>> {
        let input = image_input(image)?;
        let seed = seed_or_random(seed);
        let aug = self.inner.clone();
        let max_pixels = aug.config().max_pixels;
        let views = py.detach(move || -> Result<Vec<Vec<f32>>> {
            let img = input.load(max_pixels)?;
            Ok(parallel::install(|| aug.views(&img, seed, 0)))
        })?;
        let arrays = views
            .into_iter()
            .enumerate()
            .map(|(v, data)| {
                let s = self.inner.size(MultiCropAugmenter::kind(v)) as usize;
                f32_array(py, data, &[3, s, s])
            })
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, arrays)
    }

    /// Augments a batch: returns (globals (2, B, 3, G, G), locals (n_local, B, 3, L, L)) float32.
    #[pyo3(signature = (images, seed=None))]
    fn batch<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        seed: Option<u64>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let inputs = batch_inputs(images)?;
        let b = inputs.len();
        let seed = seed_or_random(seed);
        let aug = self.inner.clone();
        let (globals, locals) = py.detach(move || -> Result<(Vec<f32>, Vec<f32>)> {
            let imgs = decode_all(inputs, aug.config().max_pixels)?;
            let refs: Vec<&image::RgbImage> = imgs.iter().collect();
            let keys: Vec<u64> = (0..b as u64).collect();
            Ok(parallel::install(|| aug.batch(&refs, seed, &keys)))
        })?;
        let (g, l) = (
            self.inner.size(ViewKind::Global1) as usize,
            self.inner.size(ViewKind::Local) as usize,
        );
        let globals = f32_array(py, globals, &[2, b, 3, g, g])?;
        let locals = f32_array(py, locals, &[self.inner.config().n_local, b, 3, l, l])?;
        PyTuple::new(py, [globals, locals])
    }

    /// The constructor arguments, so an equal augmenter can be rebuilt with `MultiCropAugmenter(**params)`.
    fn get_params<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.inner.config();
        let d = PyDict::new(py);
        d.set_item("global_size", c.global_size)?;
        d.set_item("local_size", c.local_size)?;
        d.set_item("n_local", c.n_local)?;
        d.set_item("global_scale", c.global_scale)?;
        d.set_item("local_scale", c.local_scale)?;
        d.set_item("flip_p", c.flip_p)?;
        d.set_item("color_jitter_p", c.color_jitter_p)?;
        d.set_item("brightness", c.brightness)?;
        d.set_item("contrast", c.contrast)?;
        d.set_item("saturation", c.saturation)?;
        d.set_item("hue", c.hue)?;
        d.set_item("grayscale_p", c.grayscale_p)?;
        d.set_item("blur_p", c.blur_p)?;
        d.set_item("blur_sigma", c.blur_sigma)?;
        d.set_item("solarize_p", c.solarize_p)?;
        d.set_item("mean", c.mean.to_vec())?;
        d.set_item("std", c.std.to_vec())?;
        d.set_item("ratio", c.ratio)?;
        d.set_item("max_pixels", c.max_pixels)?;
        Ok(d)
    }

    #[getter]
    fn global_size(&self) -> u32 {
        self.inner.config().global_size
    }
    #[getter]
    fn local_size(&self) -> u32 {
        self.inner.config().local_size
    }
    #[getter]
    fn n_local(&self) -> usize {
        self.inner.config().n_local
    }
    #[getter]
    fn n_views(&self) -> usize {
        self.inner.n_views()
    }

    /// Pickle support: rebuilt from the same keyword arguments.
    fn __getnewargs_ex__<'py>(&self, py: Python<'py>) -> PyResult<((), Bound<'py, PyDict>)> {
        Ok(((), self.get_params(py)?))
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "MultiCropAugmenter(global_size={}, local_size={}, n_local={}, global_scale={:?}, local_scale={:?})",
            c.global_size, c.local_size, c.n_local, c.global_scale, c.local_scale
        )
    }
}
