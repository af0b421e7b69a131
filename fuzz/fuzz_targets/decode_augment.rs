//! Image bytes → decode (small pixel limit) → multi-crop augmentation and eval transform.
#![no_main]

#[path = "../bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(init: bodies::init(), |data: &[u8]| bodies::decode_augment(data));
