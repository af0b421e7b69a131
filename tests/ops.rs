//! The fused CPU kernels (src/ops) against the same functions composed of candle ops in f64:
//! values and every gradient, on shapes with more rows than one parallel task and widths that
//! are not multiples of the vector length.

use _dino_rs::ops;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], std: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            // Box-Muller; the exact distribution does not matter, only spread and signs.
            let (a, b): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
            std * (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    a.to_dtype(DType::F64)?
        .sub(&b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

fn max_abs(a: &Tensor) -> Result<f64> {
    a.to_dtype(DType::F64)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
}

/// Checks `fused(inputs)` against `reference(inputs in f64)`: values and the gradient of
/// Σ output·r for a random r, for every input.
fn check(
    inputs: Vec<Tensor>,
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f64,
) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let vars32: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let vars64: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(DType::F64)?))
        .collect::<Result<_>>()?;
    let t32: Vec<Tensor> = vars32.iter().map(|v| v.as_tensor().clone()).collect();
    let t64: Vec<Tensor> = vars64.iter().map(|v| v.as_tensor().clone()).collect();
    let (y32, y64) = (fused(&t32)?, reference(&t64)?);
    assert_eq!(y32.dims(), y64.dims());
    let scale = max_abs(&y64)?.max(1.0);
    let err = max_abs_diff(&y32, &y64)?;
    assert!(err <= tol * scale, "forward differs by {err} (scale {scale})");
    let r = randn(&mut rng, y32.dims(), 1.0)?;
    let g32 = (y32 * &r)?.sum_all()?.backward()?;
    let g64 = (y64 * r.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
    for (i, (v32, v64)) in vars32.iter().zip(&vars64).enumerate() {
        let a = g32
            .get(v32.as_tensor())
            .expect("fused op has a gradient for every input");
        let b = g64.get(v64.as_tensor()).expect("reference gradient");
        let scale = max_abs(b)?.max(1.0);
        let err = max_abs_diff(a, b)?;
        assert!(
            err <= tol * scale,
            "gradient of input {i} differs by {err} (scale {scale})"
        );
    }
    Ok(())
}

#[test]
fn layer_norm_matches_composed() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for shape in [[3usize, 70, 45], [2, 65, 192], [1, 1, 5]] {
        let d = shape[2];
        let x = (randn(&mut rng, &shape, 2.0)? + 0.7)?;
        let w = (randn(&mut rng, &[d], 0.3)? + 1.0)?;
        let b = randn(&mut rng, &[d], 0.3)?;
        check(
            vec![x, w, b],
            |t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-6),
            |t| {
                let mean = t[0].mean_keepdim(D::Minus1)?;
                let c = t[0].broadcast_sub(&mean)?;
                let var = c.sqr()?.mean_keepdim(D::Minus1)?;
                c.broadcast_div(&(var + 1e-6)?.sqrt()?)?
                    .broadcast_mul(&t[1])?
                    .broadcast_add(&t[2])
            },
            2e-5,
        )?;
    }
    Ok(())
}

#[test]
fn softmax_matches_composed() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for shape in [[4usize, 3, 65, 65], [2, 3, 17, 17], [1, 1, 1, 3]] {
        let x = randn(&mut rng, &shape, 4.0)?;
        check(
            vec![x],
            |t| ops::softmax_last_dim(&t[0]),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1),
            1e-5,
        )?;
    }
    // Large logits: no overflow (the row maximum is subtracted first).
    let x = Tensor::new(&[[1000f32, 999.0, -1000.0]], &Device::Cpu)?;
    let y = ops::softmax_last_dim(&x)?.to_vec2::<f32>()?;
    assert!((y[0][0] - 0.731_058_6).abs() < 1e-6 && y[0][2] == 0.0, "{y:?}");
    Ok(())
}

#[test]
fn gelu_matches_composed() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for shape in [[5usize, 40_000], [3, 7]] {
        let x = randn(&mut rng, &shape, 3.0)?;
        check(
            vec![x],
            |t| ops::gelu_erf(&t[0]),
            |t| {
                // x·Φ(x) with Φ from erf, built from f64 ops with exact backward.
                let x = &t[0];
                let cdf = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
                x * cdf?
            },
            1e-5,
        )?;
    }
    Ok(())
}

