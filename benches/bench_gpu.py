"""DINO on a GPU: dino_rs (CUDA build) against PyTorch on the same card, in the same run.

Run on the GPU machine (scripts/gpu_check.sh does, after installing the CUDA wheel)::

    python benches/bench_gpu.py                # ViT-S/16, the configurations of issue 5
    python benches/bench_gpu.py --device cpu --config tiny --steps 2   # a dry run of every code path

What it measures (each configuration in its own child process, so that GPU memory peaks are its own)

* ``iteration``: one official DINO iteration (benches/dino_torch.py, the same code bench_train.py
  times on the CPU) for ViT-S/16, 2 x 224 + 8 x 96 crops, out_dim 65536, batch 64, the full recipe
  (EMA teacher, centering, clipping, AdamW schedules). PyTorch under bf16 autocast, with the official
  explicit attention and with ``scaled_dot_product_attention``; dino_rs ``Trainer.step`` with
  ``dtype="bfloat16"`` (the same autocast policy), and again with ``DINO_RS_COMPOSED_OPS=1`` (AdamW,
  EMA and gradient clipping as candle ops instead of dino_rs's multi-tensor kernels, attention
  composed instead of the flash attention kernels, the crops normalised by candle ops), to show
  what those are worth. A dino_rs training run that fails is tried once more as ``…-layers``, with
  ``DINO_RS_BLOCK_NODE=0`` (each transformer block layer by layer instead of as one graph node).
  After its timed steps each dino_rs run profiles 3 more (``Trainer.profile``): a second table
  gives the milliseconds per phase (teacher forward, student forward, loss, backward, clip, AdamW,
  EMA, centre).
* ``embed``: teacher embedding throughput, B = 256 crops of 224 px, no gradients: PyTorch bf16 SDPA
  and fp32 against dino_rs ``forward_backbone(batch_size=256)`` in bfloat16 (with the flash
  attention kernel, and composed: ``dino_rs-bf16-composed``) and float32.
* ``e2e``: dino_rs training from JPEG files (copies of the bundled ~500x375 photos in an ImageFolder,
  the native multi-crop loader on every core, crops sent to the GPU as uint8 and normalised there)
  against the same trainer's ``step`` on synthetic crops already in memory, in the same process:
  the loader must keep the GPU fed (issue 5: >= 90% of the synthetic rate).
* ``peak``: the card's bf16 matmul rate (PyTorch, ten 8192 x 8192 x 8192 products per timed call),
  against which every achieved TFLOP/s figure is also given as a percentage.
* images/s from the median of the timed iterations (each call ends in a host sync: ``loss.item()``,
  or the features copied to NumPy). dino_rs takes its crops as NumPy arrays and uploads them on
  every call (through page-locked staging buffers); PyTorch's crops stay on the device, and each
  PyTorch run is timed again with its crops copied from the same arrays every call (``from host
  arrays``: ``torch.from_numpy(a).to(device)``, what a caller holding arrays writes). Achieved
  TFLOP/s from the FLOP count (~112 GFLOP per image for the iteration, docs/gpu.md, Reference
  measurements; the embedding's forward FLOPs only), and the peak GPU memory this process used
  (``nvidia-smi`` polled every 50 ms by the parent; the same method for both frameworks, CUDA
  context included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

VITS16 = dict(
    name="vits16", batch_size=64, n_global=2, n_local=8, global_size=224, local_size=96, patch_size=16,
    embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, drop_path_rate=0.1, out_dim=65536, hidden_dim=2048,
    bottleneck_dim=256, nlayers=3, norm_last_layer=True, embed_batch=256,
)
# Every code path, small enough for a CPU: `--device cpu --config tiny`.
TINY = dict(VITS16, name="tiny", batch_size=4, global_size=32, local_size=16, patch_size=8, embed_dim=48, depth=2,
            num_heads=3, out_dim=256, hidden_dim=64, bottleneck_dim=32, embed_batch=8)
RECIPE = dict(
    lr=5e-4, min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996,
    teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0, student_temp=0.1,
    center_momentum=0.9, clip_grad=3.0, freeze_last_layer=1, input_seed=0, model_seed=0,
)
CONFIGS = {"vits16": VITS16, "tiny": TINY}
RUNS = [
    ("peak", "torch-bf16-matmul"),
    ("iteration", "torch-bf16"),
    ("iteration", "torch-bf16-sdpa"),
    ("iteration", "dino_rs-bf16"),
    ("iteration", "dino_rs-bf16-composed"),
    ("embed", "torch-bf16-sdpa"),
    ("embed", "torch-fp32-sdpa"),
    ("embed", "dino_rs-bf16"),
    ("embed", "dino_rs-fp32"),
    ("embed", "dino_rs-bf16-composed"),
    ("e2e", "dino_rs-bf16"),
]


def backbone_gflop_per_crop(c: dict, size: int) -> float:
    """Forward GFLOP of the ViT backbone for one crop (matmuls and attention; 2 per multiply-add)."""
    n = (size // c["patch_size"]) ** 2 + 1
    d = c["embed_dim"]
    per_block = 2 * n * (4 * d * d + 2 * 4 * d * d) + 2 * 2 * n * n * d
    return (c["depth"] * per_block + 2 * (n - 1) * 3 * c["patch_size"] ** 2 * d) / 1e9


def iteration_gflop_per_image(c: dict) -> float:
    """Teacher forward on the globals + student forward and backward (3x) on all crops + the head."""
    g = backbone_gflop_per_crop(c, c["global_size"])
    lo = backbone_gflop_per_crop(c, c["local_size"])
    d, h, b, k = c["embed_dim"], c["hidden_dim"], c["bottleneck_dim"], c["out_dim"]
    head = 2 * (d * h + h * h + h * b + b * k) / 1e9
    ncrops = c["n_global"] + c["n_local"]
    return c["n_global"] * (g + head) + 3 * (c["n_global"] * g + c["n_local"] * lo + ncrops * head)


def inputs(c: dict):
    import numpy as np

    rng = np.random.default_rng(RECIPE["input_seed"])
    b = c["batch_size"]
    g = rng.standard_normal((c["n_global"], b, 3, c["global_size"], c["global_size"]), dtype=np.float32)
    lo = rng.standard_normal((c["n_local"], b, 3, c["local_size"], c["local_size"]), dtype=np.float32)
    return g, lo


def timed(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def matmul_peak(device: str, warmup: int, steps: int) -> dict:
    """bf16 matmul TFLOP/s on `device` (PyTorch): the card's practical peak for this workload's FLOPs."""
    import torch

    cuda = device.startswith("cuda")
    n, calls = (8192, 10) if cuda else (512, 2)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))

    def step():
        for _ in range(calls):
            torch.matmul(a, b)
        if cuda:
            torch.cuda.synchronize()

    med = statistics.median(timed(step, warmup, steps))
    return {"kind": "peak", "framework": "torch-bf16-matmul", "median_s": med, "n": n,
            "tflops": calls * 2 * n**3 / med / 1e12}


def child(kind: str, framework: str, c: dict, device: str, warmup: int, steps: int) -> dict:
    import numpy as np

    if kind == "peak":
        return matmul_peak(device, warmup, steps)
    c = {**RECIPE, **c}
    epochs = max(100, warmup + steps)
    if framework.startswith("torch"):
        import torch

        sys.path.insert(0, str(HERE))
        import dino_torch

        dino_torch.Attention.use_sdpa = framework.endswith("-sdpa")
        dtype = torch.bfloat16 if "bf16" in framework else None
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as in dino_rs
        if kind == "iteration":
            step, _ = dino_torch.build_iteration(c, epochs, 1, inputs(c), device=device, autocast_dtype=dtype)

            def host_step():
                return step(upload=True)
        else:
            step_model, student = dino_torch.build_iteration(c, epochs, 1, inputs(c), device=device)
            backbone = student.backbone.eval()
            host_x = np.random.default_rng(1).standard_normal(
                (c["embed_batch"], 3, c["global_size"], c["global_size"]), dtype=np.float32)
            device_x = torch.from_numpy(host_x).to(device)

            def embed(x):
                with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype or torch.float32,
                                                     enabled=dtype is not None):
                    return backbone(x).float().cpu().numpy()

            def step():
                return embed(device_x)

            def host_step():
                return embed(torch.from_numpy(host_x).to(device))
    else:
        if "-composed" in framework:  # the update and attention kernels off: what they are worth
            os.environ["DINO_RS_COMPOSED_OPS"] = "1"
        if "-layers" in framework:  # blocks layer by layer, without the block node (see main)
            os.environ["DINO_RS_BLOCK_NODE"] = "0"
        import dino_rs as dr

        model = dr.DINO(patch_size=c["patch_size"], img_size=c["global_size"], embed_dim=c["embed_dim"],
                        depth=c["depth"], num_heads=c["num_heads"], out_dim=c["out_dim"], hidden_dim=c["hidden_dim"],
                        bottleneck_dim=c["bottleneck_dim"], norm_last_layer=c["norm_last_layer"],
                        drop_path_rate=c["drop_path_rate"], device=device, seed=c["model_seed"],
                        dtype="bfloat16" if "bf16" in framework else "float32")
        if kind == "e2e":
            return end_to_end(dr, model, framework, c, epochs, warmup, steps)
        if kind == "iteration":
            aug = dr.MultiCropAugmenter(global_size=c["global_size"], local_size=c["local_size"], n_local=c["n_local"])
            pixels = np.zeros((c["batch_size"], c["global_size"], c["global_size"], 3), dtype=np.uint8)
            loader = dr.MultiCropLoader(dr.ArrayDataset(pixels), aug, batch_size=c["batch_size"], drop_last=True)
            trainer = trainer_for(dr, model, loader, c, epochs)
            g, lo = inputs(c)

            def step():
                return trainer.step(g, lo)["loss"]
        else:
            x = np.random.default_rng(1).standard_normal(
                (c["embed_batch"], 3, c["global_size"], c["global_size"]), dtype=np.float32)

            def step():
                return model.forward_backbone(x, teacher=True, batch_size=c["embed_batch"])
    times = timed(step, warmup, steps)
    images = c["batch_size"] if kind == "iteration" else c["embed_batch"]
    gflop = iteration_gflop_per_image(c) if kind == "iteration" else backbone_gflop_per_crop(c, c["global_size"])
    med = statistics.median(times)
    out = {"kind": kind, "framework": framework, "median_s": med, "min_s": min(times), "images_s": images / med,
           "tflops": images * gflop / med / 1e3, "gflop_per_image": gflop}
    if framework.startswith("torch"):
        # PyTorch's inputs above stay on the device; dino_rs takes NumPy arrays and uploads them on
        # every call. The same PyTorch call with its inputs copied from the arrays each time:
        out["host_images_s"] = images / statistics.median(timed(host_step, 1, steps))
    if kind == "iteration" and framework.startswith("dino_rs"):
        # After the timed steps: where a step's time goes (Trainer.profile synchronises the device
        # at each phase boundary), the median of 3 profiled steps.
        trainer.profile = True
        profiled = [trainer.step(g, lo) for _ in range(3)]
        out["phases_s"] = {k[len("time_"):]: statistics.median(p[k] for p in profiled)
                           for k in profiled[0] if k.startswith("time_")}
    return out


def trainer_for(dr, model, loader, c: dict, epochs: int):
    return dr.Trainer(
        model, loader, epochs=epochs, lr=c["lr"], min_lr=c["min_lr"], warmup_epochs=c["warmup_epochs"],
        weight_decay=c["weight_decay"], weight_decay_end=c["weight_decay_end"],
        momentum_teacher=c["momentum_teacher"], teacher_temp=c["teacher_temp"],
        warmup_teacher_temp=c["warmup_teacher_temp"], warmup_teacher_temp_epochs=c["warmup_teacher_temp_epochs"],
        student_temp=c["student_temp"], center_momentum=c["center_momentum"], clip_grad=c["clip_grad"],
        freeze_last_layer=c["freeze_last_layer"], progress=False,
    )


def end_to_end(dr, model, framework: str, c: dict, epochs: int, warmup: int, steps: int) -> dict:
    """One epoch of ``fit`` over JPEG files against ``step`` on synthetic crops, same model and trainer setup."""
    import shutil
    import statistics
    import tempfile

    photos = dr.bundled_photos()
    b = c["batch_size"]
    n = b * (warmup + steps)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos" / "all"
        folder.mkdir(parents=True)
        for i in range(n):
            shutil.copyfile(photos[i % len(photos)], folder / f"{i:06d}.jpg")
        aug = dr.MultiCropAugmenter(global_size=c["global_size"], local_size=c["local_size"], n_local=c["n_local"])
        loader = dr.MultiCropLoader(dr.ImageFolder(folder.parent), aug, batch_size=b, drop_last=True)
        g, lo = inputs(c)
        synthetic = trainer_for(dr, model, loader, c, epochs)
        synth_times = timed(lambda: synthetic.step(g, lo)["loss"], warmup, steps)
        stamps = [time.perf_counter()]
        trainer = trainer_for(dr, model, loader, c, epochs)
        trainer.callbacks = (lambda stats: stamps.append(time.perf_counter()),)
        trainer.fit(epochs=1)
    # Step intervals as the training loop sees them: waiting for the loader, the upload and the step.
    e2e_times = [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])][warmup:]
    med, synth = statistics.median(e2e_times), statistics.median(synth_times)
    gflop = iteration_gflop_per_image(c)
    return {"kind": "e2e", "framework": framework, "median_s": med, "min_s": min(e2e_times),
            "images_s": b / med, "tflops": b * gflop / med / 1e3, "gflop_per_image": gflop,
            "synthetic_images_s": b / synth, "of_synthetic": synth / med, "files": n}


def gpu_memory_used_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=5).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def run_child(kind: str, framework: str, args, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{kind}:{framework}", "--config", args.config,
           "--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    base = gpu_memory_used_mib() if args.device.startswith("cuda") else None
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.wait(0.05):
            m = gpu_memory_used_mib()
            if m is not None and (peak[0] is None or m > peak[0]):
                peak[0] = m

    poller = threading.Thread(target=poll, daemon=True)
    if base is not None:
        poller.start()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"kind": kind, "framework": framework, "error": f"timed out after {timeout:.0f} s"}
    finally:
        done.set()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"kind": kind, "framework": framework,
                "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-1500:]}"}
    res = json.loads(lines[-1][len("RESULT "):])
    if base is not None and peak[0] is not None:
        res["peak_mib"] = peak[0] - base
    return res


def table(results: list[dict]) -> str:
    peak = next((r["tflops"] for r in results if r["kind"] == "peak" and "tflops" in r), None)
    # "from host arrays": each call's inputs copied from NumPy arrays, as dino_rs's API always takes
    # them; PyTorch's main figure keeps its inputs on the device.
    rows = ["| what | framework | median s | images/s | from host arrays, images/s | vs PyTorch best "
            "(both from host arrays) | TFLOP/s | peak GPU MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for kind in ("iteration", "embed", "e2e"):
        torch_rows = [r for r in results if r["kind"] == kind and r["framework"].startswith("torch") and "images_s" in r]
        best = max((r["images_s"] for r in torch_rows), default=None)
        best_host = max((r["host_images_s"] for r in torch_rows if "host_images_s" in r), default=None)
        for r in (r for r in results if r["kind"] == kind):
            if "error" in r:
                rows.append(f"| {kind} | {r['framework']} | failed: {r['error'].splitlines()[-1][:120]} | | | | | |")
                continue
            ours = r["framework"].startswith("dino_rs")
            host = r["images_s"] if ours else r.get("host_images_s")
            host = f"{host:.1f}" if host and kind != "e2e" else "-"
            ratio = "-"
            if best and ours:
                ratio = f"{r['images_s'] / best:.2f}x" + (f" ({r['images_s'] / best_host:.2f}x)" if best_host else "")
            if kind == "e2e":
                ratio = f"{r['of_synthetic']:.2f}x of synthetic ({r['synthetic_images_s']:.1f}/s)"
            mib = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
            share = f" ({100 * r['tflops'] / peak:.0f}%)" if peak else ""
            rows.append(f"| {kind} | {r['framework']} | {r['median_s']:.4f} | {r['images_s']:.1f} | {host} | {ratio} | "
                        f"{r['tflops']:.2f}{share} | {mib} |")
    for r in results:
        if r["kind"] == "peak":
            rows.append(f"| peak | {r['framework']} | " + (f"failed: {r['error'].splitlines()[-1][:120]} | | | | | |"
                        if "error" in r else f"{r['median_s']:.4f} | | | bf16 {r['n']}^3 matmuls | "
                        f"{r['tflops']:.1f} (100%) | |"))
    profiled = [r for r in results if "phases_s" in r]
    if profiled:
        phases = list(profiled[0]["phases_s"])
        rows += ["", "Where a dino_rs iteration's time goes (ms; median of 3 steps with Trainer.profile, which "
                 "synchronises the device at each phase boundary):", "",
                 "| framework | " + " | ".join(phases) + " | sum |", "|---|" + "---:|" * (len(phases) + 1)]
        for r in profiled:
            ms = [r["phases_s"].get(p, float("nan")) * 1e3 for p in phases]
            rows.append(f"| {r['framework']} | " + " | ".join(f"{x:.1f}" for x in ms) + f" | {sum(ms):.1f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="vits16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", default=None, help="comma-separated kind:framework pairs (default: all)")
    ap.add_argument("--skip", default=None, help="comma-separated kind:framework pairs not to run")
    ap.add_argument("--child-timeout", type=float, default=240.0)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all runs: each child gets at most its share of what is left, runs past "
                         "the budget are skipped, and the table is printed in time")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here, one JSON object per line")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    c = CONFIGS[args.config]
    if args.child:
        kind, framework = args.child.split(":")
        print("RESULT " + json.dumps(child(kind, framework, c, args.device, args.warmup, args.steps)), flush=True)
        return
    pairs = lambda arg: [tuple(s.split(":")) for s in arg.split(",")] if arg else []  # noqa: E731
    runs = pairs(args.only) or list(RUNS)
    runs = [r for r in runs if r not in pairs(args.skip)]
    print(f"config {c['name']}: batch {c['batch_size']}, {c['n_global']}x{c['global_size']} + "
          f"{c['n_local']}x{c['local_size']} px, ViT dim {c['embed_dim']} depth {c['depth']} patch {c['patch_size']}, "
          f"out_dim {c['out_dim']}; device {args.device}; {args.warmup} warm-up + {args.steps} timed; "
          f"{iteration_gflop_per_image({**RECIPE, **c}):.1f} GFLOP per image per iteration", flush=True)
    results = []
    deadline = time.perf_counter() + args.budget if args.budget else None
    i = 0
    while i < len(runs):
        kind, framework = runs[i]
        t = time.perf_counter()
        timeout = args.child_timeout
        if deadline is not None:
            left = deadline - t
            if left < 5:
                r = {"kind": kind, "framework": framework, "error": "skipped: the time budget is spent"}
                results.append(r)
                print(f"  {kind:9s} {framework:16s} skipped (budget spent)", flush=True)
                i += 1
                continue
            # Twice a fair share of what is left, so one slow run does not starve the rest.
            timeout = min(timeout, left, 2 * left / (len(runs) - i))
        r = run_child(kind, framework, args, timeout)
        results.append(r)
        print(f"  {kind:9s} {framework:16s} {json.dumps(r)[:300]} ({time.perf_counter() - t:.0f} s)", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
        i += 1
        # A training run that fails (not one that runs out of time) gets one more try with its
        # blocks layer by layer: the block node (src/ops/block/portable.rs) is the newest piece no GPU
        # has run, and a GPU run is too scarce to come back without a figure.
        if (kind != "embed" and framework.startswith("dino_rs") and "-layers" not in framework
                and r.get("error", "").startswith("exit")):
            runs.insert(i, (kind, framework + "-layers"))
    print(table(results))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
