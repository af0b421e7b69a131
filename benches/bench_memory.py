"""Peak memory of a bf16 mixed-precision DINO training step, dino_rs against PyTorch autocast, on the CPU.

    python benches/bench_memory.py            # needs torch and dino_rs in the same Python
    python benches/bench_memory.py --frameworks torch-f32,dino_rs-f32   # the f32 CPU path

Off the fused f32 CPU kernels dino_rs runs the path a GPU runs (candle ops, dino_rs's portable ops;
on CUDA some of them are kernels, which keep the same tensors). What that path keeps for the
backward pass decides the GPU's peak memory (issue 5: at most PyTorch's), and it shows on the CPU as
the growth of the process's peak RSS over what the built model holds. This is a proxy, not the
GPU figure: CPU allocators keep freed memory differently (mimalloc is told to return freed pages at
once, for figures that repeat), and PyTorch's CPU autocast is not its CUDA one; on the CPU
dino_rs's attention is composed (it keeps the (B, heads, N, N) logits and probabilities), on CUDA
the flash kernels keep neither. Each framework runs in its own process: build the model, one warm-up step, two measured.

The configuration has ViT-S/16's widths (384, 6 heads of 64) at depth 4, batch 8, 2 x 224 + 4 x 96
crops, out_dim 4096, so that it runs in minutes on 2 cores; --depth, --batch-size and --out-dim
change it (ViT-S's full depth: --depth 12).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import format_markdown, rss_mib  # noqa: E402
from bench_gpu import RECIPE, VITS16, inputs, trainer_for  # noqa: E402

CONFIG = dict(VITS16, name="vits16-depth4-b8", depth=4, batch_size=8, n_local=4, out_dim=4096, hidden_dim=1024,
              bottleneck_dim=256)
FRAMEWORKS = ["torch-bf16", "torch-bf16-sdpa", "dino_rs-bf16"]
# Not run by default: the f32 step (dino_rs's fused CPU kernels and block node, PyTorch without autocast).
F32_FRAMEWORKS = ["torch-f32", "dino_rs-f32"]
# dino_rs allocates with mimalloc, which by default keeps freed pages a while before returning
# them: peak RSS then varies by 100 MiB and more from run to run. Returned at once, it repeats
# within a few MiB (and the steps are slower; the times here are not the point).
ENV = {**os.environ, "MIMALLOC_PURGE_DELAY": "0"}


def child(framework: str, threads: int, steps: int, out_dim: int, depth: int, batch_size: int) -> dict:
    c = {**RECIPE, **CONFIG, "out_dim": out_dim, "depth": depth, "batch_size": batch_size}
    epochs = 100
    if framework.startswith("torch"):
        import torch

        import dino_torch

        torch.set_num_threads(threads)
        dino_torch.Attention.use_sdpa = framework.endswith("-sdpa")
        autocast = None if framework.endswith("-f32") else torch.bfloat16
        step, _ = dino_torch.build_iteration(c, epochs, 1, inputs(c), device="cpu", autocast_dtype=autocast)
    else:
        import dino_rs as dr

        dr.set_num_threads(threads)
        model = dr.DINO(patch_size=c["patch_size"], img_size=c["global_size"], embed_dim=c["embed_dim"],
                        depth=c["depth"], num_heads=c["num_heads"], out_dim=c["out_dim"], hidden_dim=c["hidden_dim"],
                        bottleneck_dim=c["bottleneck_dim"], norm_last_layer=c["norm_last_layer"],
                        drop_path_rate=c["drop_path_rate"], device="cpu", seed=c["model_seed"],
                        dtype="float32" if framework.endswith("-f32") else "bfloat16")
        import numpy as np

        pixels = np.zeros((c["batch_size"], c["global_size"], c["global_size"], 3), dtype=np.uint8)
        aug = dr.MultiCropAugmenter(global_size=c["global_size"], local_size=c["local_size"], n_local=c["n_local"])
        loader = dr.MultiCropLoader(dr.ArrayDataset(pixels), aug, batch_size=c["batch_size"], drop_last=True)
        trainer = trainer_for(dr, model, loader, c, epochs)
        g, lo = inputs(c)

        def step():
            return trainer.step(g, lo)["loss"]
    built = rss_mib()
    losses = [float(step())]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(float(step()))
        times.append(time.perf_counter() - t)
    peak = rss_mib()
    return {"framework": framework, "built_mib": built, "peak_mib": peak, "growth_mib": peak - built,
            "s_per_step": statistics.median(times), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ap.add_argument("--out-dim", type=int, default=CONFIG["out_dim"],
                    help="the DINO head's output size (65536 in the official recipe: the loss's tensors grow with it)")
    ap.add_argument("--depth", type=int, default=CONFIG["depth"], help="blocks (ViT-S has 12)")
    ap.add_argument("--batch-size", type=int, default=CONFIG["batch_size"], help="images per step")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child(args.child, args.threads, args.steps, args.out_dim, args.depth, args.batch_size)
        print("RESULT " + json.dumps(res), flush=True)
        return
    c = {**CONFIG, "depth": args.depth, "batch_size": args.batch_size}
    print(f"config: batch {c['batch_size']}, {c['n_global']}x{c['global_size']} + {c['n_local']}x"
          f"{c['local_size']} px, dim {c['embed_dim']}, {c['num_heads']} heads, depth {c['depth']}, out_dim "
          f"{args.out_dim}; on the CPU (the precision is in each framework's name), {args.threads} threads, 1 warm-up + {args.steps} steps",
          flush=True)
    results = []
    for fw in args.frameworks.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", fw, "--threads", str(args.threads),
                              "--steps", str(args.steps), "--out-dim", str(args.out_dim),
                               "--depth", str(args.depth), "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, env=ENV)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{fw}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        results.append(json.loads(line[len("RESULT "):]))
        print(f"  {json.dumps(results[-1])}", flush=True)
    torch_best = min((r["growth_mib"] for r in results if r["framework"].startswith("torch")), default=None)
    header = ["framework", "peak RSS MiB", "after build MiB", "growth MiB", "growth vs PyTorch's least", "s/step"]
    rows = []
    for r in results:
        ratio = f"{r['growth_mib'] / torch_best:.2f}x" if torch_best else "-"
        rows.append([r["framework"], f"{r['peak_mib']:.0f}", f"{r['built_mib']:.0f}", f"{r['growth_mib']:.0f}", ratio,
                     f"{r['s_per_step']:.2f}"])
    print(format_markdown(header, rows))


if __name__ == "__main__":
    main()
