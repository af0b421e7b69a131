"""The ``dino-rs`` command line (also ``python -m dino_rs``).

``dino-rs train``
    DINO on a folder of images, with the flag names and defaults of the official ``main_dino.py``
    (``--arch --patch_size --out_dim --epochs --lr --batch_size_per_gpu --output_dir ...``) plus
    dino_rs extras (``--global_size --local_size --img_size --embed_dim --depth --num_heads
    --hidden_dim --bottleneck_dim --device --resume``). Checkpoints go to ``--output_dir``
    (``checkpoint.safetensors`` every epoch, ``checkpointNNNN.safetensors`` every
    ``--saveckp_freq``); a run whose ``--output_dir`` already holds ``checkpoint.safetensors``
    resumes from it, like ``main_dino.py``'s ``restart_from_checkpoint``. At the end the model is
    written to ``OUTPUT_DIR/model.safetensors`` (:meth:`dino_rs.DINO.save`) and the per-epoch
    history to ``OUTPUT_DIR/log.txt`` (one JSON object per line, as ``main_dino.py`` does).
``dino-rs embed``
    Teacher features of every image of a folder, from a model file, a trainer checkpoint, an
    output directory of ``train`` or a backbone (official ``.pth`` or ``export_backbone``
    safetensors). Writes ``--output`` (``.npy``, float32 (N, embed_dim)) and, beside it, a
    ``.json`` with the image paths, labels and class names in the same order.
``dino-rs demo``
    The main job on an embedded default: DINO on a Fashion-MNIST subset bundled with the package
    (or ``--data DIR``), k-NN accuracy against initialisation and raw pixels, attention maps as a
    PNG (:func:`dino_rs.train_demo.run_training`). ``--views`` writes the multi-crop views of the
    bundled photos instead.

Every error (missing folder, unreadable checkpoint, bad flag value) prints ``dino-rs: error: ...``
on stderr and exits with status 2, without a traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, cast

from .config import DEFAULTS, FIELDS

PROG = "dino-rs"
MODEL_FILE = "model.safetensors"
LATEST_CHECKPOINT = "checkpoint.safetensors"


class CliError(Exception):
    """A user error: printed as ``dino-rs: error: <message>``, exit status 2."""


def bool_flag(s: str) -> bool:
    """``main_dino.py``'s ``utils.bool_flag``: on/true/1 or off/false/0."""
    v = s.lower()
    if v in ("off", "false", "0"):
        return False
    if v in ("on", "true", "1"):
        return True
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {s!r} (use true/false, on/off or 1/0)")


