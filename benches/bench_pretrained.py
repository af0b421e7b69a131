"""CPU inference of a DINOv2 ViT-S/14 backbone: dino_rs against PyTorch's official model, same weights.

How to run (from the repository root; needs torch and dino_rs in the same Python)::

    python benches/bench_pretrained.py --dinov2-repo /path/to/dinov2            # the official model
    python benches/bench_pretrained.py --dinov2-repo /path/to/dinov2 --batch-size 64,32 \\
        --results benches/RESULTS.md
    python benches/bench_pretrained.py --images 4 --size 56 --repeats 1 --wait-idle 0   # a smoke test

``--dinov2-repo`` is a checkout of facebookresearch/dinov2 (not part of this repository), e.g.
``git clone https://github.com/facebookresearch/dinov2``. Without it the PyTorch side is timm's
``vit_small_patch14_dinov2`` (the same architecture and features), and the output says so; timm's
model is then built at ``img_size=size`` (its dynamic resize of the 518 px position grid lacks
dinov2's 0.1 offset and gives other features), so neither framework resizes the grid.

Options: ``--images`` (default 64), ``--size`` (crop side, default 224), ``--threads`` (default 2),
``--repeats`` (timed forwards, default 5), ``--batch-size`` (comma-separated, default 64: each is a
configuration), ``--frameworks`` (default "torch,dino_rs"), ``--dinov2-repo``, ``--seed`` (weights
and inputs, default 0), ``--tolerance`` (largest allowed max |diff| of the features, default 1e-3),
``--wait-idle`` (seconds in all to wait for other processes to leave the CPUs alone, default 120),
``--rounds`` (default 1: every configuration runs that many times, the rounds interleaved),
``--results`` (markdown file whose marked block is replaced; off by default).

What it does

* Weights: the official ``dinov2_vits14`` as dinov2/hub/backbones.py builds it (``pretrained=False``:
  img_size 518, patch 14, init_values 1.0, ffn "mlp", block_chunks 0, no registers, no antialias,
  interpolate_offset 0.1), its own random init under ``torch.manual_seed(seed)``; then the parameters
  that init sets to constants (biases, LayerNorm, LayerScale, cls token) get seeded noise, so that
  the features check below also covers them. Saved with ``torch.save(state_dict)`` to a temporary
  .pth, which both frameworks load: PyTorch with ``load_state_dict(strict=True)`` into the same
  constructor, dino_rs with ``dr.load_backbone(path, num_heads=6, device="cpu")``.
* Inputs: ``--images`` float32 crops (N, 3, size, size), uniform pixels normalised with the ImageNet
  mean / std, from ``numpy.random.default_rng(seed)``. For a size other than 518 both frameworks
  resize the 37x37 position grid (bicubic, scale factor with the 0.1 offset) on each forward.
* The parent never imports torch or dino_rs (the weights are made in a child too): a child's
  ``ru_maxrss`` starts from the RSS of the process it was spawned from (Linux carries the high-water
  mark over ``vfork`` + ``exec``), so a heavy parent would inflate every child's peak.
* Each (framework, batch size) runs in its own child process (per-framework peak RSS, no thread
  pools fighting) with OMP / MKL / OPENBLAS / RAYON / DINO_RS_NUM_THREADS = threads and
  ``torch.set_num_threads`` / ``dr.set_num_threads``. One forward pass over all images (in batches of
  the batch size) warms up, then ``--repeats`` passes are timed one by one (``time.perf_counter``).
  PyTorch: ``model.eval()`` under ``torch.no_grad()``, ``model(x)`` = the normalised CLS token, with
  the code's default attention (``F.scaled_dot_product_attention`` when xFormers is absent). dino_rs:
  ``model.forward_backbone(x, batch_size=b, features="cls")``.
* Rounds: on a shared machine (a VM whose host runs other work) the same pass took 5.7 s and 10.5 s
  minutes apart, which no number of repeats inside one process evens out. With ``--rounds R`` each
  round runs every (batch, framework) process once, PyTorch and dino_rs back to back, and the
  ratio is taken within each round: the reported dino_rs / PyTorch is the median of the R round
  ratios (their range beside it), the seconds are the medians over all rounds' passes.
* Reported: median seconds per pass (min-max), images/s = images / median, dino_rs / PyTorch = ratio
  of medians at the same batch size (target <= 0.8x), CPU cores busy during the timed passes (ours /
  other processes', from /proc), RSS after building the model (VmRSS; ``ru_maxrss`` then: the peak
  while loading) and peak RSS (``ru_maxrss`` of the child at its end), and the max |diff| of dino_rs's features from PyTorch's (asserted <
  ``--tolerance``; a failure exits with status 1 and writes nothing).
* With ``--results``: the section goes between ``<!-- pretrained-bench:start -->`` and
  ``<!-- pretrained-bench:end -->`` of that file (other content kept; appended when missing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    format_markdown,
    format_text,
    lscpu,
    machine_line,
    proc_cpu_s,
    results_footer,
    rss_mib,
    source_state,
    system_busy_s,
    wait_for_idle,
    write_results,
)

START_MARK = "<!-- pretrained-bench:start -->"
END_MARK = "<!-- pretrained-bench:end -->"
TARGET = 0.8  # dino_rs / PyTorch time
NUM_HEADS = 6
EMBED_DIM = 384
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS",
               "DINO_RS_NUM_THREADS")
LABEL = {"torch": "PyTorch", "dino_rs": "dino_rs"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# The PyTorch model: the official dinov2 code, or timm's port
# --------------------------------------------------------------------------------------------------


def build_torch_model(dinov2_repo: str | None, size: int):
    """(model in eval mode, description, attention path, forward(x) -> CLS features)."""
    import torch

    if dinov2_repo:
        repo = str(Path(dinov2_repo).resolve())
        if not (Path(repo) / "dinov2" / "hub" / "backbones.py").is_file():
            raise SystemExit(f"--dinov2-repo {dinov2_repo}: no dinov2/hub/backbones.py there")
        sys.path.insert(0, repo)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "xFormers is not available (Attention)" etc.
            import dinov2.layers.attention as dinov2_attention
            from dinov2.hub.backbones import dinov2_vits14

            model = dinov2_vits14(pretrained=False)
        attn = ("xFormers memory_efficient_attention" if dinov2_attention.XFORMERS_AVAILABLE
                else "F.scaled_dot_product_attention (xFormers not available)")
        desc = (f"official facebookresearch/dinov2 `dinov2_vits14(pretrained=False)` from {repo} "
                f"({checkout_commit(repo)})")

        def forward(x):
            return model(x)  # head(x_norm_clstoken), head = Identity
    else:
        import timm

        # Built at the input size: its position grid needs no resize. timm's dynamic_img_size resizes
        # the 518 px grid to the output size without dinov2's 0.1 offset: other features (~0.1 apart).
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=size)
        fused = getattr(model.blocks[0].attn, "fused_attn", None)
        attn = {True: "F.scaled_dot_product_attention (timm fused_attn)",
                False: "explicit softmax(q k^T / sqrt(d)) v (timm fused_attn off)"}.get(fused, "timm default")
        desc = (f"timm {timm.__version__} `vit_small_patch14_dinov2(img_size={size})` (fallback: no --dinov2-repo "
                "given; the official dinov2_vits14's architecture and features, its position grid at the input "
                "size instead of 37x37 resized on each forward)")

        def forward(x):
            return model.forward_features(x)[:, 0]  # normalised CLS token
    model.eval()
    return model, desc, attn, forward


def checkout_commit(repo: str) -> str:
    try:
        return "git " + subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                       text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


def make_weights(path: Path, dinov2_repo: str | None, size: int, seed: int) -> tuple[str, str]:
    """Builds the PyTorch model with seeded random weights, perturbs its constant-initialised
    parameters, saves its state_dict to ``path``; returns (description, attention path)."""
    import torch

    torch.manual_seed(seed)
    model, desc, attn, _ = build_torch_model(dinov2_repo, size)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(".gamma"):  # LayerScale (init_values 1.0; timm 1e-5)
                p.copy_(1.0 + 0.1 * noise)
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias") or name in ("cls_token", "mask_token"):
                p.copy_(0.02 * noise)
    torch.save(model.state_dict(), path)
    return desc, attn


def make_inputs(n: int, size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.random((n, 3, size, size), dtype=np.float32)
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Child: one framework, one batch size
# --------------------------------------------------------------------------------------------------


def current_rss_mib() -> float:
    """Resident memory of this process now (VmRSS), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def vm_hwm_mib() -> float:
    """Peak resident memory of this process's address space (VmHWM: since its exec), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def child_main(args) -> None:
    import numpy as np

    fw, bs = args.child, args.batch_size_child
    if fw == "weights":
        desc, attn = make_weights(Path(args.weights), args.dinov2_repo, args.size, args.seed)
        print("RESULT " + json.dumps({"desc": desc, "attention": attn}), flush=True)
        return
    if fw == "torch":
        import torch

        torch.set_num_threads(args.threads)
        model, _, attn, fwd = build_torch_model(args.dinov2_repo, args.size)
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True), strict=True)
        threads = torch.get_num_threads()

        def run(x):
            with torch.no_grad():
                xt = torch.from_numpy(x)
                return torch.cat([fwd(xt[i:i + bs]) for i in range(0, len(x), bs)]).numpy()
    else:
        import dino_rs as dr

        dr.set_num_threads(args.threads)
        model = dr.load_backbone(args.weights, num_heads=NUM_HEADS, device="cpu")
        threads, attn = dr.get_num_threads(), None

        def run(x):
            return model.forward_backbone(x, batch_size=bs, features="cls")
    rss_built, rss_load_peak = current_rss_mib(), rss_mib()
    x = make_inputs(args.images, args.size, args.seed)

    feats = run(x)  # warm-up
    cpu0, sys0, t0 = proc_cpu_s(), system_busy_s(), time.perf_counter()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        feats = run(x)
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    ours = (proc_cpu_s() - cpu0) / elapsed
    other = max(0.0, (system_busy_s() - sys0) / elapsed - ours)
    feats = np.asarray(feats, dtype=np.float32)
    assert feats.shape == (args.images, EMBED_DIM) and np.isfinite(feats).all(), feats.shape
    np.save(args.features_out, feats)
    res = {"times": times, "cores_ours": ours, "cores_other": other, "rss_built_mib": rss_built,
           "rss_load_peak_mib": rss_load_peak, "rss_peak_mib": rss_mib(), "vm_hwm_mib": vm_hwm_mib(), "threads_reported": threads, "attention": attn}
    print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.pop("CANDLE_NUM_THREADS", None)  # dino_rs's default, as users get it
    for k in THREAD_VARS:
        env[k] = str(threads)
    return env


def run_child(fw: str, bs: int, weights: Path, feats_out: Path | None, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", fw, "--batch-size", str(bs),
           "--weights", str(weights), "--features-out", str(feats_out), "--images", str(args.images),
           "--size", str(args.size), "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--seed", str(args.seed)]
    if args.dinov2_repo:
        cmd += ["--dinov2-repo", args.dinov2_repo]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(args.threads), capture_output=True, text=True,
                          timeout=args.child_timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{fw} (batch {bs}) failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    return res


def versions(with_timm: bool) -> str:
    """Versions, read in a child (the parent stays free of torch and dino_rs)."""
    mods = ["torch", "numpy"] + (["timm"] if with_timm else []) + ["dino_rs"]
    code = ("import importlib\nfor m in %r:\n    try: print(m, importlib.import_module(m).__version__)\n"
            "    except Exception: print(m, '?')" % (mods,))
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env=child_env(1)).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        out = [f"{m} ?" for m in mods]
    return ", ".join([f"Python {platform.python_version()}"] + out)


def cpu_flags() -> str:
    flags = lscpu().get("Flags", "").split()
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=224, help="crop side in pixels (a multiple of 14)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed forward passes (after 1 warm-up)")
    ap.add_argument("--batch-size", default="64", help="comma-separated batch sizes, e.g. 64,32")
    ap.add_argument("--frameworks", default="torch,dino_rs")
    ap.add_argument("--dinov2-repo", default=None, help="a facebookresearch/dinov2 checkout (else timm)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--wait-idle", type=float, default=120.0)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of every configuration")
    ap.add_argument("--results", type=Path, default=None, help="markdown file to update (off by default)")
    ap.add_argument("--child-timeout", type=float, default=3600.0)
    ap.add_argument("--child", choices=["weights", "torch", "dino_rs"], help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--features-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.images < 1 or args.repeats < 1 or args.threads < 1 or args.rounds < 1:
        ap.error("--images, --repeats, --threads and --rounds must be >= 1")
    if args.size % 14:
        ap.error("--size must be a multiple of the patch size 14")

    if args.child:
        args.batch_size_child = int(args.batch_size)
        child_main(args)
        return

    batch_sizes = [int(b) for b in args.batch_size.split(",") if b.strip()]
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        ap.error("--batch-size: positive integers")
    if not frameworks or any(f not in LABEL for f in frameworks):
        ap.error(f"--frameworks: a comma-separated subset of {','.join(LABEL)}")
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, HERE.parent)] + sys.argv[1:])
    try:
        from bench_train import extension_info

        built, stale = extension_info()
    except Exception:  # noqa: BLE001 - informational only
        built, stale = None, None
    if stale:
        print("warning: " + stale, flush=True)

    vers = versions(with_timm=not args.dinov2_repo)
    machine, flags, source = machine_line(), cpu_flags(), source_state()
    print(f"Machine: {machine}; {flags}", flush=True)
    print(f"Versions: {vers}; source: {source}", flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="bench_pretrained_")
    weights = Path(tmp.name) / "dinov2_vits14_random.pth"
    made = run_child("weights", 0, weights, None, args)
    desc, attn = made["desc"], made["attention"]
    print(f"PyTorch model: {desc}; attention: {attn}", flush=True)
    if not args.dinov2_repo:
        print("note: no --dinov2-repo given: the PyTorch side is timm's port, not the official dinov2 code",
              flush=True)
    print(f"Workload: {args.images} images {args.size}x{args.size}, batch size(s) {batch_sizes}, "
          f"{args.threads} thread(s), 1 warm-up + {args.repeats} timed pass(es) x {args.rounds} round(s); weights {weights.stat().st_size / 2**20:.1f} MiB "
          f"(seed {args.seed})", flush=True)

    runs: dict = {}
    budget = [args.wait_idle]
    for rnd in range(args.rounds):
        for bs in batch_sizes:
            for fw in frameworks:
                wait_for_idle(budget)
                print(f"round {rnd + 1}/{args.rounds}: {LABEL[fw]}, batch {bs}, {args.threads} thread(s) ...", flush=True)
                out = Path(tmp.name) / f"{fw}_{bs}.npy"
                r = run_child(fw, bs, weights, out, args)
                r["feats_path"] = out
                runs.setdefault((fw, bs), []).append(r)
            print(f"  median {statistics.median(r['times']):.3f} s; cores ours {r['cores_ours']:.2f} other "
                  f"{r['cores_other']:.2f}; RSS built {r['rss_built_mib']:.0f} MiB (peak while loading "
                  f"{r['rss_load_peak_mib']:.0f}), peak {r['rss_peak_mib']:.0f} MiB (VmHWM {r['vm_hwm_mib']:.0f}); "
                  f"threads reported {r['threads_reported']}; process wall {r['wall_s']:.0f} s", flush=True)

    import numpy as np  # only now: the children's peak RSS starts from the parent's

    # One summary per configuration: every round's passes, the largest memory figures, the last
    # round's features (each round computes the same ones).
    results: dict = {}
    for key, rs in runs.items():
        results[key] = dict(rs[-1], times=[t for r in rs for t in r["times"]],
                            round_medians=[statistics.median(r["times"]) for r in rs],
                            cores_ours=statistics.median(r["cores_ours"] for r in rs),
                            cores_other=max(r["cores_other"] for r in rs),
                            **{k: max(r[k] for r in rs) for k in ("rss_built_mib", "rss_load_peak_mib", "rss_peak_mib")},
                            feats=np.load(rs[-1]["feats_path"]))
    tmp.cleanup()

    header = ["framework", "batch", "threads", "median s (min-max)", "images/s", "dino_rs / PyTorch time",
              "CPU cores busy (ours / other)", "RSS after build MiB", "peak RSS while loading MiB", "peak RSS MiB",
              "max abs diff vs PyTorch"]
    rows, verdicts, diffs = [], [], []
    for bs in batch_sizes:
        for fw in frameworks:
            r = results[(fw, bs)]
            med = statistics.median(r["times"])
            ratio, diff = "-", "-"
            ref = results.get(("torch", bs))
            if fw == "dino_rs" and ref is not None:
                per_round = [a / b for a, b in zip(r["round_medians"], ref["round_medians"])]
                q = statistics.median(per_round)
                spread = f" (rounds {min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else ""
                d = float(np.abs(r["feats"] - ref["feats"]).max())
                diffs.append((bs, d))
                ratio, diff = f"**{q:.2f}x**{spread}", f"{d:.2e}"
                verdicts.append(f"batch {bs}, {args.threads} thread(s): dino_rs / PyTorch = **{q:.2f}x**{spread} "
                                f"({'meets' if q <= TARGET else 'misses'} the target <= {TARGET}x)")
            rows.append([LABEL[fw], str(bs), str(args.threads), f"{med:.3f} ({min(r['times']):.3f}-{max(r['times']):.3f})",
                         f"{args.images / med:.1f}", ratio, f"{r['cores_ours']:.2f} / {r['cores_other']:.2f}",
                         f"{r['rss_built_mib']:.0f}", f"{r['rss_load_peak_mib']:.0f}", f"{r['rss_peak_mib']:.0f}", diff])
    print()
    print(format_text(header, rows))
    for v in verdicts:
        print(v.replace("**", ""))
    if not diffs:
        print("features not compared (both frameworks are needed)")
    bad = [(bs, d) for bs, d in diffs if not d < args.tolerance]
    for bs, d in diffs:
        print(f"features, batch {bs}: max |dino_rs - PyTorch| = {d:.2e} "
              f"({'OK' if d < args.tolerance else 'FAIL'}, tolerance {args.tolerance:g})")
    if bad:
        print("error: the features disagree: the two frameworks do not compute the same model; nothing written",
              file=sys.stderr)
        raise SystemExit(1)

    if args.results is None:
        return
    other_max = max(r["cores_other"] for r in results.values())
    lines = [
        "## CPU inference, DINOv2 ViT-S/14 backbone: dino_rs vs PyTorch (same weights)",
        "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Machine: {machine}; {flags}",
        f"- Versions: {vers}" + (f" (extension built {built})" if built else ""),
        f"- Command (repository root): `{command}`; source: {source}",
        f"- PyTorch model: {desc}, `eval()` under `torch.no_grad()`, attention: {attn}, "
        "`torch.set_num_threads(n)`. dino_rs: `dr.load_backbone(pth, num_heads=6, device=\"cpu\")`, "
        "`forward_backbone(x, batch_size=b, features=\"cls\")`, `dr.set_num_threads(n)`. Both get "
        "OMP / MKL / OPENBLAS / RAYON / DINO_RS_NUM_THREADS = n (CANDLE_NUM_THREADS unset).",
        f"- Weights: the official init under seed {args.seed} (biases, LayerNorm, LayerScale and cls token "
        "perturbed with seeded noise), one `torch.save(state_dict)` .pth loaded by both. Inputs: "
        f"{args.images} crops {args.size}x{args.size}, uniform pixels normalised with the ImageNet mean / std; "
        "CLS features (the final norm's class token).",
        f"- Each (framework, batch) in its own process; 1 warm-up + {args.repeats} timed passes over all "
        f"images, {args.rounds} interleaved round(s) (PyTorch and dino_rs back to back in each); median seconds "
        f"per pass over all rounds (min-max); images/s = {args.images} / median. dino_rs / PyTorch = "
        f"median over the rounds of each round's ratio of medians (range in brackets), **target <= {TARGET}x**. CPU \"other\" = machine-wide busy cores not used by the "
        "measured process (should be ~0). RSS after build = VmRSS once the model is loaded (imports "
        "included); peak RSS while loading = `ru_maxrss` then; peak RSS = `ru_maxrss` of the child at its end. Max abs diff: dino_rs's features against PyTorch's "
        f"(checked < {args.tolerance:g}).",
        "",
        format_markdown(header, rows),
        "",
    ]
    lines += results_footer(verdicts, other_max, stale)
    write_results(args.results, "\n".join(lines), START_MARK, END_MARK)
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
