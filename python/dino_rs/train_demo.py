"""The main job on an embedded default: DINO on a Fashion-MNIST subset shipped with the package.

``python -m dino_rs demo`` trains a small ViT on 5,000 Fashion-MNIST images (28x28, in
``dino_rs/data/fashion_mnist_demo.npz``) on the CPU, then prints the teacher's k-NN accuracy
(DINO's protocol: k=20, T=0.07) on 1,000 test images against the same network at initialisation
and against raw pixels, and writes a PNG of the last block's CLS attention per head. With
``--data DIR`` the same run uses an image folder instead (k-NN when it has class subfolders).

The recipe for 28-pixel images is that of docs/recipe.md, Small data on a CPU: ViT patch 7, dim
64, depth 4, 4 heads; head 256 -> 64 -> 256; 2 global crops of 28 px and 4 local crops of 14 px;
batch 64; lr 4e-3 (x 64/256) with 2 warm-up epochs; teacher momentum 0.99; teacher temperature
0.01 (with 0.02 the loss drifted toward ln(256) and the k-NN accuracy stayed at its initial
value, in dino_rs and in a PyTorch port of the recipe alike), 24 epochs. Features are evaluated as
DINO does (:meth:`DINO.embed`: resize to 32, centre-crop 28; teacher CLS token).
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

#: The demo's model and recipe (docs/recipe.md, Small data on a CPU), for 28-pixel images.
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
    epochs: int = 24,
    seed: int = 0,
    progress: bool = True,
    eval_every: int = 4,
    img_size: Optional[int] = None,
    recipe: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Trains DINO on the embedded Fashion-MNIST subset (or the image folder ``data``) and reports.

    Returns a dict with ``raw``, ``init`` and ``trained`` k-NN top-1 accuracies (percent; ``raw``
    only for the embedded data), ``history`` (per-epoch dicts, with k-NN every ``eval_every``
    epochs) and ``seconds`` of training; writes the attention PNG to ``output``.
    """
    r = dict(RECIPE, **(recipe or {}))
    if data is None:
        x, y, xt, yt = demo_data()
        dataset: Union[ArrayDataset, ImageFolder] = ArrayDataset(x, y)
        train_images: Any = x
        test_images: Any = xt
        source = f"Fashion-MNIST subset bundled with dino_rs ({len(x)} train / {len(xt)} test images, 28x28)"
    else:
        folder = ImageFolder(data)
        size = img_size or 64
        r.update(img_size=size, patch_size=max(size // 8, 1), global_size=size, local_size=size // 2)
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
    aug = MultiCropAugmenter(global_size=r["global_size"], local_size=r["local_size"], n_local=r["n_local"])
    loader = MultiCropLoader(dataset, aug, batch_size=r["batch_size"], seed=seed)
    model = DINO(
        patch_size=r["patch_size"], img_size=r["img_size"], embed_dim=r["embed_dim"], depth=r["depth"],
        num_heads=r["num_heads"], out_dim=r["out_dim"], hidden_dim=r["hidden_dim"],
        bottleneck_dim=r["bottleneck_dim"], drop_path_rate=r["drop_path_rate"], seed=seed, device="cpu",
    )
    labelled = test_images is not None and yt is not None
    print(f"data: {source}")
    print(
        f"model: ViT patch {r['patch_size']}, dim {r['embed_dim']}, depth {r['depth']}, {r['num_heads']} heads; "
        f"DINO head {r['hidden_dim']}/{r['bottleneck_dim']} -> {r['out_dim']}; "
        f"2 x {r['global_size']} px + {r['n_local']} x {r['local_size']} px crops, batch {r['batch_size']}, {epochs} epochs"
    )

    def knn() -> float:
        train_f = model.embed(train_images, progress=False)
        return knn_accuracy(train_f, y, model.embed(test_images, progress=False), yt)[0]

    result: Dict[str, Any] = {}
    if labelled:
        if data is None:
            flat = lambda a: a.reshape(len(a), -1).astype(np.float32)  # noqa: E731
            result["raw"] = knn_accuracy(flat(train_images), y, flat(test_images), yt)[0]
        result["init"] = knn()
    trainer = Trainer(
        model, loader, epochs=epochs, lr=r["lr"], warmup_epochs=min(r["warmup_epochs"], epochs),
        teacher_temp=r["teacher_temp"], warmup_teacher_temp=r["warmup_teacher_temp"],
        momentum_teacher=r["momentum_teacher"], progress=progress,
        eval_every=eval_every if labelled else 0,
        eval_data=(train_images, y, test_images, yt) if labelled else None,
    )
    start = time.perf_counter()
    history = trainer.fit()
    result["seconds"] = time.perf_counter() - start
    result["history"] = history
    if labelled:
        last = history[-1]
        result["trained"] = last["knn_top1"] if "knn_top1" in last else knn()

    losses = ", ".join(f"{h['loss']:.3f}" for h in history)
    print(f"loss per epoch: {losses} (uniform output would be ln({r['out_dim']}) = {np.log(r['out_dim']):.2f})")
    curve = [(h["epoch"], h["knn_top1"]) for h in history if "knn_top1" in h]
    if curve:
        print("k-NN top-1 during training: " + ", ".join(f"epoch {e}: {a:.1f}%" for e, a in curve))
    if labelled:
        parts = [f"raw pixels {result['raw']:.1f}%"] if "raw" in result else []
        parts += [f"DINO teacher at init {result['init']:.1f}%", f"after {epochs} epoch{'s' * (epochs != 1)} {result['trained']:.1f}%"]
        print(f"k-NN top-1 (k=20, T=0.07, {len(yt)} test images): " + ", ".join(parts))
    print(f"training took {result['seconds']:.0f} s")

    # Attention maps of a few test images (or training images for an unlabelled folder).
    shown = test_images if test_images is not None else train_images
    if data is None:
        pictures = np.repeat(np.asarray(shown[:6])[..., None], 3, axis=-1)
    else:
        try:
            from .plot import eval_crop

            pictures = np.stack([eval_crop(p, r["img_size"]) for p in list(shown)[:6]])
        except ImportError:
            print("attention maps of folder images need Pillow (pip install pillow): no PNG written")
            return result
    grid = attention_grid(model, _normalise(pictures), pictures, scale=max(1, 112 // r["img_size"]))
    _write_png(os.fspath(output), grid)
    print(f"wrote {output} (last-block CLS attention per head)")
    return result


__all__: Sequence[str] = ["RECIPE", "attention_grid", "demo_data", "run_training"]
