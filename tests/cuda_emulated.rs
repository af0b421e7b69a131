//! dino_rs's CUDA kernels (src/ops/cuda/*.cu) run on the CPU, against the CPU path of the same ops.
//!
//! CI has no GPU, and a kernel that has never run is a guess. Here every kernel source is compiled as
//! C++ with tests/cuda_emu/cuda_emu.h (which stands in for the CUDA subset they use: threads of a
//! block as real threads, __syncthreads, warp shuffles, bf16, the _rn intrinsics) into a shared
//! library, and each kernel is launched with the grid, block and parameter records of the CUDA
//! build (src/ops/launch.rs). The outputs are compared with what the CPU computes for the same op:
//! bit for bit where both sides spell out their rounding (residual, AdamW, EMA), within a tolerance
//! otherwise. What is left to the GPU itself (tests/python/test_gpu.py, scripts/gpu_check.sh): PTX
//! compilation, nvcc's contractions and fast intrinsics, and the argument lists of the cudarc
//! launches in src/ops, which this file restates.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use _dino_rs::ops::launch::{self, Launch};
use _dino_rs::ops::{self, AdamWItem, AdamWStep};
use candle_core::{DType, Device, Result, Tensor, Var};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const KERNEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/ops/cuda");
const EMU_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cuda_emu");

/// The `extern "C" __global__` kernels of one source.
fn kernels_in(source: &str) -> Vec<String> {
    let marker = "extern \"C\" __global__ void ";
    source
        .match_indices(marker)
        .map(|(at, _)| {
            let rest = &source[at + marker.len()..];
            rest[..rest.find('(').expect("a kernel's parameter list")]
                .trim()
                .to_string()
        })
        .collect()
}

fn kernel_sources() -> Vec<(String, PathBuf)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(KERNEL_DIR)
        .expect("src/ops/cuda")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
        .collect()
}

type LaunchFn = unsafe extern "C" fn(*const u32, *const u32, *const *const c_void);

/// The kernels compiled for the CPU, loaded.
struct Emu {
    lib: libloading::Library,
    _dir: tempfile::TempDir,
}

impl Emu {
    fn get() -> &'static Emu {
        static EMU: OnceLock<Emu> = OnceLock::new();
        EMU.get_or_init(Emu::build)
    }

    fn build() -> Emu {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut units = Vec::new();
        for (stem, path) in kernel_sources() {
            // Each source in a namespace of its own: they define helpers of the same names.
            let mut unit = format!("namespace dino_emu_{stem} {{\n#include \"{}\"\n}}\n", path.display());
            for k in kernels_in(&std::fs::read_to_string(&path).unwrap()) {
                unit += &format!("EMU_EXPORT(dino_emu_{stem}, {k})\n");
            }
            let file = dir.path().join(format!("{stem}.cpp"));
            std::fs::write(&file, unit).unwrap();
            units.push(file);
        }
        let lib = dir.path().join("libdino_emu.so");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = Command::new(&cxx)
            .args(["-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror"])
            // The kernels' _rn operations must round one by one, as on the GPU.
            .args(["-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-pthread"])
            .arg(format!("-I{EMU_DIR}"))
            .args(["-include", "cuda_emu.h", "-include", "mma.h", "-o"])
            .arg(&lib)
            .args(&units)
            .output()
            .unwrap_or_else(|e| panic!("running {cxx} (a C++20 compiler; set CXX): {e}"));
        assert!(
            out.status.success(),
            "compiling the CUDA kernels for the CPU failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // SAFETY: the library was just built from the kernel sources and cuda_emu.h; loading it
        // runs no initialisers beyond the C++ runtime's.
        let lib = unsafe { libloading::Library::new(&lib) }.expect("loading the emulated kernels");
        Emu { lib, _dir: dir }
    }

    /// Runs kernel `name` over `l` with `args`: pointers to each argument's value, as
    /// cuLaunchKernel takes them.
    fn launch(&self, name: &str, l: Launch, args: &[*const c_void]) {
        let symbol = format!("emu_launch_{name}");
        // SAFETY: every emu_launch_* has this signature (cuda_emu.h's EMU_EXPORT).
        let f = unsafe { self.lib.get::<LaunchFn>(symbol.as_bytes()) }
            .unwrap_or_else(|e| panic!("no kernel {name} in src/ops/cuda: {e}"));
        // SAFETY: the callers pass one pointer per kernel parameter, each to a value of the
        // parameter's type, and buffers of the lengths the kernel indexes.
        unsafe { f(l.grid.as_ptr(), l.block.as_ptr(), args.as_ptr()) }
    }
}

/// Pointers to each value, for [`Emu::launch`].
macro_rules! args {
    ($($a:expr),* $(,)?) => { [$(&$a as *const _ as *const c_void),*] };
}

/// A device pointer to an input, as the kernels take one: here a host address.
fn addr<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

/// [`addr`] of a buffer the kernel writes.
fn addr_mut<T>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as u64
}

fn randn(rng: &mut ChaCha8Rng, n: usize, mean: f32, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (a, b): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
            mean + std * (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
        })
        .collect()
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn from_bf16(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// max |a − b| / max |b|, after checking the lengths agree.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs())).max(1e-30);
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    assert!(a.iter().all(|x| x.is_finite()), "non-finite output");
    diff / scale
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let err = rel_err(got, want);
    assert!(
        err <= tol,
        "{what}: max |emulated - cpu| / max |cpu| = {err:.3e} > {tol:.0e}"
    );
}

