"""``dino_rs.TrainConfig``: DINO's training recipe, with the names of the official ``main_dino.py``.

The defaults are the Rust core's (``TrainConfig`` in src/train.rs), read once at import: this module
names the fields, and :class:`dino_rs.Trainer`, :class:`dino_rs.sklearn.DINOEmbedder` and
``dino-rs train`` take their defaults from here (tests/python/test_config.py checks that they all
agree). Checking the values is the core's job too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional

from ._dino_rs import _train_config

# The core's official defaults (its warm-up resolved for its own 100 epochs).
_CORE = _train_config({})


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; every default is the official ``main_dino.py``'s.

    Parameters
    ----------
    epochs : int
        Epochs the schedules are built for.
    lr : float
        Peak learning rate for a batch of 256, scaled linearly with the batch size; reached after
        the warm-up, then a cosine schedule to ``min_lr``.
    min_lr : float
        The learning rate at the end of the cosine schedule.
    warmup_epochs : int, optional
        Epochs of linear learning-rate warm-up. Unset: 10, or ``epochs`` when there are fewer,
        so that a short run works with the defaults. Set longer than ``epochs``: an error.
    weight_decay, weight_decay_end : float
        AdamW's weight decay, on a cosine schedule from the first to the second.
    momentum_teacher : float
        The teacher's EMA momentum at the start, on a cosine schedule to 1.
    teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs : float, float, int
        The teacher's softmax temperature, reached linearly from ``warmup_teacher_temp`` over
        ``warmup_teacher_temp_epochs``.
    student_temp : float
        The student's softmax temperature.
    center_momentum : float
        EMA momentum of the centre subtracted from the teacher's outputs.
    sinkhorn_iterations : int
        0 (the official DINO): the teacher's targets are its centred, sharpened softmax. n > 0:
        DINOv2's Sinkhorn-Knopp centering with n iterations (DINOv2 uses 3): the targets of a batch
        are scaled so that every output dimension gets an equal share, which keeps the teacher from
        collapsing without a centre (the centre is then not used). Not part of DINO's recipe.
    koleo_weight : float
        0 (the official DINO): no KoLeo term. w > 0: DINOv2's KoLeo regulariser with weight w
        (DINOv2 uses 0.1) is added to the minimised loss: for each global view, the mean −log
        distance of each image's L2-normalised student CLS feature to its nearest neighbour in
        the batch, which spreads the features apart. The reported ``loss`` stays DINO's alone.
        Needs batches of at least 2 images. Not part of DINO's recipe.
    clip_grad : float
        Per-parameter gradient-norm clipping; 0 turns it off.
    freeze_last_layer : int
        Epochs during which the head's last layer gets no update.

    Raises ValueError, naming the option, for a value out of its range.
    """

    epochs: int = _CORE["epochs"]
    lr: float = _CORE["lr"]
    min_lr: float = _CORE["min_lr"]
    warmup_epochs: Optional[int] = None
    weight_decay: float = _CORE["weight_decay"]
    weight_decay_end: float = _CORE["weight_decay_end"]
    momentum_teacher: float = _CORE["momentum_teacher"]
    teacher_temp: float = _CORE["teacher_temp"]
    warmup_teacher_temp: float = _CORE["warmup_teacher_temp"]
    warmup_teacher_temp_epochs: int = _CORE["warmup_teacher_temp_epochs"]
    student_temp: float = _CORE["student_temp"]
    center_momentum: float = _CORE["center_momentum"]
    sinkhorn_iterations: int = _CORE["sinkhorn_iterations"]
    koleo_weight: float = _CORE["koleo_weight"]
    clip_grad: float = _CORE["clip_grad"]
    freeze_last_layer: int = _CORE["freeze_last_layer"]

    def __post_init__(self) -> None:
        self.resolved()  # the core's checks, at construction

    def overrides(self) -> Dict[str, Any]:
        """The options as the core takes them (an unset warm-up left out, for the core to resolve)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def resolved(self) -> Dict[str, Any]:
        """Every option as training will use it (the warm-up resolved)."""
        return _train_config(self.overrides())


#: The names of the recipe's options, in order.
FIELDS = tuple(f.name for f in fields(TrainConfig))
#: The defaults, for the parameter lists of the classes and commands that take the recipe.
DEFAULTS = TrainConfig()
