//! `dino_rs.ImageFolder`, `dino_rs.ArrayDataset` and `dino_rs.MultiCropLoader`.

use std::ffi::CString;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use numpy::{IntoPyArray, PyArrayDyn, PyUntypedArray};
use pyo3::exceptions::{PyIndexError, PyStopIteration, PyTypeError, PyUserWarning, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::augment::PyMultiCropAugmenter;
use super::numpy::{f32_array, shape_str, u8_array, u8_image_array};
use crate::config::DEFAULT_MAX_PIXELS;
use crate::data::loader::Next;
use crate::data::{ArrayDataset, Dataset, EpochIter, ImageFolder, LoaderConfig, MultiCropLoader};

fn check_index(index: isize, len: usize) -> PyResult<usize> {
    let i = if index < 0 { index + len as isize } else { index };
    if i < 0 || i as usize >= len {
        return Err(PyIndexError::new_err(format!(
            "index {index} out of range for a dataset of {len} images"
        )));
    }
    Ok(i as usize)
}

/// `(image uint8 (H, W, 3), label)` of item `index`, decoded off the GIL.
fn get_item<'py>(py: Python<'py>, ds: Arc<dyn Dataset>, index: isize) -> PyResult<Bound<'py, PyTuple>> {
    let i = check_index(index, ds.len())?;
    let label = ds.label(i);
    let img = py.detach(move || ds.load(i))?;
    (u8_image_array(py, img)?, label).into_pyobject(py)
}

/// Every image file under `root`, recursively (jpg, jpeg, png, bmp, webp, tif, tiff, gif).
///
/// Classes are the sorted first-level subfolders (torchvision's convention); images directly under
/// `root` are unlabelled (label -1). Items are `(uint8 (H, W, 3), label)`; files larger than
/// `max_pixels` raise `dino_rs.ImageError` when read.
#[pyclass(name = "ImageFolder", module = "dino_rs", frozen)]
pub struct PyImageFolder {
    pub inner: Arc<ImageFolder>,
}

#[pymethods]
impl PyImageFolder {
    #[new]
    #[pyo3(signature = (root, max_pixels=DEFAULT_MAX_PIXELS))]
    fn new(py: Python<'_>, root: std::path::PathBuf, max_pixels: u64) -> PyResult<Self> {
        let inner = py.detach(move || ImageFolder::new(root, max_pixels))?;
        Ok(Self { inner: Arc::new(inner) })
    }
    #[getter]
    fn root(&self) -> String {
        self.inner.root().to_string_lossy().into_owned()
    }
    #[getter]
    fn paths(&self) -> Vec<String> {
        self.inner
            .paths()
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    }
    #[getter]
    fn labels<'py>(&self, py: Python<'py>) -> Bound<'py, numpy::PyArray1<i64>> {
        self.inner.labels().to_vec().into_pyarray(py)
    }
    #[getter]
    fn classes(&self) -> Vec<String> {
        self.inner.classes().to_vec()
    }
    fn __len__(&self) -> usize {
        self.inner.len()
    }
    fn __getitem__<'py>(&self, py: Python<'py>, index: isize) -> PyResult<Bound<'py, PyTuple>> {
        get_item(py, self.inner.clone(), index)
    }
    fn __repr__(&self) -> String {
        format!(
            "ImageFolder(root={:?}, images={}, classes={})",
            self.inner.root(),
            self.inner.len(),
            self.inner.classes().len()
        )
    }
}

/// Images already in memory: a uint8 array (N, H, W) or (N, H, W, 3), with optional labels.
#[pyclass(name = "ArrayDataset", module = "dino_rs", frozen)]
pub struct PyArrayDataset {
    pub inner: Arc<ArrayDataset>,
}

fn array_dataset(images: &Bound<'_, PyAny>, labels: Option<Vec<i64>>) -> PyResult<ArrayDataset> {
    let arr = images.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err("ArrayDataset expects a uint8 numpy array of shape (N, H, W) or (N, H, W, 3)")
    })?;
    // One copy of the block as given: grey stays one channel and is expanded per image on load.
    let (data, shape) = u8_array(arr, "images")?;
    let (n, h, w, c) = match shape.as_slice() {
        [n, h, w] => (*n, *h, *w, 1),
        [n, h, w, c] if *c == 1 || *c == 3 => (*n, *h, *w, *c),
        _ => {
            return Err(PyValueError::new_err(format!(
                "ArrayDataset expects images of shape (N, H, W) or (N, H, W, 3), got {}",
                shape_str(&shape)
            )))
        }
    };
    Ok(ArrayDataset::new(data, [n, h, w, c], labels)?)
}

