//! Rust errors to specific Python exceptions: bad files raise `dino_rs.ImageError` (an OSError
//! carrying `.filename`), bad arguments and shapes raise ValueError.

use pyo3::create_exception;
use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyPermissionError, PyValueError,
};
use pyo3::prelude::*;

use crate::error::Error;

create_exception!(
    dino_rs,
    ImageError,
    PyOSError,
    "A file could not be read as an image (corrupt, truncated, empty, unsupported or too large). `filename` names it."
);

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let message = err.to_string();
        match err {
            Error::Image { path, .. } => Python::attach(|py| {
                let e = ImageError::new_err(message);
                let _ = e
                    .value(py)
                    .setattr("filename", path.to_string_lossy().as_ref());
                e
            }),
            Error::Io { path, source } => {
                let args = (
                    source.raw_os_error().unwrap_or(0),
                    message,
                    path.to_string_lossy().into_owned(),
                );
                match source.kind() {
                    std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(args),
                    std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(args),
                    _ => PyOSError::new_err(args),
                }
            }
            Error::InvalidArgument(_) | Error::Shape(_) => PyValueError::new_err(message),
            Error::Cancelled => PyKeyboardInterrupt::new_err("cancelled"),
        }
    }
}
