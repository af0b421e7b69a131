//! Finite-difference gradient checks for every differentiable layer (docs/design.md, Gradients).
//!
//! candle-nn's fused LayerNorm and `softmax_last_dim` record no backward op, so a gradient through
//! them silently stops: training still runs, the parameters upstream just never move. Each test
//! builds a layer, takes the scalar f = sum(layer(x) · r) for a fixed random r, and compares the
//! analytic gradient of `f.backward()` with central differences for the input and EVERY parameter
//! tensor, after asserting that each gradient exists and is not all zeros.
//!
//! Layers are built in f64 from a `VarMap`-backed VarBuilder (so eps = 1e-5 and a 1e-5 relative
//! tolerance are meaningful). The exception is the position-embedding resize: `pos_embed::interpolate`
//! builds its bicubic matrices in f32, so it (and the ViT at a non-native crop size) is checked in
//! f32 with step sizes and tolerances suited to f32.

use _dino_rs::loss::DinoLoss;
use _dino_rs::model::attention::Attention;
use _dino_rs::model::block::Block;
use _dino_rs::model::layer_norm::LayerNorm;
use _dino_rs::model::mlp::Mlp;
use _dino_rs::model::patch_embed::PatchEmbed;
use _dino_rs::model::{pos_embed, DinoHead, Ffn, HeadConfig, ParamStore, VisionTransformer, VitConfig};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Result, Shape, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

const DEV: Device = Device::Cpu;

/// Step and tolerance: |analytic − numeric| ≤ rtol·(max(|a|, |n|) + 0.1·max|g|) + atol.
#[derive(Clone, Copy)]
struct Tol {
    eps: f64,
    rtol: f64,
    atol: f64,
}

const F64_TOL: Tol = Tol {
    eps: 1e-5,
    rtol: 1e-5,
    atol: 1e-9,
};

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    StandardNormal.sample(rng)
}

fn randn(rng: &mut ChaCha8Rng, shape: impl Into<Shape>, std: f64, dtype: DType) -> Result<Tensor> {
    let shape = shape.into();
    let v: Vec<f64> = (0..shape.elem_count()).map(|_| std * normal(rng)).collect();
    Tensor::from_vec(v, shape, &DEV)?.to_dtype(dtype)
}

fn randn_var(rng: &mut ChaCha8Rng, shape: impl Into<Shape>, dtype: DType) -> Result<Var> {
    Var::from_tensor(&randn(rng, shape, 1.0, dtype)?)
}

fn flat(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

fn set_flat(var: &Var, v: Vec<f64>) -> Result<()> {
    var.set(&Tensor::from_vec(v, var.shape(), &DEV)?.to_dtype(var.dtype())?)
}

/// f = sum(y · r), summed in f64 so that f32 layers lose no precision in the reduction.
fn project(y: &Tensor, r: &Tensor) -> Result<Tensor> {
    y.to_dtype(DType::F64)?.mul(r)?.sum_all()
}

fn eval(f: &dyn Fn() -> Result<Tensor>) -> Result<f64> {
    f()?.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// Builds a layer in f64 over a VarMap and gives every parameter random N(0, 0.5²) values, so
/// that no bias is zero and no LayerNorm weight is one (those would hide some gradient errors).
fn build_f64<T>(rng: &mut ChaCha8Rng, build: impl FnOnce(VarBuilder) -> Result<T>) -> Result<(T, Vec<(String, Var)>)> {
    let varmap = VarMap::new();
    let layer = build(VarBuilder::from_varmap(&varmap, DType::F64, &DEV))?;
    let mut vars: Vec<(String, Var)> = varmap.data().lock().unwrap().clone().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0)); // a HashMap: sort for a reproducible sampling order
    for (_, v) in &vars {
        v.set(&randn(rng, v.shape(), 0.5, v.dtype())?)?;
    }
    Ok((layer, vars))
}

