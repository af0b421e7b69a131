"""Learning on real data (the README's main job, in full): DINO on the bundled 5,000 Fashion-MNIST
images for 24 epochs on the CPU (a few minutes on 2 cores) must give teacher features whose k-NN
accuracy clearly beats the same network at initialisation, with a loss far from the collapsed
ln(out_dim)."""

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
    # Measured on the CI machine kind (2 cores): 59.1% -> 65.3% (57.7, 59.4, 63.1, 65.0, 65.7, 65.3 every
    # 4 epochs) in 125 s; raw pixels 79.4%. (gemm's AVX-512 kernels and the fused ops add in other
    # orders than before: earlier trees gave 65.3% in 149 s and 66.3% in 232 s.)
    assert trained >= init + 3.0, (init, trained, curve)
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < math.log(256) - 2.0, losses  # not the uniform-output collapse (5.55)
    assert (tmp_path / "att.png").stat().st_size > 0
