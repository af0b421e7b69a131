"""dino_rs.datasets: the bundled Fashion-MNIST subset, and where ``fashion_mnist`` finds the full
dataset: ``root``, then ``$FASHION_MNIST_ROOT``, then Debian's folder, then the cache, which a
download fills (from a loopback server with small synthetic idx files: no test touches the internet)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from loopback import Loopback

import dino_rs as dr
from dino_rs import datasets, train_demo
from dino_rs.hub import DownloadError

NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def idx_gz(array: np.ndarray) -> bytes:
    """An array of unsigned bytes in the idx format, gzipped, as Zalando publishes Fashion-MNIST."""
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.tobytes())


def synthetic(marker: int, n: int = 6):
    """Images filled with ``marker`` and labels 0..n-1, so that a test can tell sources apart."""
    return np.full((n, 28, 28), marker, np.uint8), np.arange(n) % 10


def write_folder(folder: Path, marker: int, splits=("train", "test")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        x, y = synthetic(marker, 6 if split == "train" else 4)
        (folder / NAMES[split][0]).write_bytes(idx_gz(x))
        (folder / NAMES[split][1]).write_bytes(idx_gz(y))
    return folder


def files_under(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


@pytest.fixture
def server():
    lb = Loopback()
    yield lb
    lb.close()


@pytest.fixture
def env(monkeypatch, tmp_path, server):
    """No Fashion-MNIST anywhere: an empty stand-in for Debian's folder, an empty cache, and the
    download URL pointing at the loopback server, which serves nothing until a test says so."""
    home = tmp_path / "home"
    monkeypatch.setenv("DINO_RS_HOME", str(home))
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path / "system"))
    monkeypatch.setenv("DINO_RS_FASHION_MNIST_URL", server.url("fm/"))
    for name in ("FASHION_MNIST_ROOT", "DINO_RS_OFFLINE", "DINO_RS_IGNORE_SYSTEM_DATA", "DINO_RS_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return home


def serve_split(server, split: str, marker: int) -> None:
    x, y = synthetic(marker, 6 if split == "train" else 4)
    server.serve(f"fm/{NAMES[split][0]}", idx_gz(x))
    server.serve(f"fm/{NAMES[split][1]}", idx_gz(y))


# -- the bundled subset ---------------------------------------------------------------------------


def test_fashion_mnist_demo():
    x, y = datasets.fashion_mnist_demo()
    xt, yt = datasets.fashion_mnist_demo("test")
    assert x.shape == (5000, 28, 28) and xt.shape == (1000, 28, 28)
    assert x.dtype == xt.dtype == np.uint8 and y.dtype == yt.dtype == np.int64
    assert y.shape == (5000,) and yt.shape == (1000,)
    assert sorted(np.unique(y)) == list(range(10)) and sorted(np.unique(yt)) == list(range(10))
    # The demo reads the same arrays through it (one reader of the bundled file).
    for a, b in zip(train_demo.demo_data(), (x, y, xt, yt)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        datasets.fashion_mnist_demo("val")


# -- download into the cache ----------------------------------------------------------------------


def test_download_into_the_cache_then_no_request(env, server):
    serve_split(server, "train", 7)
    x, y = dr.fashion_mnist("train")
    np.testing.assert_array_equal(x, synthetic(7)[0])
    np.testing.assert_array_equal(y, synthetic(7)[1])
    assert y.dtype == np.int64
    assert sorted(server.requests) == sorted(f"/fm/{n}" for n in NAMES["train"])
    assert files_under(env) == sorted(f"fashion-mnist{os.sep}{n}" for n in NAMES["train"])
    # The second call reads the cache: no request, even with the server answering 404 now.
    server.routes.clear()
    x2, _ = dr.fashion_mnist("train")
    np.testing.assert_array_equal(x2, x)
    assert len(server.requests) == 2
    # The other split is fetched when first asked for.
    serve_split(server, "test", 8)
    xt, _ = dr.fashion_mnist("test")
    assert xt.shape == (4, 28, 28) and xt[0, 0, 0] == 8 and len(server.requests) == 4


def test_the_official_address_is_the_default(env, server, monkeypatch):
    assert datasets.FASHION_MNIST_URL == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    monkeypatch.delenv("DINO_RS_FASHION_MNIST_URL")
    monkeypatch.setenv("DINO_RS_OFFLINE", "1")  # the address shows in the error; nothing is fetched
    with pytest.raises(FileNotFoundError) as info:
        dr.fashion_mnist("train")
    assert datasets.FASHION_MNIST_URL + NAMES["train"][0] in str(info.value)


def test_offline_names_the_file_and_where_to_place_it(env, server, monkeypatch):
    monkeypatch.setenv("DINO_RS_OFFLINE", "1")
    serve_split(server, "train", 7)
    with pytest.raises(FileNotFoundError) as info:
        dr.fashion_mnist("train")
    target = env / "fashion-mnist" / NAMES["train"][0]
    assert str(target) in str(info.value) and "DINO_RS_OFFLINE" in str(info.value)
    assert server.url(f"fm/{NAMES['train'][0]}") in str(info.value)
    assert server.requests == [] and files_under(env) == []
    # Placed by hand, as the error says: read offline.
    write_folder(env / "fashion-mnist", 3, splits=("train",))
    assert dr.fashion_mnist("train")[0][0, 0, 0] == 3 and server.requests == []


@pytest.mark.parametrize(
    "body, message",
    [
        (b"<html>Access denied</html>", "not a gzipped idx file"),
        (gzip.compress(b"\x00\x00\x0d\x03" + bytes(12)), "not an idx file of unsigned bytes"),
        (idx_gz(np.zeros(6, np.uint8)), "1 dimensions, expected 3"),
        (idx_gz(np.zeros((6, 28, 28), np.uint8))[:-10], "not a gzipped idx file"),  # cut short
        (gzip.compress(bytes([0, 0, 8, 3]) + (6).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(100)),
         "truncated idx file"),  # the header says 6 images of 28x28, the body holds 100 bytes
    ],
    ids=["html", "magic", "ndim", "cut-short", "short-body"],
)
def test_a_corrupt_download_is_rejected_and_not_cached(env, server, body, message):
    serve_split(server, "train", 7)
    server.serve(f"fm/{NAMES['train'][0]}", body)
    url = server.url(f"fm/{NAMES['train'][0]}")
    with pytest.raises(ValueError, match=message) as info:
        dr.fashion_mnist("train")
    assert url in str(info.value) and ".partial" not in str(info.value)
    assert NAMES["train"][0] not in "".join(files_under(env))  # neither the file nor a partial one


def test_a_failed_download_names_the_url(env, server):
    with pytest.raises(DownloadError, match="404") as info:
        dr.fashion_mnist("test")
    assert server.url(f"fm/{NAMES['test'][0]}") in str(info.value)
    assert files_under(env) == []


# -- where the files are found --------------------------------------------------------------------


def test_search_order(env, server, tmp_path, monkeypatch):
    # Every place holds its own version (marker); the first in the order must win, with no request.
    root = write_folder(tmp_path / "root", 1)
    env_root = write_folder(tmp_path / "env_root", 2)
    write_folder(Path(datasets.FASHION_MNIST_DIR), 3)
    write_folder(env / "fashion-mnist", 4)
    monkeypatch.setenv("FASHION_MNIST_ROOT", str(env_root))
    marker = lambda **kw: int(dr.fashion_mnist("train", **kw)[0][0, 0, 0])  # noqa: E731
    assert marker(root=root) == 1
    assert marker(root=str(root)) == 1
    assert marker() == 2
    monkeypatch.delenv("FASHION_MNIST_ROOT")
    assert marker() == 3
    monkeypatch.setenv("DINO_RS_IGNORE_SYSTEM_DATA", "1")
    assert marker() == 4
    monkeypatch.delenv("DINO_RS_IGNORE_SYSTEM_DATA")
    # A system folder with only the other split does not hide the cache's copy of this one.
    for n in NAMES["train"]:
        (Path(datasets.FASHION_MNIST_DIR) / n).unlink()
    assert marker() == 4
    assert int(dr.fashion_mnist("test")[0][0, 0, 0]) == 3
    assert server.requests == []


def test_a_given_root_is_the_only_place_looked_at(env, server, tmp_path):
    write_folder(Path(datasets.FASHION_MNIST_DIR), 3)
    serve_split(server, "train", 7)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="install Debian's dataset-fashion-mnist") as info:
        dr.fashion_mnist("train", root=empty)
    assert info.value.filename == str(empty / NAMES["train"][0])
    assert server.requests == []


def test_fashion_mnist_root_is_the_only_place_looked_at(env, server, tmp_path, monkeypatch):
    write_folder(Path(datasets.FASHION_MNIST_DIR), 3)
    serve_split(server, "train", 7)
    monkeypatch.setenv("FASHION_MNIST_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"\$FASHION_MNIST_ROOT") as info:
        dr.fashion_mnist("train")
    assert info.value.filename == str(tmp_path / "nowhere" / NAMES["train"][0])
    assert server.requests == []


def test_a_corrupt_local_file_is_named(env, tmp_path):
    root = write_folder(tmp_path / "root", 1)
    (root / NAMES["test"][1]).write_bytes(b"\x1f\x8b\x08\x00 cut short")
    with pytest.raises(ValueError, match=f"{NAMES['test'][1]}: not a gzipped idx file"):
        dr.fashion_mnist("test", root=root)
    (root / NAMES["test"][1]).write_bytes(idx_gz(np.arange(3)))  # 3 labels for 4 images
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        dr.fashion_mnist("test", root=root)


def test_split_is_checked(env, server):
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        dr.fashion_mnist("val")
    assert server.requests == []


@pytest.mark.skipif(
    not os.path.exists(os.path.join(datasets.FASHION_MNIST_DIR, NAMES["test"][0])),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_the_bundled_subset_is_the_start_of_the_real_dataset():
    x, y = dr.fashion_mnist("test", root=datasets.FASHION_MNIST_DIR)
    assert x.shape == (10000, 28, 28)
    xd, yd = datasets.fashion_mnist_demo("test")
    np.testing.assert_array_equal(x[:1000], xd)
    np.testing.assert_array_equal(y[:1000], yd)
