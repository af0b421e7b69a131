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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._dino_rs import DINO, MultiCropLoader, _Trainer
from .config import DEFAULTS, TrainConfig
from .evaluation import knn_accuracy

PathLike = Union[str, "os.PathLike[str]"]
StepCallback = Callable[[Dict[str, float]], Any]
# (train_images, train_labels, test_images, test_labels); images as DINO.embed takes them
EvalData = Tuple[Any, Any, Any, Any]

LATEST = "checkpoint.safetensors"


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: fall back to one line per epoch
        return None
    return tqdm(total=total, desc=desc, leave=False)



#: KL(teacher ‖ student) below this (nats) means the student has nothing left to learn from the teacher.
COLLAPSE_KL = 0.01


def collapse_kind(stats: Dict[str, Any], out_dim: int) -> Optional[str]:
    """The kind of collapse an epoch's measures show, as a message naming what to change; ``None``
    when there is none. The DINO paper's two kinds: in both the student matches the teacher
    (KL(teacher ‖ student) goes to 0), with targets that are uniform (entropy at ln K: centering
    dominates) or on one dimension (entropy at 0: sharpening dominates)."""
    h, kl = stats.get("teacher_entropy"), stats.get("teacher_student_kl")
    if h is None or kl is None or not (math.isfinite(h) and math.isfinite(kl)) or kl > COLLAPSE_KL:
        return None
    ln_k = math.log(out_dim)
    if h > 0.99 * ln_k:
        return (
            f"uniform collapse: the teacher's targets are uniform (entropy {h:.3f} nats, ln K = {ln_k:.3f}) "
            f"and the student copies them (KL {kl:.4f}); centering outweighs sharpening: lower teacher_temp "
            "(or warmup_teacher_temp), or raise center_momentum"
        )
    if h < 0.01 * ln_k:
        return (
            f"one-dimension collapse: the teacher puts everything on one output (entropy {h:.4f} nats, largest "
            f"probability {stats.get('teacher_max_prob', float('nan')):.3f}) and the student copies it (KL {kl:.4f}); "
            "sharpening outweighs centering: raise teacher_temp, or lower center_momentum"
        )
    return None

