"""The multi-crop demo: DINO's views of real photos, laid out as one PNG grid."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ._dino_rs import MultiCropAugmenter, _write_png

_DATA = Path(__file__).with_name("data")

PathLike = Union[str, "os.PathLike[str]"]


def bundled_photos() -> list[str]:
    """Paths of the ~500x375 JPEG photos shipped with dino_rs (public domain / CC0, see data/LICENSE.txt)."""
    return sorted(str(p) for p in _DATA.glob("*.jpg"))


def _to_uint8(view: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undoes the normalisation of a (3, S, S) float32 view into an (S, S, 3) uint8 picture."""
    rgb = view * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def multicrop_grid(
    images: Sequence[Union[PathLike, np.ndarray]],
    augmenter: Optional[MultiCropAugmenter] = None,
    seed: int = 0,
    pad: int = 4,
) -> np.ndarray:
    """One row per image: its two global views, then its local views in two rows beside them.

    Returns an (H, W, 3) uint8 array; write it with any image library or ``dino_rs.demo.save_png``.
    """
    aug = augmenter if augmenter is not None else MultiCropAugmenter()
    params = aug.get_params()
    g, l, n_local = aug.global_size, aug.local_size, aug.n_local
    globals_, locals_ = aug.batch(list(images), seed=seed)
    cols = (n_local + 1) // 2
    row_h = max(g, 2 * l + pad)
    width = pad + 2 * (g + pad) + cols * (l + pad)
    grid = np.full((pad + len(images) * (row_h + pad), width, 3), 255, np.uint8)
    for b in range(len(images)):
        top = pad + b * (row_h + pad)
        for v in range(2):
            left = pad + v * (g + pad)
            grid[top : top + g, left : left + g] = _to_uint8(globals_[v, b], params["mean"], params["std"])
        for v in range(n_local):
            left = pad + 2 * (g + pad) + (v // 2) * (l + pad)
            t = top + (v % 2) * (l + pad)
            grid[t : t + l, left : left + l] = _to_uint8(locals_[v, b], params["mean"], params["std"])
    return grid


def save_png(image: np.ndarray, path: PathLike) -> None:
    """Writes a uint8 (H, W, 3) or (H, W) array as PNG."""
    _write_png(os.fspath(path), np.ascontiguousarray(image))


def run(output: PathLike = "dino_rs_views.png", images: Optional[Sequence[PathLike]] = None, seed: int = 0) -> str:
    """Augments the bundled photos (or ``images``) with the official DINO recipe and saves the grid."""
    import time

    paths = list(images) if images else bundled_photos()
    aug = MultiCropAugmenter()
    start = time.perf_counter()
    grid = multicrop_grid(paths, aug, seed=seed)
    elapsed = time.perf_counter() - start
    save_png(grid, output)
    n_views = aug.n_views
    print(
        f"{len(paths)} photos -> {len(paths) * n_views} views "
        f"(2 x {aug.global_size}px global + {aug.n_local} x {aug.local_size}px local each) in {elapsed * 1000:.0f} ms"
    )
    print(f"wrote {output}")
    return str(output)