/// `y = op(inputs)` on the CPU and the gradient of Σ y·g for each input.
fn cpu_with_grads(inputs: &[Tensor], g: &Tensor, op: impl Fn(&[Tensor]) -> Result<Tensor>) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&ts).unwrap();
    let grads = (y.to_dtype(DType::F32).unwrap() * g.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gs = vars.iter().map(|v| grads.get(v).expect("a gradient").clone()).collect();
    (y, gs)
}

#[test]
fn every_kernel_in_src_ops_cuda_is_run_here() {
    let this = include_str!("cuda_emulated.rs");
    let mut missing = Vec::new();
    for (_, path) in kernel_sources() {
        for k in kernels_in(&std::fs::read_to_string(&path).unwrap()) {
            if !this.contains(&format!("\"{k}\"")) {
                missing.push(k);
            }
        }
    }
    assert!(!kernel_sources().is_empty(), "no kernel sources in {KERNEL_DIR}");
    assert!(missing.is_empty(), "kernels with no emulated test: {missing:?}");
    // The library builds with every kernel in it.
    for (_, path) in kernel_sources() {
        for k in kernels_in(&std::fs::read_to_string(&path).unwrap()) {
            // SAFETY: only looked up, not called.
            let found = unsafe { Emu::get().lib.get::<LaunchFn>(format!("emu_launch_{k}").as_bytes()) };
            assert!(found.is_ok(), "{k} not exported");
        }
    }
}

#[test]
fn layer_norm_forward_matches_the_cpu_with_large_means() {
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // 37 rows: the last block has 5 of its 8 warps past the end. A mean of 300 against a spread of
    // 1 is where a one-pass E[x²] − mean² variance in f32 is off by percents; in two passes what is
    // left is the rounding of x − mean in f32 (x's ulp there is 3e-5).
    for (rows, d, mean, tol) in [
        (37usize, 384usize, 300.0f32, 1e-4),
        (37, 65, 0.0, 2e-6),
        (1, 31, -2.0, 2e-6),
    ] {
        let x = randn(&mut rng, rows * d, mean, 1.0);
        let w = randn(&mut rng, d, 1.0, 0.2);
        let b = randn(&mut rng, d, 0.0, 0.2);
        let mut y = vec![f32::NAN; rows * d];
        let eps = 1e-6f32;
        let (px, pw, pb, py) = (addr(&x), addr(&w), addr(&b), addr_mut(&mut y));
        let (r, dd) = (rows as u32, d as u32);
        emu.launch(
            "dino_layer_norm_fwd",
            launch::row_blocks(rows),
            &args![px, pw, pb, py, r, dd, eps],
        );
        let want = ops::layer_norm(
            &tensor(&x, &[rows, d]),
            &tensor(&w, &[d]),
            &tensor(&b, &[d]),
            eps as f64,
        )
        .unwrap();
        assert_close(&format!("layer norm {rows}x{d}, mean {mean}"), &y, &values(&want), tol);
        // The bf16 output (for a bf16 matmul under autocast): the f32 result rounded once.
        let mut y16 = vec![bf16::NAN; rows * d];
        let py16 = addr_mut(&mut y16);
        emu.launch(
            "dino_layer_norm_fwd_bf16",
            launch::row_blocks(rows),
            &args![px, pw, pb, py16, r, dd, eps],
        );
        assert!(
            y16.iter()
                .zip(&y)
                .all(|(a, b)| a.to_bits() == bf16::from_f32(*b).to_bits()),
            "layer norm {rows}x{d}: the bf16 output is not the f32 one rounded"
        );
    }
}

#[test]
fn layer_norm_backward_matches_the_cpu_across_tiles() {
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    // 600 rows: three tiles of 256, the last partial; widths under and over one warp's stride.
    for (rows, d) in [(600usize, 65usize), (300, 384), (3, 8)] {
        let x = randn(&mut rng, rows * d, 3.0, 2.0);
        let w = randn(&mut rng, d, 1.0, 0.3);
        let b = randn(&mut rng, d, 0.0, 0.3);
        let g = randn(&mut rng, rows * d, 0.0, 1.0);
        let eps = 1e-6f32;
        let (tiles, [rows_l, cols_l, sum_l]) = launch::layer_norm_backward(rows, d);
        let mut dx = vec![f32::NAN; rows * d];
        let mut stats = vec![f32::NAN; 2 * rows];
        let (mut pdw, mut pdb) = (vec![f32::NAN; tiles * d], vec![f32::NAN; tiles * d]);
        let (mut dw, mut db) = (vec![f32::NAN; d], vec![f32::NAN; d]);
        let (px, pw, pg) = (addr(&x), addr(&w), addr(&g));
        let (pdx, pst, ppdw, ppdb) = (
            addr_mut(&mut dx),
            addr_mut(&mut stats),
            addr_mut(&mut pdw),
            addr_mut(&mut pdb),
        );
        let (pdwo, pdbo) = (addr_mut(&mut dw), addr_mut(&mut db));
        let (r, dd, tr, t) = (rows as u32, d as u32, launch::TILE_ROWS as u32, tiles as u32);
        emu.launch(
            "dino_layer_norm_bwd_rows",
            rows_l,
            &args![px, pw, pg, pdx, pst, r, dd, eps],
        );
        emu.launch(
            "dino_layer_norm_bwd_cols",
            cols_l,
            &args![px, pg, pst, ppdw, ppdb, r, dd, tr],
        );
        emu.launch("dino_layer_norm_bwd_sum", sum_l, &args![ppdw, ppdb, pdwo, pdbo, t, dd]);
        let inputs = [tensor(&x, &[rows, d]), tensor(&w, &[d]), tensor(&b, &[d])];
        let (_, want) = cpu_with_grads(&inputs, &tensor(&g, &[rows, d]), |t| {
            ops::layer_norm(&t[0], &t[1], &t[2], eps as f64)
        });
        let what = format!("layer norm backward {rows}x{d}");
        assert_close(&format!("{what} dx"), &dx, &values(&want[0]), 1e-4);
        assert_close(&format!("{what} dw"), &dw, &values(&want[1]), 1e-4);
        assert_close(&format!("{what} db"), &db, &values(&want[2]), 1e-5);
    }
}

