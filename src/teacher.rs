//! The EMA teacher: θ_t ← m·θ_t + (1 − m)·θ_s for every parameter, paired by name (a VarMap is a
//! HashMap, so pairing by position would silently mix parameters).

use candle_core::Result;

use crate::model::ParamStore;

/// Updates every teacher variable from the student variable of the same name.
pub fn ema_update(teacher: &ParamStore, student: &ParamStore, momentum: f64) -> Result<()> {
    for (name, t) in teacher.vars() {
        let Some(s) = student.get(&name) else {
            candle_core::bail!("teacher parameter {name} has no student counterpart");
        };
        if crate::ops::ema_update(t.as_tensor(), s.as_tensor(), momentum)? {
            continue;
        }
        let updated = ((t.as_tensor() * momentum)? + (s.as_tensor() * (1.0 - momentum))?)?;
        t.set(&updated)?;
    }
    Ok(())
}