#[test]
fn fused_ops_propagate_nan() -> Result<()> {
    let x = Tensor::new(&[[1f32, f32::NAN, 2.0]], &Device::Cpu)?;
    let w = Tensor::ones(3, DType::F32, &Device::Cpu)?;
    let b = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
    for y in [
        ops::layer_norm(&x, &w, &b, 1e-6)?,
        ops::softmax_last_dim(&x)?,
        ops::gelu_erf(&x)?,
    ] {
        assert!(y.to_vec2::<f32>()?[0][1].is_nan(), "NaN must not be hidden");
    }
    Ok(())
}

/// Attention of `qkv` (B, N, 3C) composed of candle ops, as the official code writes it.
fn attention_composed(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c3) = qkv.dims3()?;
    let (c, hd) = (c3 / 3, c3 / 3 / heads);
    let scale = (hd as f64).powf(-0.5);
    let qkv = qkv.reshape((b, n, 3, heads, hd))?.permute((2, 0, 3, 1, 4))?;
    let q = (qkv.get(0)?.contiguous()? * scale)?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let attn = candle_nn::ops::softmax(&q.matmul(&k.t()?)?, D::Minus1)?;
    attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))
}

#[test]
fn attention_matches_composed() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for (b, n, heads, hd) in [(3usize, 17usize, 3usize, 8usize), (2, 65, 2, 24), (1, 1, 1, 5)] {
        let c = heads * hd;
        let scale = (hd as f64).powf(-0.5);
        let qkv = randn(&mut rng, &[b, n, 3 * c], 1.5)?;
        check(
            vec![qkv],
            |t| ops::attention(&t[0], heads, scale),
            |t| attention_composed(&t[0], heads),
            2e-5,
        )?;
    }
    Ok(())
}

#[test]
fn attention_backward_twice_recomputes_what_the_first_took() -> Result<()> {
    // The first backward pass takes the probabilities the forward pass kept; a second one over
    // the same graph recomputes them and must give the same gradient.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let qkv = Var::from_tensor(&randn(&mut rng, &[2, 33, 3 * 16], 1.5)?)?;
    let r = randn(&mut rng, &[2, 33, 16], 1.0)?;
    let loss = (ops::attention(qkv.as_tensor(), 2, 0.25)? * &r)?.sum_all()?;
    let first = loss.backward()?.get(qkv.as_tensor()).expect("gradient").clone();
    let second = loss.backward()?.get(qkv.as_tensor()).expect("gradient").clone();
    assert!(max_abs(&first)? > 0.0);
    assert_eq!(max_abs_diff(&first, &second)?, 0.0);
    // A forward pass under no_grad keeps nothing; its backward recomputes, with the same result.
    let loss = ops::no_grad(|| (ops::attention(qkv.as_tensor(), 2, 0.25)? * &r).and_then(|y| y.sum_all()))?;
    let third = loss.backward()?.get(qkv.as_tensor()).expect("gradient").clone();
    assert_eq!(max_abs_diff(&first, &third)?, 0.0);
    Ok(())
}

#[test]
fn add_bias_matches_broadcast_add() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for shape in [[3usize, 70, 45], [1, 1, 3]] {
        let x = randn(&mut rng, &shape, 1.0)?;
        let b = randn(&mut rng, &[shape[2]], 1.0)?;
        check(
            vec![x, b],
            |t| ops::add_bias(&t[0], &t[1]),
            |t| t[0].broadcast_add(&t[1]),
            1e-6,
        )?;
    }
    Ok(())
}

#[test]
fn residual_matches_composed() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    // 5 x 70 x 100 elements: parallel chunks start and end inside samples.
    let (b, n, d) = (5usize, 70usize, 100usize);
    for scale in [Some(vec![0.0f32, 1.25, 1.25, 0.0, 1.25]), None] {
        let x = randn(&mut rng, &[b, n, d], 1.0)?;
        let y = randn(&mut rng, &[b, n, d], 1.0)?;
        let s = scale.clone();
        check(
            vec![x, y],
            |t| ops::residual(&t[0], &t[1], scale.as_deref()),
            move |t| match &s {
                Some(s) => {
                    let m = Tensor::from_slice(s, (b, 1, 1), &Device::Cpu)?.to_dtype(DType::F64)?;
                    &t[0] + t[1].broadcast_mul(&m)?
                }
                None => &t[0] + &t[1],
            },
            1e-6,
        )?;
    }
    Ok(())
}

