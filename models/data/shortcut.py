"""The shortcut gate of the benchmark (bench/PROTOCOL.md): can five global block features alone tell
tumour from normal? If a logistic regression on them separates the classes much better than
chance, a network can learn that shortcut instead of morphology, and it fails out of domain for the
wrong reason. Pure numpy: features, a class-balanced sample, cross-validated logistic regression.
"""

from __future__ import annotations

import numpy as np

FEATURES = ("mean_r", "mean_g", "mean_b", "hf_energy", "grey_std")
GATE_ACCURACY = 0.60  # at most this (chance is 0.5) for the benchmark to pass


def hf_energy(grey: np.ndarray) -> float:
    """Mean squared discrete Laplacian of a grey image in [0, 1]: how much fine detail it has."""
    lap = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float(np.mean(lap**2))


def block_features(rgb: np.ndarray) -> np.ndarray:
    """(5,) features of one RGB uint8 block: mean R, G, B, high-frequency energy, grey std."""
    x = rgb.astype(np.float32) / 255.0
    grey = x.mean(axis=2)
    means = x.reshape(-1, 3).mean(axis=0)
    return np.array([*means, hf_energy(grey), float(grey.std())], dtype=np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 500, lr: float = 0.5, l2: float = 1e-3) -> np.ndarray:
    """Weights (with bias last) of an L2-regularised logistic regression by gradient descent."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(xb @ w)))
        w -= lr * (xb.T @ (p - y) / len(y) + l2 * np.r_[w[:-1], 0.0])
    return w


def cv_accuracy(
    x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, groups: np.ndarray | None = None
) -> tuple[float, float]:
    """(mean, std) accuracy of the logistic regression over ``folds`` random folds, or, with
    ``groups``, leaving one group (slide) out at a time (features standardised on each training part).

    Blocks of one slide share its layout and its shift field, so random folds let a classifier learn
    that slide's chance associations and test on the same slide; leaving slides out measures a rule
    that carries over to an unseen slide, which is what a network's shortcut would be.
    """
    if groups is not None:
        tests = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    else:
        order = np.random.default_rng(seed).permutation(len(y))
        tests = [order[k::folds] for k in range(folds)]
    scores = []
    for test in tests:
        train = np.setdiff1d(np.arange(len(y)), test)
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-12
        w = fit_logistic((x[train] - mu) / sd, y[train])
        xt = np.hstack([(x[test] - mu) / sd, np.ones((len(test), 1))])
        scores.append(float(np.mean(((xt @ w) > 0) == (y[test] > 0.5))))
    return float(np.mean(scores)), float(np.std(scores))


def balanced_index(y: np.ndarray, seed: int = 0, groups: np.ndarray | None = None) -> np.ndarray:
    """Indices of as many blocks of each class as the smaller class has (within each group if given),
    drawn at random."""
    rng = np.random.default_rng(seed)
    groups = np.zeros(len(y), np.int64) if groups is None else np.asarray(groups)
    keep = []
    for g in np.unique(groups):
        pos = np.flatnonzero((y > 0.5) & (groups == g))
        neg = np.flatnonzero((y <= 0.5) & (groups == g))
        n = min(len(pos), len(neg))
        keep += [rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def balanced(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """As many blocks of each class (the smaller class's count), drawn at random."""
    keep = balanced_index(y, seed)
    return x[keep], y[keep]
