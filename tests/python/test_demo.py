"""The README's main job: ``python -m dino_rs demo`` on the bundled Fashion-MNIST subset or a folder."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import dino_rs as dr
from dino_rs import train_demo


def test_bundled_data_is_the_fashion_mnist_subset():
    x, y, xt, yt = train_demo.demo_data()
    assert x.shape == (5000, 28, 28) and xt.shape == (1000, 28, 28)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    assert sorted(np.unique(y)) == list(range(10)) and sorted(np.unique(yt)) == list(range(10))
    # a real dataset, not noise: classes differ in mean brightness (trousers are thin, bags wide)
    means = [x[y == c].mean() for c in range(10)]
    assert max(means) - min(means) > 20


def test_demo_reports_knn_and_writes_attention_png(tmp_path):
    out = tmp_path / "att.png"
    proc = subprocess.run(
        [sys.executable, "-m", "dino_rs", "demo", "--epochs", "1", "--no_progress", "--output", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "raw pixels 79.4%" in text  # k-NN of the bundled pixels: fixed data, fixed protocol
    assert "DINO teacher at init" in text and "after 1 epoch " in text
    # The linear probe follows the k-NN and timing lines, for the same three.
    lines = text.strip().splitlines()
    k = next(i for i, line in enumerate(lines) if line.startswith("k-NN top-1 ("))
    assert lines[k + 1].startswith("training took ") and lines[k + 2].startswith("linear probe top-1 (")
    assert "raw pixels" in lines[k + 2] and "after 1 epoch " in lines[k + 2]
    img = np.asarray(Image.open(out))
    # six images, each with the picture plus one heat map per head (4 heads)
    assert img.ndim == 3 and img.shape[0] > 6 * 100 and img.shape[1] > 5 * 100


def test_demo_on_a_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, value in (("dark", 40), ("bright", 210)):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(10):
            a = np.clip(rng.normal(value, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(tmp_path / "data" / c / f"{i}.png")
    result = train_demo.run_training(
        tmp_path / "att.png", data=tmp_path / "data", epochs=1, progress=False, img_size=16,
        recipe=dict(loader=dict(batch_size=8),
                    model=dict(embed_dim=16, depth=1, num_heads=2, out_dim=32, hidden_dim=32, bottleneck_dim=8)),
    )
    # 20% of each class held out: 4 test images; the classes differ in brightness only
    assert set(result) >= {"init", "trained", "history", "seconds"} and "raw" not in result
    assert len(result["history"]) == 1
    assert (tmp_path / "att.png").stat().st_size > 0


def test_demo_bad_folder_is_a_clean_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dino_rs", "demo", "--data", str(tmp_path / "missing"), "--no_progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "missing" in proc.stderr and "Traceback" not in proc.stderr


def test_views_mode_keeps_the_multicrop_grid(tmp_path):
    out = tmp_path / "views.png"
    proc = subprocess.run([sys.executable, "-m", "dino_rs", "demo", "--views", "--output", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size[0] > 224
