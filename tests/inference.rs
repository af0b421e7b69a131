//! Inference and the teacher's forward pass run on detached views of the weights: no autograd
//! graph, so activations are freed as the forward pass goes (as under torch.no_grad), while the
//! views follow every in-place update of the weights.

use std::sync::Arc;

use _dino_rs::dino::Dino;
use _dino_rs::model::{HeadConfig, VitConfig};
use _dino_rs::train::{DinoTrainer, TrainConfig};
use candle_core::{Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;

fn crops(n: usize, size: usize, seed: u64) -> Result<Tensor> {
    let len = n * 3 * size * size;
    let v: Vec<f32> = (0..len)
        .map(|i| (((i as u64 * 2654435761 + seed * 977) % 2000) as f32 / 1000.0 - 1.0) * 1.7)
        .collect();
    Tensor::from_vec(v, (n, 3, size, size), &Device::Cpu)
}

fn model() -> Result<Dino> {
    let mut vit = VitConfig::custom(48, 2, 3, 8, 32);
    vit.drop_path_rate = 0.1;
    let head = HeadConfig {
        hidden_dim: 64,
        bottleneck_dim: 32,
        ..HeadConfig::new(48, 128)
    };
    Dino::new(vit, Some(head), 0, None, &Device::Cpu)
}

fn same(a: &Tensor, b: &Tensor) -> Result<bool> {
    let (a, b): (Vec<f32>, Vec<f32>) = (a.flatten_all()?.to_vec1()?, b.flatten_all()?.to_vec1()?);
    Ok(a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()))
}

/// Both networks of each pair, on the same crops: (with a graph, without).
fn both(dino: &Dino, teacher: bool, x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (tracked, free) = if teacher {
        (&dino.teacher, &dino.teacher_nograd)
    } else {
        (&dino.student, &dino.student_nograd)
    };
    Ok((
        tracked.backbone.forward_t::<ChaCha8Rng>(x, None)?,
        free.backbone.forward_t::<ChaCha8Rng>(x, None)?,
    ))
}

#[test]
fn the_graph_free_networks_equal_the_trained_ones_before_and_after_updates() -> Result<()> {
    let dino = Arc::new(model()?);
    let x = crops(3, 32, 1)?;
    for teacher in [true, false] {
        let (tracked, free) = both(&dino, teacher, &x)?;
        assert!(tracked.track_op(), "the Var network records a graph");
        assert!(!free.track_op(), "the detached views record none");
        assert!(same(&tracked, &free)?, "the same weights, bit for bit");
    }
    let config = TrainConfig {
        epochs: 2,
        warmup_epochs: 0,
        lr: 5e-3,
        batch_size: 2,
        niter_per_ep: 2,
        n_local: 2,
        ..TrainConfig::default()
    };
    let mut trainer = DinoTrainer::new(dino.clone(), config, 0)?;
    let before = dino.features(&x, false).map_err(candle_core::Error::wrap)?;
    for _ in 0..2 {
        trainer
            .step(&crops(4, 32, 2)?, Some(&crops(4, 16, 3)?))?
            .expect("finite loss");
    }
    for teacher in [true, false] {
        let (tracked, free) = both(&dino, teacher, &x)?;
        assert!(
            same(&tracked, &free)?,
            "AdamW and the EMA update the views in place too"
        );
    }
    let after = dino.features(&x, false).map_err(candle_core::Error::wrap)?;
    assert!(!same(&before, &after)?, "the steps changed the student");
    Ok(())
}
