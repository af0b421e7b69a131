//! CUDA devices as dino_rs opens them: one candle device per ordinal for the whole process, issuing
//! all its work on one stream of its own.
//!
//! Why not `Device::new_cuda`: that device issues work on CUDA's *per-thread* default stream, which
//! resolves to a different stream on every host thread, and per-thread streams do not wait for
//! each other. dino_rs runs a training step or a forward pass on whichever dino_rs pool thread picks
//! it up, uploads batches from the caller's thread, and frees a tensor on the thread that drops it
//! (a stream-ordered free): on per-thread streams, step k+1 could read weights that step k's
//! AdamW is still writing, and memory could be reused while a kernel on another stream reads it.
//! One stream shared by every thread orders all of it as it was issued.
//!
//! With a stream of its own, cudarc counts the context as multi-stream and then records and waits
//! on CUDA events around every read and write of every tensor (and it creates two events for
//! every allocation in any case): host work per operation that orders nothing one stream does not
//! already order. Event tracking is turned off.
//!
//! Sharing the device also lets tensors of two models meet: candle refuses to combine tensors of
//! two device objects, even for the same GPU.

#[cfg(feature = "cuda")]
use candle_core::Device;

/// CUDA device `index`, opened on first use and shared afterwards. A failed open is not
/// remembered, so a later call tries again.
#[cfg(feature = "cuda")]
pub fn cuda(index: usize) -> Result<Device, String> {
    static OPEN: std::sync::Mutex<Vec<(usize, Device)>> = std::sync::Mutex::new(Vec::new());
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, device)) = open.iter().find(|(i, _)| *i == index) {
        return Ok(device.clone());
    }
    let device = crate::panic::open_cuda(index)?;
    let cuda = device.as_cuda_device().map_err(|e| e.to_string())?;
    // SAFETY: cudarc's events order work across streams; every tensor of this device is used on its
    // one stream, where the issue order already is the execution order.
    unsafe { cuda.disable_event_tracking() };
    open.push((index, device.clone()));
    Ok(device)
}
