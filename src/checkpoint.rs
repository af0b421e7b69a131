//! Reading and writing weights: safetensors with a JSON metadata entry (ours), official PyTorch
//! `.pth` files (read with candle's pickle support, no torch), atomic writes (temp file + rename)
//! so an interrupted save leaves the previous file intact.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Metadata key holding our JSON document in a safetensors header.
pub const META_KEY: &str = "dino_rs";

/// Writes `tensors` and `meta` (JSON) to `path` atomically.
pub fn save(path: &Path, tensors: &[(String, Tensor)], meta: &serde_json::Value) -> Result<()> {
    let metadata = HashMap::from([(META_KEY.to_string(), meta.to_string())]);
    let contiguous = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(contiguous.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|e| Error::checkpoint(path, format!("cannot serialise: {e}")))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file renamed into place: a reader sees the old
/// file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} is not a file path", path.display())))?;
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    remove_stale_temps(dir, &prefix);
    let tmp = dir.join(format!("{prefix}{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is only durable (power loss, not just a killed process) once the
        // directory entry is on disk; not every platform can open a directory for this.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Removes the temporary files of saves to the same path that a killed process left behind
/// (`kill -9` mid-write): each can be as large as a checkpoint. Only files whose writer is gone
/// are removed, and only where that can be told (Linux's /proc); a concurrent save by a live
/// process keeps its file.
fn remove_stale_temps(dir: &Path, prefix: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Reads a safetensors file: its tensors and our JSON metadata (Null when absent).
pub fn load(path: &Path) -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    load_bytes(&bytes, path)
}

/// [`load`] from a safetensors file's contents; `path` only names the file in error messages.
pub fn load_bytes(bytes: &[u8], path: &Path) -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a safetensors file ({e})")))?;
    let meta = match header.metadata().as_ref().and_then(|m| m.get(META_KEY)) {
        Some(s) => serde_json::from_str(s).map_err(|e| Error::checkpoint(path, format!("corrupt metadata ({e})")))?,
        None => serde_json::Value::Null,
    };
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| Error::checkpoint(path, format!("corrupt or truncated tensors ({e})")))?;
    Ok((tensors, meta))
}

/// The tensors of a `torch.save` archive (the state dict at `key`), read with candle's pickle
/// support, which trusts the file more than it should (candle-core 0.11.1):
/// * its unpickler indexes into the tuples it reads without checking their length (`Vec::remove`
///   in `rebuild_args`) and panics on malformed files. That is inside the dependency, so the
///   calls into it go through [`catch_quietly`]: it parses a file and shares no state, so
///   nothing is left half-updated when it unwinds.
/// * it allocates each tensor at the shape the pickle declares before reading its bytes. Its zip
///   reader has no decompression (torch stores entries uncompressed), so a tensor cannot need more
///   bytes than the file holds: larger claims are refused before anything is allocated.
fn read_pth(path: &Path, file_len: u64, key: Option<&str>) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let pth = catch_quietly(|| candle_core::pickle::PthTensors::new(path, key))?.map_err(|e| e.to_string())?;
    let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
    names.sort();
    for name in &names {
        let info = &pth.tensor_infos()[*name];
        let (dims, stride) = (info.layout.dims(), info.layout.stride());
        let bytes = dims
            .iter()
            .try_fold(info.dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_add(info.layout.start_offset()));
        if stride.len() != dims.len() {
            return Err(format!("tensor {name} has shape {dims:?} but stride {stride:?}"));
        }
        if bytes.is_none_or(|b| b as u64 > file_len) {
            return Err(format!(
                "tensor {name} declares shape {dims:?}, stride {stride:?} and offset {} of {:?}: more data than the {file_len}-byte file holds",
                info.layout.start_offset(),
                info.dtype
            ));
        }
    }
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        if let Some(t) = catch_quietly(|| pth.get(name))?.map_err(|e| e.to_string())? {
            tensors.push((name.clone(), t));
        }
    }
    Ok(tensors)
}

