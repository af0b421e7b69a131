"""scikit-learn interface: :class:`DINOEmbedder`, a transformer that trains DINO in ``fit`` and
embeds images with the teacher in ``transform``.

    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from dino_rs.sklearn import DINOEmbedder

    pipe = make_pipeline(DINOEmbedder(embed_dim=64, depth=4, num_heads=4, patch_size=7, img_size=28,
                                      out_dim=256, epochs=10, warmup_epochs=2), KNeighborsClassifier())
    pipe.fit(x_train, y_train).score(x_test, y_test)

scikit-learn is an optional dependency (``pip install "dino-rs[notebook]"``); this module imports
it, ``import dino_rs`` does not.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
    from sklearn.utils.validation import check_is_fitted
except ImportError as e:  # optional dependency
    raise ImportError('dino_rs.sklearn needs scikit-learn: pip install "dino-rs[notebook]"') from e

from ._dino_rs import DINO, ArrayDataset, MultiCropAugmenter, MultiCropLoader
from .config import DEFAULTS, FIELDS
from .trainer import Trainer

__all__ = ["DINOEmbedder"]


def _default_local_size(img_size: int, patch_size: int) -> int:
    """96/224 of the image size (the official ratio), rounded to a multiple of the patch size."""
    return max(patch_size, int(round(img_size * 96 / 224 / patch_size)) * patch_size)


def _pair(name: str, value: Any) -> Tuple[float, float]:
    try:
        lo, hi = value
        return float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (min, max), got {value!r}") from None


def _check_images(X: Any, what: str, allow_lists: bool) -> Any:
    if allow_lists and isinstance(X, (list, tuple)):
        if len(X) == 0:
            raise ValueError(f"{what}: X is empty")
        return list(X)
    if not isinstance(X, np.ndarray) and hasattr(X, "__array__"):
        X = np.asarray(X)
    if not isinstance(X, np.ndarray):
        kinds = "a uint8 array or a list of images/paths" if allow_lists else "a uint8 array"
        raise ValueError(f"{what}: X must be {kinds}, got {type(X).__name__}")
    shape_ok = X.ndim == 3 or (X.ndim == 4 and X.shape[3] == 3)
    if X.dtype != np.uint8 or not shape_ok:
        hint = ""
        if X.ndim == 2:
            hint = " (flattened images: reshape them to (N, H, W))"
        elif X.dtype != np.uint8:
            hint = " (scale to 0..255 and convert with .astype(np.uint8))"
        raise ValueError(f"{what}: X must be uint8 images (N, H, W) or (N, H, W, 3), got {X.dtype} {X.shape}{hint}")
    if len(X) == 0:
        raise ValueError(f"{what}: X holds no images")
    return X


class DINOEmbedder(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Self-supervised image features as a scikit-learn transformer.

    ``fit(X)`` trains a :class:`dino_rs.DINO` model with DINO's recipe on the images ``X``
    (labels are ignored); ``transform(X)`` returns the teacher's CLS features,
    float32 (n_samples, embed_dim), with DINO's eval transform (:meth:`DINO.embed`).
    Usable in pipelines, ``clone`` and grid searches; every argument is stored unchanged and
    only read by ``fit``.

    Parameters
    ----------
    arch, patch_size, img_size, embed_dim, depth, num_heads, out_dim, hidden_dim, bottleneck_dim, \
norm_last_layer, drop_path_rate, device, seed
        The model, as in :class:`dino_rs.DINO` (``embed_dim``/``depth``/``num_heads`` override the
        ``arch`` preset for a custom ViT). ``seed`` also seeds the loader's shuffling and augmentation.
    epochs, lr, min_lr, warmup_epochs, weight_decay, weight_decay_end, momentum_teacher, teacher_temp, \
warmup_teacher_temp, warmup_teacher_temp_epochs, student_temp, center_momentum, sinkhorn_iterations, \
koleo_weight, clip_grad, freeze_last_layer
        The training recipe: :class:`dino_rs.TrainConfig`'s options and defaults (official
        ``main_dino.py``'s; an unset ``warmup_epochs`` is 10, or ``epochs`` when there are fewer).
    dtype : {"float32", "bfloat16"}, optional
        The compute dtype of training and of ``transform``, as in :class:`dino_rs.DINO`
        (default float32).
    progress : bool, default False
        Show the Trainer's progress bar (off by default, as scikit-learn estimators are quiet).
    global_size : int, optional
        Size of the two global crops. Default: ``img_size``.
    local_size : int, optional
        Size of the local crops. Default: 96/224 of ``img_size`` rounded to a multiple of
        ``patch_size`` (96 for the official 224/16).
    n_local, global_scale, local_scale
        Number of local crops and the crops' area ranges, as in :class:`dino_rs.MultiCropAugmenter`.
    augment_params : dict, optional
        Further :class:`dino_rs.MultiCropAugmenter` arguments (``flip_p``, ``blur_p``,
        ``solarize_p``, ``mean``, ``std``, ...).
    batch_size : int, default 64
        Training batch size (``lr`` is scaled by ``batch_size / 256``). With fewer images than
        ``batch_size``, one batch of all the images per epoch is used.
    embed_batch_size : int, default 128
        Images per forward pass in ``transform``.

    Attributes
    ----------
    model_ : dino_rs.DINO
        The trained model.
    history_ : list of dict
        The per-epoch dicts of :meth:`dino_rs.Trainer.fit`.
    embed_dim_ : int
        Number of output features.
    image_shape_ : tuple of int
        Shape of one training image, (H, W) or (H, W, 3).
    n_samples_fit_ : int
        Number of training images.
    batch_size_ : int
        The batch size used: ``min(batch_size, n_samples_fit_)``.
    global_size_, local_size_ : int
        The crop sizes used.

    Examples
    --------
    >>> emb = DINOEmbedder(embed_dim=192, depth=6, num_heads=3, patch_size=4, img_size=32, epochs=50,
    ...                    batch_size=64, global_size=32, local_size=16, n_local=6)
    >>> feats = emb.fit(x_train).transform(x_test)    # float32 (n_test, 192)
    """

    def __init__(
        self,
        *,
        arch: str = "vit_small",
        patch_size: int = 16,
        img_size: int = 224,
        embed_dim: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        drop_path_rate: float = 0.1,
        device: str = "auto",
        seed: int = 0,
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
        dtype: Optional[str] = None,
        progress: bool = False,
        global_size: Optional[int] = None,
        local_size: Optional[int] = None,
        n_local: int = 8,
        global_scale: Tuple[float, float] = (0.4, 1.0),
        local_scale: Tuple[float, float] = (0.05, 0.4),
        augment_params: Optional[Dict[str, Any]] = None,
        batch_size: int = 64,
        embed_batch_size: int = 128,
    ) -> None:
        self.arch = arch
        self.patch_size = patch_size
        self.img_size = img_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.out_dim = out_dim
        self.hidden_dim = hidden_dim
        self.bottleneck_dim = bottleneck_dim
        self.norm_last_layer = norm_last_layer
        self.drop_path_rate = drop_path_rate
        self.device = device
        self.seed = seed
        self.epochs = epochs
        self.lr = lr
        self.min_lr = min_lr
        self.warmup_epochs = warmup_epochs
        self.weight_decay = weight_decay
        self.weight_decay_end = weight_decay_end
        self.momentum_teacher = momentum_teacher
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        self.koleo_weight = koleo_weight
        self.clip_grad = clip_grad
        self.freeze_last_layer = freeze_last_layer
        self.dtype = dtype
        self.progress = progress
        self.global_size = global_size
        self.local_size = local_size
        self.n_local = n_local
        self.global_scale = global_scale
        self.local_scale = local_scale
        self.augment_params = augment_params
        self.batch_size = batch_size
        self.embed_batch_size = embed_batch_size

    # ----------------------------------------------------------------------------------------------
    def fit(self, X: np.ndarray, y: Any = None) -> "DINOEmbedder":
        """Trains DINO on the images ``X`` (uint8 (N, H, W) or (N, H, W, 3)); ``y`` is ignored.

        Returns ``self``. Raises ValueError for bad images or hyper-parameters (those of
        :class:`dino_rs.DINO`, :class:`dino_rs.MultiCropAugmenter` and :class:`dino_rs.Trainer`).
        """
        X = _check_images(X, "DINOEmbedder.fit", allow_lists=False)
        if self.batch_size < 1 or self.embed_batch_size < 1:
            raise ValueError(f"batch_size and embed_batch_size must be at least 1, got {self.batch_size}, {self.embed_batch_size}")
        global_size = self.img_size if self.global_size is None else self.global_size
        local_size = _default_local_size(self.img_size, self.patch_size) if self.local_size is None else self.local_size
        batch_size = min(self.batch_size, len(X))
        augmenter = MultiCropAugmenter(
            global_size=global_size,
            local_size=local_size,
            n_local=self.n_local,
            global_scale=_pair("global_scale", self.global_scale),
            local_scale=_pair("local_scale", self.local_scale),
            **dict(self.augment_params or {}),
        )
        loader = MultiCropLoader(ArrayDataset(X), augmenter, batch_size=batch_size, seed=self.seed)
        model = DINO(
            arch=self.arch,
            patch_size=self.patch_size,
            img_size=self.img_size,
            out_dim=self.out_dim,
            hidden_dim=self.hidden_dim,
            bottleneck_dim=self.bottleneck_dim,
            norm_last_layer=self.norm_last_layer,
            drop_path_rate=self.drop_path_rate,
            device=self.device,
            seed=self.seed,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            dtype=self.dtype or "float32",
        )
        trainer = Trainer(
            model,
            loader,
            **{name: getattr(self, name) for name in FIELDS},
            progress=self.progress,
            dtype=self.dtype,
        )
        self.history_: List[Dict[str, Any]] = trainer.fit()
        self.model_ = model
        self.embed_dim_ = int(model.embed_dim)
        self.image_shape_ = tuple(int(d) for d in X.shape[1:])
        self.n_samples_fit_ = int(len(X))
        self.batch_size_ = int(batch_size)
        self.global_size_ = int(global_size)
        self.local_size_ = int(local_size)
        return self

    def transform(self, X: Union[np.ndarray, Sequence[Any]]) -> np.ndarray:
        """Teacher CLS features of ``X``: float32 (n_samples, embed_dim).

        ``X``: uint8 images (N, H, W) or (N, H, W, 3) (any size: they are resized by DINO's eval
        transform), or a list of images / image paths. Raises
        :class:`sklearn.exceptions.NotFittedError` before :meth:`fit`.
        """
        check_is_fitted(self, "model_")
        X = _check_images(X, "DINOEmbedder.transform", allow_lists=True)
        return np.asarray(self.model_.embed(X, batch_size=self.embed_batch_size, progress=bool(self.progress)), dtype=np.float32)

    @property
    def _n_features_out(self) -> int:
        """Number of output features (for ``get_feature_names_out``)."""
        check_is_fitted(self, "model_")
        return self.embed_dim_

    # ----------------------------------------------------------------------------------------------
    # pickling: the Rust model travels as the bytes of its safetensors file
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(super().__getstate__())
        model = state.pop("model_", None)
        if model is not None:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "model.safetensors")
                model.save(path)
                with open(path, "rb") as f:
                    state["_model_safetensors"] = f.read()
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        blob = state.pop("_model_safetensors", None)
        super().__setstate__(state)
        if blob is not None:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "model.safetensors")
                with open(path, "wb") as f:
                    f.write(blob)
                self.model_ = DINO.load(path, device=self.device)
