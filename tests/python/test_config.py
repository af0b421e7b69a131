"""One source for the training recipe's defaults: the Rust core's TrainConfig (src/train.rs), which
dino_rs.TrainConfig, Trainer, DINOEmbedder and `dino-rs train` all take theirs from; and defaults
that work whatever the other options are."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

import dino_rs as dr
from dino_rs import cli
from dino_rs._dino_rs import _train_config
from dino_rs.config import DEFAULTS, FIELDS
from dino_rs.sklearn import DINOEmbedder

from helpers import make_loader, tiny

# The official main_dino.py defaults, written out once here as the reference the core must hold.
OFFICIAL = dict(epochs=100, lr=5e-4, min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,
                momentum_teacher=0.996, teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0,
                student_temp=0.1, center_momentum=0.9, sinkhorn_iterations=0, koleo_weight=0.0, clip_grad=3.0,
                freeze_last_layer=1)


def expected_default(name: str):
    # An unset warm-up is resolved against epochs, so its default is "unset".
    return None if name == "warmup_epochs" else OFFICIAL[name]


def test_the_core_holds_the_official_recipe():
    assert _train_config({}) == OFFICIAL
    assert FIELDS == tuple(OFFICIAL)
    assert DEFAULTS.resolved() == OFFICIAL
    assert {f: getattr(DEFAULTS, f) for f in FIELDS} == {f: expected_default(f) for f in FIELDS}


@pytest.mark.parametrize("owner", ["Trainer", "DINOEmbedder"])
def test_trainer_and_embedder_take_every_option_with_the_core_default(owner):
    params = inspect.signature({"Trainer": dr.Trainer, "DINOEmbedder": DINOEmbedder}[owner]).parameters
    for name in FIELDS:
        assert name in params, f"{owner} lacks {name}"
        assert params[name].default == expected_default(name), (owner, name, params[name].default)


def test_the_cli_takes_every_option_with_the_core_default():
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--data_path", "images"])
    for name in FIELDS:
        assert getattr(args, name) == expected_default(name), name
    help_text = next(a for a in parser._subparsers._group_actions[0].choices.values()
                     if a.prog.endswith("train")).format_help()
    help_text = " ".join(help_text.split())  # argparse wraps its lines
    assert "(default 0.996)" in help_text and "(default 10, or --epochs when fewer)" in help_text


def test_the_embedder_has_the_trainer_options():
    # The drift issue 19 found: DINOEmbedder had no dtype.
    trainer = set(inspect.signature(dr.Trainer).parameters)
    embedder = set(inspect.signature(DINOEmbedder).parameters)
    assert set(FIELDS) | {"dtype"} <= trainer & embedder


def test_readme_names_the_defaults_where_they_live():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "dr.TrainConfig()" in readme
    # Any recipe default the README spells out is the core's.
    for name, value in re.findall(r"\b(momentum_teacher|teacher_temp|lr|weight_decay)=([0-9.e-]+)", readme):
        assert float(value) == OFFICIAL[name], (name, value)


@pytest.mark.parametrize("epochs", [1, 3, 9, 10, 11])
def test_an_unset_warmup_fits_any_epochs(epochs):
    config = dr.TrainConfig(epochs=epochs)
    assert config.resolved()["warmup_epochs"] == min(10, epochs)
    trainer = dr.Trainer(tiny(), make_loader(np.zeros((8, 16, 16, 3), np.uint8)), epochs=epochs, progress=False)
    assert trainer.config["warmup_epochs"] == min(10, epochs)


def test_a_warmup_set_too_long_is_an_error():
    with pytest.raises(ValueError, match=r"warmup_epochs \(5\) must not exceed epochs \(3\)"):
        dr.TrainConfig(epochs=3, warmup_epochs=5)
    with pytest.raises(ValueError, match="warmup_epochs"):
        dr.Trainer(tiny(), make_loader(np.zeros((8, 16, 16, 3), np.uint8)), epochs=3, warmup_epochs=5)


@pytest.mark.parametrize("bad,message", [
    (dict(epochs=0), "epochs must be at least 1"),
    (dict(epochs=2.5), "epochs must be a whole number"),
    (dict(freeze_last_layer=-1), "freeze_last_layer must be >= 0"),
    (dict(lr=True), "lr must be a number, got bool"),
    (dict(lr="0.1"), "lr must be a number, got str"),
    (dict(student_temp=float("nan")), "temperatures"),
    (dict(momentum_teacher=1.5), "momentum_teacher"),
])
def test_bad_values_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        dr.TrainConfig(**bad)


def test_no_clipping_is_infinite_clip_grad():
    assert dr.TrainConfig(clip_grad=float("inf")).resolved()["clip_grad"] == float("inf")


def test_an_embedder_of_one_epoch_fits_in_a_pipeline():
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 16, 16), dtype=np.uint8)
    y = np.arange(12) % 2
    emb = DINOEmbedder(patch_size=4, img_size=16, embed_dim=16, depth=1, num_heads=2, out_dim=32, hidden_dim=32,
                       bottleneck_dim=8, global_size=16, local_size=8, n_local=2, batch_size=4, epochs=1,
                       device="cpu")
    clf = make_pipeline(emb, KNeighborsClassifier(n_neighbors=3)).fit(x, y)
    assert clf.predict(x).shape == (12,)
    assert emb.history_ and len(emb.history_) == 1


def test_cli_train_with_a_few_epochs_and_the_default_warmup(tmp_path):
    from PIL import Image

    root = tmp_path / "images" / "all"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
    args = ["train", "--data", str(root.parent), "--output_dir", str(tmp_path / "run"), "--patch_size", "4",
            "--global_size", "16", "--local_size", "8", "--local_crops_number", "2", "--embed_dim", "16",
            "--depth", "1", "--num_heads", "2", "--out_dim", "32", "--hidden_dim", "32", "--bottleneck_dim", "8",
            "--batch_size_per_gpu", "4", "--epochs", "3", "--device", "cpu", "--no_progress"]
    assert cli.main(args) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
