"""Mixed precision (issue 5): ``dtype="bfloat16"`` on DINO and Trainer computes the matmuls in
bfloat16 and keeps weights, optimiser state, loss and centre in float32, as PyTorch's autocast.
On the CPU the bf16 results must stay within 1e-2 (relative) of the float32 ones: the same bound
tests/python/test_gpu.py puts on CUDA bf16 against CPU float32."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import dino_rs as dr
from helpers import tiny

BF16_TOL = 1e-2
META_KEY = "dino_rs"  # where checkpoints keep their JSON metadata (src/checkpoint.rs)
# Crops at the model's size and a smaller (local) one, so the position embedding is interpolated.
ARCH = dict(patch_size=8, img_size=32, embed_dim=48, depth=3, num_heads=3, out_dim=256, hidden_dim=64, bottleneck_dim=32)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def crops(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


@pytest.mark.parametrize("bad", ["float16", "bf16x", "int8", ""])
def test_unknown_dtype_is_refused(bad, tmp_path):
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'bfloat16'"):
        tiny(dtype=bad)
    path = tmp_path / "m.safetensors"
    tiny().save(path)
    with pytest.raises(ValueError, match="dtype must be"):
        dr.DINO.load(path, device="cpu", dtype=bad)
    with pytest.raises(ValueError, match="dtype must be"):
        dr._dino_rs._Trainer(tiny(), {}, batch_size=2, niter_per_ep=1, n_local=0, dtype=bad)


def test_dtype_is_reported_and_float32_by_default(tmp_path):
    m = tiny()
    assert m.dtype == "float32" and 'dtype="float32"' in repr(m)
    b = tiny(dtype="bfloat16")
    assert b.dtype == "bfloat16" and 'dtype="bfloat16"' in repr(b)
    path = tmp_path / "m.safetensors"
    b.save(path)
    # a runtime setting, like the device: the file holds float32 weights and no dtype
    assert {v["dtype"] for k, v in header(path).items() if k != "__metadata__"} == {"F32"}
    assert dr.DINO.load(path, device="cpu").dtype == "float32"
    assert dr.DINO.load(path, device="cpu", dtype="bfloat16").dtype == "bfloat16"
    backbone = tmp_path / "b.safetensors"
    b.export_backbone(backbone)
    assert dr.load_backbone(backbone, device="cpu", dtype="bfloat16").dtype == "bfloat16"


@pytest.fixture(scope="module")
def pair():
    return dr.DINO(**ARCH, device="cpu"), dr.DINO(**ARCH, device="cpu", dtype="bfloat16")


@pytest.mark.parametrize("size", [32, 16])
@pytest.mark.parametrize("teacher", [True, False])
def test_bf16_features_are_within_bf16_precision(pair, size, teacher):
    f32, bf16 = pair
    x = crops(5, size, seed=size)
    a, b = bf16.forward_backbone(x, teacher=teacher), f32.forward_backbone(x, teacher=teacher)
    assert a.dtype == np.float32 and a.shape == b.shape
    assert 1e-6 < rel(a, b) < BF16_TOL  # computed in bf16 (not identical), and close


def test_bf16_attention_is_within_bf16_precision(pair):
    f32, bf16 = pair
    x = crops(3, 32, seed=3)
    a, b = bf16.attention(x), f32.attention(x)
    assert a.dtype == np.float32 and a.shape == b.shape == (3, 3, 4, 4)
    assert 1e-6 < rel(a, b) < BF16_TOL
    np.testing.assert_allclose(a.sum(axis=(2, 3)), b.sum(axis=(2, 3)), atol=BF16_TOL)


def test_bf16_embed_matches_float32(pair):
    f32, bf16 = pair
    images = np.random.default_rng(4).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    assert 1e-6 < rel(bf16.embed(images), f32.embed(images)) < BF16_TOL


def _trainer(model, dtype=None):
    return dr._dino_rs._Trainer(model, dict(epochs=2, warmup_epochs=0, lr=5e-3), batch_size=4, niter_per_ep=2,
                                n_local=2, dtype=dtype)


def test_trainer_takes_the_models_dtype_unless_told():
    assert _trainer(dr.DINO(**ARCH, device="cpu", dtype="bfloat16")).dtype == "bfloat16"
    assert _trainer(dr.DINO(**ARCH, device="cpu")).dtype == "float32"
    assert _trainer(dr.DINO(**ARCH, device="cpu", dtype="bfloat16"), dtype="float32").dtype == "float32"
    assert _trainer(dr.DINO(**ARCH, device="cpu"), dtype="bfloat16").dtype == "bfloat16"


def test_bf16_training_steps_follow_float32(tmp_path):
    g, l = crops(8, 32, seed=5).reshape(2, 4, 3, 32, 32), crops(8, 16, seed=6).reshape(2, 4, 3, 16, 16)
    probe = crops(4, 32, seed=7)
    models = {d: dr.DINO(**ARCH, device="cpu", drop_path_rate=0.1) for d in ("float32", "bfloat16")}
    before = models["float32"].forward_backbone(probe, teacher=False)
    trainers = {d: _trainer(m, dtype=d) for d, m in models.items()}
    gaps = []
    for _ in range(3):
        a, b = trainers["bfloat16"].step(g, l), trainers["float32"].step(g, l)
        gaps.append(abs(a["loss"] - b["loss"]) / abs(b["loss"]))
    assert 0 < max(gaps) < BF16_TOL, gaps
    for teacher in (False, True):
        a = models["bfloat16"].forward_backbone(probe, teacher=teacher)
        b = models["float32"].forward_backbone(probe, teacher=teacher)
        assert rel(a, b) < BF16_TOL, teacher
    moved = rel(models["float32"].forward_backbone(probe, teacher=False), before)
    assert moved > 10 * rel(models["bfloat16"].forward_backbone(probe, teacher=False),
                            models["float32"].forward_backbone(probe, teacher=False))
    # float32 master weights, Adam moments and centre; the dtype is kept for resuming
    path = tmp_path / "t.safetensors"
    trainers["bfloat16"].save(path)
    h = header(path)
    assert json.loads(h["__metadata__"][META_KEY])["dtype"] == "bfloat16"
    assert {v["dtype"] for k, v in h.items() if k != "__metadata__"} == {"F32"}
    assert any(k.startswith("optim.m.") for k in h) and "center" in h
    rust, model, _ = dr._dino_rs._Trainer.load(path, device="cpu")
    assert rust.dtype == model.dtype == "bfloat16"
    rust, model, _ = dr._dino_rs._Trainer.load(path, device="cpu", dtype="float32")
    assert rust.dtype == model.dtype == "float32"


def test_fit_and_resume_keep_the_dtype(tmp_path):
    from helpers import make_loader

    images = np.random.default_rng(8).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    t = dr.Trainer(tiny(), make_loader(images), epochs=2, warmup_epochs=1, progress=False, checkpoint_dir=tmp_path,
                   dtype="bfloat16")
    assert t.dtype == "bfloat16"
    (h,) = t.fit(epochs=1)
    assert np.isfinite(h["loss"])
    r = dr.Trainer.resume(tmp_path, make_loader(images), progress=False)
    assert r.dtype == r.model.dtype == "bfloat16"
    assert dr.Trainer.resume(tmp_path, make_loader(images), progress=False, dtype="float32").dtype == "float32"
    (h2,) = r.fit()
    assert h2["epoch"] == 2 and np.isfinite(h2["loss"])
