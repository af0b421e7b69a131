//! Mixed precision (src/ops/autocast.rs) follows PyTorch's autocast policy: bf16 matmuls, f32
//! normalisations and softmax, a residual stream that stays f32, f32 gradients for f32 parameters;
//! and a bf16 training step stays within bf16's precision of the f32 one.

use std::sync::Arc;

use _dino_rs::dino::Dino;
use _dino_rs::model::{HeadConfig, VitConfig};
use _dino_rs::ops::{self, autocast::autocast};
use _dino_rs::train::{DinoTrainer, TrainConfig};
use candle_core::{DType, Device, Result, Tensor, Var};

const BF16: DType = DType::BF16;

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    // A fixed pseudo-random pattern; only spread and signs matter here.
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0) * 1.5)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let d = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok(d / b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(1e-12))
}

#[test]
fn each_op_runs_in_the_dtype_pytorch_autocast_gives_it() -> Result<()> {
    let x = randn(&[2, 5, 8], 1)?;
    let w = Var::from_tensor(&randn(&[12, 8], 2)?)?;
    let b = Var::from_tensor(&randn(&[12], 3)?)?;
    let (g, beta) = (Var::from_tensor(&randn(&[8], 4)?)?, Var::from_tensor(&randn(&[8], 5)?)?);
    autocast(BF16, || -> Result<()> {
        let y = ops::linear(&x, &w, Some(&b))?;
        assert_eq!(y.dtype(), BF16, "linear");
        assert_eq!(ops::bias_gelu(&y, &b)?.dtype(), BF16, "GELU keeps its input's dtype");
        let low = x.to_dtype(BF16)?;
        assert_eq!(ops::layer_norm(&low, &g, &beta, 1e-6)?.dtype(), DType::F32, "LayerNorm");
        assert_eq!(ops::softmax_last_dim(&low)?.dtype(), DType::F32, "softmax");
        // Attention's probabilities stay bf16 (computed in f32 inside the op): PyTorch's f32
        // softmax output cast to bf16 by the next matmul, to within one bf16 rounding.
        let p = ops::attention_probabilities(&low, 0.35)?;
        assert_eq!(p.dtype(), BF16, "attention probabilities");
        let reference = ops::softmax_last_dim(&(low.to_dtype(DType::F32)? * 0.35)?)?.to_dtype(BF16)?;
        let e = rel(&p, &reference)?;
        assert!(e <= 1.0 / 256.0, "attention probabilities: {e} from f32 softmax + cast");
        assert_eq!(
            ops::residual(&x, &low, None)?.dtype(),
            DType::F32,
            "residual: the wider side"
        );
        assert_eq!(ops::residual(&x, &low, Some(&[1.0, 0.0]))?.dtype(), DType::F32);
        Ok(())
    })?;
    // Outside the context nothing is cast, and the CPU takes its fused f32 kernels again.
    assert_eq!(ops::linear(&x, &w, Some(&b))?.dtype(), DType::F32);
    assert!(ops::fused(&x));
    autocast(BF16, || assert!(!ops::fused(&x)));
    autocast(DType::F32, || assert!(ops::fused(&x), "f32 is no autocast"));
    Ok(())
}

#[test]
fn parameters_get_f32_gradients_close_to_the_f32_ones() -> Result<()> {
    let x = randn(&[4, 7, 16], 6)?;
    let w = Var::from_tensor(&(randn(&[32, 16], 7)? * 0.2)?)?;
    let b = Var::from_tensor(&randn(&[32], 8)?)?;
    let (g, beta) = (
        Var::from_tensor(&randn(&[16], 9)?)?,
        Var::from_tensor(&randn(&[16], 10)?)?,
    );
    let r = randn(&[4, 7, 32], 11)?;
    let run = |dtype: DType| -> Result<(Tensor, Vec<Tensor>)> {
        let y = autocast(dtype, || -> Result<Tensor> {
            let h = ops::layer_norm(&x, &g, &beta, 1e-6)?;
            let y = ops::bias_gelu(&ops::linear(&h, &w, None)?, &b)?;
            // The same weight twice in one context: the cached cast must add both gradients.
            ops::linear(&y.narrow(2, 0, 16)?, &w, None)
        })?;
        let loss = y.to_dtype(DType::F32)?.mul(&r)?.sum_all()?;
        let grads = loss.backward()?;
        let gs = [&w, &b, &g, &beta]
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .expect("every parameter has a gradient")
            })
            .collect();
        Ok((y, gs))
    };
    let (y32, g32) = run(DType::F32)?;
    let (y16, g16) = run(BF16)?;
    assert_eq!(y16.dtype(), BF16);
    let e = rel(&y16, &y32)?;
    assert!(
        e < 1e-2 && e > 1e-6,
        "output: relative difference {e} (bf16 must differ, slightly)"
    );
    for (i, (a, b)) in g16.iter().zip(&g32).enumerate() {
        assert_eq!(a.dtype(), DType::F32, "gradient {i} of an f32 parameter");
        let e = rel(a, b)?;
        assert!(e < 2e-2, "gradient {i}: relative difference {e}");
    }
    Ok(())
}

