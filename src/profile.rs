//! Where a training step's time goes: wall-clock seconds per phase, with the device synchronised at
//! every phase boundary so that each phase's queued GPU work is counted in it. On a GPU the
//! synchronisations cost a little overlap (a profiled step is slightly slower); on the CPU they
//! are free. Off by default ([`crate::train::DinoTrainer::profile`]).

use std::time::Instant;

use candle_core::{Device, Result};

/// The phases of one step, in order: `teacher_forward`, `student_forward`, `loss` (including the
/// loss read back to the host), `backward`, `clip`, `adamw`, `ema`, `center`.
pub const PHASES: [&str; 8] = [
    "teacher_forward",
    "student_forward",
    "loss",
    "backward",
    "clip",
    "adamw",
    "ema",
    "center",
];

#[derive(Debug, Clone)]
pub struct Clock {
    device: Device,
    last: Instant,
    pub phases: Vec<(&'static str, f64)>,
}

impl Clock {
    /// Starts timing once the work already queued on `device` has finished.
    pub fn start(device: &Device) -> Result<Self> {
        device.synchronize()?;
        Ok(Self {
            device: device.clone(),
            last: Instant::now(),
            phases: Vec::with_capacity(PHASES.len()),
        })
    }

    /// Ends `phase` when the device has finished it.
    pub fn mark(&mut self, phase: &'static str) -> Result<()> {
        debug_assert!(PHASES.contains(&phase), "unknown phase {phase}");
        self.device.synchronize()?;
        let now = Instant::now();
        self.phases.push((phase, now.duration_since(self.last).as_secs_f64()));
        self.last = now;
        Ok(())
    }
}

/// [`Clock::mark`] when profiling.
pub fn mark(clock: &mut Option<Clock>, phase: &'static str) -> Result<()> {
    match clock {
        Some(c) => c.mark(phase),
        None => Ok(()),
    }
}
