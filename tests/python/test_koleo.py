"""DINOv2's KoLeo regulariser (``koleo_weight``) through the Trainer, the config and the CLI. Its
value and gradient are checked against the official code in src/loss.rs's unit tests (fixture from
tests/fixtures/make_koleo_fixture.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import dino_rs as dr
from dino_rs.cli import build_parser
from helpers import make_loader, tiny


def step_losses(koleo_weight: float, images: np.ndarray) -> list:
    losses: list = []
    trainer = dr.Trainer(tiny(seed=3), make_loader(images, seed=3), epochs=2, koleo_weight=koleo_weight,
                         progress=False, callbacks=[lambda s: losses.append(s["loss"])])
    trainer.fit(1)
    return losses


def test_koleo_changes_the_updates_not_the_reported_loss():
    images = np.random.default_rng(0).integers(0, 255, (24, 16, 16, 3), dtype=np.uint8)
    off, on = step_losses(0.0, images), step_losses(1.0, images)
    assert len(off) == len(on) == 3 and all(map(math.isfinite, on))
    # The first step's loss is computed before any update: DINO's loss alone in both runs.
    assert on[0] == off[0]
    # After it, the KoLeo gradient has moved the student elsewhere.
    assert on[1:] != off[1:]
    # Same weight, same run: deterministic.
    assert step_losses(1.0, images) == on


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_weights_are_named(bad):
    with pytest.raises(ValueError, match="koleo_weight"):
        dr.TrainConfig(koleo_weight=bad)


def test_koleo_needs_two_images_per_batch():
    images = np.random.default_rng(1).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="koleo_weight needs batches of at least 2 images"):
        dr.Trainer(tiny(), make_loader(images, batch_size=1), epochs=1, koleo_weight=0.1, progress=False)
    # Without KoLeo a batch of one stays valid.
    dr.Trainer(tiny(), make_loader(images, batch_size=1), epochs=1, progress=False)


def test_koleo_option_everywhere_the_recipe_is():
    assert dr.TrainConfig().koleo_weight == 0.0  # DINO's recipe has no KoLeo term
    args = build_parser().parse_args(["train", "--data_path", "x", "--koleo_weight", "0.1"])
    assert args.koleo_weight == 0.1
    from dino_rs.sklearn import DINOEmbedder

    assert DINOEmbedder(koleo_weight=0.1).get_params()["koleo_weight"] == 0.1
