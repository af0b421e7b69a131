"""Helpers shared by the model and training tests: a tiny DINO and a minimal safetensors reader /
writer (so the tests can look inside checkpoints without the safetensors package)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

import dino_rs as dr

TINY = dict(
    patch_size=4,
    img_size=16,
    embed_dim=24,
    depth=2,
    num_heads=3,
    out_dim=32,
    hidden_dim=32,
    bottleneck_dim=16,
    drop_path_rate=0.1,
    seed=0,
    device="cpu",
)


def tiny(**kw) -> dr.DINO:
    return dr.DINO(**{**TINY, **kw})


def make_loader(images: np.ndarray, batch_size: int = 8, **kw) -> dr.MultiCropLoader:
    """A loader of 16x16 globals and two 8x8 locals (the tiny model's crops) over `images`."""
    aug = dr.MultiCropAugmenter(global_size=16, local_size=8, n_local=2)
    return dr.MultiCropLoader(dr.ArrayDataset(images), aug, batch_size=batch_size, **kw)


# --------------------------------------------------------------------------------------------------
# a minimal safetensors reader / writer (8-byte LE header length, JSON header, raw little-endian data)
# --------------------------------------------------------------------------------------------------
_DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "U8": "u1", "I8": "i1"}


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict]:
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[base + start : base + end], dtype=_DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"])
    return out, meta


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    blobs, offset = [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
