"""One full DINO training iteration on the CPU: dino_rs against PyTorch eager fp32.

How to run (from the repository root)::

    pip install ".[bench]" && python benches/bench_train.py

Options: ``--steps`` (timed iterations per configuration, at least 8; default 8), ``--warmup``
(untimed iterations first, default 2), ``--threads`` (comma-separated thread counts, default
"<all cores>,1"), ``--rounds`` (every configuration is measured that often, the rounds interleaved,
default 1), ``--frameworks`` (default "torch,dino_rs"), ``--results`` (markdown file, default
benches/RESULTS.md next to this script), ``--no-write``, ``--wait-idle`` (seconds in all to wait for
other processes to leave the CPUs alone before a measurement, default 120), ``--retries``
(re-measurements of a configuration disturbed by other processes, default 1; the least disturbed
run is kept). On a shared 2-core machine another busy process slows a 2-thread PyTorch step several
times over (OpenMP threads spin-wait for a descheduled peer): check the "other" column.

For profiling, one framework can be run on its own, in this process, without the parent::

    perf record -g -o perf.data -- python benches/bench_train.py --child dino_rs --threads 2 --steps 8
    perf report -i perf.data --no-children

What it does

* Configuration "small32": 2 global crops of 32x32 and 6 local crops of 16x16 per image, batch 64
  (i.e. 128 + 384 crops per iteration), ViT patch 4, embed dim 192, depth 6, 3 heads, MLP ratio 4,
  stochastic depth 0.1 (student only), DINO head 192 -> 1024 -> 1024 -> 256 -> 4096 with a
  weight-normalised last layer and ``norm_last_layer=True``.
* One iteration is the official ``train_one_epoch`` body (facebookresearch/dino main_dino.py):
  set lr / weight decay of the two AdamW parameter groups from the per-iteration schedules, teacher
  on the 2 global crops (its parameters need no gradient), student on all 8 crops through
  ``MultiCropWrapper`` (crops of equal resolution batched together), DINO loss (teacher temperature
  0.04, student 0.1, centering), ``loss.item()`` finiteness check, backward, per-parameter gradient
  clipping at 3.0, last-layer gradient cancelled during epoch 0, AdamW (no weight decay on biases and
  1-D parameters), EMA teacher update, centre update.
* PyTorch: the official architecture written out in benches/dino_torch.py (vision_transformer.py: conv PatchEmbed,
  Attention with qkv bias and softmax, Mlp with exact ``nn.GELU``, pre-norm Blocks with DropPath,
  LayerNorm eps 1e-6, ``interpolate_pos_encoding`` with bicubic ``F.interpolate`` for the 16x16
  crops, DINOHead with ``weight_norm``; the rate-0 Dropout layers are kept, they return their input),
  ``torch.set_num_threads(n)``. dino_rs: ``dr.DINO(...)`` + ``dr.Trainer(...)`` and
  ``trainer.step(globals, locals)``, with ``RAYON_NUM_THREADS`` = ``DINO_RS_NUM_THREADS`` = n and
  candle's own element-wise pool at dino_rs's default (``CANDLE_NUM_THREADS`` unset: 1, for fork
  safety). Both get ``OMP_NUM_THREADS`` = ``MKL_NUM_THREADS`` = n.
* The schedules are the official ones with ``epochs`` = max(100, warmup + steps) and one iteration
  per epoch (dino_rs: a ``MultiCropLoader`` over 64 images, batch 64, only used to build the
  Trainer). Iteration 0 is in epoch 0 (last layer frozen); every timed iteration is in a later epoch,
  so the last layer is updated, as in all but the first epoch of a real run.
* Inputs: fixed N(0, 1) float32 crops (seed 0), (2, 64, 3, 32, 32) and (6, 64, 3, 16, 16), the same
  arrays for both frameworks (PyTorch gets ``torch.from_numpy`` views, made once).
* Each configuration runs in its own child process (no thread pools fighting, clean peak RSS). Each
  iteration is timed on its own with ``time.perf_counter``; the table gives the median and mean
  seconds per iteration, images/s = batch / median, dino_rs / PyTorch = ratio of the medians at equal
  threads (target, docs/design.md, Performance targets: <= 1.0), CPU cores busy during the timed iterations (ours and
  other processes', from /proc; "other" well above 0 means the numbers are pessimistic), peak RSS
  (``getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the child), and the first and last timed loss.
* Writes the table, with date, machine, command and versions, between the markers
  ``<!-- train-bench:start -->`` and ``<!-- train-bench:end -->`` of RESULTS.md (other content kept).
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    CONTENDED,
    format_markdown,
    format_text,
    machine_line,
    proc_cpu_s,
    results_footer,
    rss_mib,
    source_state,
    system_busy_s,
    wait_for_idle,
    write_results,
)

START_MARK = "<!-- train-bench:start -->"
END_MARK = "<!-- train-bench:end -->"

CONFIG = dict(
    name="small32",
    batch_size=64,
    n_global=2,
    n_local=6,
    global_size=32,
    local_size=16,
    patch_size=4,
    embed_dim=192,
    depth=6,
    num_heads=3,
    mlp_ratio=4,
    drop_path_rate=0.1,
    out_dim=4096,
    hidden_dim=1024,
    bottleneck_dim=256,
    nlayers=3,
    norm_last_layer=True,
    # official main_dino.py defaults
    lr=5e-4,
    min_lr=1e-6,
    warmup_epochs=10,
    weight_decay=0.04,
    weight_decay_end=0.4,
    momentum_teacher=0.996,
    teacher_temp=0.04,
    warmup_teacher_temp=0.04,
    warmup_teacher_temp_epochs=0,
    student_temp=0.1,
    center_momentum=0.9,
    clip_grad=3.0,
    freeze_last_layer=1,
    input_seed=0,
    model_seed=0,
)


def make_inputs():
    import numpy as np

    c = CONFIG
    rng = np.random.default_rng(c["input_seed"])
    b = c["batch_size"]
    g = rng.standard_normal((c["n_global"], b, 3, c["global_size"], c["global_size"]), dtype=np.float32)
    lo = rng.standard_normal((c["n_local"], b, 3, c["local_size"], c["local_size"]), dtype=np.float32)
    return g, lo


def n_epochs(warmup: int, steps: int) -> int:
    return max(100, warmup + steps)


def time_steps(step, warmup: int, steps: int) -> dict:
    """Runs ``step()`` (returns the loss) ``warmup`` times, then times ``steps`` calls one by one."""
    for _ in range(warmup):
        step()
    cpu0, sys0, t0 = proc_cpu_s(), system_busy_s(), time.perf_counter()
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(float(step()))
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    ours = (proc_cpu_s() - cpu0) / elapsed
    machine = (system_busy_s() - sys0) / elapsed
    return {"times": times, "losses": losses, "cores_ours": ours, "cores_other": max(0.0, machine - ours)}


# --------------------------------------------------------------------------------------------------
# PyTorch: the official DINO code (benches/dino_torch.py)
# --------------------------------------------------------------------------------------------------


def run_torch(threads: int, warmup: int, steps: int) -> dict:
    import torch

    import dino_torch  # next to this script

    torch.set_num_threads(threads)
    step, student = dino_torch.build_iteration(CONFIG, n_epochs(warmup, steps), 1, make_inputs())
    res = time_steps(step, warmup, steps)
    res["threads_reported"] = torch.get_num_threads()
    res["n_params"] = sum(p.numel() for p in student.parameters())
    return res


# --------------------------------------------------------------------------------------------------
# dino_rs
# --------------------------------------------------------------------------------------------------


def run_dino_rs(threads: int, warmup: int, steps: int) -> dict:
    import numpy as np

    import dino_rs as dr

    c = CONFIG
    model = dr.DINO(patch_size=c["patch_size"], img_size=c["global_size"], embed_dim=c["embed_dim"],
                    depth=c["depth"], num_heads=c["num_heads"], out_dim=c["out_dim"], hidden_dim=c["hidden_dim"],
                    bottleneck_dim=c["bottleneck_dim"], norm_last_layer=c["norm_last_layer"],
                    drop_path_rate=c["drop_path_rate"], device="cpu", seed=c["model_seed"])
    aug = dr.MultiCropAugmenter(global_size=c["global_size"], local_size=c["local_size"], n_local=c["n_local"])
    pixels = np.random.default_rng(1).integers(0, 256, (c["batch_size"], c["global_size"], c["global_size"], 3),
                                               dtype=np.uint8)
    loader = dr.MultiCropLoader(dr.ArrayDataset(pixels), aug, batch_size=c["batch_size"], shuffle=False,
                                drop_last=True)
    assert len(loader) == 1, len(loader)
    trainer = dr.Trainer(
        model, loader, epochs=n_epochs(warmup, steps), lr=c["lr"], min_lr=c["min_lr"],
        warmup_epochs=c["warmup_epochs"], weight_decay=c["weight_decay"], weight_decay_end=c["weight_decay_end"],
        momentum_teacher=c["momentum_teacher"], teacher_temp=c["teacher_temp"],
        warmup_teacher_temp=c["warmup_teacher_temp"], warmup_teacher_temp_epochs=c["warmup_teacher_temp_epochs"],
        student_temp=c["student_temp"], center_momentum=c["center_momentum"], clip_grad=c["clip_grad"],
        freeze_last_layer=c["freeze_last_layer"], progress=False,
    )
    g, lo = make_inputs()

    def step():
        return trainer.step(g, lo)["loss"]

    res = time_steps(step, warmup, steps)
    try:
        res["threads_reported"] = dr.get_num_threads()
    except AttributeError:
        res["threads_reported"] = None
    return res


def child_main(args) -> None:
    threads = args.threads_child
    if args.child == "torch":
        res = run_torch(threads, args.warmup, args.steps)
    elif args.child == "dino_rs":
        res = run_dino_rs(threads, args.warmup, args.steps)
    else:
        raise SystemExit(f"unknown framework {args.child!r}")
    res["rss_mib"] = rss_mib()
    res["env"] = {k: os.environ.get(k) for k in THREAD_VARS}
    print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------------
# Parent: run the children, table, RESULTS.md
# --------------------------------------------------------------------------------------------------

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS",
               "DINO_RS_NUM_THREADS")
LABEL = {"torch": "PyTorch eager fp32", "dino_rs": "dino_rs"}


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.pop("CANDLE_NUM_THREADS", None)  # dino_rs's default, as users get it
    for k in THREAD_VARS:
        env[k] = str(threads)
    return env


def run_child(framework: str, threads: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", framework, "--threads", str(threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(threads), capture_output=True, text=True, timeout=args.child_timeout)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{framework} with {threads} thread(s) failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = wall
    return res


def extension_info() -> tuple[str | None, str | None]:
    """(build time of the installed extension, warning when it is older than this checkout's Rust sources)."""
    import importlib.util

    spec = importlib.util.find_spec("dino_rs")
    root = Path(__file__).resolve().parent.parent
    if spec is None or not spec.submodule_search_locations:
        return None, None
    libs = [q for d in spec.submodule_search_locations for q in Path(d).glob("_dino_rs*") if q.suffix in (".so", ".pyd")]
    if not libs:
        return None, None
    built = max(q.stat().st_mtime for q in libs)
    when = datetime.datetime.fromtimestamp(built).strftime("%Y-%m-%d %H:%M")
    sources = [q for q in (root / "src").rglob("*.rs")] + [root / "Cargo.toml", root / "Cargo.lock"]
    sources = [q for q in sources if q.is_file()]
    if sources:
        newest = max(sources, key=lambda q: q.stat().st_mtime)
        if newest.stat().st_mtime > built + 1:
            return when, (f"the installed dino_rs extension ({libs[0]}) is older than {newest.relative_to(root)}: "
                          f"the numbers may not reflect this checkout (reinstall with `pip install .`)")
    return when, None


def versions() -> str:
    out = [f"Python {platform.python_version()}"]
    for mod in ("torch", "numpy", "dino_rs"):
        try:
            r = subprocess.run([sys.executable, "-c", f"import {mod}; print({mod}.__version__)"],
                               capture_output=True, text=True, timeout=120, env=child_env(1))
            out.append(f"{mod} {r.stdout.strip() or '?'}")
        except (OSError, subprocess.SubprocessError):
            out.append(f"{mod} ?")
    return ", ".join(out)


def summarise(runs: list[dict]) -> dict:
    times = [t for r in runs for t in r["times"]]
    return {
        "median": statistics.median(times),
        "mean": statistics.fmean(times),
        "min": min(times),
        "max": max(times),
        "n": len(times),
        "cores_ours": statistics.fmean(r["cores_ours"] for r in runs),
        "cores_other": max(r["cores_other"] for r in runs),
        "rss_mib": max(r["rss_mib"] for r in runs),
        "loss_first": runs[0]["losses"][0],
        "loss_last": runs[-1]["losses"][-1],
        "round_medians": [statistics.median(r["times"]) for r in runs],
    }


def build_table(summary: dict, threads_list: list[int], frameworks: list[str]):
    b = CONFIG["batch_size"]
    header = ["framework", "threads", "median s/it", "mean s/it (min-max)", "images/s", "dino_rs / PyTorch time",
              "CPU cores busy (ours / other)", "peak RSS MiB", "loss first -> last"]
    rows = []
    for t in threads_list:
        for fw in frameworks:
            s = summary.get((fw, t))
            if s is None:
                continue
            ratio = "-"
            if fw == "dino_rs" and ("torch", t) in summary:
                ratio = f"**{s['median'] / summary[('torch', t)]['median']:.2f}x**"
            med = f"{s['median']:.3f}"
            if len(s["round_medians"]) > 1:
                med += f" (rounds {min(s['round_medians']):.3f}-{max(s['round_medians']):.3f})"
            rows.append([LABEL[fw], str(t), med, f"{s['mean']:.3f} ({s['min']:.3f}-{s['max']:.3f})",
                         f"{b / s['median']:.1f}", ratio, f"{s['cores_ours']:.2f} / {s['cores_other']:.2f}",
                         f"{s['rss_mib']:.0f}", f"{s['loss_first']:.4f} -> {s['loss_last']:.4f}"])
    return header, rows


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed iterations per configuration (>= 8)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts (default: all cores, then 1); with --child: one count")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--frameworks", default="torch,dino_rs")
    ap.add_argument("--results", type=Path, default=here / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--wait-idle", type=float, default=120.0)
    ap.add_argument("--retries", type=int, default=1,
                    help="re-measurements of a configuration disturbed by other processes (least disturbed kept)")
    ap.add_argument("--child-timeout", type=float, default=3600.0)
    ap.add_argument("--child", choices=["torch", "dino_rs"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")

    if args.child:
        args.threads_child = int(args.threads or os.cpu_count() or 1)
        if not os.environ.get("DINO_RS_NUM_THREADS"):  # run by hand (e.g. under perf): set the pools here
            for k, v in child_env(args.threads_child).items():
                if k in THREAD_VARS:
                    os.environ[k] = v
        child_main(args)
        return

    if args.steps < 8:
        print(f"warning: --steps {args.steps} < 8; the brief asks for at least 8 timed iterations", flush=True)
    ncpu = os.cpu_count() or 1
    threads_list = [int(x) for x in args.threads.split(",")] if args.threads else sorted({ncpu, 1}, reverse=True)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    command = "python " + " ".join(shlex.quote(a) for a in
                                   [os.path.relpath(__file__, here.parent)] + sys.argv[1:])
    built, stale = extension_info()
    if stale:
        print("warning: " + stale, flush=True)
    vers = versions()
    c = CONFIG
    print(f"{c['name']}: B={c['batch_size']}, {c['n_global']}x{c['global_size']}px + {c['n_local']}x{c['local_size']}px, "
          f"ViT p{c['patch_size']} d{c['embed_dim']} depth {c['depth']} heads {c['num_heads']}, head "
          f"{c['hidden_dim']}/{c['bottleneck_dim']}/{c['out_dim']}; warm-up {args.warmup}, {args.steps} timed "
          f"iterations x {args.rounds} round(s); threads {threads_list}", flush=True)
    print(vers, flush=True)

    runs: dict = {}
    budget = [args.wait_idle]
    for rnd in range(args.rounds):
        order = frameworks if rnd % 2 == 0 else frameworks[::-1]
        for t in threads_list:
            for fw in order:
                tries = []
                for attempt in range(args.retries + 1):
                    wait_for_idle(budget)
                    print(f"round {rnd + 1}: {LABEL[fw]}, {t} thread(s)"
                          + (f", retry {attempt} (disturbed)" if attempt else "") + " ...", flush=True)
                    tries.append(run_child(fw, t, args))
                    if tries[-1]["cores_other"] < CONTENDED:
                        break
                r = min(tries, key=lambda x: x["cores_other"])  # the least disturbed measurement
                runs.setdefault((fw, t), []).append(r)
                print(f"  median {statistics.median(r['times']):.3f} s/it, mean {statistics.fmean(r['times']):.3f}; "
                      f"cores ours {r['cores_ours']:.2f} other {r['cores_other']:.2f}; peak RSS {r['rss_mib']:.0f} MiB; "
                      f"loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}; process wall {r['wall_s']:.0f} s",
                      flush=True)

    summary = {k: summarise(v) for k, v in runs.items()}
    header, rows = build_table(summary, threads_list, frameworks)
    print()
    print(format_text(header, rows))

    verdicts = []
    for t in threads_list:
        if ("torch", t) in summary and ("dino_rs", t) in summary:
            ratio = summary[("dino_rs", t)]["median"] / summary[("torch", t)]["median"]
            verdicts.append(f"{t} thread(s): dino_rs / PyTorch = **{ratio:.2f}x** "
                            f"({'meets' if ratio <= 1.0 else 'misses'} the target <= 1.0x)")
    for v in verdicts:
        print(v.replace("**", ""))

    if args.no_write:
        return
    today = datetime.date.today().isoformat()
    other_max = max(s["cores_other"] for s in summary.values())
    lines = [
        "## CPU training iteration: dino_rs vs PyTorch eager fp32",
        "",
        f"- Date: {today}",
        f"- Machine: {machine_line()}",
        f"- Versions: {vers}" + (f" (extension built {built})" if built else ""),
        f"- Command (repository root): `{command}`; source: {source_state()}",
        f"- Workload (config `{c['name']}`): batch {c['batch_size']}, {c['n_global']} global crops "
        f"{c['global_size']}x{c['global_size']} + {c['n_local']} local crops {c['local_size']}x{c['local_size']} "
        f"per image (fixed N(0,1) float32 crops); ViT patch {c['patch_size']}, dim {c['embed_dim']}, depth "
        f"{c['depth']}, {c['num_heads']} heads, drop_path {c['drop_path_rate']}; DINO head {c['hidden_dim']} / "
        f"{c['bottleneck_dim']} / out_dim {c['out_dim']}, norm_last_layer {c['norm_last_layer']}.",
        "- One iteration = the official `train_one_epoch` body: teacher on the globals, student on all crops "
        "(MultiCropWrapper, grouped by resolution), DINO loss (teacher temp 0.04, student 0.1, centering), backward, "
        "per-parameter grad clipping 3.0, AdamW with two parameter groups and per-iteration lr / wd, EMA teacher, "
        "centre update. PyTorch: the official model code (benches/bench_train.py), "
        "`torch.set_num_threads(n)`; dino_rs: `Trainer.step(globals, locals)` with RAYON_NUM_THREADS = "
        "DINO_RS_NUM_THREADS = n (CANDLE_NUM_THREADS unset: dino_rs's default of 1). Each configuration in its own process; "
        f"{args.warmup} warm-up + {args.steps} timed iterations x {args.rounds} round(s); timed iterations are "
        "past epoch 0, so the last layer is updated.",
        "- images/s = batch / median iteration time (each image = 8 crops). dino_rs / PyTorch = ratio of median "
        "iteration times at equal threads; **target (docs/design.md, Performance targets): <= 1.0x**. CPU \"other\" = machine-wide busy "
        "cores not used by the measured process (should be ~0). Peak RSS = `ru_maxrss` of the child at its end.",
        "",
        format_markdown(header, rows),
        "",
    ]
    lines += results_footer(verdicts, other_max, stale)
    write_results(args.results, "\n".join(lines), START_MARK, END_MARK)
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