class Trainer:
    """Trains a :class:`dino_rs.DINO` model on a :class:`dino_rs.MultiCropLoader` with the official
    DINO recipe (every default as in ``main_dino.py``).

    The learning rate is ``lr * batch_size / 256`` with ``warmup_epochs`` of linear warm-up, then
    a cosine to ``min_lr``; weight decay goes from ``weight_decay`` to ``weight_decay_end``; the
    teacher momentum from ``momentum_teacher`` to 1; all per iteration. With ``checkpoint_dir``,
    ``checkpoint.safetensors`` is rewritten every epoch and ``checkpointNNNN.safetensors`` kept
    every ``saveckp_freq`` epochs.

    Parameters
    ----------
    model : dino_rs.DINO
        The student/teacher pair to train (changed in place).
    loader : dino_rs.MultiCropLoader
        The batches of multi-crop views; its batch size scales the learning rate.
    epochs, lr, min_lr, warmup_epochs, weight_decay, weight_decay_end, momentum_teacher, \
teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs, student_temp, center_momentum, \
sinkhorn_iterations, koleo_weight, clip_grad, freeze_last_layer
        The recipe: :class:`dino_rs.TrainConfig`'s options, names and defaults (``main_dino.py``'s).
        :meth:`fit` trains up to ``epochs`` in total. An unset ``warmup_epochs`` is 10, or
        ``epochs`` when there are fewer.
    checkpoint_dir : path, optional
        Where to write ``checkpoint.safetensors`` (every epoch) and ``checkpointNNNN.safetensors``.
    saveckp_freq : int, default 20
        Epochs between numbered checkpoints (the last epoch of a ``fit`` call is always kept).
    progress : bool, default True
        A tqdm bar per epoch (one printed line per epoch without tqdm).
    eval_every : int, default 0
        With ``eval_data``: every ``eval_every`` epochs (after epochs ``eval_every``,
        ``2 * eval_every``, ...), the teacher embeds the evaluation images
        (:meth:`DINO.embed`) and DINO's weighted k-NN (:func:`dino_rs.knn_accuracy`, k=20,
        T=0.07) adds ``knn_top1`` and ``knn_top5`` (percent) to that epoch's history dict, and to
        the progress output. 0 turns it off.
    eval_data : tuple, optional
        ``(train_images, train_labels, test_images, test_labels)``: the images in any form
        :meth:`DINO.embed` takes (uint8 arrays, lists of paths or arrays, an ImageFolder or
        ArrayDataset), or float32 (N, 3, H, W) normalised crops used as they are (no eval
        transform: for small images at the model's own size); the labels integer arrays. Kept in memory only: checkpoints store
        ``eval_every``, never these arrays (pass them again to :meth:`resume`).
    dtype : {"float32", "bfloat16"}, optional
        The compute dtype of the forward passes; default: the model's (:attr:`DINO.dtype`).
        "bfloat16" is mixed precision as PyTorch's autocast does it: float32 weights, gradients,
        optimiser state, loss and centre; bfloat16 matmuls and attention; LayerNorm and softmax
        in float32. It is meant for GPUs: on the CPU it is slower than float32.
    callbacks : sequence of callables, default ()
        Each is called as ``callback(stats)`` after every training step of :meth:`fit`, with the
        step's dict (``loss``, ``lr``, ``wd``, ``momentum``, ``teacher_temp``, ``iteration``,
        ``epoch``), before ``fit``'s own ``callback``. Return values are ignored: returning
        anything never stops training. An exception raised by a callback stops :meth:`fit` and
        propagates to its caller; the step it was called for is done and kept (``iteration``
        counts it), the unfinished epoch is not added to the history, and the trainer stays
        usable: the next ``fit()`` continues from the next step, exactly as after Ctrl-C.
    """

    def __init__(
        self,
        model: DINO,
        loader: MultiCropLoader,
        epochs: int = DEFAULTS.epochs,
        lr: float = DEFAULTS.lr,
        min_lr: float = DEFAULTS.min_lr,
        warmup_epochs: Optional[int] = None,
        weight_decay: float = DEFAULTS.weight_decay,
        weight_decay_end: float = DEFAULTS.weight_decay_end,
        momentum_teacher: float = DEFAULTS.momentum_teacher,
        teacher_temp: float = DEFAULTS.teacher_temp,
        warmup_teacher_temp: float = DEFAULTS.warmup_teacher_temp,
        warmup_teacher_temp_epochs: int = DEFAULTS.warmup_teacher_temp_epochs,
        student_temp: float = DEFAULTS.student_temp,
        center_momentum: float = DEFAULTS.center_momentum,
        sinkhorn_iterations: int = DEFAULTS.sinkhorn_iterations,
        koleo_weight: float = DEFAULTS.koleo_weight,
        clip_grad: float = DEFAULTS.clip_grad,
        freeze_last_layer: int = DEFAULTS.freeze_last_layer,
        checkpoint_dir: Optional[PathLike] = None,
        saveckp_freq: int = 20,
        progress: bool = True,
        eval_every: int = 0,
        eval_data: Optional[EvalData] = None,
        callbacks: Sequence[StepCallback] = (),
        dtype: Optional[str] = None,
        _rust: Optional[_Trainer] = None,
    ) -> None:
        if saveckp_freq < 1:
            raise ValueError(f"saveckp_freq must be at least 1, got {saveckp_freq}")
        _check_crop_sizes(model, loader)
        self.eval_every, self.eval_data = _check_eval(eval_every, eval_data)
        callbacks = tuple(callbacks)
        for i, cb in enumerate(callbacks):
            if not callable(cb):
                raise ValueError(f"callbacks[{i}] is not callable: {cb!r}")
        self.callbacks: Tuple[StepCallback, ...] = callbacks
        self.model = model
        self.loader = loader
        self.epochs = epochs
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.saveckp_freq = saveckp_freq
        self.progress = progress
        self.history: List[Dict[str, Any]] = []
        if _rust is None:
            config = TrainConfig(
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
                sinkhorn_iterations=sinkhorn_iterations,
                koleo_weight=koleo_weight,
                clip_grad=clip_grad,
                freeze_last_layer=freeze_last_layer,
            )
            _rust = _Trainer(
                model,
                config.overrides(),
                batch_size=loader.batch_size,
                niter_per_ep=len(loader),
                n_local=loader.augmenter.n_local,
                dtype=dtype,
            )
        self._rust = _rust

    @property
    def dtype(self) -> str:
        """The compute dtype of training ("float32" or "bfloat16")."""
        return self._rust.dtype

    @property
    def iteration(self) -> int:
        """Iterations done so far."""
        return self._rust.iteration

    @property
    def profile(self) -> bool:
        """Where each step's time goes (default False). When True, every step's dict has
        ``time_teacher_forward``, ``time_student_forward``, ``time_loss``, ``time_backward``,
        ``time_clip``, ``time_adamw``, ``time_ema`` and ``time_center`` in seconds, with the device
        synchronised at each phase boundary (on a GPU a profiled step is a little slower), and
        :meth:`fit` adds ``time_data`` (waiting for the loader and the upload) to each step's dict
        and the epoch means of all of them to each epoch's dict."""
        return self._rust.profile

    @profile.setter
    def profile(self, on: bool) -> None:
        self._rust.profile = bool(on)

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

    def fit(self, epochs: Optional[int] = None, callback: Optional[StepCallback] = None) -> List[Dict[str, Any]]:
        """Trains until ``epochs`` epochs are done in total (default: all). Returns this call's
        per-epoch dicts: epoch, loss, lr, wd, momentum, teacher_temp, seconds (plus knn_top1 and
        knn_top5 on the epochs evaluated with ``eval_every``).

        ``callback(stats)`` is called after every step, after the trainer's ``callbacks`` (see
        the class docstring: its return value is ignored; an exception it raises propagates
        and leaves the trainer usable).

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
                for cb in self.callbacks:
                    cb(stats)
                if callback is not None:
                    callback(stats)

            try:
                stats = self._rust.train_epoch(self.loader, epoch, on_step)
            finally:
                if bar is not None:
                    bar.close()
            stats["epoch"] = epoch + 1
            knn = ""
            if self.eval_every and (epoch + 1) % self.eval_every == 0:
                stats["knn_top1"], stats["knn_top5"] = self.evaluate()
                knn = f", k-NN top-1 {stats['knn_top1']:.1f}% top-5 {stats['knn_top5']:.1f}%"
            done.append(stats)
            self.history.append(stats)
            if self.progress and bar is None:
                measures = ""
                if "teacher_entropy" in stats:
                    measures = (f", teacher entropy {stats['teacher_entropy']:.3f}, "
                                f"KL {stats['teacher_student_kl']:.4f}")
                print(f"epoch {epoch + 1}/{target}: loss {stats['loss']:.4f}{measures}, lr {stats.get('lr', 0):.2e}, "
                      f"{stats['seconds']:.1f} s{knn}")
            elif self.progress and knn:
                _write_line(f"epoch {epoch + 1}/{target}: loss {stats['loss']:.4f}{knn}")
            collapse = collapse_kind(stats, out_dim)
            if collapse:
                import warnings

                warnings.warn(f"epoch {epoch + 1}: {collapse}", RuntimeWarning, stacklevel=2)
            self._checkpoint(epoch + 1, target)
        return done

    def evaluate(self, k: int = 20, temperature: float = 0.07, batch_size: int = 128) -> Tuple[float, float]:
        """k-NN top-1 and top-5 accuracy (percent) of the teacher's features on ``eval_data``.

        Embeds the training and test images of ``eval_data`` with :meth:`DINO.embed` (DINO's
        eval transform), or, for float32 (N, 3, H, W) arrays of normalised crops, with
        :meth:`DINO.forward_backbone` as they are; then runs :func:`dino_rs.knn_accuracy`.
        Raises ValueError when the trainer has no ``eval_data``.
        """
        if self.eval_data is None:
            raise ValueError(
                "this Trainer has no eval_data: pass eval_data=(train_images, train_labels, test_images, test_labels)"
            )
        x_train, y_train, x_test, y_test = self.eval_data
        train = _features(self.model, x_train, batch_size)
        test = _features(self.model, x_test, batch_size)
        top1, top5 = knn_accuracy(train, y_train, test, y_test, k=k, temperature=temperature)
        return float(top1), float(top5)

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
                 "saveckp_freq": self.saveckp_freq, "epochs": self.epochs, "eval_every": self.eval_every,
                 "saved_at": time.time()}
        self._rust.save(os.fspath(path), json.dumps(extra))

    @classmethod
    def resume(
        cls,
        path: PathLike,
        loader: MultiCropLoader,
        progress: bool = True,
        device: str = "auto",
        eval_data: Optional[EvalData] = None,
        eval_every: Optional[int] = None,
        callbacks: Sequence[StepCallback] = (),
        dtype: Optional[str] = None,
    ) -> "Trainer":
        """Continues from a checkpoint file, or from the latest checkpoint in a directory.

        The recipe, history, ``epochs``, ``checkpoint_dir`` and ``saveckp_freq`` come from the
        checkpoint. ``eval_data`` is not stored in checkpoints: pass it again to keep evaluating;
        ``eval_every=None`` then takes the checkpoint's value (0 without ``eval_data``).
        ``callbacks`` as in :class:`Trainer`. ``dtype=None`` continues in the checkpoint's compute
        dtype; "float32" or "bfloat16" switch (the model gets the same).
        """
        p = Path(path)
        if p.is_dir():
            p = p / LATEST
        rust, model, extra = _Trainer.load(os.fspath(p), device, dtype)
        info = json.loads(extra) if extra else {}
        if rust.niter_per_ep != len(loader):
            raise ValueError(
                f"{p}: the checkpoint was trained with {rust.niter_per_ep} batches per epoch, this loader gives {len(loader)}"
            )
        # the recipe is built for these: another batch size silently changes the learning rate,
        # another n_local makes every step fail
        for name, trained, given in (("batch_size", rust.config["batch_size"], loader.batch_size),
                                     ("n_local", rust.config["n_local"], loader.augmenter.n_local)):
            if trained != given:
                raise ValueError(f"{p}: the checkpoint was trained with {name}={trained}, this loader gives {name}={given}")
        if eval_every is None:  # the checkpoint's, when there is something to evaluate on
            eval_every = int(info.get("eval_every") or 0) if eval_data is not None else 0
        trainer = cls(
            model,
            loader,
            epochs=int(info.get("epochs") or rust.config["epochs"]),
            checkpoint_dir=info.get("checkpoint_dir"),
            saveckp_freq=int(info.get("saveckp_freq") or 20),
            progress=progress,
            eval_every=eval_every,
            eval_data=eval_data,
            callbacks=callbacks,
            _rust=rust,
        )
        trainer.history = list(info.get("history") or [])
        return trainer


def _features(model: DINO, images: Any, batch_size: int) -> np.ndarray:
    """Teacher features: normalised float32 (N, 3, H, W) crops as they are (small images such as
    Fashion-MNIST are evaluated at their own size, as lightly and solo-learn do for CIFAR), anything
    else through DINO's eval transform."""
    if isinstance(images, np.ndarray) and images.dtype == np.float32 and images.ndim == 4:
        return model.forward_backbone(images, teacher=True, batch_size=batch_size)
    return model.embed(images, batch_size=batch_size, progress=False)


