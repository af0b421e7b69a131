//! NumPy at the boundary: image arguments in (uint8 arrays, paths, anything `np.asarray` takes),
//! float32 arrays out without copying the Rust buffers.

use std::path::PathBuf;

use image::RgbImage;
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};

use crate::data::array::rgb_from_pixels;
use crate::data::load_rgb;
use crate::error::{Error, Result};

/// An image argument before decoding: pixels already in memory, or a file to read off the GIL.
pub enum ImageInput {
    Pixels(RgbImage),
    Path(PathBuf),
}

impl ImageInput {
    pub fn load(self, max_pixels: u64) -> Result<RgbImage> {
        match self {
            ImageInput::Pixels(img) => Ok(img),
            ImageInput::Path(p) => load_rgb(&p, max_pixels),
        }
    }
}

/// A shape for messages: `(2, 3)`; one dimension as `(10)`.
pub(crate) fn shape_str(shape: &[usize]) -> String {
    format!(
        "({})",
        shape.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// Any object as an ndarray: arrays pass through, others (PIL images, lists) go via `np.asarray`.
fn as_ndarray<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyUntypedArray>> {
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        return Ok(arr.clone());
    }
    let converted = obj.py().import("numpy")?.call_method1("asarray", (obj,))?;
    converted
        .cast_into::<PyUntypedArray>()
        .map_err(|_| PyValueError::new_err("expected an image array, a path or a sequence of them"))
}

/// A uint8 array of `ndim` dimensions in C order (non-contiguous inputs are copied).
pub fn u8_array(arr: &Bound<'_, PyUntypedArray>, what: &str) -> PyResult<(Vec<u8>, Vec<usize>)> {
    let shape = arr.shape().to_vec();
    let dtype = arr.dtype();
    let typed = arr.cast::<PyArrayDyn<u8>>().map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be uint8 (0..255), got dtype {} with shape {}; convert with np.clip(x, 0, 255).astype(np.uint8)",
            dtype,
            shape_str(&shape)
        ))
    })?;
    let ro = typed.readonly();
    // as_slice also accepts Fortran-ordered memory; only C order can be copied as is.
    let data = match ro.as_slice() {
        Ok(s) if arr.is_c_contiguous() => s.to_vec(),
        _ => ro.as_array().iter().copied().collect(),
    };
    Ok((data, shape))
}

/// One image as an array: (H, W), (H, W, 1) or (H, W, 3) uint8.
pub fn image_from_array(arr: &Bound<'_, PyUntypedArray>) -> PyResult<RgbImage> {
    let (data, shape) = u8_array(arr, "image")?;
    let (h, w, c) = match shape.as_slice() {
        [h, w] => (*h, *w, 1),
        [h, w, c] if *c == 1 || *c == 3 => (*h, *w, *c),
        _ => {
            return Err(PyValueError::new_err(format!(
                "an image must have shape (H, W) or (H, W, 3), got {}",
                shape_str(&shape)
            )))
        }
    };
    Ok(rgb_from_pixels(&data, h, w, c)?)
}

fn path_of(obj: &Bound<'_, PyAny>) -> Option<PathBuf> {
    if obj.is_instance_of::<PyString>() || obj.hasattr("__fspath__").unwrap_or(false) {
        obj.extract::<PathBuf>().ok()
    } else {
        None
    }
}

/// One image argument: a path (str / os.PathLike) or pixels.
pub fn image_input(obj: &Bound<'_, PyAny>) -> PyResult<ImageInput> {
    if let Some(p) = path_of(obj) {
        return Ok(ImageInput::Path(p));
    }
    Ok(ImageInput::Pixels(image_from_array(&as_ndarray(obj)?)?))
}

/// A batch argument: a uint8 array (N, H, W) or (N, H, W, 3), or a sequence of images/paths.
pub fn batch_inputs(obj: &Bound<'_, PyAny>) -> PyResult<Vec<ImageInput>> {
    if path_of(obj).is_some() {
        return Err(PyValueError::new_err(
            "expected a batch of images (an array or a list), got a single path",
        ));
    }
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        let (data, shape) = u8_array(arr, "images")?;
        let (n, h, w, c) = match shape.as_slice() {
            [n, h, w] => (*n, *h, *w, 1),
            [n, h, w, c] if *c == 1 || *c == 3 => (*n, *h, *w, *c),
            _ => {
                return Err(PyValueError::new_err(format!(
                    "a batch array must have shape (N, H, W) or (N, H, W, 3), got {}",
                    shape_str(&shape)
                )))
            }
        };
        let size = h * w * c;
        return (0..n)
            .map(|i| {
                Ok(ImageInput::Pixels(rgb_from_pixels(
                    &data[i * size..(i + 1) * size],
                    h,
                    w,
                    c,
                )?))
            })
            .collect();
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() || obj.hasattr("__len__")? {
        return obj.try_iter()?.map(|item| image_input(&item?)).collect();
    }
    Err(PyValueError::new_err(format!(
        "expected a uint8 array (N, H, W[, 3]) or a sequence of images or paths, got {}",
        obj.get_type().name()?
    )))
}

/// A float32 array of `shape` owning `data` (no copy).
pub fn f32_array<'py>(py: Python<'py>, data: Vec<f32>, shape: &[usize]) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let arr = ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|e| PyErr::from(Error::Shape(e.to_string())))?;
    Ok(arr.into_pyarray(py))
}

pub fn u8_image_array<'py>(py: Python<'py>, img: RgbImage) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let shape = [img.height() as usize, img.width() as usize, 3];
    let arr =
        ArrayD::from_shape_vec(IxDyn(&shape), img.into_raw()).map_err(|e| PyErr::from(Error::Shape(e.to_string())))?;
    Ok(arr.into_pyarray(py))
}

/// A float32 array as a candle tensor on `device` (other float dtypes are refused by name).
pub fn f32_tensor(obj: &Bound<'_, PyAny>, what: &str, device: &candle_core::Device) -> PyResult<candle_core::Tensor> {
    let arr = as_ndarray(obj)?;
    let shape = arr.shape().to_vec();
    let typed = arr.cast::<PyArrayDyn<f32>>().map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be float32, got dtype {} with shape {}",
            arr.dtype(),
            shape_str(&shape)
        ))
    })?;
    let ro = typed.readonly();
    let gathered: Vec<f32>;
    // Read in place where the array is C-contiguous: no copy of its own before the upload.
    let data: &[f32] = match ro.as_slice() {
        Ok(s) if arr.is_c_contiguous() => s,
        _ => {
            gathered = ro.as_array().iter().copied().collect();
            &gathered
        }
    };
    // The NaN/inf check and the upload (on CUDA the staging copy) run without the GIL, so other
    // Python threads (a loader feeding the next batch) go on meanwhile. The array stays referenced
    // (`ro`), so it cannot be freed or resized; a Python thread that writes into it meanwhile races
    // with the read as it would with NumPy's own GIL-free copies.
    let py = obj.py();
    py.detach(|| crate::device::upload_f32(data, &shape, device, what))
        .map_err(PyErr::from)
}

/// A candle tensor as a float32 NumPy array.
pub fn tensor_array<'py>(py: Python<'py>, t: &candle_core::Tensor) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let shape = t.dims().to_vec();
    let data = t
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| PyErr::from(Error::from(e)))?;
    f32_array(py, data, &shape)
}
