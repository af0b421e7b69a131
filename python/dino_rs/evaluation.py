"""Evaluating learned features: DINO's weighted k-NN classifier (``eval_knn.py``)."""

from __future__ import annotations

from typing import Tuple

import numpy as np


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> Tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of DINO's weighted k-NN protocol.

    Features are L2-normalised; each test sample takes its ``k`` most cosine-similar training
    samples, weights each by ``exp(similarity / temperature)`` and predicts the class with the
    largest summed weight (ties broken towards the lower class index).
    """
    train_labels = np.asarray(train_labels).astype(np.int64).ravel()
    test_labels = np.asarray(test_labels).astype(np.int64).ravel()
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError(
            f"features and labels differ in length: train {len(train_features)} vs {len(train_labels)}, "
            f"test {len(test_features)} vs {len(test_labels)}"
        )
    if len(train_labels) == 0 or len(test_labels) == 0:
        raise ValueError("knn_accuracy needs at least one training and one test sample")
    if train_labels.min() < 0 or test_labels.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, len(train_labels))
    train = _normalize(train_features)
    test = _normalize(test_features)
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    top1 = top5 = 0
    for start in range(0, len(test), batch_size):
        sim = test[start : start + batch_size] @ train.T
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sim, idx, axis=1) / temperature)
        votes = np.zeros((len(sim), n_classes))
        np.add.at(votes, (np.arange(len(sim))[:, None], train_labels[idx]), weights)
        ranked = np.argsort(-votes, axis=1, kind="stable")
        truth = test_labels[start : start + batch_size, None]
        top1 += int((ranked[:, :1] == truth).any(axis=1).sum())
        top5 += int((ranked[:, : min(5, k, n_classes)] == truth).any(axis=1).sum())
    n = len(test_labels)
    return 100.0 * top1 / n, 100.0 * top5 / n