def _check_crop_sizes(model: DINO, loader: MultiCropLoader) -> None:
    """The ViT cuts crops into whole patches: say so now rather than at the first step."""
    aug = loader.augmenter
    sizes = [("global_size", aug.global_size)] + ([("local_size", aug.local_size)] if aug.n_local else [])
    for name, size in sizes:
        if size % model.patch_size:
            raise ValueError(
                f"the loader's {name}={size} is not a multiple of the model's patch size {model.patch_size}"
            )


def _check_eval(eval_every: int, eval_data: Optional[EvalData]) -> Tuple[int, Optional[EvalData]]:
    if isinstance(eval_every, bool) or not isinstance(eval_every, (int, np.integer)) or eval_every < 0:
        raise ValueError(f"eval_every must be a non-negative integer (0: no evaluation), got {eval_every!r}")
    if eval_data is None:
        if eval_every:
            raise ValueError(
                f"eval_every={eval_every} needs eval_data=(train_images, train_labels, test_images, test_labels)"
            )
        return int(eval_every), None
    try:
        x_train, y_train, x_test, y_test = eval_data
    except (TypeError, ValueError):
        raise ValueError("eval_data must be a tuple (train_images, train_labels, test_images, test_labels)") from None
    y_train = np.asarray(y_train).ravel()
    y_test = np.asarray(y_test).ravel()
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        try:
            n = len(x)
        except TypeError:
            raise ValueError(
                f"eval_data's {name} images must be a sequence or array of images, got {type(x).__name__}"
            ) from None
        if n != len(y):
            raise ValueError(f"eval_data: {n} {name} images but {len(y)} {name} labels")
        if n == 0:
            raise ValueError(f"eval_data: no {name} images")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise ValueError(f"eval_data: the {name} labels must be non-negative integers")
    return int(eval_every), (x_train, y_train, x_test, y_test)


def _write_line(line: str) -> None:
    """A line that does not break an open tqdm bar."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(line)
    else:
        tqdm.write(line)
