//! Dependencies that panic where they mean "no": candle's pickle reader on malformed files, cudarc
//! when the CUDA driver library is missing. [`catch_quietly`] turns such a panic into an error
//! message for the caller to report, and keeps the "thread panicked" text off stderr, where beside a
//! clean Python exception it would only alarm.

thread_local! {
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `f()`, with a panic inside it turned into `Err("{what}: {panic message}")`. Other panics, on
/// other threads or outside `f`, still reach the hook that was installed before.
pub fn catch_quietly<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    let was = QUIET_PANICS.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(was));
    result.map_err(|panic| {
        let why = (panic.downcast_ref::<&str>().copied())
            .or(panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("panicked");
        format!("{what}: {why}")
    })
}

/// CUDA device `index` on a stream of its own (see [`crate::device::cuda`], which callers use).
/// cudarc opens libcuda at run time and panics when it is missing (a CUDA build on a machine
/// without the NVIDIA driver); that, like any other failure, is an error here.
pub fn open_cuda(index: usize) -> Result<candle_core::Device, String> {
    catch_quietly("the CUDA driver library could not be loaded", || {
        candle_core::Device::new_cuda_with_stream(index)
    })?
    .map_err(|e| e.to_string())
}