/// Analytic vs central-difference gradient of the scalar `f` for the entry of largest gradient
/// and 4 random entries of each var. Vars named in `no_grad` must get no (or an all-zero) gradient.
fn check_entries(
    f: &dyn Fn() -> Result<Tensor>,
    vars: &[(String, Var)],
    no_grad: &[&str],
    tol: Tol,
    rng: &mut ChaCha8Rng,
) -> Result<GradStore> {
    let grads = f()?.backward()?;
    for (name, var) in vars {
        let g = grads.get(var.as_tensor());
        if no_grad.contains(&name.as_str()) {
            let zero = g.map_or(Ok(true), |g| flat(g).map(|v| v.iter().all(|x| *x == 0.0)))?;
            assert!(zero, "{name}: expected no gradient");
            continue;
        }
        let g = flat(g.unwrap_or_else(|| panic!("{name}: no gradient (stopped in the graph?)")))?;
        let argmax = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        assert!(g[argmax] != 0.0, "{name}: gradient is all zeros");
        let theta = flat(var.as_tensor())?;
        let picks = std::iter::once(argmax).chain((0..4).map(|_| rng.random_range(0..g.len())));
        for i in picks {
            let at = |d: f64| -> Result<f64> {
                let mut t = theta.clone();
                t[i] += d;
                set_flat(var, t)?;
                eval(f)
            };
            let num = (at(tol.eps)? - at(-tol.eps)?) / (2.0 * tol.eps);
            set_flat(var, theta.clone())?;
            let ana = g[i];
            // The floor relative to the largest entry absorbs candle's gelu_erf backward, which
            // uses 0.398942 for 1/sqrt(2π) (see `candle_gelu_erf_backward_precision`).
            let bound = tol.rtol * (ana.abs().max(num.abs()) + 0.1 * g[argmax].abs()) + tol.atol;
            assert!(
                (ana - num).abs() <= bound,
                "{name}[{i}]: analytic {ana:e} vs numeric {num:e} (|diff| {:e} > {bound:e})",
                (ana - num).abs()
            );
        }
    }
    Ok(grads)
}

/// The f32 variant: per-entry differences are too noisy in f32, so each var is moved as a whole
/// along two unit directions (its gradient's, where the derivative is largest, and a random one)
/// and d/dt f(θ + t·u) is compared with <g, u>, the error bounded relative to ‖g‖.
fn check_directions_f32(
    f: &dyn Fn() -> Result<Tensor>,
    vars: &[(String, Var)],
    rng: &mut ChaCha8Rng,
) -> Result<GradStore> {
    let (eps, rtol) = (1e-2, 2e-3);
    let grads = f()?.backward()?;
    for (name, var) in vars {
        let g = flat(
            grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient")),
        )?;
        let gnorm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(gnorm > 0.0, "{name}: gradient is all zeros");
        let theta = flat(var.as_tensor())?;
        let random: Vec<f64> = (0..g.len()).map(|_| normal(rng)).collect();
        for dir in [g.clone(), random] {
            let n = dir.iter().map(|x| x * x).sum::<f64>().sqrt();
            let u: Vec<f64> = dir.iter().map(|x| x / n).collect();
            let at = |d: f64| -> Result<f64> {
                set_flat(var, theta.iter().zip(&u).map(|(t, u)| t + d * u).collect())?;
                eval(f)
            };
            let num = (at(eps)? - at(-eps)?) / (2.0 * eps);
            set_flat(var, theta.clone())?;
            let ana: f64 = g.iter().zip(&u).map(|(g, u)| g * u).sum();
            assert!(
                (ana - num).abs() <= rtol * gnorm,
                "{name}: directional analytic {ana:e} vs numeric {num:e} (‖g‖ {gnorm:e})"
            );
        }
    }
    Ok(grads)
}

/// Checks `layer` at input `x` (input gradient included, as var "input") in f64.
fn check_layer(
    layer: &dyn Fn(&Tensor) -> Result<Tensor>,
    x: Var,
    mut vars: Vec<(String, Var)>,
    no_grad: &[&str],
    rng: &mut ChaCha8Rng,
) -> Result<GradStore> {
    let r = randn(rng, layer(x.as_tensor())?.shape(), 1.0, DType::F64)?;
    let xt = x.as_tensor().clone();
    vars.push(("input".into(), x));
    check_entries(&|| project(&layer(&xt)?, &r), &vars, no_grad, F64_TOL, rng)
}

#[test]
fn layer_norm() -> Result<()> {
    let rng = &mut ChaCha8Rng::seed_from_u64(1);
    let (ln, vars) = build_f64(rng, |vb| LayerNorm::new(7, 1e-6, vb))?;
    let x = randn_var(rng, (2, 3, 7), DType::F64)?;
    check_layer(&|x| ln.forward(x), x, vars, &[], rng).map(drop)
}

#[test]
fn attention_output() -> Result<()> {
    let rng = &mut ChaCha8Rng::seed_from_u64(2);
    let (attn, vars) = build_f64(rng, |vb| Attention::new(6, 2, Default::default(), vb))?;
    let x = randn_var(rng, (2, 4, 6), DType::F64)?;
    check_layer(&|x| attn.forward(x), x, vars, &[], rng).map(drop)
}

