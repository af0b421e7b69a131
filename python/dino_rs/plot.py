"""Notebook plots: training curves (:func:`plot_history`) and self-attention maps
(:func:`plot_attention`, after the official DINO ``visualize_attention.py``).

matplotlib is an optional dependency (``pip install "dino-rs[notebook]"``): it is imported when a
plot is made, never at ``import dino_rs``. :func:`attention_maps` and :func:`attention_mask` give
the numbers behind :func:`plot_attention` without matplotlib.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ._dino_rs import DINO

PathLike = Union[str, "os.PathLike[str]"]

# ImageNet statistics: the normalisation of DINO's eval transform (and of MultiCropAugmenter's defaults).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["attention_maps", "attention_mask", "eval_crop", "plot_attention", "plot_history"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # optional dependency
        raise ImportError('dino_rs plots need matplotlib: pip install "dino-rs[notebook]"') from e
    return plt


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # Pillow comes with matplotlib
        raise ImportError('dino_rs.plot needs Pillow (it comes with matplotlib): pip install "dino-rs[notebook]"') from e
    return Image


# --------------------------------------------------------------------------------------------------
# history
# --------------------------------------------------------------------------------------------------
def _records(history: Any) -> List[Mapping[str, Any]]:
    if hasattr(history, "to_dict") and not isinstance(history, Mapping):  # a pandas DataFrame
        history = history.to_dict("records")
    if isinstance(history, Mapping):
        raise ValueError("history must be a list of per-epoch dicts (what Trainer.fit returns), got one dict")
    records = list(history)
    if not records:
        raise ValueError("history is empty: nothing to plot (train at least one epoch)")
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise ValueError(f"history[{i}] must be a dict, got {type(r).__name__}")
        if "loss" not in r:
            raise ValueError(f"history[{i}] has no 'loss' entry (keys: {sorted(r)})")
    return records


def _series(records: Sequence[Mapping[str, Any]], key: str) -> Tuple[List[float], List[float]]:
    xs, ys = [], []
    for i, r in enumerate(records):
        v = r.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        xs.append(float(r.get("epoch", i + 1)))
        ys.append(float(v))
    return xs, ys


def plot_history(
    history: Sequence[Mapping[str, Any]],
    ax: Optional[Union["Axes", Sequence["Axes"]]] = None,
) -> "Figure":
    """Training curves of a :class:`dino_rs.Trainer` run, one panel per quantity.

    Parameters
    ----------
    history : list of dict
        The per-epoch dicts returned by :meth:`Trainer.fit` (or ``trainer.history``, or a pandas
        DataFrame of them): ``epoch``, ``loss``, ``lr``, ``teacher_temp``, ... Epochs that carry
        ``knn_top1`` (from ``Trainer(eval_every=...)``) add a k-NN accuracy panel with top-1 (and
        top-5 when present) at the epochs that were evaluated.
    ax : matplotlib Axes or sequence of Axes, optional
        ``None`` (default): a new figure with the panels side by side: loss, learning rate,
        teacher temperature and, when present, k-NN accuracy, then the collapse measures
        (``teacher_entropy`` with ``teacher_student_kl``, and ``teacher_max_prob``). One Axes: the loss on it and, when
        present, the k-NN top-1 accuracy on a twin y-axis (a compact form for dashboards). A
        sequence of Axes: one per panel, in the order above.

    Returns
    -------
    matplotlib.figure.Figure
        The figure the panels are on.

    Raises
    ------
    ValueError
        An empty history, entries that are not dicts or have no ``loss``, or a sequence of
        Axes of the wrong length.
    ImportError
        matplotlib is not installed (``pip install "dino-rs[notebook]"``).

    Examples
    --------
    >>> history = trainer.fit()
    >>> fig = dr.plot_history(history)
    >>> fig.savefig("history.png")
    """
    records = _records(history)
    plt = _pyplot()
    loss = _series(records, "loss")
    knn1 = _series(records, "knn_top1")
    knn5 = _series(records, "knn_top5")
    panels: List[Tuple[str, Dict[str, Tuple[List[float], List[float]]]]] = [
        ("DINO loss", {"loss": loss}),
        ("learning rate", {"lr": _series(records, "lr")}),
        ("teacher temperature", {"teacher_temp": _series(records, "teacher_temp")}),
    ]
    if knn1[0]:
        curves = {"top-1": knn1}
        if knn5[0]:
            curves["top-5"] = knn5
        panels.append(("k-NN accuracy (%)", curves))
    entropy = _series(records, "teacher_entropy")
    if entropy[0]:
        # The DINO paper's collapse measures: both curves reach 0 KL in a collapse, the entropy at
        # ln K (uniform) or 0 (one dimension).
        panels.append(("teacher targets (nats)",
                       {"entropy": entropy, "KL(teacher || student)": _series(records, "teacher_student_kl")}))
        panels.append(("teacher's largest probability", {"max prob": _series(records, "teacher_max_prob")}))

    from matplotlib.ticker import MaxNLocator

    if ax is not None and not isinstance(ax, (list, tuple, np.ndarray)):
        # one Axes: loss, plus the k-NN top-1 on a twin axis
        one = cast("Axes", ax)
        one.plot(*loss, marker="o", ms=3, color="C0", label="loss")
        one.set_xlabel("epoch")
        one.set_ylabel("DINO loss", color="C0")
        one.xaxis.set_major_locator(MaxNLocator(integer=True))
        if knn1[0]:
            twin = one.twinx()
            twin.plot(*knn1, marker="s", ms=4, color="C1", label="k-NN top-1")
            twin.set_ylabel("k-NN top-1 (%)", color="C1")
        return cast("Figure", one.get_figure())

    if ax is None:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
        axes = list(axes[0])
    else:
        axes = list(np.ravel(np.asarray(ax, dtype=object)))
        if len(axes) != len(panels):
            names = [p[0] for p in panels]
            raise ValueError(f"ax must hold {len(panels)} Axes (one per panel: {names}), got {len(axes)}")
        fig = axes[0].figure
    for a, (title, curves) in zip(axes, panels):
        for label, (xs, ys) in curves.items():
            a.plot(xs, ys, marker="o", ms=3, label=label)
        a.set_title(title)
        a.set_xlabel("epoch")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title == "learning rate":
            a.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(curves) > 1:
            a.legend()
        a.grid(alpha=0.3)
    if ax is None:
        fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------
def _load_image(image: Union[PathLike, np.ndarray]) -> np.ndarray:
    """uint8 (H, W, 3) from a path (decoded with Pillow, EXIF orientation applied) or an array."""
    if isinstance(image, (str, os.PathLike)):
        Image = _pil()
        from PIL import ImageOps

        with Image.open(os.fspath(image)) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 array (H, W) or (H, W, 3), got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image must be a uint8 array (H, W) or (H, W, 3), got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def eval_crop(image: Union[PathLike, np.ndarray], size: int) -> np.ndarray:
    """DINO's evaluation transform without the normalisation: uint8 (size, size, 3).

    The shorter side is resized to ``int(size * 256 / 224)`` (torchvision ``Resize``; bicubic,
    antialiased) and the centre ``size`` x ``size`` square kept (``CenterCrop``), in one resampling
    pass from the source box, as :meth:`dino_rs.DINO.embed` does in Rust. ``image`` is a uint8
    (H, W) or (H, W, 3) array or a path (decoded with Pillow).
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    img = _load_image(image)
    Image = _pil()
    h, w = img.shape[:2]
    resize = max(int(size * 256.0 / 224.0), size)
    if w <= h:
        rw, rh = resize, max(resize * h // w, 1)
    else:
        rw, rh = max(resize * w // h, 1), resize
    sx, sy = w / rw, h / rh
    # halves round away from zero, as the Rust eval transform does (f64::round)
    left, top = math.floor((rw - size) / 2.0 + 0.5), math.floor((rh - size) / 2.0 + 0.5)
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    out = Image.fromarray(img).resize((size, size), Image.BICUBIC, box=box)
    return np.asarray(out)


def _normalize(crop: np.ndarray) -> np.ndarray:
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    x: np.ndarray = (crop.astype(np.float32) / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def attention_mask(attention: np.ndarray, threshold: float) -> np.ndarray:
    """The official thresholded attention: per head, the most-attended patches that together hold
    ``threshold`` of the head's attention mass.

    As in ``visualize_attention.py``: the patches are sorted by attention (ascending), the
    normalised cumulative sum is taken, and a patch is kept when it is ``> 1 - threshold``. The
    kept patches hold at least ``threshold`` of the mass, and dropping the least-attended of them
    leaves less than ``threshold``.

    Parameters
    ----------
    attention : array_like, shape (heads, h, w) or (heads, n)
        Non-negative attention weights per head, e.g. ``model.attention(crops)[0]``.
    threshold : float in (0, 1]
        Fraction of the attention mass to keep (the official default is 0.6).

    Returns
    -------
    numpy.ndarray of bool, same shape as ``attention``
    """
    a = np.asarray(attention, dtype=np.float64)
    if a.ndim < 2:
        raise ValueError(f"attention must be (heads, h, w) or (heads, n), got shape {a.shape}")
    if not (0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    flat = a.reshape(a.shape[0], -1)
    if flat.size and (not np.isfinite(flat).all() or (flat < 0).any()):
        raise ValueError("attention must hold finite non-negative weights")
    idx = np.argsort(flat, axis=1, kind="stable")
    val = np.take_along_axis(flat, idx, axis=1)
    val = val / np.maximum(val.sum(axis=1, keepdims=True), 1e-30)
    keep_sorted = np.cumsum(val, axis=1) > (1.0 - threshold)
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, idx, keep_sorted, axis=1)
    return keep.reshape(a.shape)


def attention_maps(
    model: "DINO",
    image: Union[PathLike, np.ndarray],
    threshold: Optional[float] = None,
    teacher: bool = True,
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The data behind :func:`plot_attention`.

    Returns
    -------
    crop : numpy.ndarray, uint8 (S, S, 3)
        The image after DINO's eval transform (:func:`eval_crop`) at ``S = model.img_size``.
    maps : numpy.ndarray, float32 (heads, S, S)
        Last-block CLS->patch attention of each head (:meth:`DINO.attention`), each patch's value
        repeated over its ``patch_size`` x ``patch_size`` pixels (nearest upsampling, as the
        official ``interpolate(scale_factor=patch_size, mode="nearest")``).
    masks : numpy.ndarray of bool (heads, S, S), or None
        With ``threshold``: :func:`attention_mask` of the patch-level attention, upsampled the same way.
    """
    size = int(model.img_size)
    p = int(model.patch_size)
    crop = eval_crop(image, size)
    attn = np.asarray(model.attention(_normalize(crop), teacher=teacher))[0]  # (heads, h, w)
    maps = attn.repeat(p, axis=1).repeat(p, axis=2).astype(np.float32, copy=False)
    masks = None
    if threshold is not None:
        masks = attention_mask(attn, threshold).repeat(p, axis=1).repeat(p, axis=2)
    return crop, maps, masks


def plot_attention(
    model: "DINO",
    image: Union[PathLike, np.ndarray],
    head: Optional[int] = None,
    threshold: Optional[float] = None,
) -> "Figure":
    """The image and the self-attention of the CLS token on it, one panel per head (after the
    official DINO ``visualize_attention.py``).

    The image goes through DINO's eval transform to ``model.img_size`` (:func:`eval_crop`:
    resize the shorter side to 256/224 of it, centre crop, ImageNet normalisation), then
    :meth:`DINO.attention` gives the teacher's last-block CLS->patch attention per head; each map
    is shown at the image's size (nearest upsampling by ``patch_size``).

    Parameters
    ----------
    model : dino_rs.DINO
        A trained model (or one from :func:`dino_rs.load_backbone`).
    image : uint8 array (H, W, 3) or (H, W), or a path
        The picture to look at (paths are decoded with Pillow).
    head : int, optional
        Only this head (0-based; negative counts from the end). Default: every head.
    threshold : float in (0, 1], optional
        Show the official thresholded masks instead of the raw maps: per head, the
        most-attended patches holding ``threshold`` of the attention mass (0.6 in the official
        script), drawn over the image (:func:`attention_mask`).

    Returns
    -------
    matplotlib.figure.Figure
        ``1 + heads`` panels (or 2 with ``head``): the transformed image, then each head.

    Raises
    ------
    ValueError
        A bad image, ``head`` out of range, or ``threshold`` outside (0, 1].
    ImportError
        matplotlib is not installed (``pip install "dino-rs[notebook]"``).

    Examples
    --------
    >>> fig = dr.plot_attention(model, x_test[0], threshold=0.6)
    """
    plt = _pyplot()
    n_heads = int(model.num_heads)
    if head is not None:
        if not -n_heads <= head < n_heads:
            raise ValueError(f"head must be in [{-n_heads}, {n_heads - 1}] (the model has {n_heads} heads), got {head}")
        heads = [head % n_heads]
    else:
        heads = list(range(n_heads))
    crop, maps, masks = attention_maps(model, image, threshold)
    n = 1 + len(heads)
    ncols = min(n, 5)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.5 * nrows), squeeze=False)
    flat = list(axes.ravel())
    for extra in flat[n:]:
        fig.delaxes(extra)
    flat[0].imshow(crop)
    flat[0].set_title(f"image ({crop.shape[0]} px)")
    for a, h in zip(flat[1:], heads):
        if masks is None:
            a.imshow(maps[h], cmap="inferno", interpolation="nearest")
            a.set_title(f"head {h}")
        else:
            a.imshow(crop)
            overlay = np.zeros(masks[h].shape + (4,), np.float32)
            overlay[masks[h]] = (1.0, 0.15, 0.1, 0.55)
            a.imshow(overlay, interpolation="nearest")
            a.set_title(f"head {h}: {threshold:.0%} mass")
    for a in flat[:n]:
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    return fig
