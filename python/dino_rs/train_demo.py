"""The main job on an embedded default: DINO on a Fashion-MNIST subset shipped with the package.

``python -m dino_rs demo`` trains a small ViT on 5,000 Fashion-MNIST images (28x28, in
``dino_rs/data/fashion_mnist_demo.npz``) on the CPU, then prints the teacher's k-NN accuracy
(DINO's protocol: k=20, T=0.07) on 1,000 test images against the same network at initialisation
and against raw pixels, and writes a PNG of the last block's CLS attention per head. With
``--data DIR`` the same run uses an image folder instead (k-NN when it has class subfolders).

The recipe is :func:`dino_rs.recipes.small_data` (its docstring says what it changes from the
official one and why). Features are evaluated as DINO does (:meth:`DINO.embed`: resize to 32,
centre-crop 28; teacher CLS token), beside a linear probe.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ._dino_rs import DINO, ArrayDataset, ImageFolder, MultiCropAugmenter, MultiCropLoader, _write_png
from .datasets import fashion_mnist_demo
from .evaluation import knn_accuracy
from .trainer import Trainer

PathLike = Union[str, "os.PathLike[str]"]

#: The demo's recipe before :func:`dino_rs.recipes.small_data` (DINO's initialisation, stochastic
#: depth 0.1): the starting point benches/recipe_search.py changes, kept so its records stay comparable.
RECIPE: Dict[str, Any] = dict(
    img_size=28,
    patch_size=7,
    embed_dim=64,
    depth=4,
    num_heads=4,
    out_dim=256,
    hidden_dim=256,
    bottleneck_dim=64,
    drop_path_rate=0.1,
    global_size=28,
    local_size=14,
    n_local=4,
    batch_size=64,
    lr=4e-3,
    warmup_epochs=2,
    teacher_temp=0.01,
    warmup_teacher_temp=0.01,
    momentum_teacher=0.99,
)


def demo_data() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The embedded Fashion-MNIST subset: uint8 (5000, 28, 28) train and (1000, 28, 28) test images
    with int64 labels (Zalando Research, MIT licence; see ``dino_rs/data/LICENSE.txt``)."""
    x, y = fashion_mnist_demo("train")
    xt, yt = fashion_mnist_demo("test")
    return x, y, xt, yt


def _split_folder(ds: ImageFolder, test_fraction: float, seed: int) -> Tuple[list, np.ndarray, list, np.ndarray]:
    """A stratified train/test split of a labelled folder (per class, a seeded shuffle)."""
    paths, labels = np.asarray(ds.paths), np.asarray(ds.labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels[labels >= 0]):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    train, test = np.sort(train).astype(int), np.sort(test).astype(int)
    return list(paths[train]), labels[train], list(paths[test]), labels[test]


_COLORS = np.array(  # a perceptually ordered dark-blue -> yellow ramp (viridis-like) for heat maps
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32
)


def _heat(a: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 through the colour ramp."""
    x = np.clip(a, 0.0, 1.0) * (len(_COLORS) - 1)
    i = np.minimum(x.astype(int), len(_COLORS) - 2)
    t = (x - i)[..., None]
    return (_COLORS[i] * (1 - t) + _COLORS[i + 1] * t + 0.5).astype(np.uint8)


def attention_grid(model: DINO, crops: np.ndarray, pictures: np.ndarray, scale: int = 4, pad: int = 4) -> np.ndarray:
    """One row per image: the picture, then each head's last-block CLS attention as a heat map
    (normalised per head, nearest-upsampled to the picture's size). ``crops`` are the normalised
    (N, 3, S, S) model inputs, ``pictures`` the matching uint8 (N, S, S, 3) images."""
    attn = model.attention(crops)  # (N, heads, h, w)
    n, heads, h, w = attn.shape
    size = pictures.shape[1] * scale
    cell = size + pad
    grid = np.full((pad + n * cell, pad + (heads + 1) * cell, 3), 255, np.uint8)
    for i in range(n):
        top = pad + i * cell
        big = np.kron(pictures[i], np.ones((scale, scale, 1), np.uint8))
        grid[top : top + size, pad : pad + size] = big
        for k in range(heads):
            a = attn[i, k]
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
            up = np.kron(a, np.ones((size // h, size // w), np.float32))
            left = pad + (k + 1) * cell
            grid[top : top + up.shape[0], left : left + up.shape[1]] = _heat(up)
    return grid


def _normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S[, 3]) -> float32 (N, 3, S, S) with the ImageNet mean/std (as the augmenter)."""
    x = images.astype(np.float32) / 255.0
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2))


