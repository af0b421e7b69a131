//! Rust errors to specific Python exceptions: bad files raise `dino_rs.ImageError` (an OSError
//! carrying `.filename`), other file-system errors OSError with the filename, bad arguments and
//! shapes ValueError, a device out of memory MemoryError, other device and tensor-library failures
//! RuntimeError. Bindings convert through [`Error`] rather than picking an exception themselves.

use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyPermissionError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

// Defined in Python (dino_rs/_errors.py) so that `str(e)` reads "path: what is wrong" while
// `e.filename` still names the file, which OSError's own __str__ cannot do without an errno.
pyo3::import_exception!(dino_rs._errors, ImageError);

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::Image { path, message } => {
                ImageError::new_err((None::<i32>, message, path.to_string_lossy().into_owned()))
            }
            Error::Io { path, source } => {
                // Errors made up by dino_rs (an empty folder) have no OS errno: give them the one
                // their kind stands for, so Python shows "[Errno 2] ..." rather than "[Errno 0]".
                let errno = source.raw_os_error().unwrap_or(match source.kind() {
                    std::io::ErrorKind::NotFound => 2,          // ENOENT
                    std::io::ErrorKind::PermissionDenied => 13, // EACCES
                    _ => 5,                                     // EIO
                });
                let args = (errno, source.to_string(), path.to_string_lossy().into_owned());
                match source.kind() {
                    std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(args),
                    std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(args),
                    _ => PyOSError::new_err(args),
                }
            }
            Error::InvalidArgument(m) | Error::Shape(m) => PyValueError::new_err(m),
            e @ Error::Checkpoint { .. } => PyValueError::new_err(e.to_string()),
            e @ Error::Tensor(_) if e.is_out_of_memory() => pyo3::exceptions::PyMemoryError::new_err(e.to_string()),
            Error::Tensor(e) => pyo3::exceptions::PyRuntimeError::new_err(e.to_string()),
            Error::Cancelled => PyKeyboardInterrupt::new_err("cancelled"),
        }
    }
}