#[test]
fn column_sums_match_the_cpu_in_f32_and_bf16() {
    // A linear layer's bias gradient (bias.cu): 600 rows are three tiles of 256, the last partial;
    // widths under, over and at several blocks of 32 columns.
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (rows, d) in [(600usize, 65usize), (300, 1152), (3, 8)] {
        let g = randn(&mut rng, rows * d, 0.5, 1.0);
        let (tiles, [cols, total]) = launch::column_sums(rows, d);
        let (r, dd, tr, t) = (rows as u32, d as u32, launch::TILE_ROWS as u32, tiles as u32);
        for bf in [false, true] {
            let gb = to_bf16(&g);
            let (mut partial, mut out) = (vec![f32::NAN; tiles * d], vec![f32::NAN; d]);
            let (pg, pp, po) = (
                if bf { addr(&gb) } else { addr(&g) },
                addr_mut(&mut partial),
                addr_mut(&mut out),
            );
            let name = if bf {
                "dino_column_sums_bf16"
            } else {
                "dino_column_sums_f32"
            };
            emu.launch(name, cols, &args![pg, pp, r, dd, tr]);
            emu.launch("dino_column_sums_total", total, &args![pp, po, t, dd]);
            let input = if bf {
                tensor(&from_bf16(&gb), &[rows, d])
            } else {
                tensor(&g, &[rows, d])
            };
            let want = values(&input.sum(0).unwrap());
            assert_close(&format!("column sums {rows}x{d}, bf16 {bf}"), &out, &want, 1e-5);
        }
    }
}

/// Runs row kernel `names.0` (f32) or `names.1` (bf16) with (inputs…, output, rows, d, scale).
fn row_kernel(names: (&str, &str), bf: bool, inputs: &[&[f32]], rows: usize, d: usize, scale: f32) -> Vec<f32> {
    let (r, dd) = (rows as u32, d as u32);
    let l = launch::row_blocks(rows);
    if bf {
        let ins: Vec<Vec<bf16>> = inputs.iter().map(|v| to_bf16(v)).collect();
        let mut out = vec![bf16::NAN; rows * d];
        let mut ptrs: Vec<u64> = ins.iter().map(|v| addr(v)).collect();
        ptrs.push(addr_mut(&mut out));
        let mut a: Vec<*const c_void> = ptrs.iter().map(|p| p as *const u64 as *const c_void).collect();
        a.extend(args![r, dd, scale]);
        Emu::get().launch(names.1, l, &a);
        from_bf16(&out)
    } else {
        let mut out = vec![f32::NAN; rows * d];
        let mut ptrs: Vec<u64> = inputs.iter().map(|v| addr(v)).collect();
        ptrs.push(addr_mut(&mut out));
        let mut a: Vec<*const c_void> = ptrs.iter().map(|p| p as *const u64 as *const c_void).collect();
        a.extend(args![r, dd, scale]);
        Emu::get().launch(names.0, l, &a);
        out
    }
}

#[test]
fn softmax_forward_and_backward_match_the_cpu_in_f32_and_bf16() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // Attention rows of a global (197) and a local (37) crop, 50 rows: a partial last block.
    for d in [197usize, 37] {
        let rows = 50;
        let scale = 0.125f32;
        let x = randn(&mut rng, rows * d, 0.0, 6.0);
        let g = randn(&mut rng, rows * d, 0.0, 1.0);
        for bf in [false, true] {
            let dtype = if bf { DType::BF16 } else { DType::F32 };
            // The inputs as the kernel sees them (rounded to bf16 first where it takes bf16).
            let (xs, gs) = (
                tensor(&x, &[rows, d]).to_dtype(dtype).unwrap(),
                tensor(&g, &[rows, d]).to_dtype(dtype).unwrap(),
            );
            let (y_cpu, grads) = cpu_with_grads(std::slice::from_ref(&xs), &gs, |t| {
                ops::attention_probabilities(&t[0], scale as f64)
            });
            let y = row_kernel(
                ("dino_softmax_fwd_f32", "dino_softmax_fwd_bf16"),
                bf,
                &[&x],
                rows,
                d,
                scale,
            );
            // Backward from the CPU's probabilities, so each kernel is checked on its own.
            let y_in = values(&y_cpu);
            let dx = row_kernel(
                ("dino_softmax_bwd_f32", "dino_softmax_bwd_bf16"),
                bf,
                &[&y_in, &g],
                rows,
                d,
                scale,
            );
            let (tol_y, tol_dx) = if bf { (8e-3, 2e-2) } else { (1e-6, 1e-5) };
            let what = format!("softmax {rows}x{d} {dtype:?}");
            assert_close(&format!("{what} forward"), &y, &values(&y_cpu), tol_y);
            assert_close(&format!("{what} backward"), &dx, &values(&grads[0]), tol_dx);
            let sums: Vec<f32> = y.chunks(d).map(|r| r.iter().sum()).collect();
            assert_close(
                &format!("{what} row sums"),
                &sums,
                &vec![1.0; rows],
                if bf { 2e-2 } else { 1e-5 },
            );
        }
    }
}

