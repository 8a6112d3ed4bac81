"""Dice of a segmentation against a ground-truth mask slide (band-wise, bounded memory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.wsi.raster import RasterFile
from service.wsi.slide import RegionReader, open_slide

BAND = 512


@dataclass
class Overlap:
    """Pixel counts of a binary prediction against the truth."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
        self.tp += int(np.count_nonzero(pred & truth))
        self.fp += int(np.count_nonzero(pred & ~truth))
        self.fn += int(np.count_nonzero(~pred & truth))

    @property
    def dice(self) -> float:
        """2TP / (2TP + FP + FN); 1.0 when both prediction and truth are empty."""
        denom = 2 * self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else 2 * self.tp / denom


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Rank-based AUROC (Mann-Whitney U, midranks for ties) of ``scores`` for detecting ``labels``."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    midranks = ends - (counts - 1) / 2.0
    ranks = np.empty(scores.size, np.float64)
    ranks[order] = midranks[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(prob: np.ndarray, truth: np.ndarray, bins: int = 15) -> float:
    """ECE of the tumour probability: sum over equal-width bins of (share of pixels) x |mean p - tumour rate|."""
    prob = np.asarray(prob, np.float64).ravel()
    truth = np.asarray(truth, np.float64).ravel()
    if prob.size == 0:
        return 0.0
    idx = np.clip((prob * bins).astype(np.int64), 0, bins - 1)
    n = np.bincount(idx, minlength=bins)
    sp = np.bincount(idx, weights=prob, minlength=bins)
    st = np.bincount(idx, weights=truth, minlength=bins)
    ok = n > 0
    return float((np.abs(sp[ok] - st[ok])).sum() / prob.size)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two binary arrays (1.0 when both are empty)."""
    o = Overlap()
    o.add(pred, truth)
    return o.dice


def read_truth(mask_path: Path, mpp: float, y: int, x: int, h: int, w: int, slide_mpp: float | None = None):
    """Ground-truth tumour (bool) for an analysis region, resampled from a mask slide."""
    with open_slide(mask_path, slide_mpp) as mask_slide:
        return RegionReader(mask_slide, mpp).read(y, x, h, w)[..., 0] > 127


def overlap_with_truth(
    probability: RasterFile,
    mask_path: Path,
    mpp: float,
    threshold: float = 0.5,
    region: tuple[int, int, int, int] | None = None,
) -> Overlap:
    """Compare ``probability`` (uint8 raster at ``mpp``) >= threshold with the mask slide, band by band.

    ``region`` (y, x, h, w) restricts the comparison to part of the slide (analysis pixels).
    """
    y0, x0, h, w = region or (0, 0, probability.height, probability.width)
    cut = int(np.ceil(threshold * 255 - 1e-9))
    with open_slide(mask_path) as mask_slide:
        reader = RegionReader(mask_slide, mpp)
        out = Overlap()
        for by in range(y0, y0 + h, BAND):
            bh = min(BAND, y0 + h - by)
            pred = probability.read_rows(by, by + bh)[:, x0 : x0 + w] >= cut
            truth = reader.read(by, x0, bh, w)[..., 0] > 127
            out.add(pred, truth)
        return out


def predict_mean(ensemble, image: np.ndarray) -> np.ndarray:
    """Mean tumour probability of one RGB image of any size (reflect-padded to a multiple of 8)."""
    h, w = image.shape[:2]
    ph, pw = (-h) % 8, (-w) % 8
    padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect") if ph or pw else image
    return ensemble.predict(padded[None])[0].mean(axis=0)[:h, :w]


def pairs_overlap(ensemble, images, masks, threshold: float = 0.5) -> tuple[Overlap, bool]:
    """Pixel counts over a set of (image, mask) pairs, and whether every output was finite."""
    out, finite = Overlap(), True
    for image, mask in zip(images, masks, strict=True):
        prob = predict_mean(ensemble, image)
        finite &= bool(np.isfinite(prob).all())
        out.add(prob >= threshold, mask > 0)
    return out, finite