#[pymethods]
impl PyArrayDataset {
    #[new]
    #[pyo3(signature = (images, labels=None))]
    fn new(images: &Bound<'_, PyAny>, labels: Option<Vec<i64>>) -> PyResult<Self> {
        Ok(Self {
            inner: Arc::new(array_dataset(images, labels)?),
        })
    }
    #[getter]
    fn labels<'py>(&self, py: Python<'py>) -> Option<Bound<'py, numpy::PyArray1<i64>>> {
        self.inner.labels().map(|l| l.to_vec().into_pyarray(py))
    }
    /// (N, H, W, 3): items are served as RGB whatever the stored channel count.
    #[getter]
    fn shape(&self) -> (usize, usize, usize, usize) {
        let [n, h, w, _] = self.inner.shape();
        (n, h, w, 3)
    }
    fn __len__(&self) -> usize {
        self.inner.len()
    }
    fn __getitem__<'py>(&self, py: Python<'py>, index: isize) -> PyResult<Bound<'py, PyTuple>> {
        get_item(py, self.inner.clone(), index)
    }
    fn __repr__(&self) -> String {
        let [n, h, w, _] = self.inner.shape();
        format!(
            "ArrayDataset(images={n}, size={h}x{w}, labelled={})",
            self.inner.labels().is_some()
        )
    }
}

/// The dataset argument of the loader: one of ours, or a uint8 array wrapped as an ArrayDataset.
pub(crate) fn dataset_of(obj: &Bound<'_, PyAny>) -> PyResult<Arc<dyn Dataset>> {
    if let Ok(f) = obj.cast::<PyImageFolder>() {
        return Ok(f.get().inner.clone());
    }
    if let Ok(a) = obj.cast::<PyArrayDataset>() {
        return Ok(a.get().inner.clone());
    }
    if obj.cast::<PyUntypedArray>().is_ok() {
        return Ok(Arc::new(array_dataset(obj, None)?));
    }
    Err(PyTypeError::new_err(format!(
        "dataset must be a dino_rs.ImageFolder, dino_rs.ArrayDataset or a uint8 numpy array, got {}",
        obj.get_type().name()?
    )))
}

/// Batches of multi-crop views: decoding and augmentation on native threads, `prefetch` batches ahead.
///
/// Iterating yields `(globals (2, B, 3, G, G), locals (n_local, B, 3, L, L))` float32 arrays. Each
/// `iter()` starts a new epoch (a fresh shuffle from `seed` and the epoch number; set `epoch` to
/// resume). `on_error="skip"` skips unreadable images and warns once per epoch with the count;
/// `"raise"` raises `dino_rs.ImageError` naming the file. Breaking out of the loop, deleting the
/// iterator or Ctrl-C stops the background work.
#[pyclass(name = "MultiCropLoader", module = "dino_rs")]
pub struct PyMultiCropLoader {
    pub(crate) inner: MultiCropLoader,
    dataset: Py<PyAny>,
    augmenter: Py<PyMultiCropAugmenter>,
    epoch: u64,
}

