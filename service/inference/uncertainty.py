"""Per-pixel ensemble uncertainty (pure numpy). All information quantities are in bits.

Input everywhere: ``member_probs`` of shape (M, ...) holding each member's tumour probability.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6
# Upper end of the 8-bit storage scale per measure (values above are clipped when stored).
# novelty: the larger of the feature and stain terms, each over its source 99th percentile (~1 at the
# source's edge, models/novelty.py); stored up to 16, higher saturates.
STORAGE_MAX = {"probability": 1.0, "entropy": 1.0, "mutual_information": 1.0, "uga": 4.0, "novelty": 16.0}


def _clip(p: np.ndarray) -> np.ndarray:
    return np.clip(p, EPS, 1.0 - EPS)


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) = -p log2 p - (1-p) log2 (1-p)."""
    p = _clip(np.asarray(p, dtype=np.float32))
    return -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))


def mean_probability(member_probs: np.ndarray) -> np.ndarray:
    """Ensemble mean tumour probability p̄."""
    return np.asarray(member_probs, dtype=np.float32).mean(axis=0)


def predictive_entropy(member_probs: np.ndarray) -> np.ndarray:
    """Entropy of the mean prediction, H(p̄)."""
    return binary_entropy(mean_probability(member_probs))


def mutual_information(member_probs: np.ndarray) -> np.ndarray:
    """BALD: H(p̄) - mean_m H(p_m) (>= 0; zero when all members agree)."""
    probs = np.asarray(member_probs, dtype=np.float32)
    mi = predictive_entropy(probs) - binary_entropy(probs).mean(axis=0)
    return np.maximum(mi, 0.0)


def uga_score(member_probs: np.ndarray) -> np.ndarray:
    """Khalili et al.: mean_m cross-entropy(p̄, p_m) = H(p̄) + mean_m KL(p̄ || p_m)."""
    probs = _clip(np.asarray(member_probs, dtype=np.float32))
    pbar = probs.mean(axis=0)
    ce = -(pbar * np.log2(probs) + (1.0 - pbar) * np.log2(1.0 - probs))
    return ce.mean(axis=0)


def all_measures(member_probs: np.ndarray) -> dict[str, np.ndarray]:
    """Mean probability and every uncertainty measure, sharing the logarithms."""
    probs = _clip(np.asarray(member_probs, dtype=np.float32))
    log_p, log_q = np.log2(probs), np.log2(1.0 - probs)
    pbar = probs.mean(axis=0)
    h_mean = binary_entropy(pbar)
    member_h = -(probs * log_p + (1.0 - probs) * log_q).mean(axis=0)
    uga = -(pbar * log_p.mean(axis=0) + (1.0 - pbar) * log_q.mean(axis=0))
    return {
        "probability": pbar,
        "entropy": h_mean,
        "mutual_information": np.maximum(h_mean - member_h, 0.0),
        "uga": uga,
    }


EMBEDDING_RANGE = (-4.0, 4.0)  # embedding channels (whitened principal components), stored -4..4


def storage_range(name: str) -> tuple[float, float]:
    """(low, high) of a map's 8-bit storage scale: 0..STORAGE_MAX, or -4..4 for ``embedding_<i>``."""
    return EMBEDDING_RANGE if name.startswith("embedding_") else (0.0, STORAGE_MAX[name])


def to_uint8(values: np.ndarray, name: str) -> np.ndarray:
    """Quantise a map for storage: low..high (``storage_range``) -> 0..255."""
    low, high = storage_range(name)
    scaled = (np.asarray(values, dtype=np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def from_uint8(stored: np.ndarray, name: str) -> np.ndarray:
    """Inverse of :func:`to_uint8` (up to quantisation)."""
    low, high = storage_range(name)
    return np.asarray(stored, dtype=np.float32) * ((high - low) / 255.0) + low