#[test]
fn attention_weights() -> Result<()> {
    // The attention map depends on q and k only: `proj` must get no gradient from it.
    let rng = &mut ChaCha8Rng::seed_from_u64(3);
    let (attn, vars) = build_f64(rng, |vb| Attention::new(6, 2, Default::default(), vb))?;
    let x = randn_var(rng, (2, 4, 6), DType::F64)?;
    let f = |x: &Tensor| Ok(attn.forward_with_attention(x)?.1);
    check_layer(&f, x, vars, &["proj.weight", "proj.bias"], rng).map(drop)
}

#[test]
fn mlp() -> Result<()> {
    let rng = &mut ChaCha8Rng::seed_from_u64(4);
    let (mlp, vars) = build_f64(rng, |vb| Mlp::new(5, 9, Ffn::Mlp, Default::default(), vb))?;
    let x = randn_var(rng, (2, 3, 5), DType::F64)?;
    check_layer(&|x| mlp.forward(x), x, vars, &[], rng).map(drop)
}

#[test]
fn patch_embed() -> Result<()> {
    let rng = &mut ChaCha8Rng::seed_from_u64(5);
    let (pe, vars) = build_f64(rng, |vb| PatchEmbed::new(4, 3, 5, vb))?;
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["proj.bias", "proj.weight"]);
    let x = randn_var(rng, (2, 3, 4, 8), DType::F64)?; // a non-square crop: 1x2 patches
    check_layer(&|x| pe.forward(x), x, vars, &[], rng).map(drop)
}

#[test]
fn pos_embed_interpolate() -> Result<()> {
    // f32 only (its bicubic matrices are f32). The map is linear, so central differences with a
    // large step are exact up to f32 rounding.
    let rng = &mut ChaCha8Rng::seed_from_u64(6);
    let pos = randn_var(rng, (1, 16, 5), DType::F32)?;
    let r = randn(rng, (1, 6, 5), 1.0, DType::F64)?;
    let p = pos.as_tensor().clone();
    let f = || {
        project(
            &pos_embed::interpolate(&p, 2, 3, pos_embed::PosInterpolation::Offset)?,
            &r,
        )
    };
    let tol = Tol {
        eps: 0.5,
        rtol: 1e-4,
        atol: 1e-5,
    };
    let grads = check_entries(&f, &[("pos".into(), pos.clone())], &[], tol, rng)?;
    // Every source row feeds a 4-tap bicubic filter from 4x4 down to 2x3, so each gets gradient.
    let g = grads.get(pos.as_tensor()).unwrap().abs()?.sum(D::Minus1)?;
    assert!(flat(&g)?.iter().all(|v| *v > 0.0), "a pos-embed row got no gradient");
    Ok(())
}

#[test]
fn block() -> Result<()> {
    let rng = &mut ChaCha8Rng::seed_from_u64(7);
    let vit = VitConfig {
        mlp_ratio: 2.0,
        ..VitConfig::custom(6, 1, 2, 1, 1)
    };
    let (block, vars) = build_f64(rng, |vb| Block::new(&vit, vb))?;
    assert_eq!(vars.len(), 12, "norm1/2, qkv, proj, fc1, fc2: weight and bias each");
    let x = randn_var(rng, (2, 4, 6), DType::F64)?;
    check_layer(&|x| block.forward(x), x, vars, &[], rng).map(drop)
}

#[test]
fn swiglu_mlp() -> Result<()> {
    let rng = &mut ChaCha8Rng::seed_from_u64(11);
    let (mlp, vars) = build_f64(rng, |vb| Mlp::new(5, 8, Ffn::Swiglu, Default::default(), vb))?;
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["w12.bias", "w12.weight", "w3.bias", "w3.weight"]);
    let x = randn_var(rng, (2, 3, 5), DType::F64)?;
    check_layer(&|x| mlp.forward(x), x, vars, &[], rng).map(drop)
}

#[test]
fn dinov2_block() -> Result<()> {
    // LayerScale on both branches and the SwiGLU MLP (ViT-g's block), layer by layer.
    let rng = &mut ChaCha8Rng::seed_from_u64(12);
    let vit = VitConfig {
        layer_scale: true,
        ffn: Ffn::Swiglu,
        ..VitConfig::custom(6, 1, 2, 1, 1)
    };
    let (block, vars) = build_f64(rng, |vb| Block::new(&vit, vb))?;
    assert!(vars.iter().any(|(n, _)| n == "ls1.gamma") && vars.iter().any(|(n, _)| n == "ls2.gamma"));
    assert_eq!(vars.len(), 14);
    let x = randn_var(rng, (2, 4, 6), DType::F64)?;
    check_layer(&|x| block.forward(x), x, vars, &[], rng).map(drop)
}

