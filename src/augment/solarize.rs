//! Solarisation as PIL's `ImageOps.solarize(img, threshold=128)`: values >= threshold are inverted.

use image::RgbImage;

pub fn solarize(img: &mut RgbImage, threshold: u8) {
    for v in img.iter_mut() {
        if *v >= threshold {
            *v = 255 - *v;
        }
    }
}
