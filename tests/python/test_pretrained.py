"""Published DINO and DINOv2 backbones: every key layout read, features against the reference
implementations (golden fixtures of tests/fixtures/make_pretrained_fixtures.py: the official DINOv2
code, the official DINO model, timm and transformers, on random weights), exports in each layout,
and from_pretrained's download path against a loopback server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from loopback import Loopback

import dino_rs as dr
from dino_rs import pretrained
from dino_rs.hub import DownloadError

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "pretrained"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
CASES = MANIFEST["cases"]
# The reference computes in float32 too; the two sums differ in order only.
TOL = 1e-4


def weight_files(case):
    return sorted(p.name for p in ROOT.glob(f"{case}.*") if p.suffix in (".pth", ".safetensors", ".bin"))


GOLDEN = [(case, f) for case in CASES for f in weight_files(case)]


def test_every_published_layout_has_a_fixture():
    layouts = {f.split(".", 1)[1] for _, f in GOLDEN}
    assert {"official.pth", "official_full.pth", "timm.safetensors", "hf.safetensors", "hf.bin"} <= layouts
    assert {c["architecture"]["ffn"] for c in CASES.values()} == {"mlp", "swiglu"}
    assert {c["architecture"]["num_register_tokens"] for c in CASES.values()} == {0, 4}


@pytest.mark.parametrize("case,name", GOLDEN)
def test_features_match_the_reference(case, name):
    arch = CASES[case]["architecture"]
    model = dr.load_backbone(ROOT / name, device="cpu", num_heads=arch["num_heads"])
    assert (model.family, model.embed_dim, model.depth, model.patch_size, model.num_register_tokens) == (
        arch["family"], arch["embed_dim"], arch["depth"], arch["patch_size"], arch["num_register_tokens"])
    ref = np.load(ROOT / f"{case}.npz")
    # The native size and three that resize the position grid (one not square).
    for size in CASES[case]["sizes"]:
        crops = ref[f"crops_{size}"]
        for features, key in (("cls", "cls"), ("patch", "patch"), ("cls+avgpool", "cls_avgpool")):
            got = model.forward_backbone(crops, features=features)
            want = ref[f"{key}_{size}"]
            assert got.shape == want.shape, (size, features)
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=f"{name} {size} {features}")


def test_the_heads_come_from_a_transformers_config(tmp_path):
    # The shapes cannot tell 3 heads from embed_dim/64 = 1; config.json beside the weights does.
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((ROOT / "dinov2_mlp.hf.safetensors").read_bytes())
    (folder / "config.json").write_bytes((ROOT / "dinov2_mlp.hf.config.json").read_bytes())
    assert dr.load_backbone(folder, device="cpu").num_heads == 3
    ref = np.load(ROOT / "dinov2_mlp.npz")
    np.testing.assert_allclose(dr.load_backbone(folder, device="cpu").forward_backbone(ref["crops_56"]),
                               ref["cls_56"], atol=TOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["official", "timm", "hf"])
def test_export_then_load_gives_the_same_features(tmp_path, case, layout):
    arch = CASES[case]["architecture"]
    model = dr.load_backbone(ROOT / f"{case}.official.pth", device="cpu", num_heads=arch["num_heads"])
    out = tmp_path / ("hf" if layout == "hf" else "backbone.safetensors")
    model.export_backbone(out, layout=layout)
    if layout == "hf":
        config = json.loads((out / "config.json").read_text())
        assert config["num_attention_heads"] == 3 and config["hidden_size"] == arch["embed_dim"]
    back = dr.load_backbone(out, device="cpu", num_heads=arch["num_heads"])
    assert back.num_register_tokens == model.num_register_tokens and back.family == model.family
    crops = np.load(ROOT / f"{case}.npz")[f"crops_{CASES[case]['sizes'][1]}"]
    for features in ("cls", "patch"):
        # Exact: the conversions move tensors and at most fold one add the forward pass makes.
        np.testing.assert_array_equal(back.forward_backbone(crops, features=features),
                                      model.forward_backbone(crops, features=features))


def keys_of(path):
    # The safetensors header is JSON after an 8-byte length: no extra dependency needed.
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    return set(json.loads(data[8:8 + n])) - {"__metadata__"}


def test_exported_layouts_use_each_libraries_names(tmp_path):
    model = dr.load_backbone(ROOT / "dinov2_reg_swiglu.official.pth", device="cpu", num_heads=3)
    for layout, expected in (("official", None),
                             ("timm", "dinov2_reg_swiglu.timm.safetensors"),
                             ("hf", "dinov2_reg_swiglu.hf.safetensors")):
        out = tmp_path / layout
        model.export_backbone(out if layout == "hf" else out.with_suffix(".safetensors"), layout=layout)
        written = keys_of(out / "model.safetensors" if layout == "hf" else out.with_suffix(".safetensors"))
        if layout == "official":
            assert "register_tokens" in written and "mask_token" in written and "blocks.0.mlp.w12.weight" in written
        else:
            assert written == keys_of(ROOT / expected), layout


def test_unknown_layout_and_features_are_refused(tmp_path):
    model = dr.load_backbone(ROOT / "dino_v1.official.pth", device="cpu", num_heads=3)
    with pytest.raises(ValueError, match="layout must be"):
        model.export_backbone(tmp_path / "x.safetensors", layout="onnx")
    with pytest.raises(ValueError, match="features must be"):
        model.forward_backbone(np.zeros((1, 3, 64, 64), np.float32), features="mean")


def test_embed_uses_each_familys_eval_crop():
    # DINOv2 evaluates at 224 whatever its position grid was trained at; DINO at its training size.
    v2 = dr.load_backbone(ROOT / "dinov2_reg_mlp.official.pth", device="cpu", num_heads=3)
    images = np.random.default_rng(0).integers(0, 255, (2, 60, 50, 3), dtype=np.uint8)
    assert v2.embed(images, features="patch").shape == (2, 16 * 16, v2.embed_dim)
    assert v2.embed(images, features="cls+avgpool").shape == (2, 2 * v2.embed_dim)
    v1 = dr.load_backbone(ROOT / "dino_v1.official.pth", device="cpu", num_heads=3)
    assert v1.embed(images, features="patch").shape == (2, (64 // 16) ** 2, v1.embed_dim)
    assert v1.embed(images).shape == (2, v1.embed_dim)


# ---------------------------------------------------------------------------------------------
# from_pretrained


def test_the_registry_names_every_published_backbone():
    names = {m["name"] for m in dr.pretrained_models()}
    v2 = {f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")}
    assert names == {"dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8"} | v2
    for m in dr.pretrained_models():
        assert m["url"].startswith("https://dl.fbaipublicfiles.com/dino") and m["url"].endswith(".pth")
        assert m["embed_dim"] == 64 * m["num_heads"]
    g = next(m for m in dr.pretrained_models() if m["name"] == "dinov2_vitg14_reg")
    assert (g["ffn"], g["num_register_tokens"], g["depth"]) == ("swiglu", 4, 40)


@pytest.fixture
def server():
    lb = Loopback()
    yield lb
    lb.close()


@pytest.fixture
def tiny(monkeypatch, tmp_path, server):
    """A registry entry for the small DINOv2 fixture, served by the loopback server, and a fresh cache."""
    monkeypatch.setenv("DINO_RS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DINO_RS_OFFLINE", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    body = (ROOT / "dinov2_reg_mlp.official.pth").read_bytes()
    url = server.serve("dinov2/tiny/tiny_reg4_pretrain.pth", body)
    arch = CASES["dinov2_reg_mlp"]["architecture"]
    entry = pretrained.PretrainedModel("tiny_reg", url, "dinov2", arch["embed_dim"], arch["depth"], 3, 14,
                                       arch["img_size"], num_register_tokens=4)
    monkeypatch.setitem(pretrained._MODELS, "tiny_reg", entry)
    return entry


def cached(tmp_path):
    home = tmp_path / "home"
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()) if home.exists() else []


def test_from_pretrained_downloads_once_then_reads_the_cache(tiny, server, tmp_path):
    ref = np.load(ROOT / "dinov2_reg_mlp.npz")
    model = dr.from_pretrained("tiny_reg", progress=False)
    np.testing.assert_allclose(model.forward_backbone(ref["crops_56"]), ref["cls_56"], atol=TOL, rtol=0)
    assert server.count("/dinov2/tiny/tiny_reg4_pretrain.pth") == 1
    assert cached(tmp_path) == ["checkpoints/tiny_reg4_pretrain.pth"]
    again = dr.from_pretrained("tiny_reg", progress=False)
    assert server.count("/dinov2/tiny/tiny_reg4_pretrain.pth") == 1, "a cache hit makes no request"
    np.testing.assert_array_equal(again.forward_backbone(ref["crops_42"]), model.forward_backbone(ref["crops_42"]))


def test_from_pretrained_offline_names_the_file_to_place(tiny, server, monkeypatch, tmp_path):
    monkeypatch.setenv("DINO_RS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        dr.from_pretrained("tiny_reg", progress=False)
    assert "tiny_reg4_pretrain.pth" in str(e.value) and str(tmp_path / "home") in str(e.value)
    assert server.requests == []


def test_a_404_leaves_no_cache_entry(tiny, server, tmp_path, monkeypatch):
    missing = server.error("dinov2/gone.pth", 404)
    with pytest.raises(DownloadError, match="404"):
        dr.from_pretrained("tiny_reg", url=missing, progress=False)
    assert cached(tmp_path) == []


def test_a_page_that_is_not_a_checkpoint_is_refused(tiny, server, tmp_path):
    html = server.serve("dinov2/login.pth", b"<html><body>Sign in</body></html>")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        dr.from_pretrained("tiny_reg", url=html, progress=False)
    assert cached(tmp_path) == []


def test_a_truncated_download_leaves_no_cache_entry(tiny, server, tmp_path):
    body = (ROOT / "dinov2_reg_mlp.official.pth").read_bytes()
    url = server.truncate("dinov2/cut.pth", body[: len(body) // 2], announced=len(body))
    with pytest.raises(DownloadError):
        dr.from_pretrained("tiny_reg", url=url, progress=False)
    assert cached(tmp_path) == []


def test_a_file_of_another_architecture_is_named(tiny, server, tmp_path):
    url = server.serve("dino/other.pth", (ROOT / "dino_v1.official.pth").read_bytes())
    with pytest.raises(ValueError, match="not tiny_reg's") as e:
        dr.from_pretrained("tiny_reg", url=url, progress=False)
    assert "other.pth" in str(e.value)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="dinov2_vits14"):
        dr.from_pretrained("dinov3_vits16")


# ---------------------------------------------------------------------------------------------
# Through PyTorch's own modules, where the test environment has them (not in CI: no torch there).


@pytest.mark.parametrize("case", list(CASES))
def test_hf_exports_load_in_transformers(tmp_path, case):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    native = CASES[case]["native_size"]
    crops = np.load(ROOT / f"{case}.npz")[f"crops_{native}"]
    model = dr.load_backbone(ROOT / f"{case}.official.pth", device="cpu", num_heads=3)
    model.export_backbone(tmp_path / "hf", layout="hf")
    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        tokens = hf(pixel_values=torch.from_numpy(crops)).last_hidden_state.numpy()
    np.testing.assert_allclose(tokens[:, 0], model.forward_backbone(crops), atol=TOL, rtol=0)
    patches = tokens[:, 1 + model.num_register_tokens:]
    np.testing.assert_allclose(patches, model.forward_backbone(crops, features="patch"), atol=TOL, rtol=0)


def test_timm_exports_load_in_timm(tmp_path):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    ref = np.load(ROOT / "dinov2_mlp.npz")
    model = dr.load_backbone(ROOT / "dinov2_mlp.official.pth", device="cpu", num_heads=3)
    ours = model.forward_backbone(ref["crops_56"])
    model.export_backbone(tmp_path / "t.safetensors", layout="timm")
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, embed_dim=24, depth=2,
                            num_heads=3, num_classes=0).eval()
    vit.load_state_dict(load_file(tmp_path / "t.safetensors"))
    with torch.no_grad():
        out = vit.forward_features(torch.from_numpy(ref["crops_56"]))[:, 0].numpy()
    np.testing.assert_allclose(out, ours, atol=TOL, rtol=0)


def test_cli_embed_takes_a_published_name_and_the_features_kind(tiny, server, tmp_path):
    from dino_rs import cli

    folder = tmp_path / "images" / "cats"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        dr._dino_rs._write_png(folder / f"{i}.png", rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
    out = tmp_path / "feats.npy"
    args = ["embed", "--checkpoint", "tiny_reg", "--data", str(tmp_path / "images"), "--output", str(out),
            "--device", "cpu", "--features", "cls+avgpool"]
    assert cli.main(args) == 0
    assert np.load(out).shape == (3, 2 * CASES["dinov2_reg_mlp"]["architecture"]["embed_dim"])
    assert server.count("/dinov2/tiny/tiny_reg4_pretrain.pth") == 1