#[test]
fn bias_gelu_matches_composed() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for shape in [[3usize, 70, 45], [1, 1, 3]] {
        let x = randn(&mut rng, &shape, 2.0)?;
        let b = randn(&mut rng, &[shape[2]], 1.0)?;
        check(
            vec![x, b],
            |t| ops::bias_gelu(&t[0], &t[1]),
            |t| {
                let v = t[0].broadcast_add(&t[1])?;
                let cdf = ((&v / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
                v * cdf?
            },
            1e-5,
        )?;
    }
    Ok(())
}

#[test]
fn linear_matches_composed() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    // 3 x 70 rows (more than one parallel task) by 45 -> 37 features, and a single row.
    for (shape, out) in [([3usize, 70, 45], 37usize), ([1, 1, 3], 5)] {
        let k = shape[2];
        let x = randn(&mut rng, &shape, 1.0)?;
        let w = randn(&mut rng, &[out, k], 0.5)?;
        let b = randn(&mut rng, &[out], 1.0)?;
        let reference = |t: &[Tensor]| {
            let y = t[0].reshape((shape[0] * shape[1], k))?.matmul(&t[1].t()?)?;
            y.reshape((shape[0], shape[1], out))
        };
        check(
            vec![x.clone(), w.clone(), b],
            |t| ops::linear(&t[0], &t[1], Some(&t[2])),
            |t| reference(t)?.broadcast_add(&t[2]),
            1e-5,
        )?;
        check(vec![x, w], |t| ops::linear(&t[0], &t[1], None), reference, 1e-5)?;
    }
    Ok(())
}

#[test]
fn linear_skips_the_input_gradient_of_a_constant() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let x = randn(&mut rng, &[130, 48], 1.0)?; // pixels: not a variable
    let w = Var::from_tensor(&randn(&mut rng, &[16, 48], 0.5)?)?;
    let grads = ops::linear(&x, &w, None)?.sum_all()?.backward()?;
    assert!(grads.get(&x).is_none());
    let dw = grads.get(w.as_tensor()).expect("weight gradient");
    let want = x.sum(0)?.unsqueeze(0)?.broadcast_as((16, 48))?;
    assert!(max_abs_diff(dw, &want)? < 1e-4);
    Ok(())
}

#[test]
fn dino_cross_entropy_matches_composed() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    // 2 globals + 3 locals of B = 7, 300 outputs; teacher probabilities from a sharp softmax.
    let (ncrops, b, k) = (5usize, 7usize, 300usize);
    let student = randn(&mut rng, &[ncrops * b, k], 1.0)?;
    let q = candle_nn::ops::softmax(&(randn(&mut rng, &[2 * b, k], 1.0)? / 0.04)?, D::Minus1)?;
    let q64 = q.to_dtype(DType::F64)?;
    check(
        vec![student],
        |t| ops::dino_cross_entropy(&t[0], &q, ncrops, 0.1),
        |t| ops::dino_cross_entropy(&t[0], &q64, ncrops, 0.1),
        1e-5,
    )
}

/// A transformer block layer by layer with the per-layer ops (composed candle ops in f64), with
/// `attention` for its core; `t` = [x, the twelve parameters in `ops::BLOCK_PARAMS` order].
fn block_by_layers(
    t: &[Tensor],
    keep: [Option<&[f32]>; 2],
    attention: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (x, p) = (&t[0], &t[1..]);
    let qkv = ops::linear(&ops::layer_norm(x, &p[0], &p[1], 1e-6)?, &p[2], Some(&p[3]))?;
    let y1 = ops::residual(x, &ops::linear(&attention(&qkv)?, &p[4], Some(&p[5]))?, keep[0])?;
    let z2 = ops::layer_norm(&y1, &p[6], &p[7], 1e-6)?;
    let h = ops::bias_gelu(&ops::linear(&z2, &p[8], None)?, &p[9])?;
    ops::residual(&y1, &ops::linear(&h, &p[10], Some(&p[11]))?, keep[1])
}