def run_training(
    output: PathLike = "dino_rs_attention.png",
    data: Optional[PathLike] = None,
    epochs: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
    eval_every: int = 4,
    img_size: Optional[int] = None,
    recipe: Optional[Dict[str, Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    """Trains DINO with :func:`dino_rs.recipes.small_data` on the embedded Fashion-MNIST subset
    (or the image folder ``data``) and reports.

    ``recipe`` overrides entries of the recipe's sections (``{"model": {...}, "trainer": {...}}``).
    The run trains the recipe's short run (``recipe["fit"]["epochs"]`` of the schedule's
    ``recipe["trainer"]["epochs"]``); ``epochs``, if given, is a complete schedule of that many
    epochs instead. Returns a dict with ``raw``, ``init`` and
    ``trained`` k-NN top-1 accuracies and ``probe_raw``, ``probe_init``, ``probe_trained`` linear
    probe accuracies (percent; ``raw`` ones only for the embedded data), ``history`` (per-epoch
    dicts, with k-NN every ``eval_every`` epochs) and ``seconds`` of training; writes the attention
    PNG to ``output``.
    """
    from .evaluation import linear_probe
    from .recipes import small_data

    if data is None:
        x, y, xt, yt = demo_data()
        dataset: Union[ArrayDataset, ImageFolder] = ArrayDataset(x, y)
        train_images: Any = x
        test_images: Any = xt
        source = f"Fashion-MNIST subset bundled with dino_rs ({len(x)} train / {len(xt)} test images, 28x28)"
        r = small_data(len(x), 28)
    else:
        folder = ImageFolder(data)
        size = img_size or 64
        r = small_data(len(folder), size)
        if len(folder.classes) >= 2:
            # Self-supervised training sees every image (never a label); k-NN holds out 20% per class.
            train_images, y, test_images, yt = _split_folder(folder, 0.2, seed)
            dataset = folder
        else:
            train_images, y, test_images, yt = list(folder.paths), None, None, None
            dataset = folder
        source = f"{data} ({len(folder)} images, {len(folder.classes)} classes, at {size}x{size})"
    if img_size is not None and data is None:
        raise ValueError("img_size applies to --data folders; the embedded images are 28x28")
    for section, values in (recipe or {}).items():
        if section not in r:
            raise ValueError(f"recipe sections are {sorted(r)}, got {section!r}")
        r[section].update(values)
    if epochs is not None:
        r["trainer"]["epochs"] = r["fit"]["epochs"] = epochs
    schedule = int(r["trainer"]["epochs"])
    epochs = min(int(r["fit"]["epochs"]), schedule)
    m, a = r["model"], r["augmenter"]
    loader = MultiCropLoader(dataset, MultiCropAugmenter(**a), seed=seed, **r["loader"])
    model = DINO(**m, seed=seed, device="cpu")
    labelled = test_images is not None and yt is not None
    print(f"data: {source}")
    print(
        f"model: ViT patch {m['patch_size']}, dim {m['embed_dim']}, depth {m['depth']}, {m['num_heads']} heads; "
        f"DINO head {m['hidden_dim']}/{m['bottleneck_dim']} -> {m['out_dim']}; {m.get('init', 'dino')} init; "
        f"2 x {a['global_size']} px + {a['n_local']} x {a['local_size']} px crops, batch {r['loader']['batch_size']}, "
        + (f"{epochs} epochs" if epochs == schedule else f"{epochs} of a {schedule}-epoch schedule")
        + " (recipe: dino_rs.recipes.small_data)"
    )

    def knn() -> float:
        train_f = model.embed(train_images, progress=False)
        return knn_accuracy(train_f, y, model.embed(test_images, progress=False), yt)[0]

    try:
        import sklearn  # noqa: F401  (the probe's logistic regression; not a dependency of the package)

        probing = True
    except ImportError:
        probing = False
        print("no linear probe: it needs scikit-learn (pip install scikit-learn)")

    def probe_of(train_f: np.ndarray, test_f: np.ndarray) -> float:
        # 300 lbfgs iterations: the raw pixels' probe does not converge sooner and took ~50 s at 1,000.
        return linear_probe(train_f, y, test_f, yt, max_iter=300)

    def probe() -> float:
        return probe_of(model.embed(train_images, progress=False), model.embed(test_images, progress=False))

    result: Dict[str, Any] = {}
    if labelled:
        if data is None:
            flat = lambda a: a.reshape(len(a), -1).astype(np.float32) / 255.0  # noqa: E731
            result["raw"] = knn_accuracy(flat(train_images), y, flat(test_images), yt)[0]
            if probing:
                result["probe_raw"] = probe_of(flat(train_images), flat(test_images))
        result["init"] = knn()
        if probing:
            result["probe_init"] = probe()
    trainer_kwargs = dict(r["trainer"])
    trainer_kwargs["warmup_epochs"] = min(trainer_kwargs.get("warmup_epochs", 0), schedule)
    trainer = Trainer(
        model, loader, **trainer_kwargs, progress=progress,
        eval_every=eval_every if labelled else 0,
        eval_data=(train_images, y, test_images, yt) if labelled else None,
    )
    start = time.perf_counter()
    history = trainer.fit(epochs)
    result["seconds"] = time.perf_counter() - start
    result["history"] = history
    if labelled:
        last = history[-1]
        result["trained"] = last["knn_top1"] if "knn_top1" in last else knn()
        if probing:
            result["probe_trained"] = probe()

    losses = ", ".join(f"{h['loss']:.3f}" for h in history)
    print(f"loss per epoch: {losses} (uniform output would be ln({m['out_dim']}) = {np.log(m['out_dim']):.2f})")
    curve = [(h["epoch"], h["knn_top1"]) for h in history if "knn_top1" in h]
    if curve:
        print("k-NN top-1 during training: " + ", ".join(f"epoch {e}: {a:.1f}%" for e, a in curve))
    if labelled:
        parts = [f"raw pixels {result['raw']:.1f}%"] if "raw" in result else []
        parts += [f"DINO teacher at init {result['init']:.1f}%", f"after {epochs} epoch{'s' * (epochs != 1)} {result['trained']:.1f}%"]
        print(f"k-NN top-1 (k=20, T=0.07, {len(yt)} test images): " + ", ".join(parts))
    print(f"training took {result['seconds']:.0f} s")
    if "probe_trained" in result:
        parts = [f"raw pixels {result['probe_raw']:.1f}%"] if "probe_raw" in result else []
        parts += [f"DINO teacher at init {result['probe_init']:.1f}%", f"after {epochs} epoch{'s' * (epochs != 1)} {result['probe_trained']:.1f}%"]
        print(f"linear probe top-1 ({len(yt)} test images): " + ", ".join(parts))

    # Attention maps of a few test images (or training images for an unlabelled folder).
    shown = test_images if test_images is not None else train_images
    if data is None:
        pictures = np.repeat(np.asarray(shown[:6])[..., None], 3, axis=-1)
    else:
        try:
            from .plot import eval_crop

            pictures = np.stack([eval_crop(p, m["img_size"]) for p in list(shown)[:6]])
        except ImportError:
            print("attention maps of folder images need Pillow (pip install pillow): no PNG written")
            return result
    grid = attention_grid(model, _normalise(pictures), pictures, scale=max(1, 112 // m["img_size"]))
    _write_png(os.fspath(output), grid)
    print(f"wrote {output} (last-block CLS attention per head)")
    return result


__all__: Sequence[str] = ["RECIPE", "attention_grid", "demo_data", "run_training"]
