"""Where a dino_rs training step's time goes, phase by phase (``Trainer.profile``).

    python benches/profile_step.py                         # bench_train.py's small32 config, CPU
    python benches/profile_step.py --config vits16 --device cuda --dtype bfloat16   # on a GPU

Builds the model and fixed N(0, 1) crops, takes ``--warmup`` unprofiled steps, then ``--steps``
profiled ones, and prints the median seconds of each phase (teacher forward, student forward,
loss, backward, clip, AdamW, EMA, centre) and its share of their sum. Profiling synchronises the
device at every phase boundary, so on a GPU the sum is a little above an unprofiled step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_markdown  # noqa: E402

CONFIGS = {
    # benches/bench_train.py's "small32"
    "small32": dict(batch=64, n_local=6, global_size=32, local_size=16, patch_size=4, embed_dim=192, depth=6,
                    num_heads=3, out_dim=4096, hidden_dim=1024, bottleneck_dim=256),
    # issue 5's ViT-S/16 iteration (benches/bench_gpu.py)
    "vits16": dict(batch=64, n_local=8, global_size=224, local_size=96, patch_size=16, embed_dim=384, depth=12,
                   num_heads=6, out_dim=65536, hidden_dim=2048, bottleneck_dim=256),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="dino_rs threads (default: all cores)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    import dino_rs as dr

    if args.threads:
        dr.set_num_threads(args.threads)
    c = CONFIGS[args.config]
    model = dr.DINO(patch_size=c["patch_size"], img_size=c["global_size"], embed_dim=c["embed_dim"], depth=c["depth"],
                    num_heads=c["num_heads"], out_dim=c["out_dim"], hidden_dim=c["hidden_dim"],
                    bottleneck_dim=c["bottleneck_dim"], drop_path_rate=0.1, device=args.device, dtype=args.dtype,
                    seed=0)
    aug = dr.MultiCropAugmenter(global_size=c["global_size"], local_size=c["local_size"], n_local=c["n_local"])
    pixels = np.zeros((c["batch"], c["global_size"], c["global_size"], 3), np.uint8)
    trainer = dr.Trainer(model, dr.MultiCropLoader(dr.ArrayDataset(pixels), aug, batch_size=c["batch"]),
                         epochs=100, progress=False)
    rng = np.random.default_rng(0)
    g = rng.standard_normal((2, c["batch"], 3, c["global_size"], c["global_size"]), dtype=np.float32)
    lo = rng.standard_normal((c["n_local"], c["batch"], 3, c["local_size"], c["local_size"]), dtype=np.float32)
    for _ in range(args.warmup):
        trainer.step(g, lo)
    trainer.profile = True
    runs = [trainer.step(g, lo) for _ in range(args.steps)]
    phases = [k for k in runs[0] if k.startswith("time_")]
    med = {k: statistics.median(r[k] for r in runs) for k in phases}
    total = sum(med.values())
    print(f"config {args.config}, device {args.device}, dtype {args.dtype}, threads {dr.get_num_threads()}, "
          f"batch {c['batch']}; median of {args.steps} profiled steps after {args.warmup} warm-up")
    rows = [[k[len("time_"):], f"{med[k] * 1e3:.1f}", f"{100 * med[k] / total:.0f}%"] for k in phases]
    rows.append(["sum", f"{total * 1e3:.1f}", ""])
    print(format_markdown(["phase", "ms", "share"], rows))


if __name__ == "__main__":
    main()