/// x (B, N, C) and random block parameters (LayerNorm weights near 1, everything else spread).
fn block_inputs(rng: &mut ChaCha8Rng, b: usize, n: usize, c: usize, hidden: usize) -> Result<Vec<Tensor>> {
    let mut t = vec![randn(rng, &[b, n, c], 1.0)?];
    for (i, shape) in [
        vec![c],
        vec![c],
        vec![3 * c, c],
        vec![3 * c],
        vec![c, c],
        vec![c],
        vec![c],
        vec![c],
        vec![hidden, c],
        vec![hidden],
        vec![c, hidden],
        vec![c],
    ]
    .iter()
    .enumerate()
    {
        let p = randn(rng, shape, if shape.len() == 2 { 0.3 } else { 0.5 })?;
        t.push(if i == 0 || i == 6 { (p + 1.0)? } else { p });
    }
    Ok(t)
}

fn params(t: &[Tensor]) -> [&Tensor; 12] {
    std::array::from_fn(|i| &t[i + 1])
}

/// Masks that drop some samples and scale the others, as stochastic depth does.
fn keep_masks(b: usize) -> [Vec<f32>; 2] {
    [
        (0..b).map(|i| if i % 3 == 1 { 0.0 } else { 1.25 }).collect(),
        (0..b).map(|i| if i % 2 == 0 { 0.0 } else { 2.0 }).collect(),
    ]
}

#[test]
fn transformer_block_matches_composed() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    // 5 x 17 rows = more than one parallel task; widths that are not multiples of 8.
    for (b, n, heads, hd, masked) in [
        (5usize, 17usize, 3usize, 6usize, false),
        (5, 17, 3, 6, true),
        (2, 1, 1, 5, false),
    ] {
        let (c, hidden) = (heads * hd, 4 * heads * hd + 3);
        let masks = keep_masks(b);
        let keep = if masked {
            [Some(&masks[0][..]), Some(&masks[1][..])]
        } else {
            [None, None]
        };
        check(
            block_inputs(&mut rng, b, n, c, hidden)?,
            |t| ops::transformer_block(&t[0], params(t), heads, 1e-6, keep),
            |t| block_by_layers(t, keep, |qkv| attention_composed(qkv, heads)),
            5e-5,
        )?;
    }
    Ok(())
}

/// `inputs` as variables, and their tensors.
fn variables(inputs: &[Tensor]) -> Result<(Vec<Var>, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let t = vars.iter().map(|v| v.as_tensor().clone()).collect();
    Ok((vars, t))
}

/// A backward pass from `loss`: the gradient of each of `inputs`.
fn grads_of(loss: &Tensor, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    let g = loss.backward()?;
    Ok(inputs.iter().map(|v| g.get(v).expect("gradient").clone()).collect())
}

/// Asserts two (value, gradients) results are identical bit for bit, every gradient non-zero.
fn assert_same_bits(a: &(Tensor, Vec<Tensor>), b: &(Tensor, Vec<Tensor>), what: &str) -> Result<()> {
    assert_eq!(max_abs_diff(&a.0, &b.0)?, 0.0, "value, {what}");
    for (i, (x, y)) in a.1.iter().zip(&b.1).enumerate() {
        assert!(max_abs(y)? > 0.0, "input {i} has a gradient, {what}");
        assert_eq!(max_abs_diff(x, y)?, 0.0, "gradient of input {i}, {what}");
    }
    Ok(())
}

/// The output and the gradients of Σ y·r for every input.
fn value_and_grads(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    r: &Tensor,
) -> Result<(Tensor, Vec<Tensor>)> {
    let (vars, t) = variables(inputs)?;
    let y = f(&t)?;
    let grads = (&y * r)?.sum_all()?.backward()?;
    let g = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("a gradient for every input").clone())
        .collect();
    Ok((y, g))
}

#[test]
fn transformer_block_equals_its_layers_bit_for_bit() -> Result<()> {
    // The fused block calls the per-layer kernels in the same order, so training with it takes
    // exactly the path the golden tests checked layer by layer.
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (b, n, heads, c) = (6usize, 33usize, 2usize, 24usize);
    let inputs = block_inputs(&mut rng, b, n, c, 4 * c)?;
    let r = randn(&mut rng, &[b, n, c], 1.0)?;
    let masks = keep_masks(b);
    for keep in [[None, None], [Some(&masks[0][..]), Some(&masks[1][..])]] {
        let fused = value_and_grads(
            &inputs,
            |t| ops::transformer_block(&t[0], params(t), heads, 1e-6, keep),
            &r,
        )?;
        let layers = value_and_grads(
            &inputs,
            |t| {
                block_by_layers(t, keep, |qkv| {
                    ops::attention(qkv, heads, (c as f64 / heads as f64).powf(-0.5))
                })
            },
            &r,
        )?;
        assert_same_bits(&fused, &layers, &format!("masks {}", keep[0].is_some()))?;
    }
    Ok(())
}

