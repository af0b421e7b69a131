//! `ArrayDataset`: images already in memory as one uint8 (N, H, W) or (N, H, W, 3) block.

use image::RgbImage;

use super::Dataset;
use crate::error::{Error, Result};

/// Packs an H×W×C (C = 1 or 3) uint8 pixel block into an RGB image, replicating grey.
pub fn rgb_from_pixels(pixels: &[u8], height: usize, width: usize, channels: usize) -> Result<RgbImage> {
    if height == 0 || width == 0 {
        return Err(Error::Shape(format!(
            "image must have at least one pixel, got shape ({height}, {width})"
        )));
    }
    if channels != 1 && channels != 3 {
        return Err(Error::Shape(format!(
            "images must have 1 or 3 channels, got {channels}"
        )));
    }
    if pixels.len() != height * width * channels {
        return Err(Error::Shape(format!(
            "pixel buffer of {} bytes does not match shape ({height}, {width}, {channels})",
            pixels.len()
        )));
    }
    let data = if channels == 3 {
        pixels.to_vec()
    } else {
        pixels.iter().flat_map(|&v| [v, v, v]).collect()
    };
    Ok(RgbImage::from_raw(width as u32, height as u32, data).expect("length checked above"))
}

#[derive(Debug, Clone)]
pub struct ArrayDataset {
    data: Vec<u8>,
    shape: [usize; 4],
    labels: Option<Vec<i64>>,
}

impl ArrayDataset {
    /// `shape` is (N, H, W, C) with C = 1 or 3; `data` is that block in C order.
    pub fn new(data: Vec<u8>, shape: [usize; 4], labels: Option<Vec<i64>>) -> Result<Self> {
        let [n, h, w, c] = shape;
        if n == 0 {
            return Err(Error::Shape("ArrayDataset needs at least one image, got N=0".into()));
        }
        if h == 0 || w == 0 || (c != 1 && c != 3) {
            return Err(Error::Shape(format!(
                "images must be (N, H, W) or (N, H, W, 3) with H, W > 0, got (N={n}, H={h}, W={w}, C={c})"
            )));
        }
        if data.len() != n * h * w * c {
            return Err(Error::Shape(format!(
                "{} bytes do not fill shape {shape:?}",
                data.len()
            )));
        }
        if let Some(l) = &labels {
            if l.len() != n {
                return Err(Error::Shape(format!("{} labels for {n} images", l.len())));
            }
        }
        Ok(Self { data, shape, labels })
    }

    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    pub fn labels(&self) -> Option<&[i64]> {
        self.labels.as_deref()
    }
}

impl Dataset for ArrayDataset {
    fn len(&self) -> usize {
        self.shape[0]
    }
    fn load(&self, index: usize) -> Result<RgbImage> {
        let [_, h, w, c] = self.shape;
        let size = h * w * c;
        rgb_from_pixels(&self.data[index * size..(index + 1) * size], h, w, c)
    }
    fn label(&self, index: usize) -> i64 {
        self.labels.as_ref().map_or(-1, |l| l[index])
    }
}
