//! Horizontal flip (torchvision `RandomHorizontalFlip`), in place on packed RGB.

use image::RgbImage;

pub fn hflip(img: &mut RgbImage) {
    let width = img.width() as usize;
    for row in img.chunks_exact_mut(width * 3) {
        let (mut i, mut j) = (0, width - 1);
        while i < j {
            for c in 0..3 {
                row.swap(i * 3 + c, j * 3 + c);
            }
            i += 1;
            j -= 1;
        }
    }
}