#[test]
fn transformer_block_backward_recomputes_what_it_did_not_keep() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let inputs = block_inputs(&mut rng, 3, 9, 12, 48)?;
    let (_, t) = variables(&inputs)?;
    let r = randn(&mut rng, &[3, 9, 12], 1.0)?;
    let run = || (ops::transformer_block(&t[0], params(&t), 2, 1e-6, [None, None])? * &r)?.sum_all();
    let grads = |loss: &Tensor| grads_of(loss, &t);
    let loss = run()?;
    // The first backward pass takes what the forward pass kept; the second finds nothing.
    let (first, second) = (grads(&loss)?, grads(&loss)?);
    // Under no_grad nothing is kept at all.
    let third = grads(&ops::no_grad(run)?)?;
    for i in 0..t.len() {
        assert_eq!(max_abs_diff(&first[i], &second[i])?, 0.0, "input {i}, second pass");
        assert_eq!(max_abs_diff(&first[i], &third[i])?, 0.0, "input {i}, after no_grad");
    }
    Ok(())
}

#[test]
fn block_inference_does_not_depend_on_the_batch_or_the_threads() -> Result<()> {
    // Inference shares a batch's images out between the threads (whole images each, gemm unsplit),
    // the images left over split layer by layer; a pass that keeps activations for training runs
    // the whole batch layer by layer. An image's output must be the same bits whichever way it went.
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    // 67 images of 33 tokens: several tasks per thread, and one image left over for 2 and 3 threads.
    let (b, n, heads, c) = (67usize, 33usize, 2usize, 24usize);
    let t = block_inputs(&mut rng, b, n, c, 4 * c)?;
    let (_vars, tracked) = variables(&t)?;
    let trained = ops::transformer_block(&tracked[0], params(&tracked), heads, 1e-6, [None, None])?;
    let infer = |x: &Tensor| ops::no_grad(|| ops::transformer_block(x, params(&t), heads, 1e-6, [None, None]));
    let threads = |n| _dino_rs::set_num_threads(n).map_err(|e| candle_core::Error::Msg(e.to_string()));
    let before = _dino_rs::num_threads();
    for pool in [1, 2, 3] {
        threads(pool)?;
        let all = infer(&t[0])?;
        assert_eq!(max_abs_diff(&all, &trained)?, 0.0, "{pool} threads, the whole batch");
        for (i, len) in [(0, 1), (b - 1, 1), (3, 5)] {
            let part = infer(&t[0].narrow(0, i, len)?)?;
            assert_eq!(
                max_abs_diff(&part, &all.narrow(0, i, len)?)?,
                0.0,
                "{pool} threads, images {i}..{}",
                i + len
            );
        }
    }
    threads(before)
}

#[test]
fn transformer_block_rejects_wrong_shapes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let mut t = block_inputs(&mut rng, 2, 5, 8, 32)?;
    let err = ops::transformer_block(&t[0], params(&t), 2, 1e-6, [Some(&[1.0][..]), None]).unwrap_err();
    assert!(
        err.to_string().contains("1 stochastic-depth scales for a batch of 2"),
        "{err}"
    );
    t[10] = randn(&mut rng, &[31], 1.0)?;
    let err = ops::transformer_block(&t[0], params(&t), 2, 1e-6, [None, None]).unwrap_err();
    assert!(err.to_string().contains("mlp.fc1.bias is [31], expected [32]"), "{err}");
    Ok(())
}