#[test]
fn bias_gelu_forward_and_backward_match_the_cpu_in_f32_and_bf16() {
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    // 33 rows of 100: the grid-stride loop's last block is partial.
    let (rows, d) = (33usize, 100usize);
    let n = rows * d;
    let x = randn(&mut rng, n, 0.0, 2.0);
    let b = randn(&mut rng, d, 0.0, 1.0);
    let g = randn(&mut rng, n, 0.0, 1.0);
    let (count, width) = (n as u32, d as u32);
    for bf in [false, true] {
        let dtype = if bf { DType::BF16 } else { DType::F32 };
        let inputs = [
            tensor(&x, &[rows, d]).to_dtype(dtype).unwrap(),
            tensor(&b, &[d]).to_dtype(dtype).unwrap(),
        ];
        let gs = tensor(&g, &[rows, d]).to_dtype(dtype).unwrap();
        let (y_cpu, grads) = cpu_with_grads(&inputs, &gs, |t| ops::bias_gelu(&t[0], &t[1]));
        let (y, dx) = if bf {
            let (xb, bb, gb) = (to_bf16(&x), to_bf16(&b), to_bf16(&g));
            let (mut y, mut dx) = (vec![bf16::NAN; n], vec![bf16::NAN; n]);
            let (px, pb, pg, py, pdx) = (addr(&xb), addr(&bb), addr(&gb), addr_mut(&mut y), addr_mut(&mut dx));
            emu.launch(
                "dino_bias_gelu_bf16",
                launch::grid_stride(n),
                &args![px, pb, py, count, width],
            );
            emu.launch(
                "dino_bias_gelu_bwd_bf16",
                launch::grid_stride(n),
                &args![px, pb, pg, pdx, count, width],
            );
            (from_bf16(&y), from_bf16(&dx))
        } else {
            let (mut y, mut dx) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            let (px, pb, pg, py, pdx) = (addr(&x), addr(&b), addr(&g), addr_mut(&mut y), addr_mut(&mut dx));
            emu.launch(
                "dino_bias_gelu_f32",
                launch::grid_stride(n),
                &args![px, pb, py, count, width],
            );
            emu.launch(
                "dino_bias_gelu_bwd_f32",
                launch::grid_stride(n),
                &args![px, pb, pg, pdx, count, width],
            );
            (y, dx)
        };
        let (tol_y, tol_dx) = if bf { (8e-3, 8e-3) } else { (1e-6, 1e-6) };
        assert_close(&format!("bias gelu {dtype:?} forward"), &y, &values(&y_cpu), tol_y);
        assert_close(&format!("bias gelu {dtype:?} dx"), &dx, &values(&grads[0]), tol_dx);
    }
}

#[test]
fn weight_norm_forward_and_backward_match_the_cpu() {
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    // The head's bottleneck (256) and a row width that is not a multiple of the warp; 50 rows: the
    // last block of 8 is partial.
    for d in [256usize, 37] {
        let rows = 50;
        let v = randn(&mut rng, rows * d, 0.0, 0.05);
        let g: Vec<f32> = randn(&mut rng, rows, 1.0, 0.3);
        let grad = randn(&mut rng, rows * d, 0.0, 1.0);
        let (r, dd) = (rows as u32, d as u32);
        for bf in [false, true] {
            let dtype = if bf { DType::BF16 } else { DType::F32 };
            let inputs = [tensor(&v, &[rows, d]), tensor(&g, &[rows, 1])];
            let gs = tensor(&grad, &[rows, d]).to_dtype(dtype).unwrap();
            let (w_cpu, grads) = cpu_with_grads(&inputs, &gs, |t| ops::weight_norm_to(&t[0], &t[1], Some(dtype)));
            // The kernels' buffers for both dtypes; each launch uses those of its own.
            let grad_bf = to_bf16(&grad);
            let (mut w32, mut w16) = (vec![f32::NAN; rows * d], vec![bf16::NAN; rows * d]);
            let mut packed = vec![f32::NAN; rows * d + rows];
            let (pv, pg, pp) = (addr(&v), addr(&g), addr_mut(&mut packed));
            let (pw, pgrad, [fwd, bwd]) = if bf {
                let names = ["dino_weight_norm_fwd_bf16", "dino_weight_norm_bwd_bf16"];
                (addr_mut(&mut w16), addr(&grad_bf), names)
            } else {
                let names = ["dino_weight_norm_fwd_f32", "dino_weight_norm_bwd_f32"];
                (addr_mut(&mut w32), addr(&grad), names)
            };
            emu.launch(fwd, launch::row_blocks(rows), &args![pv, pg, pw, r, dd]);
            emu.launch(bwd, launch::row_blocks(rows), &args![pgrad, pv, pg, pp, r, dd]);
            let w = if bf { from_bf16(&w16) } else { w32 };
            let what = format!("weight norm {rows}x{d} {dtype:?}");
            // bf16 output: at most one rounding apart (2^-8 relative).
            let tol_w = if bf { 4e-3 } else { 1e-6 };
            assert_close(&format!("{what} forward"), &w, &values(&w_cpu), tol_w);
            let (dv, dg) = packed.split_at(rows * d);
            assert_close(&format!("{what} dv"), dv, &values(&grads[0]), 1e-5);
            assert_close(&format!("{what} dg"), dg, &values(&grads[1]), 1e-5);
        }
    }
}