/// The tensors of a `.pth`: its top-level dict, else the first of the entries training checkpoints
/// keep them under. The error is the first one met: later keys mostly add "key ... not found".
fn read_pth_any(path: &Path, file_len: u64) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let mut first_err = None;
    for key in [
        None,
        Some("teacher"),
        Some("state_dict"),
        Some("model"),
        Some("student"),
    ] {
        match read_pth(path, file_len, key) {
            Ok(v) if !v.is_empty() => return Ok(v),
            Ok(_) => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| "no tensors found".to_string()))
}

/// `f()` with a panic in candle's pickle reader turned into an error (see [`crate::panic`]): there
/// the panic is the dependency's way of rejecting a malformed file.
fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    crate::panic::catch_quietly("malformed pickle data", f)
}

/// Weights from a `.pth` (PyTorch pickle) or safetensors file, by content.
pub fn load_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut head = [0u8; 9];
    let file_len;
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let n = f.read(&mut head).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Err(Error::checkpoint(path, "empty file, not a checkpoint"));
        }
    }
    // safetensors: an 8-byte little-endian header length, then the JSON header. Checked first: its
    // first byte is the length's low byte, which can be anything (0x80 included).
    let header_len = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
    let safetensors = head[8] == b'{' && header_len.checked_add(8).is_some_and(|end| end <= file_len);
    // torch.save writes a zip archive ("PK\x03\x04"); legacy pickles start with 0x80.
    if !safetensors && (head.starts_with(b"PK") || head[0] == 0x80) {
        let read = read_pth_any(path, file_len).or_else(|why| {
            // A failure in the zip layer, not the pickle: see `rewritten_archive`.
            if !why.contains("Invalid Central Directory header") {
                return Err(why);
            }
            let copy = rewritten_archive(path).map_err(|_| why.clone())?;
            let len = std::fs::metadata(&copy.0).map_or(file_len, |m| m.len());
            read_pth_any(&copy.0, len).map_err(|_| why)
        });
        return read
            .map(|v| v.into_iter().collect())
            .map_err(|why| Error::checkpoint(path, format!("cannot read PyTorch checkpoint ({why})")));
    }
    Ok(load(path)?.0)
}

/// A temporary file, removed when dropped.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `path`'s torch archive rewritten so that the zip crate (which candle's loader uses) reads it.
///
/// The crate takes the central directory to end where the end-of-archive record begins, but
/// torch's archives have zip64 records (76 bytes) in between. Where the first central entry is
/// itself 76 bytes long (a `.pth` whose file stem has 21 characters: torch names the entries
/// after it), that guess lands on the second entry, every offset is read 76 bytes off, and the
/// valid file is refused. Read at the offsets the file states, and written again under another
/// root folder name (entries stored, as torch stores them), it loads. Costs a copy, and is only
/// tried when the first read failed that way.
fn rewritten_archive(path: &Path) -> std::result::Result<TempFile, String> {
    use zip::read::{ArchiveOffset, Config};
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let file = std::fs::File::open(path).map_err(|e| err(&e))?;
    let config = Config {
        archive_offset: ArchiveOffset::Known(0),
    };
    let mut src = zip::ZipArchive::with_config(config, std::io::BufReader::new(file)).map_err(|e| err(&e))?;
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = TempFile(std::env::temp_dir().join(format!("dino_rs-rezip-{}-{n}.pth", std::process::id())));
    let out = std::fs::File::create(&tmp.0).map_err(|e| err(&e))?;
    let mut w = zip::ZipWriter::new(std::io::BufWriter::new(out));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    for i in 0..src.len() {
        let mut entry = src.by_index(i).map_err(|e| err(&e))?;
        let name = entry.name().map_err(|e| err(&e))?.into_owned();
        let inner = name.split_once('/').map_or(name.as_str(), |(_, rest)| rest);
        w.start_file(format!("archive/{inner}"), options).map_err(|e| err(&e))?;
        std::io::copy(&mut entry, &mut w).map_err(|e| err(&e))?;
    }
    w.finish().map_err(|e| err(&e))?;
    Ok(tmp)
}
