"""The researcher's workflow: plots, linear probe, the scikit-learn embedder, Trainer evaluation and
callbacks, and the ``dino-rs train`` / ``embed`` command line.

Tiny models (patch 4, 16 px, embed 16, depth 1, 2 heads) on a few random images: every test is fast.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dino_rs as dr
from dino_rs import cli
from dino_rs.plot import _normalize, attention_mask, attention_maps, eval_crop
from helpers import read_safetensors

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

TINY = dict(patch_size=4, img_size=16, embed_dim=16, depth=1, num_heads=2, out_dim=32, hidden_dim=32,
            bottleneck_dim=8, seed=0, device="cpu")
N_IMAGES, BATCH = 24, 8
NITER = N_IMAGES // BATCH  # 3 iterations per epoch


def tiny(**kw) -> dr.DINO:
    return dr.DINO(**{**TINY, **kw})


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (N_IMAGES, 16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.arange(N_IMAGES) % 3


def make_loader(images: np.ndarray) -> dr.MultiCropLoader:
    aug = dr.MultiCropAugmenter(global_size=16, local_size=8, n_local=2)
    return dr.MultiCropLoader(dr.ArrayDataset(images), aug, batch_size=BATCH, seed=0)


def eval_data(images, labels):
    return images[:12], labels[:12], images[12:], labels[12:]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------------------------------
# optional dependencies
# --------------------------------------------------------------------------------------------------
def test_import_does_not_load_optional_dependencies():
    code = ("import sys, dino_rs; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('matplotlib', 'sklearn', 'tqdm', 'nbclient')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_new_names_are_exported():
    for name in ("plot_history", "plot_attention", "linear_probe"):
        assert name in dr.__all__ and callable(getattr(dr, name))
        assert getattr(dr, name).__doc__ and "Parameters" in getattr(dr, name).__doc__


def _hide(monkeypatch, top: str) -> None:
    """Makes `top` and its submodules unimportable."""
    for name in [m for m in list(sys.modules) if m == top or m.startswith(top + ".")] + [top]:
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_matplotlib_says_what_to_install(monkeypatch):
    _hide(monkeypatch, "matplotlib")
    with pytest.raises(ImportError, match=r'pip install "dino-rs\[notebook\]"'):
        dr.plot_history([{"epoch": 1, "loss": 1.0}])
    with pytest.raises(ImportError, match=r"dino-rs\[notebook\]"):
        dr.plot_attention(tiny(), np.zeros((16, 16, 3), np.uint8))


def test_missing_sklearn_says_what_to_install(monkeypatch):
    _hide(monkeypatch, "sklearn")
    f = np.random.default_rng(0).standard_normal((10, 3))
    with pytest.raises(ImportError, match=r'pip install "dino-rs\[notebook\]"'):
        dr.linear_probe(f, np.arange(10) % 2, f, np.arange(10) % 2)
    monkeypatch.delitem(sys.modules, "dino_rs.sklearn", raising=False)
    with pytest.raises(ImportError, match=r"dino-rs\[notebook\]"):
        importlib.import_module("dino_rs.sklearn")


# --------------------------------------------------------------------------------------------------
# plot_history
# --------------------------------------------------------------------------------------------------
HISTORY = [
    {"epoch": 1, "loss": 3.0, "lr": 1e-4, "wd": 0.04, "momentum": 0.996, "teacher_temp": 0.02, "seconds": 1.0},
    {"epoch": 2, "loss": 2.5, "lr": 2e-4, "wd": 0.1, "momentum": 0.997, "teacher_temp": 0.03, "seconds": 1.0,
     "knn_top1": 40.0, "knn_top5": 80.0},
    {"epoch": 3, "loss": 2.0, "lr": 1e-4, "wd": 0.3, "momentum": 0.999, "teacher_temp": 0.04, "seconds": 1.0},
    {"epoch": 4, "loss": 1.5, "lr": 1e-6, "wd": 0.4, "momentum": 1.0, "teacher_temp": 0.04, "seconds": 1.0,
     "knn_top1": 55.0, "knn_top5": 90.0},
]


def _lines(ax):
    return [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()]


def test_plot_history_panels_and_data():
    fig = dr.plot_history(HISTORY)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4  # loss, lr, teacher temperature, k-NN
    loss_ax, lr_ax, temp_ax, knn_ax = fig.axes
    assert _lines(loss_ax) == [([1, 2, 3, 4], [3.0, 2.5, 2.0, 1.5])]
    assert _lines(lr_ax) == [([1, 2, 3, 4], [1e-4, 2e-4, 1e-4, 1e-6])]
    assert _lines(temp_ax) == [([1, 2, 3, 4], [0.02, 0.03, 0.04, 0.04])]
    # k-NN only at the evaluated epochs: top-1 and top-5
    assert _lines(knn_ax) == [([2, 4], [40.0, 55.0]), ([2, 4], [80.0, 90.0])]


def test_plot_history_without_knn_has_three_panels():
    plain = [{k: v for k, v in h.items() if not k.startswith("knn")} for h in HISTORY]
    fig = dr.plot_history(plain)
    assert len(fig.axes) == 3
    assert [a.get_title() for a in fig.axes] == ["DINO loss", "learning rate", "teacher temperature"]


def test_plot_history_on_given_axes():
    fig, ax = plt.subplots()
    assert dr.plot_history(HISTORY, ax=ax) is fig
    assert len(fig.axes) == 2  # the loss axis and the k-NN twin
    assert _lines(fig.axes[0])[0][1] == [3.0, 2.5, 2.0, 1.5]
    assert _lines(fig.axes[1])[0] == ([2, 4], [40.0, 55.0])
    fig, axes = plt.subplots(2, 2)
    assert dr.plot_history(HISTORY, ax=axes) is fig
    assert _lines(axes[1, 1])[0] == ([2, 4], [40.0, 55.0])
    with pytest.raises(ValueError, match="4 Axes"):
        dr.plot_history(HISTORY, ax=list(axes.ravel())[:3])


def test_plot_history_of_a_real_run(images):
    t = dr.Trainer(tiny(), make_loader(images), epochs=2, warmup_epochs=1, progress=False)
    hist = t.fit()
    fig = dr.plot_history(hist)
    # loss, lr, teacher temperature, then the collapse measures: entropy with KL, largest probability.
    assert len(fig.axes) == 5
    assert _lines(fig.axes[0])[0][1] == [h["loss"] for h in hist]
    (entropy, kl) = _lines(fig.axes[3])
    assert entropy[1] == [h["teacher_entropy"] for h in hist] and kl[1] == [h["teacher_student_kl"] for h in hist]
    assert _lines(fig.axes[4])[0][1] == [h["teacher_max_prob"] for h in hist]


@pytest.mark.parametrize(
    "bad,needle",
    [([], "empty"), ([{"epoch": 1, "lr": 0.1}], "loss"), ([3.0], "dict"), ({"loss": 1.0}, "list")],
)
def test_plot_history_rejects_bad_input(bad, needle):
    with pytest.raises(ValueError, match=needle):
        dr.plot_history(bad)


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------
def _official_mask(attn: np.ndarray, threshold: float) -> np.ndarray:
    """visualize_attention.py line by line (torch.sort, cumsum, argsort of the indices)."""
    nh = attn.shape[0]
    flat = attn.reshape(nh, -1)
    idx = np.argsort(flat, axis=1, kind="stable")
    val = np.take_along_axis(flat, idx, axis=1)
    val = val / val.sum(axis=1, keepdims=True)
    th = np.cumsum(val, axis=1) > (1 - threshold)
    idx2 = np.argsort(idx, axis=1)
    th = np.stack([th[h][idx2[h]] for h in range(nh)])
    return th.reshape(attn.shape)


def test_attention_mask_on_a_known_map():
    attn = np.array([[[0.5, 0.1], [0.3, 0.1]], [[0.05, 0.05], [0.1, 0.8]]])
    mask = attention_mask(attn, 0.6)
    # head 0: 0.5 + 0.3 = 0.8 >= 0.6, and 0.5 alone < 0.6; head 1: 0.8 alone holds 60%
    np.testing.assert_array_equal(mask, [[[True, False], [True, False]], [[False, False], [False, True]]])
    # a head whose weights do not sum to 1 is normalised first
    np.testing.assert_array_equal(attention_mask(attn * 7.0, 0.6), mask)
    assert attention_mask(attn, 1.0)[0].all()


@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.6, 0.9])
def test_attention_mask_keeps_the_mass(threshold):
    attn = np.random.default_rng(3).random((4, 5, 6)).astype(np.float32)
    mask = attention_mask(attn, threshold)
    assert mask.shape == attn.shape and mask.dtype == bool
    np.testing.assert_array_equal(mask, _official_mask(attn.astype(np.float64), threshold))
    for h in range(4):
        a = attn[h] / attn[h].sum()
        kept = a[mask[h]]
        assert kept.sum() >= threshold - 1e-6  # at least `threshold` of the mass ...
        assert kept.sum() - kept.min() < threshold  # ... and no patch more than needed
        assert kept.min() >= a[~mask[h]].max()  # the most attended patches


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5])
def test_attention_mask_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        attention_mask(np.ones((2, 3, 3)), threshold)


def test_eval_crop_matches_the_embedding_transform(photo_rgb, photos):
    model = tiny()
    for img in (photo_rgb, photo_rgb[:, :40], photo_rgb[:33, :71], photo_rgb[:, :, 0]):
        crop = eval_crop(img, 16)
        assert crop.shape == (16, 16, 3) and crop.dtype == np.uint8
        ours = model.forward_backbone(_normalize(crop))
        np.testing.assert_allclose(ours, model.embed([img]), atol=5e-3)
    # paths are decoded too
    np.testing.assert_array_equal(eval_crop(photos[0], 16).shape, (16, 16, 3))


def test_attention_maps_are_nearest_upsampled(photo_rgb):
    model = tiny()
    crop, maps, masks = attention_maps(model, photo_rgb, threshold=0.6)
    assert crop.shape == (16, 16, 3)
    assert maps.shape == (2, 16, 16) and maps.dtype == np.float32
    patches = model.attention(_normalize(crop))[0]
    assert patches.shape == (2, 4, 4)
    np.testing.assert_array_equal(maps[:, ::4, ::4], patches)
    for dy in range(4):
        for dx in range(4):  # every pixel of a patch carries the patch's value
            np.testing.assert_array_equal(maps[:, dy::4, dx::4], patches)
    np.testing.assert_array_equal(masks[:, ::4, ::4], attention_mask(patches, 0.6))
    assert attention_maps(model, photo_rgb)[2] is None


def test_plot_attention_panels(photo_rgb, png_photo):
    model = tiny()
    fig = dr.plot_attention(model, photo_rgb)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3  # image + one per head
    assert [a.get_title() for a in fig.axes][1:] == ["head 0", "head 1"]
    _, maps, _ = attention_maps(model, photo_rgb)
    np.testing.assert_array_equal(fig.axes[2].get_images()[0].get_array(), maps[1])
    assert len(dr.plot_attention(model, photo_rgb, head=1).axes) == 2
    assert dr.plot_attention(model, photo_rgb, head=-1).axes[1].get_title() == "head 1"
    fig = dr.plot_attention(model, png_photo, threshold=0.6)  # a path
    assert len(fig.axes) == 3
    assert len(fig.axes[1].get_images()) == 2  # the image with the mask over it
    gray = dr.plot_attention(model, photo_rgb[:, :, 0])
    assert len(gray.axes) == 3
    # 6 heads: 7 panels on a grid of 5 columns, no empty axes left over
    assert len(dr.plot_attention(tiny(embed_dim=24, num_heads=6), photo_rgb).axes) == 7


def test_plot_attention_rejects_bad_arguments(photo_rgb):
    model = tiny()
    with pytest.raises(ValueError, match="head"):
        dr.plot_attention(model, photo_rgb, head=2)
    with pytest.raises(ValueError, match="threshold"):
        dr.plot_attention(model, photo_rgb, threshold=0.0)
    with pytest.raises(ValueError, match="uint8"):
        dr.plot_attention(model, photo_rgb.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        dr.plot_attention(model, np.zeros((4, 4, 4), np.uint8))


# --------------------------------------------------------------------------------------------------
# linear_probe
# --------------------------------------------------------------------------------------------------
def _blobs(n_per_class: int, n_classes: int, dim: int, seed: int, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim)) * 3.0
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + spread * rng.standard_normal((len(y), dim))
    return x.astype(np.float32), y


@pytest.mark.parametrize("normalize", ["standardize", "l2", "none"])
def test_linear_probe_separable(normalize):
    x, y = _blobs(40, 4, 8, seed=0)
    xt, yt = _blobs(40, 4, 8, seed=0)
    xt = xt + 0.1 * np.random.default_rng(9).standard_normal(xt.shape).astype(np.float32)
    acc = dr.linear_probe(x, y, xt, yt, normalize=normalize)
    assert isinstance(acc, float)
    assert acc == pytest.approx(100.0)


def test_linear_probe_shuffled_labels_is_chance():
    x, y = _blobs(60, 10, 16, seed=1)
    xt, yt = _blobs(60, 10, 16, seed=1)
    assert dr.linear_probe(x, y, xt, yt) == pytest.approx(100.0)
    shuffled = np.random.default_rng(2).permutation(y)
    acc = dr.linear_probe(x, shuffled, xt, yt)
    assert acc < 25.0  # chance is 10%


def test_linear_probe_validation():
    x, y = _blobs(10, 2, 4, seed=0)
    with pytest.raises(ValueError, match="train_labels has 19"):
        dr.linear_probe(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="test_labels has 19"):
        dr.linear_probe(x, y, x, y[:-1])
    with pytest.raises(ValueError, match="4 features per sample but test_features has 3"):
        dr.linear_probe(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="2-D"):
        dr.linear_probe(x[:, 0], y, x, y)
    with pytest.raises(ValueError, match="two classes"):
        dr.linear_probe(x, np.zeros_like(y), x, y)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dr.linear_probe(bad, y, x, y)
    with pytest.raises(ValueError, match="normalize"):
        dr.linear_probe(x, y, x, y, normalize="zscore")
    with pytest.raises(ValueError, match="C must"):
        dr.linear_probe(x, y, x, y, C=0.0)
    with pytest.raises(ValueError, match="at least one test"):
        dr.linear_probe(x, y, x[:0], y[:0])


# --------------------------------------------------------------------------------------------------
# DINOEmbedder
# --------------------------------------------------------------------------------------------------
sk = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402

from dino_rs.sklearn import DINOEmbedder  # noqa: E402

EMB = dict(TINY, epochs=2, warmup_epochs=1, batch_size=BATCH, n_local=2)

DINO_ARGS = {"arch", "patch_size", "img_size", "embed_dim", "depth", "num_heads", "out_dim", "hidden_dim",
             "bottleneck_dim", "norm_last_layer", "drop_path_rate", "device", "seed"}
TRAINER_ARGS = {"epochs", "lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "momentum_teacher",
                "teacher_temp", "warmup_teacher_temp", "warmup_teacher_temp_epochs", "student_temp", "clip_grad",
                "freeze_last_layer", "progress"}
AUG_ARGS = {"global_size", "local_size", "n_local", "global_scale", "local_scale", "batch_size", "embed_batch_size"}


def test_embedder_params_cover_dino_trainer_and_augmenter():
    params = DINOEmbedder().get_params()
    assert DINO_ARGS | TRAINER_ARGS | AUG_ARGS <= set(params)
    # the official defaults
    assert params["arch"] == "vit_small" and params["patch_size"] == 16 and params["img_size"] == 224
    assert params["out_dim"] == 65536 and params["epochs"] == 100 and params["lr"] == 5e-4
    assert params["n_local"] == 8 and params["teacher_temp"] == 0.04 and params["batch_size"] == 64
    # docs/design.md's Python API example is accepted as written
    emb = DINOEmbedder(embed_dim=192, depth=6, num_heads=3, patch_size=4, img_size=32, epochs=50, batch_size=64,
                       global_size=32, local_size=16, n_local=6)
    assert emb.get_params()["global_size"] == 32


def test_embedder_clone_get_set_params():
    scale = (0.3, 1.0)
    emb = DINOEmbedder(**EMB, global_scale=scale, augment_params={"solarize_p": 0.0})
    assert emb.global_scale is scale  # stored unchanged
    twin = clone(emb)
    assert twin is not emb and twin.get_params() == emb.get_params()
    assert twin.set_params(epochs=5, lr=1e-3) is twin
    assert twin.epochs == 5 and twin.lr == 1e-3 and emb.epochs == 2
    with pytest.raises(ValueError):
        twin.set_params(not_a_parameter=1)
    with pytest.raises(TypeError):
        DINOEmbedder(16)  # keyword-only, as scikit-learn asks


def test_embedder_not_fitted(images):
    with pytest.raises(NotFittedError):
        DINOEmbedder(**EMB).transform(images)


def test_embedder_fit_transform(images):
    emb = DINOEmbedder(**EMB)
    assert emb.fit(images) is emb
    feats = emb.transform(images)
    assert feats.shape == (N_IMAGES, 16) and feats.dtype == np.float32
    assert isinstance(emb.model_, dr.DINO)
    assert [h["epoch"] for h in emb.history_] == [1, 2]
    assert emb.embed_dim_ == 16 and emb.image_shape_ == (16, 16, 3) and emb.n_samples_fit_ == N_IMAGES
    assert emb.global_size_ == 16 and emb.local_size_ == 8  # img_size and 96/224 of it, to the patch
    np.testing.assert_array_equal(feats, emb.model_.embed(images))
    assert list(emb.get_feature_names_out()) == [f"dinoembedder{i}" for i in range(16)]
    # deterministic for a seed; another seed trains another model
    np.testing.assert_array_equal(DINOEmbedder(**EMB).fit_transform(images), feats)
    assert np.abs(DINOEmbedder(**{**EMB, "seed": 1}).fit_transform(images) - feats).max() > 1e-4
    # grey images, lists of images
    gray = images[..., 0]
    assert DINOEmbedder(**EMB).fit(gray).transform(gray).shape == (N_IMAGES, 16)
    np.testing.assert_array_equal(emb.transform(list(images[:3])), feats[:3])


def test_embedder_small_dataset_and_bad_input(images):
    emb = DINOEmbedder(**{**EMB, "batch_size": 64}).fit(images[:10])
    assert emb.batch_size_ == 10 and len(emb.history_) == 2
    with pytest.raises(ValueError, match="uint8"):
        DINOEmbedder(**EMB).fit(images.astype(np.float32))
    with pytest.raises(ValueError, match="flattened"):
        DINOEmbedder(**EMB).fit(images[..., 0].reshape(N_IMAGES, -1))
    with pytest.raises(ValueError, match="global_scale"):
        DINOEmbedder(**EMB, global_scale=(0.5,)).fit(images)
    with pytest.raises(ValueError, match="warmup_epochs"):
        DINOEmbedder(**{**EMB, "warmup_epochs": 5}).fit(images)


def test_embedder_in_a_pipeline(images, labels):
    pipe = make_pipeline(DINOEmbedder(**EMB), KNeighborsClassifier(n_neighbors=3))
    pipe.fit(images, labels)
    pred = pipe.predict(images)
    assert pred.shape == (N_IMAGES,) and set(pred) <= {0, 1, 2}
    assert 0.0 <= pipe.score(images, labels) <= 1.0
    clone(pipe).fit(images, labels)


def test_embedder_pickles(images):
    emb = DINOEmbedder(**EMB).fit(images)
    back = pickle.loads(pickle.dumps(emb))
    np.testing.assert_array_equal(back.transform(images), emb.transform(images))
    assert back.history_ == emb.history_
    unfitted = pickle.loads(pickle.dumps(DINOEmbedder(**EMB)))
    assert unfitted.get_params() == DINOEmbedder(**EMB).get_params()


# --------------------------------------------------------------------------------------------------
# Trainer: eval_every, callbacks
# --------------------------------------------------------------------------------------------------
def test_eval_every_adds_knn_on_the_right_epochs(images, labels):
    data = eval_data(images, labels)
    model = tiny()
    t = dr.Trainer(model, make_loader(images), epochs=3, warmup_epochs=1, progress=False, eval_every=2, eval_data=data)
    hist = t.fit(epochs=2)
    assert "knn_top1" not in hist[0] and "knn_top5" not in hist[0]
    expected = dr.knn_accuracy(model.embed(data[0]), data[1], model.embed(data[2]), data[3])
    assert (hist[1]["knn_top1"], hist[1]["knn_top5"]) == expected
    assert 0 <= hist[1]["knn_top1"] <= hist[1]["knn_top5"] <= 100
    assert t.evaluate() == expected
    hist3 = t.fit()
    assert [h["epoch"] for h in hist3] == [3] and "knn_top1" not in hist3[0]
    assert [("knn_top1" in h) for h in t.history] == [False, True, False]


def test_eval_every_one_and_progress_output(images, labels, capfd):
    t = dr.Trainer(tiny(), make_loader(images), epochs=2, warmup_epochs=1, progress=True, eval_every=1,
                   eval_data=eval_data(images, labels))
    hist = t.fit()
    assert all("knn_top1" in h and "knn_top5" in h for h in hist)
    out, err = capfd.readouterr()
    assert (out + err).count("k-NN top-1") == 2


def test_evaluate_takes_normalised_crops_as_they_are(images, labels):
    model = tiny()
    crops = np.random.default_rng(3).normal(size=(len(images), 3, 16, 16)).astype(np.float32)
    data = (crops[:12], labels[:12], crops[12:], labels[12:])
    t = dr.Trainer(model, make_loader(images), epochs=2, warmup_epochs=1, progress=False, eval_every=1, eval_data=data)
    expected = dr.knn_accuracy(model.forward_backbone(crops[:12]), labels[:12], model.forward_backbone(crops[12:]), labels[12:])
    assert t.evaluate() == expected


def test_eval_every_validation(images, labels):
    loader = make_loader(images)
    with pytest.raises(ValueError, match="eval_data"):
        dr.Trainer(tiny(), loader, epochs=2, warmup_epochs=1, eval_every=1)
    with pytest.raises(ValueError, match="eval_every"):
        dr.Trainer(tiny(), loader, epochs=2, warmup_epochs=1, eval_every=-1, eval_data=eval_data(images, labels))
    with pytest.raises(ValueError, match="12 train images but 11 train labels"):
        dr.Trainer(tiny(), loader, epochs=2, warmup_epochs=1, eval_every=1,
                   eval_data=(images[:12], labels[:11], images[12:], labels[12:]))
    with pytest.raises(ValueError, match="tuple"):
        dr.Trainer(tiny(), loader, epochs=2, warmup_epochs=1, eval_every=1, eval_data=(images, labels))
    with pytest.raises(ValueError, match="no eval_data"):
        dr.Trainer(tiny(), loader, epochs=2, warmup_epochs=1).evaluate()


def test_eval_data_stays_out_of_checkpoints(images, labels, tmp_path):
    big = np.random.default_rng(5).integers(0, 256, (400, 16, 16, 3), dtype=np.uint8)  # 300 KiB of pixels
    big_labels = np.arange(400) % 3
    plain, evald = tmp_path / "plain", tmp_path / "eval"
    dr.Trainer(tiny(), make_loader(images), epochs=2, warmup_epochs=1, progress=False,
               checkpoint_dir=plain).fit(epochs=1)
    dr.Trainer(tiny(), make_loader(images), epochs=2, warmup_epochs=1, progress=False, checkpoint_dir=evald,
               eval_every=1, eval_data=(big, big_labels, big[:50], big_labels[:50])).fit(epochs=1)
    size_plain = (plain / "checkpoint.safetensors").stat().st_size
    size_eval = (evald / "checkpoint.safetensors").stat().st_size
    assert abs(size_eval - size_plain) < 200  # only the k-NN numbers and eval_every were added
    # resume: the history keeps its k-NN entries; eval_every comes back with eval_data
    r = dr.Trainer.resume(evald, make_loader(images), progress=False)
    assert r.eval_every == 0 and r.eval_data is None and "knn_top1" in r.history[0]
    r = dr.Trainer.resume(evald, make_loader(images), progress=False, eval_data=eval_data(images, labels))
    assert r.eval_every == 1
    assert "knn_top1" in r.fit()[0]
    r = dr.Trainer.resume(evald, make_loader(images), progress=False, eval_data=eval_data(images, labels),
                          eval_every=0)
    assert r.eval_every == 0


def test_callbacks_get_every_step(images):
    a, b, order = [], [], []
    t = dr.Trainer(tiny(), make_loader(images), epochs=2, warmup_epochs=1, progress=False,
                   callbacks=[a.append, lambda s: order.append("trainer")])
    hist = t.fit(callback=lambda s: (b.append(s), order.append("fit")))
    assert [s["iteration"] for s in a] == list(range(2 * NITER))
    assert [s["iteration"] for s in b] == list(range(2 * NITER))
    assert order == ["trainer", "fit"] * (2 * NITER)
    for epoch, h in enumerate(hist):
        losses = [s["loss"] for s in a if s["epoch"] == epoch]
        assert len(losses) == NITER and all(math.isfinite(v) for v in losses)
        assert h["loss"] == pytest.approx(np.mean(losses), rel=1e-12)


def test_callback_return_value_does_not_stop_training(images):
    calls = []

    def stop_please(stats):
        calls.append(stats["iteration"])
        return True

    t = dr.Trainer(tiny(), make_loader(images), epochs=2, warmup_epochs=1, progress=False, callbacks=(stop_please,))
    t.fit()
    assert calls == list(range(2 * NITER)) and t.epoch == 2


def test_callback_exception_propagates_and_trainer_stays_usable(images):
    seen = []

    def boom(stats):
        seen.append(stats["iteration"])
        if len(seen) == 4:
            raise RuntimeError("stop here")

    t = dr.Trainer(tiny(), make_loader(images), epochs=2, warmup_epochs=1, progress=False, callbacks=[boom])
    with pytest.raises(RuntimeError, match="stop here"):
        t.fit()
    assert t.iteration == 4  # the step the callback saw is kept
    assert [h["epoch"] for h in t.history] == [1]  # the unfinished epoch is not
    t.callbacks = ()
    rest = t.fit()
    assert [h["epoch"] for h in rest] == [2] and t.iteration == 2 * NITER
    with pytest.raises(ValueError, match="callable"):
        dr.Trainer(tiny(), make_loader(images), epochs=2, warmup_epochs=1, callbacks=[3])


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
CLI_TINY = ["--patch_size", "4", "--global_size", "16", "--local_size", "8", "--local_crops_number", "2",
            "--embed_dim", "16", "--depth", "1", "--num_heads", "2", "--out_dim", "32", "--hidden_dim", "32",
            "--bottleneck_dim", "8", "--batch_size_per_gpu", "4", "--epochs", "2", "--warmup_epochs", "1",
            "--saveckp_freq", "1", "--device", "cpu", "--no_progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """root/{cat,dog}/*.png: 2 classes x 4 small RGB images."""
    root = tmp_path_factory.mktemp("cli") / "images"
    rng = np.random.default_rng(1)
    for cls in ("dog", "cat"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dino_rs", *args], capture_output=True, text=True, timeout=300)


def test_cli_train_dtype_reaches_the_checkpoint(folder, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(folder), "--output_dir", str(out), "--dtype", "bfloat16", *CLI_TINY]) == 0
    _, meta = read_safetensors(out / "checkpoint.safetensors")
    assert json.loads(meta["dino_rs"])["dtype"] == "bfloat16"
    rust, model, _ = dr._dino_rs._Trainer.load(out / "checkpoint.safetensors", device="cpu")
    assert rust.dtype == model.dtype == "bfloat16"


def test_cli_train_writes_checkpoints_model_and_log(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(folder), "--output_dir", str(out), "--use_fp16", "true", *CLI_TINY]) == 0
    captured = capsys.readouterr()
    assert "--use_fp16 is ignored" in captured.err
    assert sorted(os.listdir(out)) == ["checkpoint.safetensors", "checkpoint0001.safetensors",
                                       "checkpoint0002.safetensors", "log.txt", "model.safetensors"]
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2]
    # The collapse measures reach the log, as the rest of the history does.
    assert all({"teacher_entropy", "teacher_student_kl", "teacher_max_prob"} <= set(e) for e in log)
    model = dr.DINO.load(out / "model.safetensors", device="cpu")
    assert (model.embed_dim, model.depth, model.num_heads, model.patch_size, model.img_size, model.out_dim) == \
        (16, 1, 2, 4, 16, 32)
    trainer = dr.Trainer.resume(out, dr.MultiCropLoader(dr.ImageFolder(folder), dr.MultiCropAugmenter(
        global_size=16, local_size=8, n_local=2), batch_size=4), progress=False)
    assert trainer.epoch == 2 and trainer.config["batch_size"] == 4 and trainer.config["n_local"] == 2


def test_cli_second_run_resumes(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data_path", str(folder), "--output_dir", str(out), *CLI_TINY]) == 0
    final = dr.DINO.load(out / "model.safetensors", device="cpu").embed(dr.ImageFolder(folder))
    first_log = (out / "log.txt").read_text().splitlines()
    # pretend the run stopped after epoch 1
    shutil.copy(out / "checkpoint0001.safetensors", out / "checkpoint.safetensors")
    (out / "model.safetensors").unlink()
    (out / "checkpoint0002.safetensors").unlink()
    epoch1 = (out / "checkpoint0001.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["train", "--data", str(folder), "--output_dir", str(out), *CLI_TINY]) == 0
    stdout = capsys.readouterr().out
    assert "resuming from" in stdout and "at epoch 1/2" in stdout
    assert (out / "checkpoint0001.safetensors").stat().st_mtime_ns == epoch1  # epoch 1 was not trained again
    log = (out / "log.txt").read_text().splitlines()
    assert json.loads(log[0]) == json.loads(first_log[0])  # epoch 1's entry comes from the checkpoint, timings included
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]
    resumed = dr.DINO.load(out / "model.safetensors", device="cpu").embed(dr.ImageFolder(folder))
    np.testing.assert_allclose(resumed, final, rtol=0, atol=1e-5)
    # a finished run is not trained again
    capsys.readouterr()
    assert cli.main(["train", "--data", str(folder), "--output_dir", str(out), *CLI_TINY]) == 0
    assert "at epoch 2/2" in capsys.readouterr().out
    assert len((out / "log.txt").read_text().splitlines()) == 2


def test_cli_embed(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(folder), "--output_dir", str(out), *CLI_TINY]) == 0
    model = dr.DINO.load(out / "model.safetensors", device="cpu")
    expected = model.embed(dr.ImageFolder(folder))
    model.export_backbone(tmp_path / "backbone.safetensors")
    for i, ckpt in enumerate([out, out / "model.safetensors", out / "checkpoint.safetensors",
                              tmp_path / "backbone.safetensors"]):
        feats_path = tmp_path / f"feats{i}.npy"
        assert cli.main(["embed", "--checkpoint", str(ckpt), "--data", str(folder), "--output", str(feats_path),
                         "--batch_size", "3", "--device", "cpu"]) == 0
        feats = np.load(feats_path)
        assert feats.shape == (8, 16) and feats.dtype == np.float32
        np.testing.assert_allclose(feats, expected, rtol=0, atol=1e-6)
        meta = json.loads(feats_path.with_suffix(".json").read_text())
        assert meta["classes"] == ["cat", "dog"] and meta["labels"] == [0, 0, 0, 0, 1, 1, 1, 1]
        assert [Path(p).name for p in meta["paths"]] == ["0.png", "1.png", "2.png", "3.png"] * 2
        assert meta["shape"] == [8, 16]
    # mixed precision: within bf16's precision of the float32 features, and not identical to them
    for i, ckpt in enumerate([out, tmp_path / "backbone.safetensors"]):
        bf16_path = tmp_path / f"bf16_{i}.npy"
        assert cli.main(["embed", "--checkpoint", str(ckpt), "--data", str(folder), "--output", str(bf16_path),
                         "--device", "cpu", "--dtype", "bfloat16"]) == 0
        gap = np.abs(np.load(bf16_path) - expected).max() / np.abs(expected).max()
        assert 0 < gap < 1e-2, gap
    # a name without .npy is kept as given
    assert cli.main(["embed", "--checkpoint", str(out), "--data", str(folder), "--output",
                     str(tmp_path / "sub" / "feats.bin")]) == 0
    assert np.load(tmp_path / "sub" / "feats.bin").shape == (8, 16)
    assert (tmp_path / "sub" / "feats.json").is_file()


def test_cli_bad_data_folder(tmp_path):
    missing = tmp_path / "no_such_folder"
    for cmd in (["train", "--data", str(missing), "--output_dir", str(tmp_path / "o")],
                ["embed", "--checkpoint", str(tmp_path), "--data", str(missing)]):
        result = run_cli(*cmd)
        assert result.returncode == 2, result
        assert "dino-rs: error:" in result.stderr and str(missing) in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_cli_bad_checkpoint(folder, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a checkpoint")
    for ckpt in (junk, tmp_path / "missing.safetensors", tmp_path):
        result = run_cli("embed", "--checkpoint", str(ckpt), "--data", str(folder), "--output", str(tmp_path / "f.npy"))
        assert result.returncode == 2, result
        assert "dino-rs: error:" in result.stderr and "Traceback" not in result.stderr
    assert str(junk) in run_cli("embed", "--checkpoint", str(junk), "--data", str(folder)).stderr
    # a corrupt checkpoint in --output_dir stops train the same way
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(junk, out / "checkpoint.safetensors")
    result = run_cli("train", "--data", str(folder), "--output_dir", str(out), *CLI_TINY)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(out / "checkpoint.safetensors") in result.stderr


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--use_bn_in_head", "true"], "use_bn_in_head"),
        (["--optimizer", "sgd"], "adamw"),
        (["--batch_size_per_gpu", "64"], "fewer than one batch"),
        (["--arch", "vit_huge"], "invalid choice"),
        (["--norm_last_layer", "maybe"], "boolean"),
    ],
)
def test_cli_train_rejects_unsupported_flags(folder, tmp_path, flags, needle):
    result = run_cli("train", "--data", str(folder), "--output_dir", str(tmp_path / "o"), *CLI_TINY, *flags)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_cli_keeps_the_demo_command():
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "--output", "x.png", "--seed", "3"])
    assert args.run is cli.run_demo and args.output == "x.png" and args.seed == 3 and args.images is None
    from dino_rs.__main__ import main

    assert main is cli.main
    assert cli.bool_flag("on") is True and cli.bool_flag("0") is False


def test_embed_progress_bar(images, capfd):
    model = tiny()
    quiet = model.embed(images, batch_size=4, progress=False)
    assert "embed" not in capfd.readouterr().err
    shown = model.embed(images, batch_size=4, progress=True)
    err = capfd.readouterr().err
    assert "embed:" in err and f"/{len(images)}" in err  # tqdm bar over the images (cleared at the end)
    np.testing.assert_array_equal(quiet, shown)


def test_cli_train_recipe_small_takes_the_recipe_and_explicit_flags_win(folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(folder), "--output_dir", str(out), "--recipe", "small", "--img_size", "16",
            "--epochs", "1", "--batch_size_per_gpu", "4", "--device", "cpu", "--no_progress"]
    assert cli.main(args) == 0
    model = dr.DINO.load(out / "model.safetensors", device="cpu")
    r = dr.recipes.small_data(len(dr.ImageFolder(folder)), 16)
    cfg = model.config
    assert (model.embed_dim, model.depth, model.patch_size, model.img_size, model.out_dim) == (
        r["model"]["embed_dim"], r["model"]["depth"], r["model"]["patch_size"], 16, r["model"]["out_dim"])
    assert cfg["vit"]["init"] == "torch" and cfg["vit"]["drop_path_rate"] == 0.0
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 1  # --epochs 1 given explicitly, not the recipe's
    assert log[0]["teacher_temp"] == pytest.approx(r["trainer"]["teacher_temp"])


def test_recipes_small_data_scales_with_the_data():
    r = dr.recipes.small_data(5000, 28)
    assert r["model"]["patch_size"] == 7 and r["augmenter"] == dict(global_size=28, local_size=14, n_local=4)
    assert r["trainer"]["epochs"] == 72 and r["fit"] == dict(epochs=40) and r["model"]["init"] == "torch"
    assert r["trainer"]["sinkhorn_iterations"] == 3 and r["model"]["out_dim"] == 1024
    assert r["trainer"]["koleo_weight"] == 0.03
    # The step budget scales inversely with the images, the short run stays 5/9 of the schedule.
    big = dr.recipes.small_data(50_000, 28)
    assert (big["trainer"]["epochs"], big["fit"]["epochs"]) == (7, 4)
    small = dr.recipes.small_data(1000, 28)
    assert (small["trainer"]["epochs"], small["fit"]["epochs"]) == (200, 111)
    assert dr.recipes.small_data(10**7, 28)["fit"]["epochs"] == 2
    assert dr.recipes.small_data(10, 64)["loader"]["batch_size"] == 10
    for bad in ((0, 28), (100, 4), (1.5, 28)):
        with pytest.raises(ValueError):
            dr.recipes.small_data(*bad)
    # Every section is accepted by the class it is for.
    m = dr.DINO(**dict(r["model"], device="cpu"))
    aug = dr.MultiCropAugmenter(**r["augmenter"])
    loader = dr.MultiCropLoader(np.zeros((8, 28, 28, 3), np.uint8), aug, **dict(r["loader"], batch_size=4))
    trainer = dr.Trainer(m, loader, **r["trainer"], progress=False)
    assert set(r) == {"model", "augmenter", "loader", "trainer", "fit"}
    inspect.signature(trainer.fit).bind(**r["fit"])
