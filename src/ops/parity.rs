//! Each of dino_rs's own device kernels against the CPU, one by one: the forward value and every
//! input gradient of LayerNorm, softmax, bias + GELU, the residual update (alone and with the
//! linear layer before it), a whole transformer block, the DINO loss, the weight-normalised last layer and attention from the
//! qkv projection (f32, and bf16 under autocast where a model uses it), the multi-tensor AdamW, EMA
//! and clipping over tensors that span several chunks, the page-locked upload and the
//! normalisation of u8 crops. The model-level tests (tests/python/test_gpu.py) say whether training
//! matches; this says which kernel does not.
//!
//! The reference is the CPU in f32 (its fused kernels, which the golden tests check against the
//! official code). Asked for the CPU, the other side is the CPU's path for other devices (the fused
//! kernels off: candle ops and dino_rs's portable ops), which is what CUDA runs bar the kernels.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// One row of [`kernel_parity`]: the check's name and its max |device − cpu| / max |cpu|, or the
/// error (or panic) that stopped it.
pub type Check = (String, std::result::Result<f64, String>);

/// Every check in a fixed order. Checks named `….bf16` ran in bf16 on `device` (mixed precision)
/// against f32 on the CPU. A check that fails is recorded as its error and the next one runs, so
/// that one bad kernel does not hide the others (after a CUDA fault the context is lost, and every
/// later check records that too: run with `CUDA_LAUNCH_BLOCKING=1` so that the first error is
/// raised by the kernel at fault). Only making the CPU inputs can fail the whole call.
pub fn kernel_parity(device: &Device) -> Result<Vec<Check>> {
    let rng = &mut ChaCha8Rng::seed_from_u64(0x5EED);
    let mut out = Vec::new();
    let cpu = Device::Cpu;
    // ViT-S's widths; rows that cross the kernels' block and tile sizes (8 rows, 256-row tiles).
    let x = randn(rng, &[3, 197, 384], 3.0, 1.0)?;
    let w = randn(rng, &[384], 1.0, 0.2)?;
    let b = randn(rng, &[384], 0.0, 0.2)?;
    let ln = |t: &[Tensor]| super::layer_norm(&t[0], &t[1], &t[2], 1e-6);
    compare(&mut out, "layer_norm", device, None, &[&x, &w, &b], rng, &ln);
    // Under autocast the norms before qkv and fc1 write bf16 themselves.
    let ln_low = |t: &[Tensor]| super::layer_norm_lowered(&t[0], &t[1], &t[2], 1e-6);
    compare(
        &mut out,
        "layer_norm_lowered.bf16",
        device,
        Some(DType::BF16),
        &[&x, &w, &b],
        rng,
        &ln_low,
    );

    let logits = randn(rng, &[2, 6, 37, 37], 0.0, 2.0)?;
    compare(&mut out, "softmax", device, None, &[&logits], rng, &|t| {
        super::softmax_last_dim(&t[0])
    });
    // ViT-S's head dim: scale 64^-1/2, applied inside the softmax off the fused CPU path.
    let attention = |t: &[Tensor]| super::attention_probabilities(&super::autocast::lower(&t[0])?, 0.125);
    compare_both(&mut out, "attention_probabilities", device, &[&logits], rng, &attention);

    // Attention from the qkv projection: 197 tokens, 3 heads of 64. In bf16 on CUDA these are the
    // flash attention kernels, forward and backward.
    let qkv = randn(rng, &[2, 197, 3 * 3 * 64], 0.0, 1.5)?;
    let attend = |t: &[Tensor]| -> Result<Tensor> {
        let qkv = super::autocast::lower(&t[0])?;
        if super::fused(&qkv) {
            return super::attention(&qkv, 3, 0.125);
        }
        match super::flash_attention(&qkv, 3, 0.125)? {
            Some(out) => Ok(out),
            None => Ok(super::attention_composed(&qkv, 3, 0.125)?.0),
        }
    };
    compare_both(&mut out, "attention", device, &[&qkv], rng, &attend);

    let h = randn(rng, &[2, 50, 1536], 0.0, 1.0)?;
    let hb = randn(rng, &[1536], 0.0, 0.5)?;
    let gelu = |t: &[Tensor]| super::bias_gelu(&super::autocast::lower(&t[0])?, &t[1]);
    compare_both(&mut out, "bias_gelu", device, &[&h, &hb], rng, &gelu);

    let stream = randn(rng, &[4, 50, 384], 0.0, 1.0)?;
    let branch = randn(rng, &[4, 50, 384], 0.0, 1.0)?;
    let keep = [1.0 / 0.9f32, 0.0, 1.0 / 0.9, 1.0 / 0.9];
    let residual = |t: &[Tensor]| {
        let mask = Tensor::from_slice(&keep, 4, t[0].device())?;
        super::residual_with_mask(&t[0], &super::autocast::lower(&t[1])?, Some(&mask))
    };
    compare_both(&mut out, "residual", device, &[&stream, &branch], rng, &residual);

    // A block's last linear layer (fc2: 1536 -> 384) with its residual update, as one node off
    // the fused CPU path.
    let hidden = randn(rng, &[4, 50, 1536], 0.0, 1.0)?;
    let w2 = randn(rng, &[384, 1536], 0.0, 0.02)?;
    let b2 = randn(rng, &[384], 0.0, 0.2)?;
    let linear_residual = |t: &[Tensor]| -> Result<Tensor> {
        let mask = Tensor::from_slice(&keep, 4, t[0].device())?;
        match super::linear_residual(&t[0], &t[1], &t[2], &t[3], Some(&mask))? {
            Some(y) => Ok(y),
            None => super::residual_with_mask(&t[0], &super::linear(&t[1], &t[2], Some(&t[3]))?, Some(&mask)),
        }
    };
    let lr_inputs = [&stream, &hidden, &w2, &b2];
    compare_both(&mut out, "linear_residual", device, &lr_inputs, rng, &linear_residual);

    // A whole transformer block at ViT-S's widths (6 heads of 64), as the student trains it: one
    // graph node on both sides (the fused CPU block; elsewhere the portable one, which on CUDA in
    // bf16 runs the flash attention kernels), with drop-path masks.
    let mut block_inputs = vec![randn(rng, &[4, 50, 384], 0.0, 1.0)?];
    let vit_s = super::block::Sizes {
        c: 384,
        hidden: 1536,
        heads: 6,
        eps: 1e-6,
        scale: 0.125,
    };
    for (i, shape) in vit_s.shapes().iter().enumerate() {
        let (mean, std) = match (i, shape.len()) {
            (0 | 6, _) => (1.0, 0.2),
            (_, 2) => (0.0, 0.03),
            _ => (0.0, 0.2),
        };
        block_inputs.push(randn(rng, shape, mean, std)?);
    }
    let keep2 = [0.0f32, 1.0 / 0.9, 1.0 / 0.9, 1.0 / 0.9];
    let block = |t: &[Tensor]| -> Result<Tensor> {
        let p: [&Tensor; 12] = std::array::from_fn(|i| &t[i + 1]);
        if super::fused(&t[0]) {
            return super::transformer_block(&t[0], p, 6, 1e-6, [Some(&keep), Some(&keep2)]);
        }
        let masks = [
            Tensor::from_slice(&keep, 4, t[0].device())?,
            Tensor::from_slice(&keep2, 4, t[0].device())?,
        ];
        match super::transformer_block_portable(&t[0], p, 6, 1e-6, Some([&masks[0], &masks[1]]))? {
            Some(y) => Ok(y),
            None => candle_core::bail!("parity: the transformer block node did not apply"),
        }
    };
    let block_refs: Vec<&Tensor> = block_inputs.iter().collect();
    compare_both(&mut out, "transformer_block", device, &block_refs, rng, &block);

    // ncrops 4 of B 3 against the two globals' teacher probabilities.
    let student = randn(rng, &[12, 1000], 0.0, 1.0)?;
    let q = super::softmax_last_dim(&randn(rng, &[6, 1000], 0.0, 3.0)?)?;
    compare(&mut out, "dino_loss", device, None, &[&student], rng, &|t| {
        super::dino_cross_entropy(&t[0], &q.to_device(t[0].device())?, 4, 0.1)
    });

    // The head's last layer: 1000 rows of the bottleneck's 256, written bf16 under autocast.
    let v = randn(rng, &[1000, 256], 0.0, 0.05)?;
    let g = randn(rng, &[1000, 1], 1.0, 0.3)?;
    let wn = |t: &[Tensor]| super::weight_norm_to(&t[0], &t[1], super::autocast::active());
    compare_both(&mut out, "weight_norm", device, &[&v, &g], rng, &wn);

    check(&mut out, "updates", device, |o| updates(o, device, rng));

    let bytes: Vec<u8> = (0..2 * 3 * 96 * 96).map(|_| rng.random()).collect();
    check_one(&mut out, "upload_u8", device, || {
        let up = crate::device::upload_u8(bytes.clone(), (2, 3, 96, 96), device)?;
        Ok(share_differing(
            &up.flatten_all()?.to_device(&cpu)?.to_vec1::<u8>()?,
            &bytes,
        ))
    });
    // Float crops through the same staging, seen as their bytes, 36 MiB: in two pieces (PIECE in
    // src/device.rs is 32 MiB). Bit for bit as well.
    let floats: Vec<f32> = (0..9 * 1024 * 1024).map(|_| rng.random::<f32>() - 0.5).collect();
    check_one(&mut out, "upload_f32", device, || {
        let back = crate::device::upload_f32(&floats, &[9, 1024, 1024], device, "parity floats")
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .flatten_all()?
            .to_device(&cpu)?
            .to_vec1::<f32>()?;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        Ok(share_differing(&bits(&back), &bits(&floats)))
    });
    // One NaN in the second piece: the check that runs while the staging buffers are filled must
    // catch it (0: refused with the error naming it; 1: taken).
    check_one(&mut out, "upload_f32.refuses_nan", device, || {
        let mut bad = floats.clone();
        bad[(32 << 20) / 4 + 12_345] = f32::NAN;
        let refused = match crate::device::upload_f32(&bad, &[9, 1024, 1024], device, "parity floats") {
            Err(crate::Error::InvalidArgument(m)) => m.contains("NaN"),
            _ => false,
        };
        Ok(if refused { 0.0 } else { 1.0 })
    });
    // Crops normalised where they are (one kernel on CUDA) against the CPU's lookup.
    check_one(&mut out, "normalize_u8", device, || {
        let normalize = crate::augment::normalize::Normalize::new([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
        let up = crate::device::upload_u8(bytes.clone(), (2, 3, 96, 96), device)?;
        let on_cpu = Tensor::from_vec(bytes.clone(), (2, 3, 96, 96), &cpu)?;
        rel(&normalize.on_device(&up)?, &normalize.on_device(&on_cpu)?)
    });
    // Freed memory stays in CUDA's pool between steps (src/device.rs): 0 when the release threshold
    // is the maximum (or off CUDA), 1 otherwise.
    check_one(&mut out, "memory_pool.release_threshold", device, || {
        let kept = crate::device::memory_pool_release_threshold(device)?.is_none_or(|t| t == u64::MAX);
        Ok(if kept { 0.0 } else { 1.0 })
    });
    Ok(out)
}

/// Runs one check: its rows, or a row `name` with the error or panic that stopped it. The device is
/// synchronised before the check counts as passed, so that an asynchronous fault is charged to it.
fn check(out: &mut Vec<Check>, name: &str, device: &Device, f: impl FnOnce(&mut Vec<(String, f64)>) -> Result<()>) {
    let mut rows = Vec::new();
    let result = crate::panic::catch_quietly(name, || f(&mut rows).and_then(|()| device.synchronize()));
    let error = match result {
        Ok(Ok(())) => None,
        // The message without the backtrace candle appends under RUST_BACKTRACE: a row of the table.
        Ok(Err(e)) => Some(e.to_string().split("\n   0: ").next().unwrap_or_default().to_string()),
        Err(panic) => Some(panic),
    };
    out.extend(rows.into_iter().map(|(n, v)| (n, Ok(v))));
    if let Some(e) = error {
        out.push((name.to_string(), Err(e)));
    }
}

/// [`check`] of one figure, in a row of the check's own name.
fn check_one(out: &mut Vec<Check>, name: &str, device: &Device, f: impl FnOnce() -> Result<f64>) {
    check(out, name, device, |o| {
        o.push((name.into(), f()?));
        Ok(())
    });
}

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], mean: f32, std: f32) -> Result<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| mean + std * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, rng))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// max |a − b| / max |b|, both read back as f64.
/// The share of elements where `got` and `want` differ (uploads must be exact).
fn share_differing<T: PartialEq>(got: &[T], want: &[T]) -> f64 {
    got.iter().zip(want).filter(|(a, b)| a != b).count() as f64 / want.len().max(1) as f64
}

fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let read = |t: &Tensor| -> Result<Vec<f64>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()
    };
    let (a, b) = (read(a)?, read(b)?);
    if a.len() != b.len() {
        candle_core::bail!("parity: {} values against {}", a.len(), b.len());
    }
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-30);
    Ok(diff / scale)
}

/// [`compare`] in f32, then in bf16 (autocast) on `device` as `{name}.bf16`.
fn compare_both(
    out: &mut Vec<Check>,
    name: &str,
    device: &Device,
    inputs: &[&Tensor],
    rng: &mut ChaCha8Rng,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) {
    compare(out, name, device, None, inputs, rng, f);
    compare(out, &format!("{name}.bf16"), device, Some(DType::BF16), inputs, rng, f);
}

/// `f` on `inputs` on the CPU in f32 and on `device` (under autocast to `low` when given): the
/// output and each input's gradient of Σ f(x)·r for a fixed random r.
fn compare(
    out: &mut Vec<Check>,
    name: &str,
    device: &Device,
    low: Option<DType>,
    inputs: &[&Tensor],
    rng: &mut ChaCha8Rng,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) {
    check(out, name, device, |o| {
        compare_rows(o, name, device, low, inputs, rng, f)
    });
}

fn compare_rows(
    out: &mut Vec<(String, f64)>,
    name: &str,
    device: &Device,
    low: Option<DType>,
    inputs: &[&Tensor],
    rng: &mut ChaCha8Rng,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let forward = |dev: &Device, dtype: DType| -> Result<(Vec<Var>, Tensor)> {
        let vars = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(dev)?))
            .collect::<Result<Vec<_>>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = super::autocast::autocast(dtype, || f(&ts))?.to_dtype(DType::F32)?;
        Ok((vars, y))
    };
    let backward = |vars: &[Var], y: &Tensor, r: &Tensor| -> Result<Vec<Tensor>> {
        let grads = (y * r.to_device(y.device())?)?.sum_all()?.backward()?;
        vars.iter()
            .map(|v| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => candle_core::bail!("{name}: no gradient for an input"),
            })
            .collect()
    };
    let (vars_ref, y_ref) = forward(&Device::Cpu, DType::F32)?;
    let r = randn(rng, y_ref.dims(), 0.0, 1.0)?;
    let g_ref = backward(&vars_ref, &y_ref, &r)?;
    let (y, g) = super::portable(|| -> Result<_> {
        let (vars, y) = forward(device, low.unwrap_or(DType::F32))?;
        let g = backward(&vars, &y, &r)?;
        Ok((y, g))
    })?;
    out.push((format!("{name}.forward"), rel(&y, &y_ref)?));
    for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
        out.push((format!("{name}.grad{i}"), rel(a, b)?));
    }
    Ok(())
}

