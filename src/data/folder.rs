//! `ImageFolder`: every image file under a root, recursively; the sorted first-level
//! subfolders are the classes (torchvision's convention), images directly under the root are
//! unlabelled (label −1).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;

use super::decode::{has_image_extension, load_rgb};
use super::Dataset;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    paths: Vec<PathBuf>,
    labels: Vec<i64>,
    classes: Vec<String>,
    max_pixels: u64,
}

impl ImageFolder {
    pub fn new(root: impl AsRef<Path>, max_pixels: u64) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let meta = std::fs::metadata(&root).map_err(|e| Error::io(&root, e))?;
        if !meta.is_dir() {
            return Err(Error::io(&root, std::io::Error::other("not a directory")));
        }
        let mut files = Vec::new();
        for entry in walkdir::WalkDir::new(&root).follow_links(true).sort_by_file_name() {
            let entry = entry.map_err(|e| {
                let path = e.path().unwrap_or(&root).to_path_buf();
                let message = if e.loop_ancestor().is_some() {
                    std::io::Error::other("symbolic link loop in the image folder")
                } else {
                    e.into_io_error()
                        .unwrap_or_else(|| std::io::Error::other("cannot scan directory"))
                };
                Error::io(path, message)
            })?;
            if entry.file_type().is_file() && has_image_extension(entry.path()) {
                files.push(entry.into_path());
            }
        }
        if files.is_empty() {
            return Err(Error::io(
                &root,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "no image files found (extensions: {})",
                        super::decode::IMAGE_EXTENSIONS.join(", ")
                    ),
                ),
            ));
        }
        let class_of = |p: &Path| -> Option<String> {
            let rel = p.strip_prefix(&root).ok()?;
            let mut parts = rel.components();
            let first = parts.next()?;
            parts.next().map(|_| first.as_os_str().to_string_lossy().into_owned())
        };
        let classes: BTreeMap<String, i64> = files.iter().filter_map(|p| class_of(p)).map(|c| (c, 0)).collect();
        let classes: BTreeMap<String, i64> = classes.into_keys().enumerate().map(|(i, c)| (c, i as i64)).collect();
        let labels = files.iter().map(|p| class_of(p).map_or(-1, |c| classes[&c])).collect();
        Ok(Self {
            root,
            paths: files,
            labels,
            classes: classes.into_keys().collect(),
            max_pixels,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.paths.len()
    }
    fn load(&self, index: usize) -> Result<RgbImage> {
        load_rgb(&self.paths[index], self.max_pixels)
    }
    fn label(&self, index: usize) -> i64 {
        self.labels[index]
    }
}
