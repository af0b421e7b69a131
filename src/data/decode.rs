//! Reading image files into packed RGB8, as the official `pil_loader` does (`convert('RGB')`):
//! grey, alpha, 16-bit and palette images become RGB, EXIF orientation is applied, and images
//! above a pixel limit are refused from their header alone (decompression bombs).

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageError as DecodeError, ImageFormat, ImageReader, Limits, RgbImage};

use crate::error::{Error, Result};

/// File extensions treated as images when scanning folders (compared case-insensitively).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "gif"];

pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn describe(err: DecodeError) -> String {
    match err {
        DecodeError::Unsupported(e) => format!("not a supported image ({e})"),
        DecodeError::Decoding(e) => format!("corrupt or truncated image ({e})"),
        DecodeError::Limits(e) => format!("image exceeds the decoder's memory limits ({e})"),
        DecodeError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("corrupt or truncated image ({e})")
        }
        DecodeError::IoError(e) => format!("cannot read image data ({e})"),
        other => other.to_string(),
    }
}

/// Whether a JPEG stream has an end-of-image marker after its last start-of-scan. The decoder
/// silently fills the missing rows of a truncated file with grey; PIL refuses such files.
/// Entropy-coded data cannot contain either marker (0xFF bytes are stuffed), so the last SOS is
/// the main image's last scan even when an EXIF thumbnail precedes it.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let marker = |m: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == m);
    match (marker(0xDA), marker(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

/// Decodes the image at `path` to RGB8, refusing images with more than `max_pixels` pixels.
pub fn load_rgb(path: &Path, max_pixels: u64) -> Result<RgbImage> {
    // Reading a named pipe blocks until something writes to it and a device may never end: only
    // regular files are read (a directory is left to fail below with the OS's EISDIR).
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() && !meta.is_dir() {
        return Err(Error::image(
            path,
            "not a regular file (a named pipe, socket or device), not an image",
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb(&bytes, path, max_pixels)
}

/// Decodes an image file's contents to RGB8 as [`load_rgb`] does; `path` only names the file in
/// error messages.
pub fn decode_rgb(bytes: &[u8], path: &Path, max_pixels: u64) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::image(path, "empty file (0 bytes), not an image"));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    match reader.format() {
        None => return Err(Error::image(path, "not a recognised image format")),
        Some(ImageFormat::Jpeg) if !jpeg_is_complete(bytes) => {
            return Err(Error::image(
                path,
                "corrupt or truncated image (JPEG data ends before its end-of-image marker)",
            ));
        }
        Some(_) => {}
    }
    let mut limits = Limits::default();
    // Room for the largest allowed image at 16 bits per RGBA channel plus decoder scratch.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| Error::image(path, describe(e)))?;
    let (w, h) = decoder.dimensions();
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(Error::image(
            path,
            format!("image of {w}x{h} = {pixels} pixels exceeds max_pixels={max_pixels} (possible decompression bomb)"),
        ));
    }
    if pixels == 0 {
        return Err(Error::image(path, format!("image has no pixels ({w}x{h})")));
    }
    let orientation = decoder.orientation().map_err(|e| Error::image(path, describe(e)))?;
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(|e| Error::image(path, describe(e)))?;
    img.apply_orientation(orientation);
    Ok(match img {
        // 16-bit samples keep their high byte, as PIL reads 16-bit PNGs; `into_rgb8` would round
        // v / 257, one level off PIL in places. (PIL's convert('RGB') of 16-bit grey, mode I;16,
        // clips at 255 and whitens the picture: that one quirk is not followed.)
        DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_)
        | DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_) => {
            let rgb16 = img.into_rgb16();
            let (w, h) = rgb16.dimensions();
            let high = rgb16.into_raw().into_iter().map(|v| (v >> 8) as u8).collect();
            RgbImage::from_raw(w, h, high).expect("one byte per 16-bit sample")
        }
        other => other.into_rgb8(),
    })
}
