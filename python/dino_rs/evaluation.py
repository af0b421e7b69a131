"""Evaluating learned features: DINO's weighted k-NN classifier (``eval_knn.py``) and a linear probe
(scikit-learn logistic regression)."""

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


def _require_sklearn(what: str):
    try:
        import sklearn  # noqa: F401
    except ImportError as e:  # scikit-learn is an optional dependency
        raise ImportError(f'{what} needs scikit-learn: pip install "dino-rs[notebook]"') from e


def _features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_samples, n_features), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    C: float = 1.0,
    max_iter: int = 1000,
    normalize: str = "standardize",
) -> float:
    """Top-1 accuracy (percent) of a logistic-regression probe trained on frozen features.

    A multinomial :class:`sklearn.linear_model.LogisticRegression` (L2 penalty, lbfgs) is fitted
    on the training features and scored on the test features: the usual "linear evaluation" of
    self-supervised features, done with scikit-learn instead of DINO's SGD-trained linear layer.

    Parameters
    ----------
    train_features, test_features : array_like, shape (n_samples, n_features)
        Features, e.g. from :meth:`dino_rs.DINO.embed`. Both must have the same number of columns.
    train_labels, test_labels : array_like of int, shape (n_samples,)
        Class labels (any integers; classes only seen in the test set count as errors).
    C : float, default 1.0
        Inverse regularisation strength of the logistic regression.
    max_iter : int, default 1000
        Iteration limit of the lbfgs solver (a ConvergenceWarning is left to scikit-learn).
    normalize : {"standardize", "l2", "none"}, default "standardize"
        How the features are scaled before the fit. ``"standardize"`` (default): each feature
        is centred and divided by its standard deviation, both measured on the *training*
        features (scikit-learn's StandardScaler; this keeps lbfgs well conditioned and makes
        ``C`` comparable across models). ``"l2"``: every sample is scaled to unit L2 norm, as
        for :func:`knn_accuracy`. ``"none"``: the features as given.

    Returns
    -------
    float
        Top-1 accuracy on the test set, in percent.

    Raises
    ------
    ValueError
        Shapes or lengths that do not fit together, non-finite features, fewer than two
        classes in the training labels, or a bad ``C``/``max_iter``/``normalize``.
    ImportError
        scikit-learn is not installed (``pip install "dino-rs[notebook]"``).

    Examples
    --------
    >>> top1 = dr.linear_probe(model.embed(x_train), y_train, model.embed(x_test), y_test)
    """
    train = _features(train_features, "train_features")
    test = _features(test_features, "test_features")
    ytr = np.asarray(train_labels).ravel()
    yte = np.asarray(test_labels).ravel()
    if len(train) != len(ytr):
        raise ValueError(f"train_features has {len(train)} rows but train_labels has {len(ytr)} entries")
    if len(test) != len(yte):
        raise ValueError(f"test_features has {len(test)} rows but test_labels has {len(yte)} entries")
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"train_features has {train.shape[1]} features per sample but test_features has {test.shape[1]}"
        )
    if len(test) == 0:
        raise ValueError("linear_probe needs at least one test sample")
    if len(np.unique(ytr)) < 2:
        raise ValueError(f"train_labels must hold at least two classes, got {np.unique(ytr).tolist()}")
    if not (np.isfinite(C) and C > 0):
        raise ValueError(f"C must be a positive number, got {C}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if normalize not in ("standardize", "l2", "none"):
        raise ValueError(f"normalize must be 'standardize', 'l2' or 'none', got {normalize!r}")
    _require_sklearn("linear_probe")
    from sklearn.linear_model import LogisticRegression

    if normalize == "standardize":
        mean = train.mean(axis=0)
        std = train.std(axis=0)
        std[std < 1e-12] = 1.0
        train, test = (train - mean) / std, (test - mean) / std
    elif normalize == "l2":
        train = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
        test = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(train, ytr)
    return 100.0 * float(np.mean(clf.predict(test) == yte))
