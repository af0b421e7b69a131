"""dino_rs.DINO, dino_rs.load_backbone, dino_rs.DINOLoss and dino_rs.cosine_scheduler.

Tiny models only (patch 4, 16x16 crops, embed 24, depth 2) so that the whole file runs in seconds.
Golden values come from tests/fixtures (made with PyTorch by tests/fixtures/make_fixtures.py); the
safetensors files are read with the small NumPy reader below, so no extra package is needed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dino_rs as dr
from helpers import read_safetensors, tiny, write_safetensors

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PTH = FIXTURES / "vit_tiny_p4.pth"
PTH_SAFETENSORS = FIXTURES / "vit_tiny_p4.safetensors"
GOLDEN = FIXTURES / "golden.safetensors"
GOLDEN_JSON = FIXTURES / "golden.json"

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float64)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float64)


def crops(n: int = 4, h: int = 16, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)




@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    tensors, meta = read_safetensors(GOLDEN)
    assert "torch_version" in meta
    return tensors


@pytest.fixture(scope="module")
def golden_json() -> dict:
    return json.loads(GOLDEN_JSON.read_text())


def test_safetensors_reader_reads_the_fixture():
    t, _ = read_safetensors(PTH_SAFETENSORS)
    assert t["pos_embed"].shape == (1, 65, 48)
    assert t["patch_embed.proj.weight"].shape == (48, 3, 4, 4)
    assert t["blocks.1.attn.qkv.weight"].shape == (144, 48)
    assert t["cls_token"].dtype == np.float32


# --------------------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,dims",
    [("vit_tiny", (192, 12, 3)), ("vit_small", (384, 12, 6)), ("vit_base", (768, 12, 12))],
)
def test_presets(arch, dims):
    m = dr.DINO(arch=arch, out_dim=16, hidden_dim=16, bottleneck_dim=8, device="cpu")
    assert (m.embed_dim, m.depth, m.num_heads) == dims
    assert m.patch_size == 16
    assert m.img_size == 224
    assert m.out_dim == 16
    assert m.device == "cpu"
    assert m.config["vit"]["embed_dim"] == dims[0]
    assert m.config["head"] == {
        "in_dim": dims[0],
        "out_dim": 16,
        "hidden_dim": 16,
        "bottleneck_dim": 8,
        "nlayers": 3,
        "norm_last_layer": True,
        "init": "dino",
    }


def test_preset_patch_size_8():
    m = dr.DINO(arch="vit_tiny", patch_size=8, out_dim=16, hidden_dim=16, bottleneck_dim=8, device="cpu")
    assert (m.embed_dim, m.depth, m.num_heads, m.patch_size, m.img_size) == (192, 12, 3, 8, 224)


def test_custom_overrides():
    m = tiny()
    assert (m.embed_dim, m.depth, m.num_heads, m.patch_size, m.img_size, m.out_dim) == (24, 2, 3, 4, 16, 32)
    cfg = m.config
    assert cfg["vit"]["drop_path_rate"] == pytest.approx(0.1)
    assert cfg["vit"]["mlp_ratio"] == 4.0
    assert cfg["head"]["hidden_dim"] == 32 and cfg["head"]["bottleneck_dim"] == 16
    # an override of a preset keeps the preset's other values
    m2 = dr.DINO(arch="vit_small", depth=1, patch_size=8, img_size=32, out_dim=8, hidden_dim=8,
                 bottleneck_dim=4, device="cpu")
    assert (m2.embed_dim, m2.depth, m2.num_heads, m2.patch_size, m2.img_size) == (384, 1, 6, 8, 32)
    m3 = tiny(norm_last_layer=False, nlayers=2)
    assert m3.config["head"]["norm_last_layer"] is False
    assert m3.config["head"]["nlayers"] == 2


def test_same_seed_same_weights_different_seed_different():
    x = crops()
    a = tiny(seed=0).forward_backbone(x)
    b = tiny(seed=0).forward_backbone(x)
    c = tiny(seed=1).forward_backbone(x)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(arch="vit_huge"), "arch"),
        (dict(img_size=18), "img_size"),
        (dict(embed_dim=25), "num_heads"),
        (dict(num_heads=0), "num_heads"),
        (dict(depth=0), "depth"),
        (dict(out_dim=0), "out_dim"),
        (dict(hidden_dim=0), "hidden_dim"),
        (dict(bottleneck_dim=0), "bottleneck_dim"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(device="tpu"), "device"),
        (dict(device="cuda:x"), "device"),
        (dict(device="cuda:"), "device"),
    ],
)
def test_invalid_arguments(kw, needle):
    with pytest.raises(ValueError, match=needle):
        tiny(**kw)


def test_invalid_arch_message_names_the_choices():
    with pytest.raises(ValueError) as e:
        tiny(arch="vit_huge")
    msg = str(e.value)
    assert "vit_huge" in msg and "vit_small" in msg and "vit_tiny" in msg and "vit_base" in msg


def test_img_size_message_has_the_numbers():
    with pytest.raises(ValueError) as e:
        tiny(img_size=18)
    assert "18" in str(e.value) and "4" in str(e.value)


@pytest.mark.skipif(dr.cuda_is_available(), reason="a CUDA device opens here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_device_without_cuda_raises(device):
    # A CPU build says it has no CUDA support; a CUDA build on a machine without the NVIDIA driver
    # says it cannot load the driver library (cudarc panics there: that must not escape).
    with pytest.raises(RuntimeError, match="no CUDA support|could not be loaded|cannot open CUDA device") as e:
        tiny(device=device)
    assert "panicked" not in str(e.value)


@pytest.mark.skipif(dr.cuda_is_available(), reason="CUDA is available in this build")
def test_auto_device_is_cpu_without_cuda():
    assert tiny(device="auto").device == "cpu"


def test_repr():
    r = repr(tiny())
    assert r.startswith("DINO(")
    for part in ["embed_dim=24", "depth=2", "num_heads=3", "patch_size=4", "img_size=16", "out_dim=32", "cpu"]:
        assert part in r, r
    # Rust's Option formatting must not leak into the Python repr
    assert "Some(" not in r, r


def test_repr_of_backbone_only():
    r = repr(dr.load_backbone(PTH, device="cpu"))
    assert "embed_dim=48" in r and "out_dim=None" in r, r


# --------------------------------------------------------------------------------------------------
# forward_backbone
# --------------------------------------------------------------------------------------------------
def test_forward_backbone_shape_dtype():
    m = tiny()
    f = m.forward_backbone(crops(5))
    assert f.shape == (5, 24)
    assert f.dtype == np.float32
    assert np.isfinite(f).all()
    # the CLS output goes through the final LayerNorm: per row mean ~ 0 (weights 1, bias 0 at init)
    np.testing.assert_allclose(f.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(f.var(axis=1), 1.0, rtol=1e-3)


def test_teacher_starts_as_copy_of_student():
    m = tiny()
    x = crops(3)
    np.testing.assert_array_equal(m.forward_backbone(x, teacher=True), m.forward_backbone(x, teacher=False))
    np.testing.assert_array_equal(m.attention(x, teacher=True), m.attention(x, teacher=False))


def test_forward_backbone_is_deterministic_eval_mode():
    # drop_path is on the student only during training: two eval calls agree exactly
    m = tiny(drop_path_rate=0.5)
    x = crops(3)
    np.testing.assert_array_equal(m.forward_backbone(x, teacher=False), m.forward_backbone(x, teacher=False))


@pytest.mark.parametrize("hw", [(8, 8), (16, 12), (12, 16), (24, 24), (4, 4)])
def test_other_crop_sizes(hw):
    m = tiny()
    f = m.forward_backbone(crops(2, *hw))
    assert f.shape == (2, 24) and f.dtype == np.float32
    assert np.isfinite(f).all()


def test_other_crop_size_changes_features():
    m = tiny()
    x = crops(2, 16, 16)
    small = np.ascontiguousarray(x[:, :, :8, :8])
    assert np.abs(m.forward_backbone(x) - m.forward_backbone(small)).max() > 1e-4


def test_forward_backbone_bad_inputs():
    m = tiny()
    x = crops(2)
    with pytest.raises(ValueError, match="float32"):
        m.forward_backbone(x.astype(np.float64))
    with pytest.raises(ValueError, match="float32"):
        m.forward_backbone(x.astype(np.float16))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m.forward_backbone(x[0])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m.forward_backbone(x[None])
    with pytest.raises(ValueError, match="patch size 4"):
        m.forward_backbone(crops(2, 18, 16))
    with pytest.raises(ValueError, match="patch size 4"):
        m.forward_backbone(crops(2, 16, 10))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m.forward_backbone(np.zeros((2, 1, 16, 16), np.float32))
    bad = x.copy()
    bad[1, 2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.forward_backbone(bad)
    bad[1, 2, 3, 4] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        m.forward_backbone(bad)


def test_forward_backbone_batch_size_splitting():
    m = tiny()
    x = crops(7)
    whole = m.forward_backbone(x, batch_size=256)
    for bs in (1, 2, 3, 7):
        np.testing.assert_allclose(m.forward_backbone(x, batch_size=bs), whole, rtol=0, atol=1e-6)
    # a row does not depend on the other rows of the batch
    np.testing.assert_allclose(m.forward_backbone(x[3:4]), whole[3:4], rtol=0, atol=1e-6)


def test_forward_backbone_non_contiguous_input():
    m = tiny()
    x = crops(4)
    nc = x[::2]
    assert not nc.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(m.forward_backbone(nc), m.forward_backbone(np.ascontiguousarray(nc)), atol=1e-6)


def test_forward_backbone_empty_batch():
    out = tiny().forward_backbone(np.zeros((0, 3, 16, 16), np.float32))
    assert out.shape == (0, 24) and out.dtype == np.float32


def test_forward_backbone_batch_size_zero_is_a_value_error():
    # embed(batch_size=0) is a ValueError; forward_backbone must validate the same way
    with pytest.raises(ValueError, match="batch_size"):
        tiny().forward_backbone(crops(2), batch_size=0)


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------
def test_attention_shape_and_probabilities():
    m = tiny()
    a = m.attention(crops(3))
    assert a.shape == (3, 3, 4, 4)
    assert a.dtype == np.float32
    assert (a > 0).all() and (a < 1).all()
    s = a.sum(axis=(2, 3))
    # CLS->patch plus CLS->CLS sums to 1, so the patch part is strictly below 1
    assert (s < 1).all() and (s > 0).all()


def test_attention_rectangular_crops():
    a = tiny().attention(crops(2, 16, 12))
    assert a.shape == (2, 3, 4, 3)
    a = tiny().attention(crops(2, 8, 8))
    assert a.shape == (2, 3, 2, 2)


def test_attention_bad_inputs():
    m = tiny()
    with pytest.raises(ValueError, match="float32"):
        m.attention(crops(2).astype(np.float64))
    with pytest.raises(ValueError, match="patch size"):
        m.attention(crops(2, 14, 16))
    bad = crops(2)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.attention(bad)


def test_attention_empty_batch():
    # forward_backbone handles an empty batch; attention must too (not a RuntimeError)
    a = tiny().attention(np.zeros((0, 3, 16, 16), np.float32))
    assert a.shape == (0, 3, 4, 4)


def test_attention_matches_golden(golden):
    m = dr.load_backbone(PTH, num_heads=3, device="cpu")
    x = golden["input.global"]
    a = m.attention(x)
    # official get_last_selfattention: (B, heads, 1 + N, 1 + N); CLS row, patch columns
    ref = golden["attn.global"][:, :, 0, 1:].reshape(8, 3, 8, 8)
    assert a.shape == (8, 3, 8, 8)
    np.testing.assert_allclose(a, ref, rtol=0, atol=1e-5)
    ref_local = golden["attn.local"][:, :, 0, 1:].reshape(16, 3, 4, 4)
    np.testing.assert_allclose(m.attention(golden["input.local"]), ref_local, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# embed
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits16() -> np.ndarray:
    """40 scikit-learn digits (8x8, 0..16) upscaled to 16x16 uint8 (0..255)."""
    from sklearn.datasets import load_digits

    imgs = load_digits().images[:40]
    imgs = np.clip(np.rint(imgs * 255.0 / 16.0), 0, 255).astype(np.uint8)
    imgs = np.kron(imgs, np.ones((1, 2, 2), np.uint8))
    assert imgs.shape == (40, 16, 16) and imgs.dtype == np.uint8
    return imgs


@pytest.fixture(scope="module")
def embed_model() -> dr.DINO:
    return tiny()


def test_embed_gray_and_rgb(embed_model, digits16):
    gray = embed_model.embed(digits16)
    rgb = embed_model.embed(np.repeat(digits16[..., None], 3, axis=-1))
    assert gray.shape == (40, 24) and gray.dtype == np.float32
    np.testing.assert_array_equal(gray, rgb)
    # different images give different features
    assert np.abs(gray[0] - gray[1]).max() > 1e-4


def test_embed_batch_size(embed_model, digits16):
    a = embed_model.embed(digits16, batch_size=128)
    b = embed_model.embed(digits16, batch_size=1)
    c = embed_model.embed(digits16, batch_size=7)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a, c, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        embed_model.embed(digits16, batch_size=0)


def test_embed_list_of_arrays_paths_folder_dataset(embed_model, digits16, tmp_path):
    imgs = digits16[:6]
    ref = embed_model.embed(imgs)
    # list of arrays
    np.testing.assert_allclose(embed_model.embed(list(imgs)), ref, atol=1e-6)
    # list of PNG paths (lossless: same pixels)
    paths = []
    for i, im in enumerate(imgs):
        p = tmp_path / f"class{i % 2}" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(np.repeat(im[..., None], 3, axis=-1)).save(p)
        paths.append(p)
    np.testing.assert_allclose(embed_model.embed([str(p) for p in paths]), ref, atol=1e-6)
    np.testing.assert_allclose(embed_model.embed(paths), ref, atol=1e-6)  # os.PathLike
    # ImageFolder: order is its own (.paths), map back
    folder = dr.ImageFolder(tmp_path)
    order = [[str(p) for p in paths].index(p) for p in folder.paths]
    assert sorted(order) == list(range(6))
    f = embed_model.embed(folder)
    assert f.shape == (6, 24)
    np.testing.assert_allclose(f, ref[order], atol=1e-6)
    # ArrayDataset, gray and RGB
    np.testing.assert_allclose(embed_model.embed(dr.ArrayDataset(imgs)), ref, atol=1e-6)
    np.testing.assert_allclose(
        embed_model.embed(dr.ArrayDataset(np.repeat(imgs[..., None], 3, axis=-1))), ref, atol=1e-6
    )


def test_embed_constant_image_matches_forward_backbone(embed_model):
    # a constant image stays constant under resize + centre crop: embed == forward_backbone of the
    # normalised constant crop
    colour = np.array([200, 100, 30], np.uint8)
    img = np.broadcast_to(colour, (1, 20, 24, 3)).copy()
    crop = ((colour / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    crop = np.broadcast_to(crop[None, :, None, None], (1, 3, 16, 16)).copy()
    np.testing.assert_allclose(embed_model.embed(img), embed_model.forward_backbone(crop), rtol=0, atol=1e-5)


def test_embed_other_image_sizes(embed_model):
    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(16, 16), (40, 30), (9, 50)]]
    f = embed_model.embed(imgs)
    assert f.shape == (3, 24) and np.isfinite(f).all()


def test_embed_bad_inputs(embed_model, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        embed_model.embed(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(ValueError, match="single path"):
        embed_model.embed(str(tmp_path / "x.png"))
    with pytest.raises(FileNotFoundError):
        embed_model.embed([str(tmp_path / "missing.png")])
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(dr.ImageError) as e:
        embed_model.embed([str(bad)])
    assert str(bad) in str(e.value)


# --------------------------------------------------------------------------------------------------
# save / load / export / load_backbone
# --------------------------------------------------------------------------------------------------
def trained_tiny() -> dr.DINO:
    """A tiny model after two training steps, so that the teacher differs from the student."""
    m = tiny()
    aug = dr.MultiCropAugmenter(global_size=16, local_size=8, n_local=2)
    imgs = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    loader = dr.MultiCropLoader(dr.ArrayDataset(imgs), aug, batch_size=8)
    t = dr.Trainer(m, loader, epochs=2, warmup_epochs=0, lr=0.05, progress=False)
    for s in range(2):
        t.step(*aug.batch(imgs, seed=s))
    return m


def test_save_load_round_trip(tmp_path):
    m = trained_tiny()
    x = crops(3)
    assert np.abs(m.forward_backbone(x, teacher=True) - m.forward_backbone(x, teacher=False)).max() > 1e-6
    path = tmp_path / "m.safetensors"
    m.save(path)
    assert path.is_file()
    m2 = dr.DINO.load(path, device="cpu")
    assert m2.config == m.config
    assert (m2.embed_dim, m2.depth, m2.num_heads, m2.out_dim) == (24, 2, 3, 32)
    for teacher in (True, False):
        np.testing.assert_array_equal(m2.forward_backbone(x, teacher=teacher), m.forward_backbone(x, teacher=teacher))
        np.testing.assert_array_equal(m2.attention(x, teacher=teacher), m.attention(x, teacher=teacher))
    # the file holds our metadata and both networks
    tensors, meta = read_safetensors(path)
    assert json.loads(meta["dino_rs"])["format"] == "dino_rs.model"
    assert "student.backbone.cls_token" in tensors and "teacher.head.last_layer.weight_v" in tensors
    # str paths work as well, and no temporary file is left behind
    m.save(str(tmp_path / "m2.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "m2.safetensors"]


def test_export_backbone_official_keys(tmp_path):
    m = tiny(embed_dim=48, num_heads=3, img_size=32)
    path = tmp_path / "b.safetensors"
    m.export_backbone(path)
    tensors, meta = read_safetensors(path)
    official, _ = read_safetensors(PTH_SAFETENSORS)
    assert set(tensors) == set(official)
    for k, v in official.items():
        assert tensors[k].shape == v.shape, k
    assert not any(k.startswith(("head", "backbone.", "teacher", "student")) for k in tensors)


def test_export_backbone_then_load_backbone_with_num_heads(tmp_path):
    m = trained_tiny()
    path = tmp_path / "b.safetensors"
    m.export_backbone(path)
    b = dr.load_backbone(path, num_heads=3, device="cpu")
    assert (b.embed_dim, b.depth, b.num_heads, b.patch_size, b.img_size, b.out_dim) == (24, 2, 3, 4, 16, None)
    x = crops(3)
    # the exported network is the teacher
    np.testing.assert_allclose(b.forward_backbone(x), m.forward_backbone(x, teacher=True), rtol=0, atol=1e-6)
    assert np.abs(b.forward_backbone(x) - m.forward_backbone(x, teacher=False)).max() > 1e-6


def test_export_backbone_then_load_backbone_default_heads(tmp_path):
    # our own export records the architecture (num_heads=3); loading it back without num_heads must
    # not silently rebuild it with embed_dim // 64 = 1 head
    m = tiny()
    path = tmp_path / "b.safetensors"
    m.export_backbone(path)
    b = dr.load_backbone(path, device="cpu")
    assert b.num_heads == 3
    x = crops(3)
    np.testing.assert_allclose(b.forward_backbone(x), m.forward_backbone(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", [PTH, PTH_SAFETENSORS])
def test_load_backbone_fixture_inferred(path):
    b = dr.load_backbone(path, device="cpu")
    assert (b.embed_dim, b.depth, b.patch_size, b.img_size) == (48, 2, 4, 32)
    assert b.num_heads == 1  # documented default: embed_dim // 64, at least 1
    assert b.out_dim is None
    assert b.config["head"] is None


@pytest.mark.parametrize("path", [PTH, PTH_SAFETENSORS])
def test_load_backbone_fixture_matches_golden(path, golden):
    b = dr.load_backbone(str(path), num_heads=3, device="cpu")
    assert b.num_heads == 3
    np.testing.assert_allclose(b.forward_backbone(golden["input.global"]), golden["backbone.global"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(b.forward_backbone(golden["input.local"]), golden["backbone.local"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(b.forward_backbone(golden["input.rect"]), golden["backbone.rect"], rtol=0, atol=1e-4)
    # teacher and student of a loaded backbone are the same network
    np.testing.assert_array_equal(
        b.forward_backbone(golden["input.global"], teacher=False), b.forward_backbone(golden["input.global"])
    )


def test_load_backbone_wrong_num_heads():
    with pytest.raises(ValueError, match="num_heads"):
        dr.load_backbone(PTH, num_heads=5, device="cpu")


def test_load_backbone_bad_files(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n" * 4)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pth"
    raw = PTH.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    for p in (text, empty, truncated):
        with pytest.raises(ValueError) as e:
            dr.load_backbone(p, device="cpu")
        assert str(p) in str(e.value)
    with pytest.raises(ValueError, match="empty"):
        dr.load_backbone(empty, device="cpu")
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError) as e:
        dr.load_backbone(missing, device="cpu")
    assert str(missing) in str(e.value)


def test_load_backbone_safetensors_without_vit_keys(tmp_path):
    p = tmp_path / "random.safetensors"
    write_safetensors(p, {"weight": np.ones((2, 3), np.float32)})
    with pytest.raises(ValueError) as e:
        dr.load_backbone(p, device="cpu")
    assert str(p) in str(e.value) and "patch_embed.proj.weight" in str(e.value)


def test_dino_load_bad_files(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a checkpoint\n" * 4)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    foreign = tmp_path / "foreign.safetensors"
    write_safetensors(foreign, {"a": np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)})
    good = tmp_path / "m.safetensors"
    tiny().save(good)
    truncated = tmp_path / "truncated.safetensors"
    raw = good.read_bytes()
    truncated.write_bytes(raw[: len(raw) - 100])
    for p in (text, empty, foreign, truncated, PTH, PTH_SAFETENSORS):
        with pytest.raises(ValueError) as e:
            dr.DINO.load(p, device="cpu")
        assert str(p) in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="not a dino_rs model"):
        dr.DINO.load(foreign, device="cpu")
    with pytest.raises(FileNotFoundError):
        dr.DINO.load(tmp_path / "missing.safetensors", device="cpu")


def test_dino_load_other_architecture_metadata(tmp_path):
    # weights of one architecture with the metadata of another
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tiny().save(a)
    tiny(embed_dim=48, img_size=32).save(b)
    ta, _ = read_safetensors(a)
    _, mb = read_safetensors(b)
    mixed = tmp_path / "mixed.safetensors"
    write_safetensors(mixed, ta, mb)
    with pytest.raises(ValueError) as e:
        dr.DINO.load(mixed, device="cpu")
    assert str(mixed) in str(e.value)


def test_backbone_cannot_be_trained():
    b = dr.load_backbone(PTH, num_heads=3, device="cpu")
    aug = dr.MultiCropAugmenter(global_size=32, local_size=16, n_local=2)
    imgs = np.zeros((8, 32, 32, 3), np.uint8)
    loader = dr.MultiCropLoader(dr.ArrayDataset(imgs), aug, batch_size=4)
    with pytest.raises(ValueError, match="head"):
        dr.Trainer(b, loader, epochs=1, warmup_epochs=0, progress=False)


# --------------------------------------------------------------------------------------------------
# DINOLoss
# --------------------------------------------------------------------------------------------------
def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class NumpyDINOLoss:
    """The official DINOLoss (main_dino.py) in float64 NumPy."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                 nepochs, student_temp=0.1, center_momentum=0.9):
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.center = np.zeros((1, out_dim))
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )

    def __call__(self, student_output, teacher_output, epoch):
        s = np.asarray(student_output, np.float64) / self.student_temp
        s = np.split(s, self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        t = _softmax((np.asarray(teacher_output, np.float64) - self.center) / temp)
        t = np.split(t, 2)
        total, n = 0.0, 0
        for iq, q in enumerate(t):
            for v in range(len(s)):
                if v == iq:
                    continue
                total += np.sum(-q * _log_softmax(s[v]), axis=-1).mean()
                n += 1
        total /= n
        batch_center = np.asarray(teacher_output, np.float64).mean(axis=0, keepdims=True)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total


def test_dino_loss_basic():
    rng = np.random.default_rng(0)
    loss = dr.DINOLoss(16, 4)
    assert loss.center.shape == (1, 16) and loss.center.dtype == np.float32
    np.testing.assert_array_equal(loss.center, 0.0)
    s = rng.standard_normal((4 * 3, 16)).astype(np.float32)
    t = rng.standard_normal((2 * 3, 16)).astype(np.float32)
    v = loss(s, t, 0)
    assert isinstance(v, float)
    assert v > 0 and math.isfinite(v)
    # center after one call = 0.1 * mean of the teacher outputs (center_momentum 0.9)
    np.testing.assert_allclose(loss.center, 0.1 * t.mean(axis=0, keepdims=True), rtol=1e-5, atol=1e-7)


def test_dino_loss_center_momentum_two_calls():
    rng = np.random.default_rng(1)
    loss = dr.DINOLoss(8, 2, center_momentum=0.7)
    t1 = rng.standard_normal((4, 8)).astype(np.float32)
    t2 = rng.standard_normal((4, 8)).astype(np.float32)
    s = rng.standard_normal((4, 8)).astype(np.float32)
    loss(s, t1, 0)
    loss(s, t2, 0)
    expected = 0.7 * (0.3 * t1.mean(0)) + 0.3 * t2.mean(0)
    np.testing.assert_allclose(loss.center[0], expected, rtol=1e-5, atol=1e-7)


def test_dino_loss_identical_distributions_value():
    # student == teacher logits and equal temperatures: loss = entropy of softmax(x / T); for an
    # all-zero input this is ln(out_dim)
    loss = dr.DINOLoss(64, 2, warmup_teacher_temp=0.1, teacher_temp=0.1)
    v = loss(np.zeros((4, 64), np.float32), np.zeros((4, 64), np.float32), 0)
    assert v == pytest.approx(math.log(64), rel=1e-6)


def test_dino_loss_teacher_temp_warmup():
    loss = dr.DINOLoss(8, 2, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30, nepochs=100)
    expected = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    got = np.array([loss.teacher_temp(e) for e in range(100)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert loss.teacher_temp(0) == pytest.approx(0.04)
    assert loss.teacher_temp(29) == pytest.approx(0.07)
    assert loss.teacher_temp(15) == pytest.approx(0.04 + 0.03 * 15 / 29)
    # past the schedule: the final value
    assert loss.teacher_temp(500) == pytest.approx(0.07)
    flat = dr.DINOLoss(8, 2)
    assert flat.teacher_temp(0) == pytest.approx(0.04) and flat.teacher_temp(99) == pytest.approx(0.04)


@pytest.mark.parametrize("ncrops,b,d,epochs", [(2, 3, 16, [0]), (4, 5, 32, [0, 1, 2]), (10, 2, 65, [0, 5, 12])])
def test_dino_loss_matches_numpy(ncrops, b, d, epochs):
    rng = np.random.default_rng(ncrops * 100 + d)
    kw = dict(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=10, nepochs=20,
              student_temp=0.1, center_momentum=0.9)
    ours = dr.DINOLoss(d, ncrops, **kw)
    ref = NumpyDINOLoss(d, ncrops, **kw)
    for e in epochs:
        s = rng.standard_normal((ncrops * b, d)).astype(np.float32)
        t = rng.standard_normal((2 * b, d)).astype(np.float32)
        v = ours(s, t, e)
        r = ref(s, t, e)
        assert v == pytest.approx(r, rel=1e-5)
        np.testing.assert_allclose(ours.center, ref.center, rtol=1e-5, atol=1e-7)


def test_dino_loss_matches_golden(golden, golden_json):
    c = golden_json["config"]
    s, t = golden["student.out"], golden["teacher.out"]
    kw = dict(warmup_teacher_temp=c["warmup_teacher_temp"], teacher_temp=c["teacher_temp"],
              warmup_teacher_temp_epochs=c["warmup_teacher_temp_epochs"], nepochs=c["epochs"],
              student_temp=c["student_temp"], center_momentum=c["center_momentum"])
    for e, expected in enumerate(golden_json["loss_by_epoch"]):
        loss = dr.DINOLoss(c["out_dim"], c["ncrops"], **kw)
        assert loss(s, t, e) == pytest.approx(expected, rel=1e-5)
    seq = dr.DINOLoss(c["out_dim"], c["ncrops"], **kw)
    for k, expected in enumerate(golden_json["loss_sequence"]):
        assert seq(s, t, k) == pytest.approx(expected, rel=1e-5)
        np.testing.assert_allclose(seq.center, golden[f"center.after_{k + 1}"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        [seq.teacher_temp(e) for e in range(c["epochs"])], golden_json["teacher_temp_schedule"], atol=1e-12
    )


def test_dino_loss_bad_inputs():
    loss = dr.DINOLoss(8, 4)
    rng = np.random.default_rng(0)
    s = rng.standard_normal((8, 8)).astype(np.float32)
    t = rng.standard_normal((4, 8)).astype(np.float32)
    assert math.isfinite(loss(s, t, 0))
    center = loss.center.copy()
    with pytest.raises(ValueError, match="columns"):
        loss(s[:, :7].copy(), t, 0)
    with pytest.raises(ValueError, match="columns"):
        loss(s, t[:, :5].copy(), 0)
    with pytest.raises(ValueError, match="ncrops"):
        loss(s[:7], t, 0)  # 7 rows is not a multiple of 4 crops
    with pytest.raises(ValueError, match="2·B"):
        loss(s, t[:3], 0)  # teacher rows must be 2·B = 4
    with pytest.raises(ValueError, match="columns"):
        loss(s[None], t, 0)
    with pytest.raises(ValueError, match="float32"):
        loss(s.astype(np.float64), t, 0)
    bad = t.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        loss(s, bad, 0)
    # refused calls do not move the centre
    np.testing.assert_array_equal(loss.center, center)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(ncrops=1), "ncrops"),
        (dict(ncrops=0), "ncrops"),
        (dict(out_dim=0), "out_dim"),
        (dict(teacher_temp=0.0), "teacher_temp"),
        (dict(warmup_teacher_temp=-1.0), "warmup_teacher_temp"),
        (dict(student_temp=0.0), "student_temp"),
        (dict(center_momentum=1.5), "center_momentum"),
        (dict(nepochs=0), "nepochs"),
    ],
)
def test_dino_loss_invalid_construction(kw, needle):
    args = {**dict(out_dim=8, ncrops=4), **kw}
    with pytest.raises(ValueError, match=needle):
        dr.DINOLoss(**args)


# --------------------------------------------------------------------------------------------------
# cosine_scheduler
# --------------------------------------------------------------------------------------------------
def numpy_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """The official utils.cosine_scheduler."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def test_cosine_scheduler_shape_and_values():
    s = dr.cosine_scheduler(1e-3, 1e-6, 10, 7, warmup_epochs=2, start_warmup_value=1e-5)
    assert isinstance(s, np.ndarray) and s.dtype == np.float64
    assert s.shape == (70,)
    # linear warm-up from start_warmup_value to base over 14 iterations
    assert s[0] == pytest.approx(1e-5, rel=1e-12)
    np.testing.assert_allclose(np.diff(s[:14]), (1e-3 - 1e-5) / 13, rtol=1e-9)
    assert s[13] == pytest.approx(1e-3, rel=1e-12)
    # first post-warm-up value is the base value, then a decreasing cosine towards final
    assert s[14] == pytest.approx(1e-3, rel=1e-12)
    assert (np.diff(s[14:]) < 0).all()
    assert s[-1] > 1e-6
    assert s[-1] - 1e-6 < 0.005 * (1e-3 - 1e-6)
    mid = 14 + 28  # half-way through the cosine: the mean of base and final
    assert s[mid] == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-12)


@pytest.mark.parametrize(
    "args",
    [
        (5e-4 * 64 / 256, 1e-6, 100, 3, 10, 0.0),
        (0.04, 0.4, 100, 3, 0, 0.0),
        (0.996, 1.0, 10, 5, 0, 0.0),
        (1.0, 0.0, 4, 1, 4, 0.5),
        (1.0, 0.0, 3, 7, 1, 0.25),
        (2.0, 3.0, 1, 1, 0, 0.0),
    ],
)
def test_cosine_scheduler_matches_numpy(args):
    got = dr.cosine_scheduler(*args)
    ref = numpy_cosine_scheduler(*args)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def test_cosine_scheduler_keywords_and_errors():
    s = dr.cosine_scheduler(base_value=1.0, final_value=0.0, epochs=2, niter_per_ep=2)
    np.testing.assert_allclose(s, [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    assert dr.cosine_scheduler(1.0, 0.0, 0, 5).shape == (0,)
    with pytest.raises(ValueError, match="warmup_epochs"):
        dr.cosine_scheduler(1.0, 0.0, 2, 5, warmup_epochs=3)


def test_init_scheme_sets_how_linear_layers_start(tmp_path):
    # torch: nn.Linear's default U(+-1/sqrt(fan_in)); dino: N(0, 0.02) weights and zero biases.
    import json as _json

    def weights(init):
        m = dr.DINO(arch="vit_tiny", patch_size=7, img_size=28, embed_dim=64, depth=1, num_heads=4, out_dim=32,
                    hidden_dim=32, bottleneck_dim=16, device="cpu", init=init)
        path = tmp_path / f"{init}.safetensors"
        m.export_backbone(path)
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = _json.loads(data[8:8 + n])
        out = {}
        for k in ("blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias"):
            a, b = header[k]["data_offsets"]
            out[k] = np.frombuffer(data[8 + n + a:8 + n + b], np.float32)
        return m, out

    m, t = weights("torch")
    assert m.config["vit"]["init"] == "torch" and m.config["head"]["init"] == "torch"
    bound = 1 / np.sqrt(64)
    for v in t.values():
        assert np.abs(v).max() <= bound and np.abs(v).max() > 0.9 * bound
    _, d = weights("dino")
    assert 0.015 < d["blocks.0.mlp.fc1.weight"].std() < 0.025 and not d["blocks.0.mlp.fc1.bias"].any()
    with pytest.raises(ValueError, match="init must be"):
        dr.DINO(device="cpu", init="xavier")
