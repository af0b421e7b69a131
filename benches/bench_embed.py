"""CPU inference: ViT-S/16 features of a batch of 224 px crops, dino_rs against PyTorch, same run.

    python benches/bench_embed.py                 # 64 crops, both frameworks, 2 rounds
    python benches/bench_embed.py --frameworks dino_rs --batch 16

Each measurement runs in its own child process, so that peak RSS (``ru_maxrss``) is that
framework's alone: the model is built, one untimed call warms up, then ``--calls`` timed calls
embed the same fixed N(0, 1) float32 crops in one batch. dino_rs: ``DINO.forward_backbone`` (the
teacher backbone, no autograd graph). PyTorch: the official ``vision_transformer.py`` backbone
(benches/dino_torch.py) in eval mode under ``torch.no_grad()``. Both use ``--threads`` threads.
Printed: median seconds per call, images/s, peak RSS of the child and its growth over the model
alone (what the forward pass itself holds at its peak).
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

VITS16 = dict(patch_size=16, img_size=224, embed_dim=384, depth=12, num_heads=6)


def child(framework: str, batch: int, calls: int, threads: int) -> dict:
    import numpy as np

    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    if framework == "dino_rs":
        import dino_rs as dr

        dr.set_num_threads(threads)
        model = dr.DINO(**VITS16, out_dim=256, hidden_dim=256, bottleneck_dim=64, device="cpu")
        base = rss_mib()

        def run():
            return model.forward_backbone(x, batch_size=batch)
    else:
        import torch

        import dino_torch

        torch.set_num_threads(threads)
        model = dino_torch.VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                             mlp_ratio=4, drop_path_rate=0.0).eval()
        xt = torch.from_numpy(x)
        base = rss_mib()

        def run():
            with torch.no_grad():
                return model(xt).numpy()
    out = run()
    assert out.shape == (batch, 384) and np.isfinite(out).all()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    peak = rss_mib()
    return {"framework": framework, "median_s": med, "images_s": batch / med, "peak_mib": peak,
            "growth_mib": peak - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--frameworks", default="torch,dino_rs")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.batch, args.calls, args.threads)), flush=True)
        return
    print(f"ViT-S/16 backbone, {args.batch} crops of 224 px in one batch, {args.threads} thread(s), "
          f"{args.calls} timed calls after one warm-up, {args.rounds} round(s)", flush=True)
    rows = []
    for r in range(args.rounds):
        for fw in args.frameworks.split(","):
            cmd = [sys.executable, __file__, "--child", fw, "--batch", str(args.batch), "--calls", str(args.calls),
                   "--threads", str(args.threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"  round {r + 1} {fw}: failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
                continue
            res = json.loads(lines[-1][len("RESULT "):])
            rows.append(res)
            print(f"  round {r + 1} {fw:8s} {res['median_s']:.3f} s/call  {res['images_s']:.1f} img/s  "
                  f"peak RSS {res['peak_mib']:.0f} MiB (+{res['growth_mib']:.0f} over the model)", flush=True)
    header = ["framework", "median s/call", "images/s", "peak RSS MiB", "growth over the model MiB"]
    table = []
    for fw in args.frameworks.split(","):
        mine = [r for r in rows if r["framework"] == fw]
        if mine:
            table.append([fw, f"{statistics.median(r['median_s'] for r in mine):.3f}",
                          f"{statistics.median(r['images_s'] for r in mine):.1f}",
                          f"{statistics.median(r['peak_mib'] for r in mine):.0f}",
                          f"{statistics.median(r['growth_mib'] for r in mine):.0f}"])
    print("\n" + format_markdown(header, table))


if __name__ == "__main__":
    main()
