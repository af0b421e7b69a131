"""Real datasets on any machine: the Fashion-MNIST subset bundled with the package, and the full
Fashion-MNIST, read from a folder of the machine or downloaded once into :func:`dino_rs.hub.cache_dir`."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np

from . import hub

PathLike = Union[str, "os.PathLike[str]"]

#: Debian's ``dataset-fashion-mnist`` package installs the idx files here.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Where Zalando Research publishes the idx files (``DINO_RS_FASHION_MNIST_URL`` overrides it).
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: The Fashion-MNIST subset shipped in the package (see ``dino_rs/data/LICENSE.txt``).
DEMO_DATA = Path(__file__).with_name("data") / "fashion_mnist_demo.npz"

_TRUE = ("1", "true", "yes", "on")


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def fashion_mnist_demo(split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """The Fashion-MNIST subset bundled with dino_rs: uint8 images (N, 28, 28) and int64 labels (N,),
    the first 5,000 training images (``split="train"``) or the first 1,000 test images (``"test"``).

    Needs no download and no other package (Zalando Research, MIT licence; see
    ``dino_rs/data/LICENSE.txt``). :func:`fashion_mnist` gives all 70,000 images.
    """
    _check_split(split)
    with np.load(DEMO_DATA) as f:
        return f[f"x_{split}"], f[f"y_{split}"].astype(np.int64)


def _parse_idx(path: Path, ndim: Optional[int] = None) -> np.ndarray:
    """A gzipped idx file of unsigned bytes as an array; ValueError saying why it is not one (of
    ``ndim`` dimensions, when given), without the path, which callers name in their own terms."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"not a gzipped idx file ({e or type(e).__name__})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError("not an idx file of unsigned bytes")
    if ndim is not None and data[3] != ndim:
        raise ValueError(f"an idx file of {data[3]} dimensions, expected {ndim}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
    offset = 4 + 4 * data[3]
    if len(data) - offset != int(np.prod(dims)):
        raise ValueError(f"truncated idx file ({len(data) - offset} bytes for shape {dims})")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def _read_idx(path: Path, ndim: Optional[int] = None) -> np.ndarray:
    try:
        return _parse_idx(path, ndim)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _files(split: str) -> Tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


def _require(folder: Path, names: Sequence[str], why: str) -> Tuple[Path, ...]:
    paths = tuple(folder / n for n in names)
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(2, f"Fashion-MNIST file not found ({why})", str(p))
    return paths


def _has(folder: Path, names: Sequence[str]) -> bool:
    return all((folder / n).is_file() for n in names)


def _idx_check(ndim: int) -> Callable[[Path], None]:
    """A :func:`dino_rs.hub.download` check: the file must be a whole idx file of ``ndim`` dimensions."""

    def check(path: Path) -> None:
        # hub.download names the URL and the file; the path here is its temporary name.
        _parse_idx(path, ndim)

    return check


def _download(names: Sequence[str]) -> Tuple[Path, ...]:
    base = os.environ.get("DINO_RS_FASHION_MNIST_URL") or FASHION_MNIST_URL
    base = base if base.endswith("/") else base + "/"
    # idx3 files hold images (N, 28, 28), idx1 files labels (N,).
    return tuple(
        hub.download(base + n, f"fashion-mnist/{n}", check=_idx_check(3 if "idx3" in n else 1)) for n in names
    )


def fashion_mnist(split: str = "train", root: Optional[PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (Zalando Research, MIT licence): uint8 images (N, 28, 28) and int64 labels (N,),
    60,000 for ``split="train"``, 10,000 for ``"test"``.

    Reads the official gzipped idx files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
    ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``) from the first of:

    1. ``root``, when given (and only there);
    2. ``$FASHION_MNIST_ROOT``, when set (and only there);
    3. Debian's ``dataset-fashion-mnist`` package, in ``/usr/share/datasets/fashion-mnist``
       (skipped when ``DINO_RS_IGNORE_SYSTEM_DATA=1``);
    4. ``fashion-mnist/`` in :func:`dino_rs.hub.cache_dir`, where the split's two files are
       downloaded (about 30 MB for both splits) when they are not there yet, from
       ``$DINO_RS_FASHION_MNIST_URL`` or Zalando's own site.

    With ``DINO_RS_OFFLINE=1`` nothing is downloaded: a missing file raises FileNotFoundError naming
    where to place it. :func:`fashion_mnist_demo` is a 5,000/1,000 subset that ships with dino_rs.

    Raises
    ------
    FileNotFoundError
        ``root`` or ``$FASHION_MNIST_ROOT`` lacks a file, or a file is missing while offline.
    dino_rs.hub.DownloadError
        The download failed (an OSError naming the URL).
    ValueError
        A file is not a gzipped idx file of the expected shape, or images and labels differ in number.
    """
    _check_split(split)
    names = _files(split)
    env_root = os.environ.get("FASHION_MNIST_ROOT")
    system = Path(FASHION_MNIST_DIR)
    if root is not None:
        images, labels = _require(Path(root), names, "install Debian's dataset-fashion-mnist")
    elif env_root:
        images, labels = _require(Path(env_root), names, "in $FASHION_MNIST_ROOT")
    elif os.environ.get("DINO_RS_IGNORE_SYSTEM_DATA", "").strip().lower() not in _TRUE and _has(system, names):
        images, labels = system / names[0], system / names[1]
    else:  # the cache: hub.download makes no request for a file already there
        images, labels = _download(names)
    x, y = _read_idx(images, 3), _read_idx(labels, 1).astype(np.int64)
    if len(x) != len(y):
        raise ValueError(f"{images.parent}: {len(x)} images but {len(y)} labels")
    return x, y


__all__: Sequence[str] = [
    "DEMO_DATA",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_URL",
    "fashion_mnist",
    "fashion_mnist_demo",
]