#[test]
fn linear_residual_equals_linear_then_residual_bit_for_bit() -> Result<()> {
    // Off the fused CPU path (under bf16 autocast here; CUDA's path) the node runs the same storage
    // ops as a linear node followed by a residual node, forward and backward, so every value and
    // gradient is the same bit for bit, with and without a drop-path mask.
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let (b, n, inp, out) = (3, 7, 24, 16);
    let inputs = vec![
        randn(&mut rng, &[b, n, out], 1.0)?,
        randn(&mut rng, &[b, n, inp], 1.0)?,
        randn(&mut rng, &[out, inp], 0.3)?,
        randn(&mut rng, &[out], 0.3)?,
    ];
    let r = randn(&mut rng, &[b, n, out], 1.0)?;
    let mask = Tensor::new(&[1.0f32 / 0.9, 0.0, 1.0 / 0.9], &Device::Cpu)?;
    for m in [None, Some(&mask)] {
        let node = |t: &[Tensor]| {
            ops::autocast::autocast(DType::BF16, || {
                let y = ops::linear_residual(&t[0], &t[1], &t[2], &t[3], m)?;
                Ok(y.expect("the node applies under autocast"))
            })
        };
        let layers = |t: &[Tensor]| {
            ops::autocast::autocast(DType::BF16, || {
                ops::residual_with_mask(&t[0], &ops::linear(&t[1], &t[2], Some(&t[3]))?, m)
            })
        };
        let node = value_and_grads(&inputs, node, &r)?;
        assert_eq!(node.0.dtype(), DType::F32);
        assert_same_bits(
            &node,
            &value_and_grads(&inputs, layers, &r)?,
            &format!("mask {}", m.is_some()),
        )?;
    }
    // On the fused CPU path (f32, no autocast) it leaves the work to the fused layers.
    assert!(ops::linear_residual(&inputs[0], &inputs[1], &inputs[2], &inputs[3], None)?.is_none());
    Ok(())
}

/// A one-block model over `t` = [x, the twelve BLOCK_PARAMS (+ ls1 and ls2 gammas with
/// `layer_scale`)] in x's dtype (the tensors themselves, so that gradients reach them), and the
/// per-sample masks `keep` as drop-path masks: on the host only, as the fused CPU path takes them,
/// or with `on_device` copies too, as the model passes them off that path.
fn model_block(
    t: &[Tensor],
    heads: usize,
    layer_scale: bool,
    keep: Option<&[Vec<f32>; 2]>,
    on_device: bool,
) -> Result<(
    _dino_rs::model::block::Block,
    Option<_dino_rs::model::block::DropPathMasks>,
)> {
    let names = ops::BLOCK_PARAMS.iter().copied().chain(["ls1.gamma", "ls2.gamma"]);
    let map = names.zip(&t[1..]).map(|(k, p)| (k.to_string(), p.clone())).collect();
    let vb = candle_nn::VarBuilder::from_tensors(map, t[0].dtype(), &Device::Cpu);
    let c = t[0].dim(2)?;
    let vit = _dino_rs::model::VitConfig {
        layer_scale,
        mlp_ratio: t[10].elem_count() as f64 / c as f64,
        .._dino_rs::model::VitConfig::custom(c, 1, heads, 1, 1)
    };
    let block = _dino_rs::model::block::Block::new(&vit, vb)?;
    let masks = keep
        .map(|[a, m]| -> Result<_> {
            let copies = [
                Tensor::new(a.as_slice(), &Device::Cpu)?,
                Tensor::new(m.as_slice(), &Device::Cpu)?,
            ];
            Ok(_dino_rs::model::block::DropPathMasks {
                attn: a.clone(),
                mlp: m.clone(),
                on_device: on_device.then_some(copies),
            })
        })
        .transpose()?;
    Ok((block, masks))
}

#[test]
fn cls_only_block_is_row_zero_of_the_block() -> Result<()> {
    // The last block of a CLS-feature forward pass computes the CLS row only (every token still a
    // key and value): against row 0 of the whole block in f64, output and every gradient (the
    // input's patch rows included: they reach the CLS row through k and v), for DINO's block and
    // a LayerScale one, with and without stochastic depth.
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    let (b, n, heads, c) = (4usize, 9usize, 2usize, 12usize);
    let masks = keep_masks(b);
    for layer_scale in [false, true] {
        let mut inputs = block_inputs(&mut rng, b, n, c, 4 * c)?;
        if layer_scale {
            inputs.push(randn(&mut rng, &[c], 0.7)?);
            inputs.push(randn(&mut rng, &[c], 0.7)?);
        }
        for keep in [None, Some(&masks)] {
            let cls_only = |t: &[Tensor]| -> Result<Tensor> {
                let (block, m) = model_block(t, heads, layer_scale, keep, false)?;
                assert!(ops::fused(&t[0]));
                block.forward_cls(&t[0], m.as_ref())
            };
            let whole = |t: &[Tensor]| -> Result<Tensor> {
                let (block, m) = model_block(t, heads, layer_scale, keep, false)?;
                block.forward_masked(&t[0], m.as_ref())?.narrow(1, 0, 1)
            };
            check(inputs.clone(), cls_only, whole, 5e-5)?;
        }
    }
    Ok(())
}

