//! dino_rs against golden outputs of the official PyTorch architecture and recipe
//! (tests/fixtures/make_fixtures.py, run once with torch; torch is not a test dependency).

use std::collections::HashMap;

use _dino_rs::dino::Dino;
use _dino_rs::loss::DinoLoss;
use _dino_rs::model::{HeadConfig, VitConfig};
use _dino_rs::schedule::{cosine_scheduler, teacher_temp_schedule};
use _dino_rs::train::{DinoTrainer, TrainConfig};
use candle_core::{Device, Module, Tensor};
use serde_json::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

struct Golden {
    t: HashMap<String, Tensor>,
    j: Value,
}

impl Golden {
    fn load() -> Self {
        let t = candle_core::safetensors::load(format!("{DIR}/golden.safetensors"), &Device::Cpu).unwrap();
        let j = serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/golden.json")).unwrap()).unwrap();
        Self { t, j }
    }
    fn get(&self, k: &str) -> &Tensor {
        self.t.get(k).unwrap_or_else(|| panic!("fixture {k} missing"))
    }
    fn c(&self, k: &str) -> f64 {
        self.j["config"][k].as_f64().unwrap_or_else(|| panic!("config {k}"))
    }
    fn u(&self, k: &str) -> usize {
        self.c(k) as usize
    }
    fn prefixed(&self, prefix: &str) -> HashMap<String, Tensor> {
        // Parameters only: `student.out` is an output, not a weight.
        self.t
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
            .filter(|(n, _)| n.starts_with("backbone.") || n.starts_with("head."))
            .collect()
    }
    fn vit(&self) -> VitConfig {
        VitConfig::custom(
            self.u("embed_dim"),
            self.u("depth"),
            self.u("num_heads"),
            self.u("patch_size"),
            self.u("img_size"),
        )
    }
    fn head(&self) -> HeadConfig {
        HeadConfig {
            in_dim: self.u("embed_dim"),
            out_dim: self.u("out_dim"),
            hidden_dim: self.u("hidden_dim"),
            bottleneck_dim: self.u("bottleneck_dim"),
            nlayers: self.u("nlayers"),
            norm_last_layer: true,
            init: Default::default(),
        }
    }
    fn dino(&self) -> std::sync::Arc<Dino> {
        std::sync::Arc::new(
            Dino::new(
                self.vit(),
                Some(self.head()),
                0,
                Some(self.prefixed("student.")),
                &Device::Cpu,
            )
            .unwrap(),
        )
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_close(name: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let d = max_abs_diff(a, b);
    assert!(d <= tol, "{name}: max |diff| = {d:e} > {tol:e}");
}

#[test]
pub fn backbone_matches_for_global_local_and_rectangular_crops() {
    let g = Golden::load();
    let dino = g.dino();
    let vit = &dino.student.backbone;
    for (input, output) in [
        ("input.global", "backbone.global"),
        ("input.local", "backbone.local"),
        ("input.rect", "backbone.rect"),
    ] {
        assert_close(output, &vit.forward(g.get(input)).unwrap(), g.get(output), 2e-5);
    }
    assert_close(
        "pos_embed.local",
        &vit.interpolate_pos_encoding(16, 16).unwrap(),
        g.get("pos_embed.local"),
        1e-6,
    );
    assert_close(
        "pos_embed.rect",
        &vit.interpolate_pos_encoding(32, 24).unwrap(),
        g.get("pos_embed.rect"),
        1e-6,
    );
    assert_close(
        "attn.global",
        &vit.last_self_attention(g.get("input.global")).unwrap(),
        g.get("attn.global"),
        1e-5,
    );
    assert_close(
        "attn.local",
        &vit.last_self_attention(g.get("input.local")).unwrap(),
        g.get("attn.local"),
        1e-5,
    );
}

#[test]
pub fn head_and_multicrop_wrapper_match() {
    let g = Golden::load();
    let dino = g.dino();
    let feats = dino.student.backbone.forward(g.get("input.global")).unwrap();
    assert_close(
        "head.global",
        &dino.student.head.as_ref().unwrap().forward(&feats).unwrap(),
        g.get("head.global"),
        2e-5,
    );
    let out = dino
        .student
        .forward_t::<rand_chacha::ChaCha8Rng>(&[g.get("input.global"), g.get("input.local")], None)
        .unwrap();
    assert_close("student.out", &out, g.get("student.out"), 2e-5);
    let t = dino
        .teacher
        .forward_t::<rand_chacha::ChaCha8Rng>(&[g.get("input.global")], None)
        .unwrap();
    assert_close("teacher.out", &t, g.get("teacher.out"), 2e-5);
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
pub fn schedules_match_the_official_cosine_scheduler() {
    let g = Golden::load();
    let (epochs, nit) = (g.u("epochs"), g.u("niter_per_ep"));
    let cases = [
        (
            "lr_schedule",
            cosine_scheduler(g.c("lr_scaled"), g.c("min_lr"), epochs, nit, g.u("warmup_epochs"), 0.0),
        ),
        (
            "wd_schedule",
            cosine_scheduler(g.c("weight_decay"), g.c("weight_decay_end"), epochs, nit, 0, 0.0),
        ),
        (
            "momentum_schedule",
            cosine_scheduler(g.c("momentum_teacher"), 1.0, epochs, nit, 0, 0.0),
        ),
        (
            "teacher_temp_schedule",
            teacher_temp_schedule(
                g.c("warmup_teacher_temp"),
                g.c("teacher_temp"),
                g.u("warmup_teacher_temp_epochs"),
                epochs,
            ),
        ),
    ];
    for (name, ours) in cases {
        let theirs = floats(&g.j[name]);
        assert_eq!(ours.len(), theirs.len(), "{name} length");
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1e-12), "{name}[{i}]: {a} vs {b}");
        }
    }
}

