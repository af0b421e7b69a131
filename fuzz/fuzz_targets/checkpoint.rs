//! Checkpoint bytes → safetensors / `.pth` loading → model built from the weights → one forward.
#![no_main]

#[path = "../bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(init: bodies::init(), |data: &[u8]| bodies::checkpoint(data));
