//! The crate's error type. Messages name the offending file or shape, because they end up in a
//! Python traceback where that is the only context a user gets.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in dino_rs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that is not a readable image (corrupt, truncated, empty, unsupported, too large).
    #[error("{}: {message}", path.display())]
    Image { path: PathBuf, message: String },
    /// A file system error that is not about image contents (missing folder, permissions, loops).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An argument outside its valid range.
    #[error("{0}")]
    InvalidArgument(String),
    /// An array or tensor of the wrong shape or layout.
    #[error("{0}")]
    Shape(String),
    /// A file that is not a usable checkpoint or weights file (truncated, wrong architecture, ...).
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    /// A numerical / tensor-library failure.
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
    /// The work was cancelled (loader dropped or interrupted).
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn image(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Image {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn checkpoint(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }

    /// Whether this is a device running out of memory (CUDA's `CUDA_ERROR_OUT_OF_MEMORY`, as
    /// cudarc reports it, or an allocator's "out of memory"): Python gets MemoryError for it, which
    /// a caller may catch to retry with a smaller batch, where other device failures are RuntimeError.
    pub fn is_out_of_memory(&self) -> bool {
        let Error::Tensor(e) = self else { return false };
        let text = e.to_string();
        text.contains("OUT_OF_MEMORY") || text.to_ascii_lowercase().contains("out of memory")
    }
}

/// Returns `InvalidArgument` unless `cond` holds; keeps argument validation one line per rule.
pub(crate) fn ensure(cond: bool, message: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::InvalidArgument(message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_told_apart_from_other_device_errors() {
        let tensor = |m: &str| Error::Tensor(candle_core::Error::Msg(m.into()));
        assert!(tensor("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")").is_out_of_memory());
        assert!(tensor("cudaMalloc: out of memory").is_out_of_memory());
        assert!(!tensor("DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")").is_out_of_memory());
        assert!(!Error::invalid("out of memory budget: max_pixels").is_out_of_memory());
    }
}