def _note(message: str) -> None:
    print(f"{PROG}: note: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# demo (kept apart: its behaviour is owned by dino_rs.demo)
# --------------------------------------------------------------------------------------------------
def add_demo_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers ``dino-rs demo`` and its flags."""
    demo = sub.add_parser(
        "demo",
        help="train a small ViT with DINO on the bundled Fashion-MNIST subset (or --data DIR) and report k-NN accuracy",
        description="Trains a small ViT with DINO on the CPU on 5,000 Fashion-MNIST images bundled with dino_rs "
        "(or on the image folder --data), prints the teacher's k-NN accuracy against the same network at "
        "initialisation and against raw pixels, and writes a PNG of the attention maps. --views instead writes "
        "the multi-crop views of the bundled photos (or --images).",
    )
    demo.add_argument("--output", default=None, help="PNG file to write (default dino_rs_attention.png, or dino_rs_views.png with --views)")
    demo.add_argument("--data", default=None, help="an image folder to train on instead of the bundled images")
    demo.add_argument("--img_size", type=int, default=None, help="image size for --data (default 64)")
    demo.add_argument("--epochs", type=int, default=None,
                      help="training epochs, a complete schedule (default: the small-data recipe's short run, "
                      "40 epochs of a 72-epoch schedule for the bundled images)")
    demo.add_argument("--no_progress", action="store_true", help="no progress bar")
    demo.add_argument("--views", action="store_true", help="only write the multi-crop views of the bundled photos")
    demo.add_argument("--images", nargs="*", help="with --views: image files to use instead of the bundled photos")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Runs ``dino-rs demo``: :func:`dino_rs.train_demo.run_training`, or with ``--views``
    :func:`dino_rs.demo.run`."""
    if args.views:
        from . import demo as demo_mod

        demo_mod.run(args.output or "dino_rs_views.png", args.images, args.seed)
        return 0
    if args.images:
        raise CliError("--images goes with --views; to train on your images use --data DIR")
    if args.epochs is not None and args.epochs < 1:
        raise CliError(f"--epochs must be at least 1, got {args.epochs}")
    from .train_demo import run_training

    run_training(
        args.output or "dino_rs_attention.png",
        data=args.data,
        epochs=args.epochs,
        seed=args.seed,
        progress=not args.no_progress,
        img_size=args.img_size,
    )
    return 0


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------
def add_train_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers ``dino-rs train`` with ``main_dino.py``'s flags and defaults."""
    p = sub.add_parser(
        "train",
        help="self-supervised DINO training on a folder of images (main_dino.py's flags)",
        description="DINO training on a folder of images, with the flags and defaults of the official "
        "main_dino.py. Resumes from OUTPUT_DIR/checkpoint.safetensors when it exists; writes "
        "OUTPUT_DIR/model.safetensors and OUTPUT_DIR/log.txt at the end.",
    )
    m = p.add_argument_group("model (main_dino.py)")
    m.add_argument("--arch", default="vit_small", choices=["vit_tiny", "vit_small", "vit_base"],
                   help="ViT preset (default vit_small); --embed_dim/--depth/--num_heads override it")
    m.add_argument("--patch_size", type=int, default=16, help="patch size in pixels (default 16)")
    m.add_argument("--out_dim", type=int, default=65536, help="DINO head output dimension (default 65536)")
    m.add_argument("--norm_last_layer", type=bool_flag, default=True,
                   help="weight-normalise the head's last layer with fixed norm (default true)")
    m.add_argument("--momentum_teacher", type=float, default=DEFAULTS.momentum_teacher,
                   help="base EMA momentum of the teacher (default %(default)s)")
    m.add_argument("--use_bn_in_head", type=bool_flag, default=False,
                   help="not supported by dino_rs (the head has no batch norm); only false is accepted")
    m.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth rate (default 0.1)")

    t = p.add_argument_group("temperatures (main_dino.py)")
    t.add_argument("--warmup_teacher_temp", type=float, default=DEFAULTS.warmup_teacher_temp,
                   help="initial teacher temperature (default %(default)s)")
    t.add_argument("--teacher_temp", type=float, default=DEFAULTS.teacher_temp, help="final teacher temperature (default %(default)s)")
    t.add_argument("--warmup_teacher_temp_epochs", type=int, default=DEFAULTS.warmup_teacher_temp_epochs,
                   help="teacher temperature warm-up epochs (default %(default)s)")
    t.add_argument("--student_temp", type=float, default=DEFAULTS.student_temp,
                   help="student temperature (default %(default)s; main_dino.py fixes it)")

    o = p.add_argument_group("training and optimisation (main_dino.py)")
    o.add_argument("--use_fp16", type=bool_flag, default=None,
                   help="accepted for compatibility and ignored: dino_rs has no float16 mode (see --dtype)")
    o.add_argument("--weight_decay", type=float, default=DEFAULTS.weight_decay, help="initial weight decay (default %(default)s)")
    o.add_argument("--weight_decay_end", type=float, default=DEFAULTS.weight_decay_end,
                   help="final weight decay (default %(default)s)")
    o.add_argument("--clip_grad", type=float, default=DEFAULTS.clip_grad,
                   help="per-parameter gradient norm clipping, 0 for none (default %(default)s)")
    o.add_argument("--batch_size_per_gpu", type=int, default=64, help="batch size (default 64)")
    o.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="number of epochs (default %(default)s)")
    o.add_argument("--freeze_last_layer", type=int, default=DEFAULTS.freeze_last_layer,
                   help="epochs with the head's last layer frozen (default %(default)s)")
    o.add_argument("--lr", type=float, default=DEFAULTS.lr,
                   help="peak learning rate at batch size 256, scaled linearly (default %(default)s)")
    o.add_argument("--warmup_epochs", type=int, default=None,
                   help="linear learning-rate warm-up epochs (default 10, or --epochs when fewer)")
    o.add_argument("--min_lr", type=float, default=DEFAULTS.min_lr,
                   help="final learning rate of the cosine schedule (default %(default)s)")
    o.add_argument("--center_momentum", type=float, default=DEFAULTS.center_momentum,
                   help="EMA momentum of the teacher's centre (default %(default)s; main_dino.py fixes it)")
    o.add_argument("--sinkhorn_iterations", type=int, default=DEFAULTS.sinkhorn_iterations,
                   help="0: DINO's centering; n > 0: DINOv2's Sinkhorn-Knopp targets, n iterations "
                        "(DINOv2 uses 3; default %(default)s)")
    o.add_argument("--koleo_weight", type=float, default=DEFAULTS.koleo_weight,
                   help="weight of DINOv2's KoLeo regulariser on the student's global-crop CLS features "
                        "(DINOv2 uses 0.1; default %(default)s: DINO has none)")
    o.add_argument("--optimizer", default="adamw", help="only adamw is supported (default adamw)")

    a = p.add_argument_group("multi-crop (main_dino.py)")
    a.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.4, 1.0), metavar=("MIN", "MAX"),
                   help="area range of the global crops (default 0.4 1.0)")
    a.add_argument("--local_crops_number", type=int, default=8, help="number of local crops (default 8)")
    a.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.4), metavar=("MIN", "MAX"),
                   help="area range of the local crops (default 0.05 0.4)")

    d = p.add_argument_group("data and run (main_dino.py)")
    d.add_argument("--data_path", "--data", dest="data_path", required=True, metavar="DIR",
                   help="folder of images (searched recursively; first-level subfolders are classes)")
    d.add_argument("--output_dir", default=".", help="where checkpoints, model and log go (default .)")
    d.add_argument("--saveckp_freq", type=int, default=20, help="keep a numbered checkpoint every N epochs (default 20)")
    d.add_argument("--seed", type=int, default=0, help="seed of the weights, shuffling and augmentation (default 0)")
    d.add_argument("--num_workers", type=int, default=None,
                   help="compute threads (default: DINO_RS_NUM_THREADS or all cores)")

    x = p.add_argument_group("dino_rs extras")
    x.add_argument("--global_size", type=int, default=224, help="global crop size in pixels (default 224)")
    x.add_argument("--local_size", type=int, default=96, help="local crop size in pixels (default 96)")
    x.add_argument("--img_size", type=int, default=None,
                   help="the ViT's position-embedding and evaluation size (default: --global_size)")
    x.add_argument("--embed_dim", type=int, default=None, help="custom ViT width (overrides --arch)")
    x.add_argument("--depth", type=int, default=None, help="custom ViT depth (overrides --arch)")
    x.add_argument("--num_heads", type=int, default=None, help="custom ViT heads (overrides --arch)")
    x.add_argument("--hidden_dim", type=int, default=2048, help="DINO head hidden width (default 2048)")
    x.add_argument("--bottleneck_dim", type=int, default=256, help="DINO head bottleneck width (default 256)")
    x.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    x.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype: bfloat16 is mixed precision for GPUs, float32 weights and loss "
                        "(default float32, or the checkpoint's when resuming)")
    x.add_argument("--resume", default=None, metavar="PATH",
                   help="resume from this checkpoint file or folder instead of OUTPUT_DIR/checkpoint.safetensors")
    x.add_argument("--no_progress", action="store_true", help="no progress bar, one line per epoch")
    x.add_argument("--recipe", default="official", choices=["official", "small"],
                   help="official: main_dino.py's defaults; small: dino_rs.recipes.small_data for a few thousand "
                   "small images (its model, crops, schedule and init at --img_size, default 64); flags given "
                   "explicitly still win (default official)")
    x.add_argument("--init", default="dino", choices=["dino", "torch"],
                   help="how the linear layers start: DINO's N(0, 0.02) or PyTorch's default (default dino)")
    p.set_defaults(run=run_train)


