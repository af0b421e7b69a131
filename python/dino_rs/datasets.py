"""Small real datasets available offline, for demos and tests."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Tuple, Union

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated idx file ({len(data) - offset} bytes for shape {dims})")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def fashion_mnist(split: str = "train", root: Union[str, "os.PathLike[str]"] = FASHION_MNIST_DIR) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (Zalando, MIT licence): uint8 images (N, 28, 28) and int64 labels (N,).

    Reads the idx files of Debian's ``dataset-fashion-mnist`` package (``apt-get install
    dataset-fashion-mnist``) or any folder holding the four ``*-idx?-ubyte.gz`` files.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    root = Path(root)
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (images, labels):
        if not p.exists():
            raise FileNotFoundError(2, "Fashion-MNIST file not found (install Debian's dataset-fashion-mnist)", str(p))
    x, y = _read_idx(images), _read_idx(labels).astype(np.int64)
    if len(x) != len(y):
        raise ValueError(f"{root}: {len(x)} images but {len(y)} labels")
    return x, y