/// AdamW (two steps, both parameter groups), the EMA teacher and gradient clipping as the
/// trainer calls them, over tensors of 7, 1,000 and 20,000 values (three chunks of 8,192).
fn updates(out: &mut Vec<(String, f64)>, device: &Device, rng: &mut ChaCha8Rng) -> Result<()> {
    let shapes: [(&str, &[usize]); 3] = [("a.bias", &[7]), ("b.weight", &[10, 100]), ("c.weight", &[20, 1000])];
    let params: Vec<(String, Tensor)> = shapes
        .iter()
        .map(|(n, s)| Ok((n.to_string(), randn(rng, s, 0.0, 1.0)?)))
        .collect::<Result<_>>()?;
    let grads: Vec<Vec<Tensor>> = (0..2)
        .map(|_| shapes.iter().map(|(_, s)| randn(rng, s, 0.0, 0.5)).collect())
        .collect::<Result<_>>()?;
    let teacher: Vec<Tensor> = shapes
        .iter()
        .map(|(_, s)| randn(rng, s, 0.0, 1.0))
        .collect::<Result<_>>()?;
    type Run = (Vec<Tensor>, Vec<Tensor>, Vec<Tensor>, Vec<Tensor>);
    let run = |dev: &Device| -> Result<Run> {
        let vars = params
            .iter()
            .map(|(n, t)| Ok((n.clone(), Var::from_tensor(&t.to_device(dev)?)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut adamw = crate::optim::AdamW::new(vars.clone())?;
        let mut clipped = Vec::new();
        for (k, step) in grads.iter().enumerate() {
            let mut g: HashMap<String, Tensor> = vars
                .iter()
                .zip(step)
                .map(|((n, _), t)| Ok((n.clone(), t.to_device(dev)?)))
                .collect::<Result<_>>()?;
            // Clips b.weight and c.weight (norms ~5 and ~70), leaves a.bias (~1.3).
            crate::optim::clip_gradients(&mut g, 3.0)?;
            if k == 0 {
                clipped = shapes.iter().map(|(n, _)| g[*n].clone()).collect();
            }
            adamw.step(&g, 1e-2, 0.04)?;
        }
        let student = crate::model::ParamStore::from_tensors(
            vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect(),
            0,
        )?;
        let t = crate::model::ParamStore::from_tensors(
            shapes
                .iter()
                .zip(&teacher)
                .map(|((n, _), t)| Ok((n.to_string(), t.to_device(dev)?)))
                .collect::<Result<_>>()?,
            0,
        )?;
        crate::teacher::ema_update(&t, &student, 0.996)?;
        let by_name = |s: &crate::model::ParamStore| -> Vec<Tensor> {
            let all = s.tensors();
            shapes.iter().map(|(n, _)| all[*n].clone()).collect()
        };
        let state = adamw.state();
        let moments = state.iter().flat_map(|(_, m, v, _)| [m.clone(), v.clone()]).collect();
        Ok((clipped, by_name(&student), moments, by_name(&t)))
    };
    let (c_ref, p_ref, m_ref, t_ref) = run(&Device::Cpu)?;
    let (c, p, m, t) = super::portable(|| run(device))?;
    for (name, a, b) in [
        ("clip", &c, &c_ref),
        ("adamw.params", &p, &p_ref),
        ("adamw.moments", &m, &m_ref),
        ("ema", &t, &t_ref),
    ] {
        let mut worst = 0f64;
        for (x, y) in a.iter().zip(b) {
            worst = worst.max(rel(x, y)?);
        }
        out.push((name.into(), worst));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_check_does_not_stop_the_next() {
        let mut out = Vec::new();
        let cpu = Device::Cpu;
        check(&mut out, "errs", &cpu, |o| {
            o.push(("errs.forward".into(), 0.5));
            candle_core::bail!("no kernel")
        });
        check(&mut out, "panics", &cpu, |_| panic!("out of bounds"));
        check(&mut out, "passes", &cpu, |o| {
            o.push(("passes.forward".into(), 0.0));
            Ok(())
        });
        let rows: Vec<(&str, std::result::Result<f64, &str>)> = out
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_ref().map(|x| *x).map_err(|e| e.as_str())))
            .collect();
        assert_eq!(
            rows,
            [
                ("errs.forward", Ok(0.5)),
                ("errs", Err("no kernel")),
                ("panics", Err("panics: out of bounds")),
                ("passes.forward", Ok(0.0)),
            ]
        );
    }

    #[test]
    fn every_check_runs_on_the_cpu() -> Result<()> {
        let checks: Vec<(String, f64)> = kernel_parity(&Device::Cpu)?
            .into_iter()
            .map(|(name, value)| {
                value
                    .map(|v| (name.clone(), v))
                    .map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))
            })
            .collect::<Result<_>>()?;
        let names: Vec<&str> = checks.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "layer_norm.grad0",
            "layer_norm.grad2",
            "layer_norm_lowered.bf16.grad0",
            "softmax.grad0",
            "attention_probabilities.grad0",
            "attention_probabilities.bf16.forward",
            "bias_gelu.bf16.grad1",
            "residual.bf16.grad1",
            "dino_loss.grad0",
            "clip",
            "adamw.params",
            "adamw.moments",
            "ema",
            "upload_u8",
            "upload_f32",
            "upload_f32.refuses_nan",
            "normalize_u8",
            "memory_pool.release_threshold",
            "attention.grad0",
            "attention.bf16.grad0",
            "transformer_block.grad0",
            "transformer_block.grad12",
            "transformer_block.bf16.grad12",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for (name, err) in &checks {
            // The fused kernels against the portable path: other summation orders in f32; in bf16
            // a few roundings of 2^-8 (up to 8e-3 seen, for the softmax's gradient).
            let tol = if name.contains(".bf16") { 2e-2 } else { 1e-5 };
            assert!(*err <= tol, "{name}: {err}");
        }
        // The two sides really differ (a run of one path against itself would give zeros).
        assert!(
            checks.iter().any(|(n, e)| n.starts_with("layer_norm") && *e > 0.0),
            "{checks:?}"
        );
        Ok(())
    }
}