def _data_folder(path: str) -> str:
    if not os.path.exists(path):
        raise CliError(f"data folder not found: {path}")
    if not os.path.isdir(path):
        raise CliError(f"--data must be a folder of images, not a file: {path}")
    return path


def run_train(args: argparse.Namespace) -> int:
    """Runs ``dino-rs train``: ImageFolder + MultiCropLoader + Trainer(checkpoint_dir=output_dir)."""
    import dino_rs as dr

    if args.use_bn_in_head:
        raise CliError("--use_bn_in_head true is not supported: dino_rs's DINO head has no batch norm")
    if args.optimizer.lower() != "adamw":
        raise CliError(f"--optimizer {args.optimizer} is not supported: dino_rs trains with adamw only")
    if args.batch_size_per_gpu < 1:
        raise CliError(f"--batch_size_per_gpu must be at least 1, got {args.batch_size_per_gpu}")
    if args.use_fp16:
        _note("--use_fp16 is ignored: dino_rs has no float16 mode; --dtype bfloat16 is its mixed precision "
              "(no loss scaling needed)")
    data = _data_folder(args.data_path)
    if args.num_workers is not None:
        if args.num_workers < 1:
            raise CliError(f"--num_workers must be at least 1, got {args.num_workers}")
        dr.set_num_threads(args.num_workers)

    output_dir = Path(args.output_dir)
    dataset = dr.ImageFolder(data)
    if len(dataset) < args.batch_size_per_gpu:
        raise CliError(
            f"{data} holds {len(dataset)} images, fewer than one batch (--batch_size_per_gpu {args.batch_size_per_gpu}): "
            "lower --batch_size_per_gpu"
        )
    augmenter = dr.MultiCropAugmenter(
        global_size=args.global_size,
        local_size=args.local_size,
        n_local=args.local_crops_number,
        global_scale=tuple(args.global_crops_scale),
        local_scale=tuple(args.local_crops_scale),
    )
    loader = dr.MultiCropLoader(dataset, augmenter, batch_size=args.batch_size_per_gpu, seed=args.seed)
    progress = not args.no_progress

    resume_from: Optional[Path] = Path(args.resume) if args.resume else None
    if resume_from is None and (output_dir / LATEST_CHECKPOINT).is_file():
        resume_from = output_dir / LATEST_CHECKPOINT
    if resume_from is not None:
        if not resume_from.exists():
            raise CliError(f"checkpoint not found: {resume_from}")
        trainer = dr.Trainer.resume(resume_from, loader, progress=progress, device=args.device, dtype=args.dtype)
        trainer.checkpoint_dir = output_dir
        trainer.saveckp_freq = max(1, args.saveckp_freq)
        print(f"resuming from {resume_from} at epoch {trainer.epoch}/{trainer.epochs} (iteration {trainer.iteration})")
        if trainer.epochs != args.epochs:
            _note(f"the checkpoint's schedules are for {trainer.epochs} epochs: --epochs {args.epochs} is ignored")
    else:
        model = dr.DINO(
            arch=args.arch,
            patch_size=args.patch_size,
            img_size=args.img_size or args.global_size,
            out_dim=args.out_dim,
            hidden_dim=args.hidden_dim,
            bottleneck_dim=args.bottleneck_dim,
            norm_last_layer=args.norm_last_layer,
            drop_path_rate=args.drop_path_rate,
            device=args.device,
            seed=args.seed,
            embed_dim=args.embed_dim,
            depth=args.depth,
            num_heads=args.num_heads,
            dtype=args.dtype or "float32",
            init=args.init,
        )
        trainer = dr.Trainer(
            model,
            loader,
            **{name: getattr(args, name) for name in FIELDS},
            checkpoint_dir=output_dir,
            saveckp_freq=args.saveckp_freq,
            progress=progress,
        )
        print(f"training {model!r} on {len(dataset)} images of {data} for {args.epochs} epochs "
              f"({len(loader)} iterations per epoch)")
    try:
        trainer.fit()
    finally:
        if trainer.history:
            output_dir.mkdir(parents=True, exist_ok=True)
            with open(output_dir / "log.txt", "w") as f:
                for h in trainer.history:
                    f.write(json.dumps(h) + "\n")
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.save(output_dir / MODEL_FILE)
    last = trainer.history[-1] if trainer.history else {}
    loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
    print(f"epoch {trainer.epoch}/{trainer.epochs}{loss}; wrote {output_dir / MODEL_FILE}")
    return 0