#[test]
fn dinov2_block_runs_fused_with_layer_scale_folded_in() -> Result<()> {
    // A LayerScale block on the fused CPU path (γ folded into proj and fc2) against the same block
    // layer by layer in f64, with and without stochastic depth: output and every gradient, the
    // two γ included.
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let (b, n, heads, c) = (5usize, 11usize, 2usize, 12usize);
    let mut inputs = block_inputs(&mut rng, b, n, c, 4 * c)?;
    inputs.push(randn(&mut rng, &[c], 0.7)?);
    inputs.push(randn(&mut rng, &[c], 0.7)?);
    let masks = keep_masks(b);
    for keep in [None, Some(&masks)] {
        let run = |t: &[Tensor]| -> Result<Tensor> {
            let (block, m) = model_block(t, heads, true, keep, false)?;
            assert_eq!(ops::fused(&t[0]), t[0].dtype() == DType::F32);
            block.forward_masked(&t[0], m.as_ref())
        };
        check(inputs.clone(), run, run, 5e-5)?;
    }
    Ok(())
}

#[test]
fn portable_transformer_block_equals_its_layers_bit_for_bit() -> Result<()> {
    // Off the fused CPU path (under bf16 autocast here; CUDA's path) the block node runs the
    // per-layer ops in the same order on the same data, forward and backward, so every value and
    // gradient is the layer-by-layer path's bit for bit. (The composed f32 path: the unit tests of
    // src/ops/block/portable.rs, and the golden tests through tests/composed.rs.)
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let (b, n, heads, c) = (3usize, 7usize, 2usize, 16usize);
    let inputs = block_inputs(&mut rng, b, n, c, 4 * c + 3)?;
    let r = randn(&mut rng, &[b, n, c], 1.0)?;
    let keep = keep_masks(b);
    {
        let dtype = DType::BF16;
        for masks in [None, Some(&keep)] {
            let node = |t: &[Tensor]| {
                let (_, m) = model_block(t, heads, false, masks, true)?;
                let dev = m.as_ref().and_then(|m| m.on_device.as_ref()).map(|[a, b]| [a, b]);
                ops::autocast::autocast(dtype, || {
                    let y = ops::transformer_block_portable(&t[0], params(t), heads, 1e-6, dev)?;
                    Ok(y.expect("the node applies off the fused path"))
                })
            };
            let layers = |t: &[Tensor]| {
                let (block, m) = model_block(t, heads, false, masks, true)?;
                ops::autocast::autocast(dtype, || block.forward_layers(&t[0], m.as_ref()))
            };
            let what = format!("{dtype:?}, masks {}", masks.is_some());
            assert_same_bits(
                &value_and_grads(&inputs, node, &r)?,
                &value_and_grads(&inputs, layers, &r)?,
                &what,
            )?;
        }
    }
    Ok(())
}

#[test]
fn portable_transformer_block_applies_only_where_it_should() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(18);
    let inputs = block_inputs(&mut rng, 2, 5, 8, 32)?;
    let (_, t) = variables(&inputs)?;
    let node = |t: &[Tensor]| ops::transformer_block_portable(&t[0], params(t), 2, 1e-6, None);
    // The fused CPU path has its own block; nothing to differentiate, or no_grad, needs no node.
    assert!(node(&t)?.is_none());
    assert!(ops::autocast::autocast(DType::BF16, || node(&inputs))?.is_none());
    assert!(ops::autocast::autocast(DType::BF16, || ops::no_grad(|| node(&t)))?.is_none());
    assert!(ops::autocast::autocast(DType::BF16, || node(&t))?.is_some());
    Ok(())
}

#[test]
fn portable_transformer_block_backward_recomputes_what_it_did_not_keep() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    let inputs = block_inputs(&mut rng, 3, 9, 12, 48)?;
    let (_, t) = variables(&inputs)?;
    let r = randn(&mut rng, &[3, 9, 12], 1.0)?;
    let loss = ops::autocast::autocast(DType::BF16, || -> Result<Tensor> {
        let y = ops::transformer_block_portable(&t[0], params(&t), 2, 1e-6, None)?.expect("applies");
        (y * &r)?.sum_all()
    })?;
    // The first backward pass takes what the forward pass kept; the second finds nothing.
    let (first, second) = (grads_of(&loss, &t)?, grads_of(&loss, &t)?);
    for i in 0..t.len() {
        assert!(max_abs(&first[i])? > 0.0, "input {i} has a gradient");
        assert_eq!(max_abs_diff(&first[i], &second[i])?, 0.0, "input {i}, second pass");
    }
    Ok(())
}

