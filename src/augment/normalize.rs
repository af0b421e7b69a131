//! `ToTensor` + `Normalize`: packed RGB u8 to planar (C, H, W) float32, (v/255 − mean)/std.
//! The same on a device: crops go there as planar u8, a quarter of the bytes, and
//! [`Normalize::on_device`] looks each value up in the same table, so the result is identical.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

/// Per-channel lookup tables: one multiply-free load per sample.
#[derive(Debug, Clone)]
pub struct Normalize {
    lut: [[f32; 256]; 3],
}

impl Normalize {
    pub fn new(mean: [f32; 3], std: [f32; 3]) -> Self {
        let mut lut = [[0.0; 256]; 3];
        for c in 0..3 {
            for (v, out) in lut[c].iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - mean[c]) / std[c];
            }
        }
        Self { lut }
    }

    /// Normalised crops from planar u8 ones (N, 3, H, W) already on their device: a lookup in
    /// this table (3 × 256 values), bit for bit what [`Normalize::apply`] writes. One kernel on
    /// CUDA ([`crate::ops::normalize_u8`]); candle ops elsewhere.
    pub fn on_device(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(out) = crate::ops::normalize_u8(pixels, &self.lut)? {
            return Ok(out);
        }
        let dev = pixels.device();
        let table = Tensor::from_iter(self.lut.iter().flatten().copied(), dev)?;
        let (n, c, h, w) = pixels.dims4()?;
        if c != 3 || pixels.dtype() != DType::U8 {
            candle_core::bail!(
                "expected u8 crops (N, 3, H, W), got {:?} {:?}",
                pixels.dtype(),
                pixels.dims()
            );
        }
        // Index of value v in channel k: 256·k + v.
        let offsets = Tensor::from_slice(&[0u32, 256, 512], (1, 3, 1, 1), dev)?;
        let idx = pixels.to_dtype(DType::U32)?.broadcast_add(&offsets)?.flatten_all()?;
        table.index_select(&idx, 0)?.reshape((n, c, h, w))
    }

    /// The table: value v of channel c becomes `table()[c][v]`.
    pub fn table(&self) -> &[[f32; 256]; 3] {
        &self.lut
    }

    /// Writes `img` into `out` (length 3·H·W) in CHW order.
    pub fn apply(&self, img: &RgbImage, out: &mut [f32]) {
        let plane = (img.width() * img.height()) as usize;
        assert_eq!(out.len(), 3 * plane, "output slice must hold 3 planes of the image");
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            r[i] = self.lut[0][px[0] as usize];
            g[i] = self.lut[1][px[1] as usize];
            b[i] = self.lut[2][px[2] as usize];
        }
    }
}

/// What the augmenter writes crops as: normalised f32, or planar u8 for [`Normalize::on_device`].
pub trait Pixel: Copy + Default + Send + Sync + 'static {
    fn write(normalize: &Normalize, img: &RgbImage, out: &mut [Self]);
    /// The crops as a normalised f32 tensor `shape` on `device`.
    fn crops(
        data: Vec<Self>,
        shape: (usize, usize, usize, usize),
        normalize: &Normalize,
        device: &Device,
    ) -> candle_core::Result<Tensor>;
}

impl Pixel for f32 {
    fn write(normalize: &Normalize, img: &RgbImage, out: &mut [f32]) {
        normalize.apply(img, out)
    }
    fn crops(
        data: Vec<f32>,
        shape: (usize, usize, usize, usize),
        _: &Normalize,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::from_vec(data, shape, device)
    }
}

impl Pixel for u8 {
    fn write(_: &Normalize, img: &RgbImage, out: &mut [u8]) {
        let plane = (img.width() * img.height()) as usize;
        assert_eq!(out.len(), 3 * plane, "output slice must hold 3 planes of the image");
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            (r[i], g[i], b[i]) = (px[0], px[1], px[2]);
        }
    }
    fn crops(
        data: Vec<u8>,
        shape: (usize, usize, usize, usize),
        normalize: &Normalize,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        normalize.on_device(&crate::device::upload_u8(data, shape, device)?)
    }
}
