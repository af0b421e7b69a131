//! Per-iteration schedules, exactly as the official `utils.cosine_scheduler` (numpy float64):
//! a linear warm-up from `start_warmup_value` to `base_value`, then a half cosine to
//! `final_value`.

/// `np.linspace(start, stop, n)`: `start + i·step`, the last value exactly `stop`.
pub fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// One value per iteration for `epochs · niter_per_ep` iterations.
pub fn cosine_scheduler(
    base_value: f64,
    final_value: f64,
    epochs: usize,
    niter_per_ep: usize,
    warmup_epochs: usize,
    start_warmup_value: f64,
) -> Vec<f64> {
    let total = epochs * niter_per_ep;
    let warmup_iters = (warmup_epochs * niter_per_ep).min(total);
    let mut schedule = if warmup_epochs > 0 {
        linspace(start_warmup_value, base_value, warmup_iters)
    } else {
        Vec::new()
    };
    let rest = total - warmup_iters;
    schedule.extend((0..rest).map(|i| {
        final_value + 0.5 * (base_value - final_value) * (1.0 + (std::f64::consts::PI * i as f64 / rest as f64).cos())
    }));
    schedule
}

/// The teacher temperature per epoch: linear warm-up over `warmup_epochs`, then constant.
pub fn teacher_temp_schedule(
    warmup_teacher_temp: f64,
    teacher_temp: f64,
    warmup_epochs: usize,
    nepochs: usize,
) -> Vec<f64> {
    let mut s = linspace(warmup_teacher_temp, teacher_temp, warmup_epochs.min(nepochs));
    s.resize(nepochs.max(s.len()), teacher_temp);
    s
}