#[pymethods]
impl PyMultiCropLoader {
    #[new]
    #[pyo3(signature = (dataset, augmenter, batch_size=64, shuffle=true, drop_last=true, seed=0, prefetch=4, on_error="raise"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        dataset: &Bound<'_, PyAny>,
        augmenter: Bound<'_, PyMultiCropAugmenter>,
        batch_size: usize,
        shuffle: bool,
        drop_last: bool,
        seed: u64,
        prefetch: usize,
        on_error: &str,
    ) -> PyResult<Self> {
        let skip_errors = match on_error {
            "raise" => false,
            "skip" => true,
            other => {
                return Err(PyValueError::new_err(format!(
                    "on_error must be 'raise' or 'skip', got {other:?}"
                )))
            }
        };
        let ds = dataset_of(dataset)?;
        let config = LoaderConfig {
            batch_size,
            shuffle,
            drop_last,
            seed,
            prefetch,
            skip_errors,
        };
        let inner = MultiCropLoader::new(ds, augmenter.get().inner.clone(), config)?;
        Ok(Self {
            inner,
            dataset: dataset.clone().unbind(),
            augmenter: augmenter.unbind(),
            epoch: 0,
        })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Starts the next epoch: a fresh shuffle and fresh augmentation draws.
    fn __iter__(&mut self) -> LoaderIterator {
        let it = self.inner.iter_epoch(self.epoch);
        self.epoch += 1;
        let c = self.inner.augmenter().config();
        LoaderIterator {
            inner: Mutex::new(Some(it)),
            n_local: c.n_local,
            global_size: c.global_size as usize,
            local_size: c.local_size as usize,
        }
    }

    /// The epoch the next `iter()` produces (set it to resume a run).
    #[getter]
    fn get_epoch(&self) -> u64 {
        self.epoch
    }
    #[setter]
    fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }
    #[getter]
    fn batch_size(&self) -> usize {
        self.inner.config().batch_size
    }
    #[getter]
    fn dataset(&self, py: Python<'_>) -> Py<PyAny> {
        self.dataset.clone_ref(py)
    }
    #[getter]
    fn augmenter(&self, py: Python<'_>) -> Py<PyMultiCropAugmenter> {
        self.augmenter.clone_ref(py)
    }
    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "MultiCropLoader(images={}, batch_size={}, shuffle={}, drop_last={}, batches={})",
            self.inner.dataset().len(),
            c.batch_size,
            c.shuffle,
            c.drop_last,
            self.inner.len()
        )
    }
}

/// One epoch's batches. Waits off the GIL in short slices so Ctrl-C is seen promptly.
#[pyclass(name = "_LoaderIterator", module = "dino_rs")]
pub struct LoaderIterator {
    inner: Mutex<Option<EpochIter>>,
    n_local: usize,
    global_size: usize,
    local_size: usize,
}

impl LoaderIterator {
    fn finish(&self) -> Option<EpochIter> {
        let mut it = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        it.finish();
        Some(it)
    }
}

#[pymethods]
impl LoaderIterator {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        loop {
            let next = py.detach(|| {
                let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                match guard.as_mut() {
                    Some(it) => it.next_timeout(Duration::from_millis(50)),
                    None => Next::Done,
                }
            });
            match next {
                Next::Pending => {
                    if let Err(e) = py.check_signals() {
                        py.detach(|| self.finish());
                        return Err(e);
                    }
                }
                Next::Batch(Ok(batch)) => return self.to_arrays(py, batch),
                Next::Batch(Err(e)) => {
                    py.detach(|| self.finish());
                    return Err(e.into());
                }
                Next::Done => {
                    if let Some(it) = py.detach(|| self.finish()) {
                        let skipped = it.skipped();
                        if skipped.count() > 0 {
                            let msg = format!(
                                "MultiCropLoader skipped {} unreadable image(s) this epoch; first: {}",
                                skipped.count(),
                                skipped.first().unwrap_or_default()
                            );
                            let msg = CString::new(msg.replace('\0', " ")).expect("NULs replaced");
                            PyErr::warn(py, &py.get_type::<PyUserWarning>(), &msg, 1)?;
                        }
                    }
                    return Err(PyStopIteration::new_err(()));
                }
            }
        }
    }

    /// Stops the background work now (also happens when the iterator is garbage-collected).
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.finish());
    }
}

impl LoaderIterator {
    fn to_arrays<'py>(&self, py: Python<'py>, batch: crate::data::Batch) -> PyResult<Bound<'py, PyTuple>> {
        let (b, g, l) = (batch.len(), self.global_size, self.local_size);
        let globals: Bound<'py, PyArrayDyn<f32>> = f32_array(py, batch.globals, &[2, b, 3, g, g])?;
        let locals = f32_array(py, batch.locals, &[self.n_local, b, 3, l, l])?;
        PyTuple::new(py, [globals, locals])
    }
}

impl Drop for LoaderIterator {
    fn drop(&mut self) {
        self.finish();
    }
}