#[test]
fn pos_embed_interpolate_antialias() -> Result<()> {
    // DINOv2's `_reg` resize, both ways: 4x4 down to 2x3 and up to 5x6.
    let rng = &mut ChaCha8Rng::seed_from_u64(13);
    for (h, w) in [(2, 3), (5, 6)] {
        let pos = randn_var(rng, (1, 16, 5), DType::F32)?;
        let r = randn(rng, (1, h * w, 5), 1.0, DType::F64)?;
        let p = pos.as_tensor().clone();
        let f = || {
            project(
                &pos_embed::interpolate(&p, h, w, pos_embed::PosInterpolation::Antialias)?,
                &r,
            )
        };
        let tol = Tol {
            eps: 0.5,
            rtol: 1e-4,
            atol: 1e-5,
        };
        check_entries(&f, &[("pos".into(), pos.clone())], &[], tol, rng)?;
    }
    Ok(())
}

/// |gradient| summed over the patch rows of pos_embed (row 0, the CLS row, is reached without
/// interpolation, so only the patch rows show whether gradient flows through the resize).
fn patch_pos_grad(grads: &GradStore, vars: &[(String, Var)]) -> Result<f64> {
    let pos = &vars.iter().find(|(n, _)| n == "pos_embed").unwrap().1;
    let g = grads.get(pos.as_tensor()).expect("pos_embed has a gradient");
    let rows = g.narrow(1, 1, g.dim(1)? - 1)?;
    rows.to_dtype(DType::F64)?.abs()?.sum_all()?.to_scalar::<f64>()
}

#[test]
fn vision_transformer_native_size_f64() -> Result<()> {
    // 8x8 only: at 4x8, pos_embed::interpolate's f32 matrices meet the f64 pos_embed and the
    // forward fails with a dtype mismatch; that size is covered by the f32 test below.
    let rng = &mut ChaCha8Rng::seed_from_u64(8);
    let cfg = VitConfig::custom(12, 2, 3, 4, 8);
    let (vit, vars) = build_f64(rng, |vb| VisionTransformer::new(&cfg, vb))?;
    // patch_embed.proj.{weight,bias}, cls_token, pos_embed, 2 blocks x 12, norm.{weight,bias}.
    assert_eq!(vars.len(), 2 + 2 + 2 * 12 + 2);
    let x = randn_var(rng, (2, 3, 8, 8), DType::F64)?;
    let grads = check_layer(&|x| vit.forward(x), x, vars.clone(), &[], rng)?;
    assert!(patch_pos_grad(&grads, &vars)? > 0.0);
    Ok(())
}

#[test]
fn vision_transformer_both_sizes_f32() -> Result<()> {
    // The 4x8 crop goes through pos_embed::interpolate (2x2 grid -> 1x2), which needs f32: the
    // model is built through ParamStore as in training, then randomised.
    let rng = &mut ChaCha8Rng::seed_from_u64(9);
    let store = ParamStore::new(0);
    let vit = VisionTransformer::new(&VitConfig::custom(12, 2, 3, 4, 8), store.var_builder(&DEV))?;
    let vars = store.vars();
    for (_, v) in &vars {
        v.set(&randn(rng, v.shape(), 0.5, DType::F32)?)?;
    }
    for (h, w) in [(8, 8), (4, 8)] {
        let x = randn_var(rng, (2, 3, h, w), DType::F32)?;
        let r = randn(rng, (2, 12), 1.0, DType::F64)?;
        let xt = x.as_tensor().clone();
        let mut all = vars.clone();
        all.push(("input".into(), x));
        let grads = check_directions_f32(&|| project(&vit.forward(&xt)?, &r), &all, rng)?;
        let s = patch_pos_grad(&grads, &vars)?;
        assert!(s > 0.0, "{h}x{w}: no gradient reaches the patch rows of pos_embed");
    }
    Ok(())
}

#[test]
fn dino_head() -> Result<()> {
    let rng = &mut ChaCha8Rng::seed_from_u64(10);
    let cfg = HeadConfig {
        in_dim: 6,
        out_dim: 9,
        hidden_dim: 8,
        bottleneck_dim: 5,
        nlayers: 3,
        norm_last_layer: false,
        init: Default::default(),
    };
    let (head, vars) = build_f64(rng, |vb| DinoHead::new(&cfg, vb))?;
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    let expected = "last_layer.weight_g last_layer.weight_v mlp.0.bias mlp.0.weight mlp.2.bias \
                    mlp.2.weight mlp.4.bias mlp.4.weight";
    assert_eq!(names.join(" "), expected);
    let x = randn_var(rng, (4, 6), DType::F64)?;
    check_layer(&|x| head.forward(x), x, vars, &[], rng).map(drop)
}