#[test]
fn residual_updates_match_the_cpu_bit_for_bit() {
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // 5 samples of 37 tokens × 24: per-sample masks of 0 and 1/keep_prob, and a partial block.
    let (batch, per) = (5usize, 37 * 24);
    let n = batch * per;
    let x = randn(&mut rng, n, 0.0, 1.0);
    let branch = randn(&mut rng, n, 0.0, 1.0);
    let mask = vec![0.0f32, 1.25, 1.25, 0.0, 1.25];
    let (count, per_sample) = (n as u32, per as u32);
    for bf in [false, true] {
        let dtype = if bf { DType::BF16 } else { DType::F32 };
        let branch_t = tensor(&branch, &[batch, 37, 24]).to_dtype(dtype).unwrap();
        let x_t = tensor(&x, &[batch, 37, 24]);
        let mask_t = tensor(&mask, &[batch]);
        for masked in [false, true] {
            let want = ops::residual_with_mask(&x_t, &branch_t, masked.then_some(&mask_t)).unwrap();
            let mut out = vec![f32::NAN; n];
            let branch_bf = to_bf16(&branch);
            let (px, pm, po) = (addr(&x), addr(&mask), addr_mut(&mut out));
            let pb = if bf { addr(&branch_bf) } else { addr(&branch) };
            let name = match (masked, bf) {
                (false, false) => "dino_residual_f32",
                (false, true) => "dino_residual_bf16",
                (true, false) => "dino_residual_masked_f32",
                (true, true) => "dino_residual_masked_bf16",
            };
            if masked {
                emu.launch(name, launch::grid_stride(n), &args![px, pb, pm, po, count, per_sample]);
            } else {
                emu.launch(name, launch::grid_stride(n), &args![px, pb, po, count]);
            }
            let want = values(&want);
            assert!(
                out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}: differs from the CPU (max rel {:.3e})",
                rel_err(&out, &want)
            );
        }
    }
}

#[test]
fn packing_a_blocks_gradients_matches_the_cpu_bit_for_bit() {
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    // A block of width 24 (hidden 96): LayerNorm and bias gradients in f32, weight gradients in
    // bf16 (src/ops/block/portable.rs's backward under autocast), in BLOCK_PARAMS order.
    let lens = [24, 24, 72 * 24, 72, 24 * 24, 24, 24, 24, 96 * 24, 96, 24 * 96, 24];
    let is_bf16 = |i: usize| matches!(i, 2 | 4 | 8 | 10);
    let values_f32: Vec<Vec<f32>> = lens.iter().map(|&n| randn(&mut rng, n, 0.0, 1.0)).collect();
    let values_bf16: Vec<Vec<bf16>> = values_f32.iter().map(|v| to_bf16(v)).collect();
    let parts: Vec<Tensor> = (0..lens.len())
        .map(|i| match is_bf16(i) {
            true => Tensor::from_vec(values_bf16[i].clone(), lens[i], &Device::Cpu).unwrap(),
            false => tensor(&values_f32[i], &[lens[i]]),
        })
        .collect();
    let want = values(&ops::pack::flat_f32(&parts).unwrap());
    let records: Vec<(u64, usize, bool)> = (0..lens.len())
        .map(|i| match is_bf16(i) {
            true => (addr(&values_bf16[i]), lens[i], true),
            false => (addr(&values_f32[i]), lens[i], false),
        })
        .collect();
    let (table, total, grid) = launch::pack_parts(&records).unwrap();
    assert_eq!(total, want.len());
    // The build's launch, and one block a part (every part's grid-stride loop goes round).
    let one_block = Launch {
        grid: [1, grid.grid[1], 1],
        ..grid
    };
    for l in [grid, one_block] {
        let mut out = vec![f32::NAN; total];
        let po = addr_mut(&mut out);
        emu.launch("dino_pack_f32", l, &args![table, po]);
        assert!(
            out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{l:?}: differs from the CPU's casts and concatenation"
        );
    }
}

