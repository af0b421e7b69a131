"""``dino_rs.Trainer``: DINO training with a progress bar, per-epoch history and checkpoints.

The heavy lifting (loader, forward, backward, optimiser, EMA) runs in Rust with the GIL
released; this wrapper decides when to save and what to show.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np

from ._dino_rs import DINO, MultiCropLoader, _Trainer

PathLike = Union[str, "os.PathLike[str]"]

LATEST = "checkpoint.safetensors"


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: fall back to one line per epoch
        return None
    return tqdm(total=total, desc=desc, leave=False)


class Trainer:
    """Trains a :class:`dino_rs.DINO` model on a :class:`dino_rs.MultiCropLoader` with the official
    DINO recipe (every default as in ``main_dino.py``).

    The learning rate is ``lr * batch_size / 256`` with ``warmup_epochs`` of linear warm-up, then
    a cosine to ``min_lr``; weight decay goes from ``weight_decay`` to ``weight_decay_end``; the
    teacher momentum from ``momentum_teacher`` to 1; all per iteration. With ``checkpoint_dir``,
    ``checkpoint.safetensors`` is rewritten every epoch and ``checkpointNNNN.safetensors`` kept
    every ``saveckp_freq`` epochs.
    """

    def __init__(
        self,
        model: DINO,
        loader: MultiCropLoader,
        epochs: int = 100,
        lr: float = 5e-4,
        min_lr: float = 1e-6,
        warmup_epochs: int = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        momentum_teacher: float = 0.996,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
        checkpoint_dir: Optional[PathLike] = None,
        saveckp_freq: int = 20,
        progress: bool = True,
        _rust: Optional[_Trainer] = None,
    ) -> None:
        if saveckp_freq < 1:
            raise ValueError(f"saveckp_freq must be at least 1, got {saveckp_freq}")
        self.model = model
        self.loader = loader
        self.epochs = epochs
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.saveckp_freq = saveckp_freq
        self.progress = progress
        self.history: List[Dict[str, Any]] = []
        self._rust = _rust or _Trainer(
            model,
            batch_size=loader.batch_size,
            niter_per_ep=len(loader),
            n_local=loader.augmenter.n_local,
            epochs=epochs,
            lr=lr,
            min_lr=min_lr,
            warmup_epochs=warmup_epochs,
            weight_decay=weight_decay,
            weight_decay_end=weight_decay_end,
            momentum_teacher=momentum_teacher,
            teacher_temp=teacher_temp,
            warmup_teacher_temp=warmup_teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            student_temp=student_temp,
            center_momentum=center_momentum,
            clip_grad=clip_grad,
            freeze_last_layer=freeze_last_layer,
        )

    @property
    def iteration(self) -> int:
        """Iterations done so far."""
        return self._rust.iteration

    @property
    def epoch(self) -> int:
        """Epochs completed so far."""
        return self._rust.iteration // self._rust.niter_per_ep

    @property
    def config(self) -> Dict[str, Any]:
        """The training recipe."""
        return self._rust.config

    def step(self, globals: np.ndarray, locals: Optional[np.ndarray] = None) -> Dict[str, float]:
        """One iteration on given crops: globals (2, B, 3, G, G), locals (n_local, B, 3, L, L)."""
        return self._rust.step(globals, locals)

    def fit(self, epochs: Optional[int] = None, callback: Optional[Callable[[Dict[str, float]], None]] = None) -> List[Dict[str, Any]]:
        """Trains until ``epochs`` epochs are done in total (default: all). Returns this call's
        per-epoch dicts: epoch, loss, lr, wd, momentum, teacher_temp, seconds.

        Ctrl-C stops at the next step boundary; the model keeps the weights of the last step.
        A non-finite loss raises FloatingPointError naming the iteration, weights from before it.
        """
        target = self.epochs if epochs is None else epochs
        if target > self.epochs:
            raise ValueError(f"epochs={target} exceeds the {self.epochs} epochs the schedules were built for")
        done: List[Dict[str, Any]] = []
        out_dim = self.model.out_dim or 1
        for epoch in range(self.epoch, target):
            bar = _progress(len(self.loader), f"epoch {epoch + 1}/{target}", self.progress)

            def on_step(stats: Dict[str, float], bar=bar) -> None:
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", t=f"{stats['teacher_temp']:.3f}")
                if callback is not None:
                    callback(stats)

            try:
                stats = self._rust.train_epoch(self.loader, epoch, on_step)
            finally:
                if bar is not None:
                    bar.close()
            stats["epoch"] = epoch + 1
            done.append(stats)
            self.history.append(stats)
            if self.progress and bar is None:
                print(f"epoch {epoch + 1}/{target}: loss {stats['loss']:.4f}, lr {stats.get('lr', 0):.2e}, {stats['seconds']:.1f} s")
            if abs(stats["loss"] - math.log(out_dim)) < 1e-3:
                import warnings

                warnings.warn(
                    f"epoch {epoch + 1}: loss {stats['loss']:.4f} sits at ln(out_dim) = {math.log(out_dim):.4f}: "
                    "the output is uniform (collapse); lower teacher_temp or check the learning rate",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._checkpoint(epoch + 1, target)
        return done

    def _checkpoint(self, epoch: int, target: int) -> None:
        if self.checkpoint_dir is None:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.save(self.checkpoint_dir / LATEST)
        if epoch % self.saveckp_freq == 0 or epoch == target:
            self.save(self.checkpoint_dir / f"checkpoint{epoch:04d}.safetensors")

    def save(self, path: PathLike) -> None:
        """A resumable checkpoint: student, teacher, optimiser state, centre, schedules' position."""
        extra = {"history": self.history, "checkpoint_dir": str(self.checkpoint_dir) if self.checkpoint_dir else None,
                 "saveckp_freq": self.saveckp_freq, "epochs": self.epochs, "saved_at": time.time()}
        self._rust.save(os.fspath(path), json.dumps(extra))

    @classmethod
    def resume(cls, path: PathLike, loader: MultiCropLoader, progress: bool = True, device: str = "auto") -> "Trainer":
        """Continues from a checkpoint file, or from the latest checkpoint in a directory."""
        p = Path(path)
        if p.is_dir():
            p = p / LATEST
        rust, model, extra = _Trainer.load(os.fspath(p), device)
        info = json.loads(extra) if extra else {}
        if rust.niter_per_ep != len(loader):
            raise ValueError(
                f"{p}: the checkpoint was trained with {rust.niter_per_ep} batches per epoch, this loader gives {len(loader)}"
            )
        trainer = cls(
            model,
            loader,
            epochs=int(info.get("epochs") or rust.config["epochs"]),
            checkpoint_dir=info.get("checkpoint_dir"),
            saveckp_freq=int(info.get("saveckp_freq") or 20),
            progress=progress,
            _rust=rust,
        )
        trainer.history = list(info.get("history") or [])
        return trainer