# --------------------------------------------------------------------------------------------------
# embed
# --------------------------------------------------------------------------------------------------
def add_embed_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Registers ``dino-rs embed``."""
    p = sub.add_parser(
        "embed",
        help="teacher features of a folder of images, as .npy (+ .json of paths and labels)",
        description="Embeds every image under --data with a trained model and writes float32 features "
        "(N, embed_dim; see --features) to --output (.npy) and the image paths, labels and classes, in the same order, "
        "to the same name with .json.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="DINO.save file, trainer checkpoint, `train` output folder, backbone (official .pth, timm "
                   "or transformers files or folder), or a published model's name (dinov2_vits14, ...: "
                   "downloaded once)")
    p.add_argument("--data", "--data_path", dest="data", required=True, metavar="DIR", help="folder of images (recursive)")
    p.add_argument("--output", default="features.npy", help="features file (default features.npy)")
    p.add_argument("--batch_size", type=int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--features", default="cls", choices=["cls", "patch", "cls+avgpool"],
                   help="cls: (N, D); patch: (N, patches, D); cls+avgpool: (N, 2D), DINOv2's linear-evaluation "
                   "input (default cls)")
    p.add_argument("--num_heads", type=int, default=None, help="heads of a backbone file (default embed_dim // 64)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype: bfloat16 is mixed precision for GPUs (default float32)")
    p.add_argument("--num_workers", type=int, default=None, help="compute threads (default: all cores)")
    p.set_defaults(run=run_embed)


def load_model(path: str, num_heads: Optional[int] = None, device: str = "auto", dtype: str = "float32") -> Any:
    """A :class:`dino_rs.DINO` from any file dino_rs writes or reads.

    A folder: its ``model.safetensors``, else its ``checkpoint.safetensors``. ``.pth``/``.pt``:
    :func:`dino_rs.load_backbone` (official weights). Otherwise :meth:`dino_rs.DINO.load` (model
    files and trainer checkpoints), then :func:`dino_rs.load_backbone` (backbones). Raises
    :class:`CliError` naming the file when none of them can read it.
    """
    import dino_rs as dr

    p = Path(path)
    if not p.exists() and path in {m["name"] for m in dr.pretrained_models()}:
        return dr.from_pretrained(path, device=device, dtype=dtype)
    if p.is_dir():
        for name in (MODEL_FILE, LATEST_CHECKPOINT):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise CliError(f"no {MODEL_FILE} or {LATEST_CHECKPOINT} in {path}")
    if not p.exists():
        raise CliError(f"checkpoint not found: {path}")
    if p.suffix in (".pth", ".pt"):
        return dr.load_backbone(p, num_heads=num_heads, device=device, dtype=dtype)
    try:
        return dr.DINO.load(p, device=device, dtype=dtype)
    except ValueError as first:
        try:
            return dr.load_backbone(p, num_heads=num_heads, device=device, dtype=dtype)
        except ValueError as second:
            raise CliError(f"cannot read {p} as a dino_rs model or checkpoint ({first}) nor as a backbone ({second})") from None


def run_embed(args: argparse.Namespace) -> int:
    """Runs ``dino-rs embed``."""
    import numpy as np

    import dino_rs as dr

    if args.batch_size < 1:
        raise CliError(f"--batch_size must be at least 1, got {args.batch_size}")
    data = _data_folder(args.data)
    if args.num_workers is not None:
        if args.num_workers < 1:
            raise CliError(f"--num_workers must be at least 1, got {args.num_workers}")
        dr.set_num_threads(args.num_workers)
    model = load_model(args.checkpoint, args.num_heads, args.device, args.dtype)
    dataset = dr.ImageFolder(data)
    feats = np.asarray(model.embed(dataset, batch_size=args.batch_size, features=args.features), dtype=np.float32)
    out = Path(args.output)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # np.save(path) would append .npy to other names
        np.save(f, feats)
    meta = out.with_suffix(".json")
    with open(meta, "w") as f:
        json.dump(
            {
                "checkpoint": str(args.checkpoint),
                "data": str(data),
                "shape": list(feats.shape),
                "paths": list(dataset.paths),
                "labels": [int(v) for v in dataset.labels],
                "classes": list(dataset.classes),
            },
            f,
        )
    print(f"embedded {len(feats)} images -> {out} {feats.shape} float32; paths and labels -> {meta}")
    return 0


# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``dino-rs`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog=PROG, description="DINO self-supervised learning in Rust.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_command(sub)
    add_train_command(sub)
    add_embed_command(sub)
    return parser


def recipe_defaults(args: argparse.Namespace) -> Dict[str, Any]:
    """``dino-rs train --recipe small``: :func:`dino_rs.recipes.small_data` for the data folder's
    image count at ``--img_size`` (default 64), as defaults of the train flags (so that flags
    given explicitly win)."""
    import dino_rs as dr

    size = args.img_size or 64
    r = dr.recipes.small_data(len(dr.ImageFolder(_data_folder(args.data_path))), size)
    m, a, t = r["model"], r["augmenter"], r["trainer"]
    flags = {k: m[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "out_dim", "hidden_dim",
                               "bottleneck_dim", "drop_path_rate", "init", "img_size")}
    flags.update(global_size=a["global_size"], local_size=a["local_size"], local_crops_number=a["n_local"],
                 batch_size_per_gpu=r["loader"]["batch_size"], **t)
    return flags


def _train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return cast(argparse.ArgumentParser, sub.choices["train"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``dino-rs`` / ``python -m dino_rs``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._errors import ImageError

    try:
        if args.command == "train" and args.recipe != "official":
            # Parsed again with the recipe's values as the defaults: explicit flags keep theirs. The
            # warm-up is the recipe's unless given, but never longer than the epochs trained.
            defaults = recipe_defaults(args)
            warmup = defaults.pop("warmup_epochs")
            _train_parser(parser).set_defaults(**defaults)
            args = parser.parse_args(argv)
            if args.warmup_epochs is None:
                args.warmup_epochs = min(warmup, args.epochs)
        return int(args.run(args))
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (ImageError, OSError, ValueError, FloatingPointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


__all__: List[str] = ["main", "build_parser", "bool_flag", "load_model", "run_demo", "run_train", "run_embed"]