#[test]
fn residual_updates_with_a_bias_match_the_cpu_bit_for_bit() {
    // proj and fc2 on CUDA: the matmul alone, then one kernel adding the layer's bias (rounded in
    // the branch's dtype, as the layer's own add) and the residual update. Against the CPU's
    // bias add followed by the residual update.
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let (batch, tokens, d) = (5usize, 37usize, 24usize);
    let n = batch * tokens * d;
    let x = randn(&mut rng, n, 0.0, 1.0);
    let branch = randn(&mut rng, n, 0.0, 1.0);
    let bias = randn(&mut rng, d, 0.0, 0.5);
    let mask = vec![0.0f32, 1.25, 1.25, 0.0, 1.25];
    let (count, per_sample, width) = (n as u32, (tokens * d) as u32, d as u32);
    let null = 0u64;
    for bf in [false, true] {
        let dtype = if bf { DType::BF16 } else { DType::F32 };
        let branch_t = tensor(&branch, &[batch, tokens, d]).to_dtype(dtype).unwrap();
        let biased = branch_t
            .broadcast_add(&tensor(&bias, &[d]).to_dtype(dtype).unwrap())
            .unwrap();
        let (x_t, mask_t) = (tensor(&x, &[batch, tokens, d]), tensor(&mask, &[batch]));
        let (branch_bf, bias_bf) = (to_bf16(&branch), to_bf16(&bias));
        let (pb, pbias) = if bf {
            (addr(&branch_bf), addr(&bias_bf))
        } else {
            (addr(&branch), addr(&bias))
        };
        let name = if bf {
            "dino_residual_bias_bf16"
        } else {
            "dino_residual_bias_f32"
        };
        for masked in [false, true] {
            let want = values(&ops::residual_with_mask(&x_t, &biased, masked.then_some(&mask_t)).unwrap());
            let mut out = vec![f32::NAN; n];
            let (px, po) = (addr(&x), addr_mut(&mut out));
            let pm = if masked { addr(&mask) } else { null };
            emu.launch(
                name,
                launch::grid_stride(n),
                &args![px, pb, pbias, pm, po, count, per_sample, width],
            );
            assert!(
                out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name}, masked {masked}: differs from the CPU (max rel {:.3e})",
                rel_err(&out, &want)
            );
        }
    }
}

/// Host buffers standing in for device memory, each with a CPU tensor of its initial values: the
/// records are built from the tensors, with each tensor's address that of its buffer.
struct Buffers {
    data: Vec<Vec<f32>>,
    addrs: Vec<u64>,
    tensors: Vec<Tensor>,
}

impl Buffers {
    fn new(mut data: Vec<Vec<f32>>) -> Self {
        let tensors = data.iter().map(|v| tensor(v, &[v.len()])).collect();
        let addrs = data.iter_mut().map(|v| addr_mut(v)).collect();
        Buffers { data, addrs, tensors }
    }
    fn ptr(&self) -> impl Fn(&Tensor) -> Result<u64> + '_ {
        move |t: &Tensor| {
            let i = self
                .tensors
                .iter()
                .position(|u| u.id() == t.id())
                .expect("a tensor of these buffers");
            Ok(self.addrs[i])
        }
    }
}

/// Parameter sizes around the chunk size: one element, a chunk less one, exactly one, one more,
/// several and a remainder, none.
fn param_lens() -> Vec<usize> {
    let c = launch::CHUNK;
    vec![1, c - 1, c, c + 1, 3 * c + 17, 0, 384]
}

/// Uploads the chunk table of `lens` (as the CUDA build does) and returns it with its length and
/// each tensor's first chunk.
fn chunk_table(lens: &[usize]) -> (Vec<u32>, u32, Vec<u32>) {
    let (table, first) = launch::chunk_table(lens);
    let count = table.len() as u32;
    (table.as_flattened().to_vec(), count, first)
}

#[test]
fn multi_tensor_adamw_matches_the_cpu_bit_for_bit() {
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let lens = param_lens();
    let mut cpu: Vec<[Tensor; 3]> = Vec::new();
    let mut bufs = Vec::new();
    for &n in &lens {
        let (p, g) = (randn(&mut rng, n, 0.0, 1.0), randn(&mut rng, n, 0.0, 1e-2));
        cpu.push([
            tensor(&p, &[n]),
            Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap(),
        ]);
        bufs.extend([p, vec![0.0; n], vec![0.0; n], g]);
    }
    let emu_bufs = Buffers::new(bufs);
    let (table, count, _) = chunk_table(&lens);
    // Two steps; even and odd parameters in the two groups (weight decay or none), as DINO's.
    for t in 1..=2 {
        let (beta1, beta2, lr) = (0.9f64, 0.999f64, 5e-4f64);
        let step = |decays: bool| AdamWStep {
            decay: 1.0 - lr * if decays { 0.04 } else { 0.0 },
            beta1,
            beta2,
            bias_correction2_sqrt: (1.0 - beta2.powi(t)).sqrt(),
            eps: 1e-8,
            step_size: lr / (1.0 - beta1.powi(t)),
        };
        let items: Vec<AdamWItem> = (0..lens.len())
            .map(|i| {
                let b = &emu_bufs.tensors[4 * i..4 * i + 4];
                AdamWItem {
                    param: &b[0],
                    m: &b[1],
                    v: &b[2],
                    grad: &b[3],
                    step: step(i % 2 == 0),
                }
            })
            .collect();
        let rec = launch::adamw_records(&items, emu_bufs.ptr()).unwrap();
        let [keep1, b2, keep2, eps] = launch::adamw_scalars(&items[0].step);
        let (prec, ptab) = (addr(&rec), addr(&table));
        emu.launch(
            "dino_adamw_foreach",
            launch::foreach_blocks(count),
            &args![prec, ptab, keep1, b2, keep2, eps],
        );
        for (i, [p, m, v]) in cpu.iter().enumerate() {
            let g = &emu_bufs.tensors[4 * i + 3];
            assert!(
                ops::adamw_update(p, m, v, g, step(i % 2 == 0)).unwrap().is_some(),
                "the CPU kernels apply"
            );
            for (k, (want, what)) in [(p, "param"), (m, "m"), (v, "v")].into_iter().enumerate() {
                let got = &emu_bufs.data[4 * i + k];
                let want = values(want);
                assert!(
                    got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "step {t}, tensor {i} ({} elements): {what} differs (max rel {:.3e})",
                    lens[i],
                    rel_err(got, &want)
                );
            }
        }
    }
}

