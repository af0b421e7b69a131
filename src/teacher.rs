//! The EMA teacher: θ_t ← m·θ_t + (1 − m)·θ_s for every parameter, paired by name (a VarMap is a
//! HashMap, so pairing by position would silently mix parameters).

use candle_core::Result;

use crate::model::ParamStore;

/// Updates every teacher variable from the student variable of the same name.
pub fn ema_update(teacher: &ParamStore, student: &ParamStore, momentum: f64) -> Result<()> {
    let pairs = teacher
        .vars()
        .into_iter()
        .map(|(name, t)| match student.get(&name) {
            Some(s) => Ok((t, s)),
            None => candle_core::bail!("teacher parameter {name} has no student counterpart"),
        })
        .collect::<Result<Vec<_>>>()?;
    let tensors: Vec<_> = pairs.iter().map(|(t, s)| (t.as_tensor(), s.as_tensor())).collect();
    if crate::ops::ema_foreach(&tensors, momentum)?.is_some() {
        return Ok(());
    }
    for (t, s) in &pairs {
        if crate::ops::ema_update(t.as_tensor(), s.as_tensor(), momentum)?.is_some() {
            continue;
        }
        let updated = ((t.as_tensor() * momentum)? + (s.as_tensor() * (1.0 - momentum))?)?;
        t.set(&updated)?;
    }
    Ok(())
}