fn tiny() -> (VitConfig, HeadConfig) {
    let mut vit = VitConfig::custom(48, 2, 3, 8, 32);
    vit.drop_path_rate = 0.1;
    let head = HeadConfig {
        hidden_dim: 64,
        bottleneck_dim: 32,
        ..HeadConfig::new(48, 128)
    };
    (vit, head)
}

#[test]
fn a_bf16_training_step_keeps_f32_state_and_follows_the_f32_one() -> Result<()> {
    let (vit, head) = tiny();
    let config = TrainConfig {
        epochs: 2,
        warmup_epochs: 0,
        lr: 5e-3,
        batch_size: 4,
        niter_per_ep: 2,
        n_local: 2,
        ..TrainConfig::default()
    };
    let globals = randn(&[8, 3, 32, 32], 12)?;
    let locals = randn(&[8, 3, 16, 16], 13)?;
    let train = |dtype: DType| -> Result<(Vec<f64>, DinoTrainer)> {
        let mut dino = Dino::new(vit.clone(), Some(head.clone()), 0, None, &Device::Cpu)?;
        dino.dtype = dtype;
        let mut t = DinoTrainer::new(Arc::new(dino), config.clone(), 0)?;
        assert_eq!(t.dtype, dtype, "a trainer takes its model's dtype");
        let losses = (0..3)
            .map(|_| Ok(t.step(&globals, Some(&locals))?.expect("finite loss").loss))
            .collect::<Result<Vec<_>>>()?;
        Ok((losses, t))
    };
    let (l32, t32) = train(DType::F32)?;
    let (l16, t16) = train(BF16)?;
    for (a, b) in l16.iter().zip(&l32) {
        assert!((a - b).abs() / b.abs() < 1e-2, "losses {l16:?} against {l32:?}");
    }
    assert_ne!(l16, l32, "the bf16 run computed in bf16");
    // Master weights, Adam moments and centre are f32.
    for (name, v) in t16
        .dino
        .student_store
        .vars()
        .into_iter()
        .chain(t16.dino.teacher_store.vars())
    {
        assert_eq!(v.dtype(), DType::F32, "{name}");
    }
    for (name, m, v, _) in t16.optimizer.state() {
        assert_eq!((m.dtype(), v.dtype()), (DType::F32, DType::F32), "Adam state of {name}");
    }
    assert_eq!(t16.loss.center.dtype(), DType::F32);
    // The trained students stay within bf16 precision of each other, and moved much further.
    let x = randn(&[4, 3, 32, 32], 14)?;
    let initial = Dino::new(vit.clone(), Some(head.clone()), 0, None, &Device::Cpu)?;
    let f0 = initial.features(&x, false).map_err(candle_core::Error::wrap)?;
    let f32_ = t32.dino.features(&x, false).map_err(candle_core::Error::wrap)?;
    let f16 = t16.dino.features(&x, false).map_err(candle_core::Error::wrap)?;
    assert_eq!(f16.dtype(), DType::F32, "features come out in f32");
    let (gap, moved) = (rel(&f16, &f32_)?, rel(&f32_, &f0)?);
    assert!(gap < 1e-2, "bf16 against f32 after 3 steps: {gap}");
    assert!(
        moved > 10.0 * gap,
        "training moved the features by {moved}, the dtypes differ by {gap}"
    );
    Ok(())
}