#[test]
fn portable_transformer_blocks_of_two_resolutions_share_their_parameters() -> Result<()> {
    // The student runs each block on the global and the local crops inside one autocast context,
    // where the block's packed parameters are made once and shared: the gradients must be those
    // of two separate contexts (each packing its own), bit for bit.
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let inputs = block_inputs(&mut rng, 2, 9, 12, 48)?;
    let local = randn(&mut rng, &[4, 5, 12], 1.0)?;
    let (r1, r2) = (randn(&mut rng, &[2, 9, 12], 1.0)?, randn(&mut rng, &[4, 5, 12], 1.0)?);
    let (_, t) = variables(&inputs)?;
    let local = Var::from_tensor(&local)?;
    let block = |x: &Tensor, r: &Tensor| -> Result<Tensor> {
        let y = ops::transformer_block_portable(x, params(&t), 2, 1e-6, None)?.expect("applies");
        (y * r)?.sum_all()
    };
    let shared = ops::autocast::autocast(DType::BF16, || block(&t[0], &r1)? + block(local.as_tensor(), &r2)?)?;
    let apart = (ops::autocast::autocast(DType::BF16, || block(&t[0], &r1))?
        + ops::autocast::autocast(DType::BF16, || block(local.as_tensor(), &r2))?)?;
    let (g1, g2) = (shared.backward()?, apart.backward()?);
    for (i, v) in t.iter().chain([local.as_tensor()]).enumerate() {
        let (a, b) = (g1.get(v).expect("gradient"), g2.get(v).expect("gradient"));
        assert!(max_abs(a)? > 0.0, "input {i} has a gradient");
        assert_eq!(max_abs_diff(a, b)?, 0.0, "gradient of input {i}");
    }
    Ok(())
}

/// candle keys nothing by an op's name, but a profile or an error message names the op by it: two
/// different ops must not share one (a LayerNorm and a softmax backward once did).
#[test]
fn every_custom_op_has_a_name_of_its_own() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/ops");
    let mut names: Vec<(String, String)> = Vec::new();
    let mut files = Vec::new();
    let mut dirs = vec![std::path::PathBuf::from(dir)];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    for path in files {
        let source = std::fs::read_to_string(&path).unwrap();
        let mut lines = source.lines();
        while let Some(line) = lines.next() {
            if line.trim() == "fn name(&self) -> &'static str {" {
                let body = lines.next().unwrap().trim();
                if let Some(name) = body.strip_prefix('"').and_then(|b| b.strip_suffix('"')) {
                    names.push((name.to_string(), path.display().to_string()));
                }
            }
        }
    }
    assert!(names.len() >= 20, "found only {names:?}");
    names.sort();
    for pair in names.windows(2) {
        assert_ne!(
            pair[0].0, pair[1].0,
            "{} and {} name their ops alike",
            pair[0].1, pair[1].1
        );
    }
}

#[test]
fn linear_rows_do_not_depend_on_the_rows_beside_them() -> Result<()> {
    // gemm changes kernels (and summation order) for one row and for products of at most 16×16
    // outputs; a CLS row computed alone (a last block on CLS rows only, one image embedded) must
    // still match the same row in a batch, bit for bit.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (k, n) in [(16usize, 16usize), (16, 32), (16, 64), (64, 16), (32, 128), (48, 384)] {
        let x = randn(&mut rng, &[24, k], 1.0)?;
        let w = randn(&mut rng, &[n, k], 0.3)?;
        let b = randn(&mut rng, &[n], 0.3)?;
        for bias in [None, Some(&b)] {
            let full = ops::linear(&x, &w, bias)?;
            for m in [1usize, 2, 3, 8, 16, 20] {
                let part = ops::linear(&x.narrow(0, 0, m)?, &w, bias)?;
                let d = max_abs_diff(&part, &full.narrow(0, 0, m)?)?;
                assert_eq!(d, 0.0, "k {k} n {n} m {m} bias {}", bias.is_some());
            }
        }
    }
    Ok(())
}