fn loss_for(g: &Golden) -> DinoLoss {
    DinoLoss::new(
        g.u("out_dim"),
        g.u("ncrops"),
        g.c("warmup_teacher_temp"),
        g.c("teacher_temp"),
        g.u("warmup_teacher_temp_epochs"),
        g.u("epochs"),
        g.c("student_temp"),
        g.c("center_momentum"),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
pub fn dino_loss_and_centering_match_across_the_temperature_warmup() {
    let g = Golden::load();
    let (s, t) = (g.get("student.out"), g.get("teacher.out"));
    for (epoch, expected) in floats(&g.j["loss_by_epoch"]).into_iter().enumerate() {
        let value = loss_for(&g).forward(s, t, epoch).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!(
            (value - expected).abs() <= 1e-5 * expected.abs(),
            "epoch {epoch}: {value} vs {expected}"
        );
    }
    let mut loss = loss_for(&g);
    let epochs: Vec<usize> = floats(&g.j["loss_sequence_epochs"])
        .into_iter()
        .map(|e| e as usize)
        .collect();
    for (i, (epoch, expected)) in epochs.into_iter().zip(floats(&g.j["loss_sequence"])).enumerate() {
        let value = loss.forward(s, t, epoch).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!(
            (value - expected).abs() <= 1e-5 * expected.abs(),
            "call {i}: {value} vs {expected}"
        );
        assert_close(
            &format!("center.after_{}", i + 1),
            &loss.center,
            g.get(&format!("center.after_{}", i + 1)),
            1e-7,
        );
    }
}

/// Compares the change each step made to every parameter, relative to the change's size: the
/// step's lr is ~3e-6, so absolute differences of the weights alone would prove nothing.
fn assert_updates_match(
    tag: &str,
    before: &HashMap<String, Tensor>,
    ours: &HashMap<String, Tensor>,
    theirs: &HashMap<String, Tensor>,
) {
    let mut extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    extra.sort();
    assert!(
        extra.is_empty() && ours.len() == theirs.len(),
        "{tag}: parameters differ, extra {extra:?}"
    );
    for (name, expected) in theirs {
        let ours_t = &ours[name];
        let (d_ours, d_theirs) = ((ours_t - &before[name]).unwrap(), (expected - &before[name]).unwrap());
        let scale = d_theirs
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let err = max_abs_diff(&d_ours, &d_theirs);
        // Both sides round the new weight to f32: allow two ulps of the weight's magnitude.
        let magnitude = expected
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let tol = 1e-3 * scale + 2.0 * f32::EPSILON * magnitude;
        assert!(
            err <= tol,
            "{tag}.{name}: update differs by {err:e} (update size {scale:e}, tolerance {tol:e})"
        );
    }
}

fn train_config(g: &Golden) -> TrainConfig {
    TrainConfig {
        epochs: g.u("epochs"),
        lr: g.c("lr"),
        min_lr: g.c("min_lr"),
        warmup_epochs: g.u("warmup_epochs"),
        weight_decay: g.c("weight_decay"),
        weight_decay_end: g.c("weight_decay_end"),
        momentum_teacher: g.c("momentum_teacher"),
        teacher_temp: g.c("teacher_temp"),
        warmup_teacher_temp: g.c("warmup_teacher_temp"),
        warmup_teacher_temp_epochs: g.u("warmup_teacher_temp_epochs"),
        student_temp: g.c("student_temp"),
        center_momentum: g.c("center_momentum"),
        // The official DINO's centering: the fixtures come from its code.
        sinkhorn_iterations: 0,
        koleo_weight: 0.0,
        clip_grad: g.c("clip_grad"),
        freeze_last_layer: g.u("freeze_last_layer"),
        batch_size: g.u("batch_size"),
        niter_per_ep: g.u("niter_per_ep"),
        n_local: g.u("n_local"),
    }
}

#[test]
pub fn first_step_gradients_match_after_clipping() {
    // The student's gradients of the first step after per-parameter clipping, the last layer's
    // included (the trainer derives it from the weight's gradient once the graph is freed; the
    // steps above freeze it, so only this checks it against PyTorch).
    let g = Golden::load();
    let mut trainer = DinoTrainer::new(g.dino(), train_config(&g), 0).unwrap();
    trainer.iteration = floats(&g.j["config"]["step_iterations"])[0] as usize;
    let computed = trainer
        .compute(g.get("input.global"), Some(g.get("input.local")))
        .unwrap()
        .unwrap();
    let want = g.prefixed("step.grad.");
    assert!(want.contains_key("head.last_layer.weight_v"));
    let mut names: Vec<_> = computed.grads.keys().cloned().collect();
    names.sort();
    let mut expected: Vec<_> = want.keys().cloned().collect();
    expected.sort();
    assert_eq!(names, expected);
    for (name, theirs) in &want {
        let ours = &computed.grads[name];
        let scale = max_abs_diff(theirs, &theirs.zeros_like().unwrap());
        let err = max_abs_diff(ours, theirs);
        assert!(
            err <= 1e-4 * scale + 1e-9,
            "{name}: gradient differs by {err:e} (size {scale:e})"
        );
    }
}

#[test]
pub fn two_full_training_steps_match_student_teacher_and_center() {
    let g = Golden::load();
    let config = train_config(&g);
    let mut trainer = DinoTrainer::new(g.dino(), config, 0).unwrap();
    let its: Vec<usize> = floats(&g.j["config"]["step_iterations"])
        .into_iter()
        .map(|x| x as usize)
        .collect();
    trainer.iteration = its[0];
    let mut before = g.prefixed("student.");
    let mut teacher_before = g.prefixed("student.");
    for tag in ["step", "step2"] {
        let stats = trainer
            .step(g.get("input.global"), Some(g.get("input.local")))
            .unwrap()
            .unwrap();
        let expected = g.j[format!("{tag}.loss")].as_f64().unwrap();
        assert!(
            (stats.loss - expected).abs() <= 1e-5 * expected,
            "{tag} loss {} vs {expected}",
            stats.loss
        );
        assert!((stats.lr - g.j[format!("{tag}.lr")].as_f64().unwrap()).abs() < 1e-15);
        let student = trainer.dino.student_store.tensors();
        let teacher = trainer.dino.teacher_store.tensors();
        assert_updates_match(tag, &before, &student, &g.prefixed(&format!("{tag}.student.")));
        assert_updates_match(
            &format!("{tag} teacher"),
            &teacher_before,
            &teacher,
            &g.prefixed(&format!("{tag}.teacher.")),
        );
        assert_close(
            &format!("{tag}.center"),
            &trainer.loss.center,
            g.get(&format!("{tag}.center")),
            1e-7,
        );
        before = student;
        teacher_before = teacher;
    }
}

#[test]
pub fn official_pth_and_safetensors_backbones_load_with_the_same_keys() {
    let pth: HashMap<String, Tensor> = candle_core::pickle::read_all(format!("{DIR}/vit_tiny_p4.pth"))
        .unwrap()
        .into_iter()
        .collect();
    let st = candle_core::safetensors::load(format!("{DIR}/vit_tiny_p4.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(pth.len(), st.len());
    for (k, v) in &st {
        assert_close(k, &pth[k], v, 0.0);
    }
    let g = Golden::load();
    let store = _dino_rs::model::ParamStore::from_tensors(pth, 0).unwrap();
    let vit = _dino_rs::model::VisionTransformer::new(&g.vit(), store.var_builder(&Device::Cpu)).unwrap();
    assert_close(
        "pth backbone",
        &vit.forward(g.get("input.global")).unwrap(),
        g.get("backbone.global"),
        2e-5,
    );
}

#[test]
pub fn adamw_matches_torch_with_weight_decay_over_three_steps() {
    let g = Golden::load();
    let w = candle_core::Var::from_tensor(g.get("adamw.init.w")).unwrap();
    let b = candle_core::Var::from_tensor(g.get("adamw.init.b")).unwrap();
    let mut opt = _dino_rs::optim::AdamW::new(vec![("w".into(), w.clone()), ("b.bias".into(), b.clone())]).unwrap();
    let lrs = floats(&g.j["adamw"]["lr"]);
    let wds = floats(&g.j["adamw"]["weight_decay_group0"]);
    for k in 1..=3 {
        let grads: HashMap<String, Tensor> = [
            ("w".to_string(), g.get(&format!("adamw.grad_{k}.w")).clone()),
            ("b.bias".to_string(), g.get(&format!("adamw.grad_{k}.b")).clone()),
        ]
        .into();
        opt.step(&grads, lrs[k - 1], wds[k - 1]).unwrap();
        assert_close(
            &format!("adamw.after_{k}.w"),
            w.as_tensor(),
            g.get(&format!("adamw.after_{k}.w")),
            1e-6,
        );
        assert_close(
            &format!("adamw.after_{k}.b"),
            b.as_tensor(),
            g.get(&format!("adamw.after_{k}.b")),
            1e-6,
        );
    }
}
