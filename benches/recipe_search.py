"""Recipe search harness: one DINO configuration on the bundled Fashion-MNIST subset, one record.

Runs ONE configuration (the demo RECIPE of dino_rs.train_demo, changed by JSON overrides) on the
CPU with 2 threads, and appends one JSON record to benches/recipe_search/runs.jsonl: run id,
label, the resolved configuration, git commit, k-NN curve (teacher CLS, k=20, T=0.07, DINO's
eval transform through Trainer.evaluate), per-epoch loss, training and total wall time, a linear
probe of the trained teacher, and whether the run crashed or was stopped (with the error).

    python benches/recipe_search.py --baseline
    python benches/recipe_search.py --label torch-init '{"model": {"init": "torch", "drop_path_rate": 0.0}, "epochs": 24}'

Overrides (all optional):
    model:  DINO(...) kwargs (patch_size, embed_dim, depth, num_heads, out_dim, hidden_dim,
            bottleneck_dim, nlayers, norm_last_layer, drop_path_rate, init)
    aug:    MultiCropAugmenter(...) kwargs (global_size, local_size, n_local, global_scale,
            local_scale, color_jitter_p, blur_p, solarize_p, ...)
    train:  Trainer(...) kwargs (lr, min_lr, warmup_epochs, weight_decay, weight_decay_end,
            momentum_teacher, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs,
            student_temp, center_momentum, clip_grad, freeze_last_layer)
    probe_max_iter (lbfgs iterations of the linear probe, default 1000: it can take ~50 s),
    epochs (the schedule's length), fit_epochs (train only that many of them: a schedule stopped
    early on purpose, status ok; default all), seed, batch_size, eval_every, max_train_seconds
    (stop the run past this many seconds of training; it is then recorded as stopped, with its
    curve so far), full_data (train on the
    60k Fashion-MNIST set instead of the 5k subset; k-NN bank and probe still on the 5k subset).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Dict

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "recipe_search" / "runs.jsonl"

MODEL_KEYS = ("patch_size", "img_size", "embed_dim", "depth", "num_heads", "out_dim", "hidden_dim",
              "bottleneck_dim", "drop_path_rate")
AUG_KEYS = ("global_size", "local_size", "n_local")
TRAIN_KEYS = ("lr", "warmup_epochs", "teacher_temp", "warmup_teacher_temp", "momentum_teacher")


class StopRun(Exception):
    pass


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "python"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty(src/python)" if dirty else "")
    except Exception as e:  # noqa: BLE001
        return f"unknown ({e})"


def resolve(over: Dict[str, Any]) -> Dict[str, Any]:
    from dino_rs.train_demo import RECIPE

    model = {k: RECIPE[k] for k in MODEL_KEYS}
    model.update(over.get("model", {}))
    aug = {k: RECIPE[k] for k in AUG_KEYS}
    aug.update(over.get("aug", {}))
    train = {k: RECIPE[k] for k in TRAIN_KEYS}
    train.update(over.get("train", {}))
    cfg = dict(model=model, aug=aug, train=train,
               epochs=int(over.get("epochs", 24)), seed=int(over.get("seed", 0)),
               fit_epochs=int(over.get("fit_epochs", over.get("epochs", 24))),
               batch_size=int(over.get("batch_size", RECIPE["batch_size"])),
               eval_every=int(over.get("eval_every", 2)),
               max_train_seconds=over.get("max_train_seconds"),
               full_data=bool(over.get("full_data", False)),
               probe_max_iter=int(over.get("probe_max_iter", 1000)))
    cfg["train"]["warmup_epochs"] = min(cfg["train"].get("warmup_epochs", 2), cfg["epochs"])
    if not 1 <= cfg["fit_epochs"] <= cfg["epochs"]:
        raise ValueError(f"fit_epochs must be in 1..epochs ({cfg['epochs']}), got {cfg['fit_epochs']}")
    unknown = set(over) - {"model", "aug", "train", "epochs", "fit_epochs", "seed", "batch_size", "eval_every",
                           "max_train_seconds", "full_data", "probe_max_iter"}
    if unknown:
        raise ValueError(f"unknown override keys {sorted(unknown)}")
    return cfg


def flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1).astype(np.float32)


def append(rec: Dict[str, Any]) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(rec, default=float) + "\n")


def baseline(args) -> None:
    import dino_rs
    from dino_rs.train_demo import RECIPE, demo_data

    dino_rs.set_num_threads(2)
    t0 = time.perf_counter()
    x, y, xt, yt = demo_data()
    rec: Dict[str, Any] = dict(run_id="baseline-" + uuid.uuid4().hex[:6], label="baseline", kind="baseline",
                               commit=git_commit(), started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    rec["raw_pixels"] = dict(knn_top1=dino_rs.knn_accuracy(flat(x), y, flat(xt), yt)[0],
                             linear_probe=dino_rs.linear_probe(flat(x), y, flat(xt), yt))
    for init in ("dino", "torch"):
        m = {k: RECIPE[k] for k in MODEL_KEYS}
        m.update(drop_path_rate=0.0, init=init)
        model = dino_rs.DINO(**m, seed=args.seed, device="cpu")
        f, ft = model.embed(x, progress=False), model.embed(xt, progress=False)
        rec[f"init_{init}"] = dict(model=m, knn_top1=dino_rs.knn_accuracy(f, y, ft, yt)[0],
                                   linear_probe=dino_rs.linear_probe(f, y, ft, yt))
    rec["total_seconds"] = time.perf_counter() - t0
    append(rec)
    print(json.dumps(rec, indent=1, default=float))


def package_info() -> Dict[str, Any]:
    """Which dino_rs this process runs (path, extension's mtime and hash): the tree is edited live."""
    import hashlib

    import dino_rs

    so = next(Path(dino_rs.__file__).parent.glob("_dino_rs*.so"), None)
    info: Dict[str, Any] = dict(path=str(Path(dino_rs.__file__).parent))
    if so is not None:
        info["so_mtime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(so.stat().st_mtime))
        info["so_sha256"] = hashlib.sha256(so.read_bytes()).hexdigest()[:16]
    return info


def run(args) -> None:
    over = json.loads(args.overrides) if args.overrides else {}
    try:
        import dino_rs
        from dino_rs.train_demo import demo_data
    except BaseException as e:  # noqa: BLE001  (the package is rebuilt by others while we run)
        append(dict(run_id=time.strftime("%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:4],
                    label=args.label, kind="train", overrides=over, commit=git_commit(), status="crashed",
                    error="import dino_rs: " + "".join(traceback.format_exception_only(type(e), e)).strip(),
                    started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), train_seconds=0.0,
                    total_seconds=0.0, loss_per_epoch=[], knn_curve=[], final_loss=None, config=dict(epochs=over.get("epochs"))))
        raise

    dino_rs.set_num_threads(2)
    cfg = resolve(over)
    t_start = time.perf_counter()
    rec: Dict[str, Any] = dict(run_id=time.strftime("%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:4],
                               label=args.label, kind="train", overrides=over, config=cfg, commit=git_commit(),
                               threads=dino_rs.get_num_threads(), package=package_info(),
                               started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               status="running", error=None)
    curve, losses, epoch_seconds = [], [], []
    eval_seconds = 0.0
    train_seconds = 0.0
    trainer = None
    try:
        x, y, xt, yt = demo_data()
        train_x = x
        if cfg["full_data"]:
            train_x = dino_rs.fashion_mnist("train")[0]
        aug = dino_rs.MultiCropAugmenter(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["aug"].items()})
        loader = dino_rs.MultiCropLoader(dino_rs.ArrayDataset(train_x), aug, batch_size=cfg["batch_size"], seed=cfg["seed"])
        model = dino_rs.DINO(**cfg["model"], seed=cfg["seed"], device="cpu")
        rec["config"]["model_config"] = model.config
        trainer = dino_rs.Trainer(model, loader, epochs=cfg["epochs"], progress=False,
                                  eval_every=0, eval_data=(x, y, xt, yt), **cfg["train"])
        rec["config"]["trainer_config"] = trainer.config

        def evaluate(epoch: int) -> None:
            nonlocal eval_seconds
            t = time.perf_counter()
            top1, top5 = trainer.evaluate()
            dt = time.perf_counter() - t
            eval_seconds += dt
            curve.append(dict(epoch=epoch, knn_top1=top1, knn_top5=top5, train_seconds=train_seconds))
            print(f"[{args.label}] epoch {epoch}: k-NN {top1:.1f}% (train {train_seconds:.0f} s, eval {dt:.1f} s)",
                  flush=True)

        evaluate(0)
        limit = cfg["max_train_seconds"]
        last = cfg["fit_epochs"]
        for epoch in range(1, last + 1):
            t = time.perf_counter()
            h = trainer.fit(epoch)[-1]
            dt = time.perf_counter() - t
            train_seconds += dt
            epoch_seconds.append(dt)
            losses.append(h["loss"])
            print(f"[{args.label}] epoch {epoch}: loss {h['loss']:.4f} ({dt:.1f} s)", flush=True)
            if not np.isfinite(h["loss"]):
                raise FloatingPointError(f"loss {h['loss']} at epoch {epoch}")
            if (cfg["eval_every"] and epoch % cfg["eval_every"] == 0) or epoch == last:
                evaluate(epoch)
            if limit is not None and train_seconds > limit and epoch < last:
                if not curve or curve[-1]["epoch"] != epoch:
                    evaluate(epoch)
                raise StopRun(f"training time {train_seconds:.0f} s exceeded max_train_seconds={limit} after epoch {epoch}")
        rec["status"] = "ok"
    except StopRun as e:
        rec["status"], rec["error"] = "stopped", str(e)
    except KeyboardInterrupt:
        rec["status"], rec["error"] = "stopped", "KeyboardInterrupt"
    except BaseException as e:  # noqa: BLE001
        rec["status"], rec["error"] = "crashed", "".join(traceback.format_exception_only(type(e), e)).strip()
        rec["traceback"] = traceback.format_exc()
    rec["knn_curve"] = curve
    rec["loss_per_epoch"] = losses
    rec["epoch_seconds"] = epoch_seconds
    rec["final_loss"] = losses[-1] if losses else None
    rec["train_seconds"] = train_seconds
    rec["eval_seconds"] = eval_seconds
    if curve:
        rec["knn_init"] = curve[0]["knn_top1"]
        rec["knn_best"] = max(c["knn_top1"] for c in curve)
        rec["knn_best_epoch"] = max(curve, key=lambda c: c["knn_top1"])["epoch"]
        rec["knn_final"] = curve[-1]["knn_top1"]
        rec["knn_final_epoch"] = curve[-1]["epoch"]
    if trainer is not None and losses:
        try:
            x, y, xt, yt = demo_data()
            m = trainer.model
            t = time.perf_counter()
            rec["linear_probe"] = dino_rs.linear_probe(m.embed(x, progress=False), y, m.embed(xt, progress=False), yt,
                                                       max_iter=cfg["probe_max_iter"])
            rec["probe_seconds"] = time.perf_counter() - t
        except BaseException as e:  # noqa: BLE001
            rec["linear_probe_error"] = repr(e)
    rec["total_seconds"] = time.perf_counter() - t_start
    append(rec)
    print(f"[{args.label}] {rec['status']}: k-NN {rec.get('knn_init', float('nan')):.1f} -> best "
          f"{rec.get('knn_best', float('nan')):.1f} (ep {rec.get('knn_best_epoch')}) -> final "
          f"{rec.get('knn_final', float('nan')):.1f}; probe {rec.get('linear_probe', float('nan')):.1f}; "
          f"loss {rec['final_loss']}; train {train_seconds:.0f} s, total {rec['total_seconds']:.0f} s"
          + (f"; {rec['error']}" if rec["error"] else ""), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="?", default="", help="JSON overrides")
    p.add_argument("--label", default="run")
    p.add_argument("--baseline", action="store_true", help="raw pixels and init-network k-NN / linear probe")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.environ.setdefault("DINO_RS_NUM_THREADS", "2")
    if args.baseline:
        baseline(args)
    else:
        run(args)


if __name__ == "__main__":
    sys.exit(main())