#[test]
fn dino_loss_student_only() -> Result<()> {
    let rng = &mut ChaCha8Rng::seed_from_u64(11);
    let (b, d, ncrops) = (2, 6, 4);
    let mut loss = DinoLoss::new(d, ncrops, 0.04, 0.07, 2, 5, 0.1, 0.9, &DEV)?;
    loss.center = randn(rng, (1, d), 0.3, DType::F64)?; // f64 centre: it is an f32 zero by default
    let student = randn_var(rng, (ncrops * b, d), DType::F64)?;
    let teacher = randn_var(rng, (2 * b, d), DType::F64)?;
    let (s, t) = (student.as_tensor().clone(), teacher.as_tensor().clone());
    let vars = [("student".into(), student), ("teacher".into(), teacher)];
    // Epoch 1: mid-warm-up teacher temperature.
    check_entries(&|| loss.loss(&s, &t, 1), &vars, &["teacher"], F64_TOL, rng).map(drop)
}

#[test]
fn fused_candle_ops_have_no_backward() -> Result<()> {
    // The pitfall itself: candle-nn's fused softmax_last_dim and layer_norm are applied with
    // `apply_op*_no_bwd`, so backward() succeeds and simply returns no gradient for their inputs.
    // f32: the fused CPU layer_norm rejects f64.
    let rng = &mut ChaCha8Rng::seed_from_u64(12);
    let x = randn_var(rng, (3, 5), DType::F32)?;
    let w = randn_var(rng, 5, DType::F32)?;
    let bias = randn_var(rng, 5, DType::F32)?;
    let r = randn(rng, (3, 5), 1.0, DType::F64)?; // project() sums in f64
    let xt = x.as_tensor();

    let fused = project(&candle_nn::ops::softmax_last_dim(xt)?, &r)?.backward()?;
    assert!(
        fused.get(xt).is_none(),
        "softmax_last_dim now has a backward: revisit docs/design.md, Gradients"
    );
    let composed = project(&candle_nn::ops::softmax(xt, D::Minus1)?, &r)?.backward()?;
    assert!(flat(composed.get(xt).unwrap())?.iter().any(|v| *v != 0.0));

    let fused_ln = candle_nn::ops::layer_norm(xt, w.as_tensor(), bias.as_tensor(), 1e-6)?;
    let fused = project(&fused_ln, &r)?.backward()?;
    for v in [&x, &w, &bias] {
        assert!(
            fused.get(v.as_tensor()).is_none(),
            "fused layer_norm now has a backward"
        );
    }
    // Our LayerNorm over the same values: a gradient for x, weight and bias.
    let varmap = VarMap::new();
    let ln = LayerNorm::new(5, 1e-6, VarBuilder::from_varmap(&varmap, DType::F32, &DEV))?;
    let data = varmap.data().lock().unwrap().clone();
    data["weight"].set(w.as_tensor())?;
    data["bias"].set(bias.as_tensor())?;
    let ours_out = ln.forward(xt)?;
    let diff = (&ours_out - &fused_ln)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-4, "the two compute the same function: {diff}");
    let ours = project(&ours_out, &r)?.backward()?;
    for t in [xt, data["weight"].as_tensor(), data["bias"].as_tensor()] {
        assert!(flat(ours.get(t).unwrap())?.iter().any(|v| *v != 0.0));
    }
    Ok(())
}

#[test]
fn candle_gelu_erf_backward_precision() -> Result<()> {
    // candle 0.11.1's gelu_erf backward writes 1/sqrt(2π) as 0.398942, so even in f64 its
    // derivative is off by up to ~1.7e-7 (at |x| = 1): the reason for the tolerance floor above.
    let xs = [-2.0, -1.0, -0.3, 0.0, 0.5, 1.0, 3.0];
    let x = Var::from_tensor(&Tensor::new(&xs, &DEV)?)?;
    let grads = x.as_tensor().gelu_erf()?.sum_all()?.backward()?;
    let g = flat(grads.get(x.as_tensor()).unwrap())?;
    let gelu = |v: f64| Tensor::new(&[v], &DEV)?.gelu_erf()?.to_vec1::<f64>().map(|t| t[0]);
    for (&v, &ana) in xs.iter().zip(&g) {
        let num = (gelu(v + 1e-5)? - gelu(v - 1e-5)?) / 2e-5;
        assert!((ana - num).abs() < 2e-7, "gelu_erf'({v}): {ana} vs {num}");
    }
    Ok(())
}