#[test]
fn multi_tensor_ema_matches_the_cpu_bit_for_bit() {
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let lens = param_lens();
    let mut bufs = Vec::new();
    for &n in &lens {
        bufs.extend([randn(&mut rng, n, 0.0, 1.0), randn(&mut rng, n, 0.0, 1.0)]);
    }
    let emu_bufs = Buffers::new(bufs);
    let cpu: Vec<Tensor> = (0..lens.len())
        .map(|i| emu_bufs.tensors[2 * i].copy().unwrap())
        .collect();
    let pairs: Vec<(&Tensor, &Tensor)> = (0..lens.len())
        .map(|i| (&emu_bufs.tensors[2 * i], &emu_bufs.tensors[2 * i + 1]))
        .collect();
    let (table, count, _) = chunk_table(&lens);
    let momentum = 0.996f64;
    let rec = launch::ema_records(&pairs, emu_bufs.ptr()).unwrap();
    let (m, keep) = (momentum as f32, (1.0 - momentum) as f32);
    let (prec, ptab) = (addr(&rec), addr(&table));
    emu.launch(
        "dino_ema_foreach",
        launch::foreach_blocks(count),
        &args![prec, ptab, m, keep],
    );
    for (i, teacher) in cpu.iter().enumerate() {
        assert!(ops::ema_update(teacher, &emu_bufs.tensors[2 * i + 1], momentum)
            .unwrap()
            .is_some());
        let (got, want) = (&emu_bufs.data[2 * i], values(teacher));
        assert!(
            got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "tensor {i} ({} elements) differs (max rel {:.3e})",
            lens[i],
            rel_err(got, &want)
        );
    }
}

#[test]
fn multi_tensor_clipping_matches_the_cpu() {
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let lens = param_lens();
    // Spreads that put some norms above the clip (scaled) and some below (unchanged, bit for bit).
    let data: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| randn(&mut rng, n, 0.0, if i % 2 == 0 { 1.0 } else { 1e-4 }))
        .collect();
    let clip = 0.5f64;
    let mut cpu: HashMap<String, Tensor> = data
        .iter()
        .enumerate()
        .map(|(i, v)| (i.to_string(), tensor(v, &[v.len()])))
        .collect();
    _dino_rs::optim::clip_gradients(&mut cpu, clip).unwrap();
    let emu_bufs = Buffers::new(data.clone());
    let grads: Vec<&Tensor> = emu_bufs.tensors.iter().collect();
    let (table, count, first) = chunk_table(&lens);
    let rec = launch::grad_records(&grads, &first, emu_bufs.ptr()).unwrap();
    let mut partial = vec![f32::NAN; count as usize];
    let (prec, ptab, ppart, c) = (addr(&rec), addr(&table), addr_mut(&mut partial), clip as f32);
    emu.launch(
        "dino_sumsq_foreach",
        launch::foreach_blocks(count),
        &args![prec, ptab, ppart],
    );
    emu.launch(
        "dino_clip_foreach",
        launch::foreach_blocks(count),
        &args![prec, ptab, ppart, c],
    );
    let mut scaled = 0;
    for (i, before) in data.iter().enumerate() {
        let got = &emu_bufs.data[i];
        let want = values(&cpu[&i.to_string()]);
        if want.iter().zip(before).all(|(a, b)| a.to_bits() == b.to_bits()) {
            assert!(
                got.iter().zip(before).all(|(a, b)| a.to_bits() == b.to_bits()),
                "tensor {i}: changed"
            );
        } else {
            scaled += 1;
            assert_close(&format!("clipped tensor {i} ({} elements)", lens[i]), got, &want, 1e-6);
            let norm = got.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            assert!(
                (norm - clip).abs() < 1e-5,
                "tensor {i}: norm {norm} after clipping to {clip}"
            );
        }
    }
    assert!(
        scaled >= 3,
        "only {scaled} tensors were clipped: the case tests too little"
    );
}

#[test]
fn fused_attention_matches_the_cpu_on_global_and_local_crops() {
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let hd = launch::ATTENTION_HEAD_DIM;
    // A global crop's 197 tokens (query and key tiles both partial), a local crop's 37 (one key
    // tile and a bit), and one token.
    for (b, n, heads) in [(2usize, 197usize, 3usize), (3, 37, 2), (1, 1, 1)] {
        let c = heads * hd;
        let scale = (hd as f32).powf(-0.5);
        // Spread 1.5: scores of several units, so the softmax is far from uniform.
        let qkv = to_bf16(&randn(&mut rng, b * n * 3 * c, 0.0, 1.5));
        let mut out = vec![bf16::NAN; b * n * c];
        // No log-sum-exps: the no-grad pass.
        let (pq, po, no_lse) = (addr(&qkv), addr_mut(&mut out), 0u64);
        let (nn, hh) = (n as u32, heads as u32);
        emu.launch(
            "dino_attention_fwd_bf16",
            launch::attention(b, n, heads),
            &args![pq, po, no_lse, nn, hh, scale],
        );
        let want = ops::attention(&tensor(&from_bf16(&qkv), &[b, n, 3 * c]), heads, scale as f64).unwrap();
        // bf16 probabilities and output: within a few bf16 roundings of the f32 result (2e-3 to 4e-3
        // seen).
        assert_close(
            &format!("attention {b}x{n}, {heads} heads"),
            &from_bf16(&out),
            &values(&want),
            1e-2,
        );
    }
}

