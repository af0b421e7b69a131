"""Sinkhorn-Knopp centering (``sinkhorn_iterations``): DINOv2's targets, checked against the official
code's output (tests/fixtures/make_sinkhorn_fixture.py), through the loss and the Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import dino_rs as dr
from helpers import make_loader, tiny

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "sinkhorn" / "sinkhorn_knopp.json"
CASES = json.loads(FIXTURE.read_text())["cases"]


def dino_loss(targets: np.ndarray, student: np.ndarray, ncrops: int, student_temp: float = 0.1) -> float:
    """DINO's loss for given teacher targets (2·B, K): the mean over (teacher view, other student
    view) pairs of the batch-mean cross-entropy, in float64."""
    b = targets.shape[0] // 2
    z = student / student_temp
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    terms = [-(targets[t * b:(t + 1) * b] * log_p[v * b:(v + 1) * b]).sum(1).mean()
             for t in range(2) for v in range(ncrops) if v != t]
    return float(np.mean(terms))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_targets_are_dinov2s(case):
    teacher = np.array(case["teacher_out"], np.float32)
    student = np.array(case["student_out"], np.float32)
    want = np.array(case["targets"])
    # The reference's targets are assignments: every row sums to 1.
    np.testing.assert_allclose(want.sum(1), 1.0, atol=1e-5)
    temp = case["teacher_temp"]
    loss = dr.DINOLoss(want.shape[1], case["ncrops"], warmup_teacher_temp=temp, teacher_temp=temp,
                       sinkhorn_iterations=case["iterations"])
    got = loss(student, teacher, 0)
    expected = dino_loss(want, student.astype(np.float64), case["ncrops"])
    assert got == pytest.approx(expected, rel=2e-6, abs=2e-6)
    # The centre is DINO's, not used here: it stays zero.
    assert not loss.center.any()
    # Centering gives other targets: the comparison above can tell the two apart.
    centred = dr.DINOLoss(want.shape[1], case["ncrops"], warmup_teacher_temp=temp, teacher_temp=temp)
    assert abs(centred(student, teacher, 0) - expected) > 1e-3


def test_sharp_temperatures_stay_finite():
    # logits near 1 at the small-data recipe's 0.01: exp(t / τ) overflows float32 in the reference's
    # formula; dino_rs's targets come from the same ratios shifted by their maximum.
    rng = np.random.default_rng(1)
    teacher = rng.uniform(-1, 1, (8, 32)).astype(np.float32)
    student = rng.standard_normal((16, 32)).astype(np.float32)
    loss = dr.DINOLoss(32, 4, warmup_teacher_temp=0.01, teacher_temp=0.01, sinkhorn_iterations=3)
    assert np.isfinite(loss(student, teacher, 0))
    # A prototype no sample comes near (its exp underflows even in float64) gets no weight.
    teacher[:, 0] = -1e4
    assert np.isfinite(loss(student, teacher, 0))


def test_trainer_with_sinkhorn_knopp():
    images = np.random.default_rng(0).integers(0, 255, (16, 16, 16, 3), dtype=np.uint8)
    trainer = dr.Trainer(tiny(), make_loader(images), epochs=2, sinkhorn_iterations=3, progress=False)
    assert trainer.config["sinkhorn_iterations"] == 3
    history = trainer.fit()
    assert len(history) == 2
    for h in history:
        assert np.isfinite(h["loss"])
        # Sinkhorn-Knopp spreads the targets: their entropy is within [0, ln K].
        assert 0.0 <= h["teacher_entropy"] <= np.log(32) + 1e-4


@pytest.mark.parametrize("bad", [-1, 1001, 2.5])
def test_bad_iterations_are_named(bad):
    with pytest.raises(ValueError, match="sinkhorn_iterations"):
        dr.TrainConfig(sinkhorn_iterations=bad)


def test_the_loss_takes_the_same_bound():
    # The standalone loss too: a huge count would stall every call, not fail.
    with pytest.raises(ValueError, match="sinkhorn_iterations must be at most 1000, got 1001"):
        dr.DINOLoss(16, 4, sinkhorn_iterations=1001)
