"""Learning on real data (the README's main job, in full): DINO with the small-data recipe on the
bundled 5,000 Fashion-MNIST images, 40 epochs of its 72-epoch schedule on the CPU (about 5 minutes
on 2 cores), must give teacher features whose k-NN accuracy and linear probe clearly beat the same
network at initialisation, with a loss far from the collapsed ln(out_dim)."""

from __future__ import annotations

import math

import numpy as np

from dino_rs import train_demo


def test_dino_learns_fashion_mnist(tmp_path):
    result = train_demo.run_training(tmp_path / "att.png", progress=False)
    init, trained = result["init"], result["trained"]
    losses = [h["loss"] for h in result["history"]]
    curve = [h["knn_top1"] for h in result["history"] if "knn_top1" in h]
    print(f"k-NN init {init:.1f}% -> trained {trained:.1f}% (curve {curve}); losses {np.round(losses, 3)}")
    # The small-data recipe (dino_rs.recipes.small_data), measured on the CI machine kind (2 cores,
    # AVX2; benches/recipe_search K2): 62.0% -> 81.7% (70.9, 75.7, 76.4, 76.7, 78.7, 78.9, 80.3,
    # 80.4, 80.6, 81.7 every 4 epochs), probe 65.9% -> 81.7%; raw pixels 79.4% / 80.6%. The
    # official recipe's initialisation gave 59.1% -> 65.3%. The margins leave room for other
    # seeds and other CPUs' rounding.
    assert trained >= init + 12.0, (init, trained, curve)
    assert result["probe_trained"] >= result["probe_init"] + 10.0, result
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    # Not the uniform-output collapse: the teacher's targets well below ln K's entropy (6.93).
    entropy = result["history"][-1]["teacher_entropy"]
    assert entropy < math.log(1024) - 1.0, (entropy, losses)
    assert (tmp_path / "att.png").stat().st_size > 0