#[test]
fn fused_attention_backward_matches_the_cpu_gradients() {
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let hd = launch::ATTENTION_HEAD_DIM;
    // 197 tokens: four key blocks of 64 (the last of 5) against seven query steps of 32 (the last
    // of 5); 37: one and a bit; 1: a single token, where every gradient but v's is zero.
    for (b, n, heads) in [(2usize, 197usize, 3usize), (3, 37, 2), (1, 1, 1)] {
        let c = heads * hd;
        let scale = (hd as f32).powf(-0.5);
        let qkv = to_bf16(&randn(&mut rng, b * n * 3 * c, 0.0, 1.5));
        let dout = to_bf16(&randn(&mut rng, b * n * c, 0.0, 1.0));
        let rows = b * n * heads;
        let (mut out, mut lse, mut dot) = (vec![bf16::NAN; b * n * c], vec![f32::NAN; rows], vec![f32::NAN; rows]);
        let mut dqkv = vec![bf16::NAN; b * n * 3 * c];
        let (pq, pd) = (addr(&qkv), addr(&dout));
        let (po, pl, pdot, pdq) = (
            addr_mut(&mut out),
            addr_mut(&mut lse),
            addr_mut(&mut dot),
            addr_mut(&mut dqkv),
        );
        let (nn, hh, rr) = (n as u32, heads as u32, rows as u32);
        let grid = launch::attention(b, n, heads);
        emu.launch("dino_attention_fwd_bf16", grid, &args![pq, po, pl, nn, hh, scale]);
        emu.launch(
            "dino_attention_bwd_dot",
            launch::row_blocks(rows),
            &args![po, pd, pdot, rr],
        );
        emu.launch(
            "dino_attention_bwd_dkdv",
            grid,
            &args![pq, pd, pl, pdot, pdq, nn, hh, scale],
        );
        emu.launch(
            "dino_attention_bwd_dq",
            grid,
            &args![pq, pd, pl, pdot, pdq, nn, hh, scale],
        );

        let inputs = [tensor(&from_bf16(&qkv), &[b, n, 3 * c])];
        let g = tensor(&from_bf16(&dout), &[b, n, c]);
        let (_, grads) = cpu_with_grads(&inputs, &g, |t| ops::attention(&t[0], heads, scale as f64));
        let want = values(&grads[0]);
        let got = from_bf16(&dqkv);
        // q, k and v's parts on their own: each has its own scale (and q's and k's are zero for one
        // token). 2e-3 to 5e-3 seen: the bf16 rounding of the products and of the result.
        for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let pick = |v: &[f32]| -> Vec<f32> {
                v.chunks(c)
                    .enumerate()
                    .filter(|(i, _)| i % 3 == part)
                    .flat_map(|(_, r)| r.to_vec())
                    .collect()
            };
            let (got, want) = (pick(&got), pick(&want));
            let what = format!("attention backward {b}x{n}, {heads} heads: {name}");
            if want.iter().all(|&x| x.abs() < 1e-6) {
                assert!(got.iter().all(|&x| x.abs() < 1e-6), "{what}: not zero");
            } else {
                assert_close(&what, &got, &want, 1e-2);
            }
        }
        // The log-sum-exps the backward pass takes its probabilities from, against f64.
        let x = from_bf16(&qkv);
        let head = |token: usize, part: usize, h: usize| &x[((token * 3 + part) * heads + h) * hd..][..hd];
        for bi in 0..b {
            for t in 0..n {
                for h in 0..heads {
                    let q = head(bi * n + t, 0, h);
                    let scores: Vec<f64> = (0..n)
                        .map(|k| {
                            let k = head(bi * n + k, 1, h);
                            scale as f64 * q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let want = max + scores.iter().map(|s| (s - max).exp()).sum::<f64>().ln();
                    let got = lse[(bi * n + t) * heads + h] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * want.abs().max(1.0),
                        "log-sum-exp {got} against {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn normalising_u8_crops_matches_the_cpu_bit_for_bit() {
    let emu = Emu::get();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let normalize = _dino_rs::augment::normalize::Normalize::new([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    // 3 crops of 3 × 15 × 17: planes that are not a multiple of the block size.
    let (n, h, w) = (3usize, 15usize, 17usize);
    let px: Vec<u8> = (0..n * 3 * h * w).map(|_| rng.random()).collect();
    let table: Vec<f32> = normalize.table().iter().flatten().copied().collect();
    let mut out = vec![f32::NAN; px.len()];
    let (pp, pt, po) = (addr(&px), addr(&table), addr_mut(&mut out));
    let (count, plane) = (px.len() as u32, (h * w) as u32);
    emu.launch(
        "dino_normalize_u8",
        launch::grid_stride(px.len()),
        &args![pp, pt, po, count, plane],
    );
    let on_cpu = Tensor::from_slice(&px, (n, 3, h, w), &Device::Cpu).unwrap();
    let want = values(&normalize.on_device(&on_cpu).unwrap());
    assert!(
        out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
        "differs from the CPU's lookup"
    );
}
