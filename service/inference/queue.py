"""Ranked review queue: square patches over tissue scored from the uncertainty map (pure numpy).

The map is summarised once into per-cell sums (cells of ``cell`` analysis pixels); a patch is a
k x k block of cells, so every candidate's statistics come from integral images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.inference.selection import Candidate, select, select_non_overlapping  # noqa: F401 (re-exported)
from service.vocabulary import SCORINGS

PAPER_FRACTION = 0.8  # the paper: pixels above 0.8 x max count 100 each


@dataclass
class CellStats:
    """Per-cell sums over tissue pixels. Arrays have shape (grid_h, grid_w)."""

    cell: int
    tissue: np.ndarray  # tissue pixel count
    uncertainty: np.ndarray  # sum of the ranking measure over tissue pixels
    probability: np.ndarray  # sum of mean probability over tissue pixels
    above: np.ndarray  # tissue pixels whose measure exceeds PAPER_FRACTION x slide max
    embedding: np.ndarray | None = None  # (E, grid_h, grid_w) sums of the model's embedding over tissue
    negative: np.ndarray | None = None  # tissue pixels the model calls normal (for the "negative" scoring)
    negative_uncertainty: np.ndarray | None = None  # sum of the ranking measure over those pixels


def cell_sums(values: np.ndarray, cell: int) -> np.ndarray:
    """Sum of ``values`` (h, w) over cell x cell blocks; partial edge blocks are summed too."""
    h, w = values.shape
    gh, gw = -(-h // cell), -(-w // cell)
    if (gh * cell, gw * cell) != (h, w):  # only a ragged edge is padded: no full-size float64 copy
        values = np.pad(values, ((0, gh * cell - h), (0, gw * cell - w)))
    return values.reshape(gh, cell, gw, cell).sum(axis=(1, 3), dtype=np.float64)


def _window_sums(grid: np.ndarray, k: int) -> np.ndarray:
    """Sums over every k x k window of ``grid`` (valid positions only)."""
    ii = np.pad(grid.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return ii[k:, k:] - ii[:-k, k:] - ii[k:, :-k] + ii[:-k, :-k]


def patch_cells(patch_px: int, cell: int) -> int:
    """A patch's side in whole cells: the requested side rounded, at least one cell."""
    return max(1, round(patch_px / cell))


def score_candidates(stats: CellStats, k: int, *, scoring: str = "mean", min_tissue: float = 0.5) -> list[Candidate]:
    """Every k x k-cell patch with at least ``min_tissue`` tissue, scored."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; use one of {SCORINGS}")
    gh, gw = stats.tissue.shape
    if k > gh or k > gw:
        return []
    tissue = _window_sums(stats.tissue, k)
    unc = _window_sums(stats.uncertainty, k)
    prob = _window_sums(stats.probability, k)
    area = float(k * stats.cell) ** 2
    frac = tissue / area
    ok = (frac >= min_tissue) & (tissue > 0)
    safe = np.maximum(tissue, 1)
    mean_u, mean_p = unc / safe, prob / safe
    if scoring == "mean":
        score = mean_u
    elif scoring == "paper":
        score = 100.0 * _window_sums(stats.above, k) + unc
    else:  # the mean over the patch's predicted-normal tissue; 0 where the model calls all of it tumour
        if stats.negative is None or stats.negative_uncertainty is None:
            raise ValueError("the negative scoring needs the cells' predicted-normal sums")
        score = _window_sums(stats.negative_uncertainty, k) / np.maximum(_window_sums(stats.negative, k), 1)
    rows, cols = np.nonzero(ok)
    embedding = (
        np.stack([_window_sums(e, k)[rows, cols] for e in stats.embedding], axis=1) / safe[rows, cols][:, None]
        if stats.embedding is not None
        else None
    )
    return [
        Candidate(
            int(r),
            int(c),
            float(score[r, c]),
            float(mean_u[r, c]),
            float(mean_p[r, c]),
            float(frac[r, c]),
            tuple(float(v) for v in embedding[i]) if embedding is not None else None,
        )
        for i, (r, c) in enumerate(zip(rows, cols, strict=True))
    ]


def item_id(slide_key: str, x: int, y: int, size: int) -> str:
    """Stable id of a patch region (level-0 pixels), independent of model version and rank."""
    return hashlib.sha256(f"{slide_key}|{x}|{y}|{size}".encode()).hexdigest()[:16]


def build_queue(
    stats: CellStats,
    *,
    patch_px: int,
    top: int,
    scoring: str,
    min_tissue: float,
    mpp: float,
    level0_mpp: float,
    slide_key: str,
    measure: str,
    model_version: str,
    reviewed: Sequence[tuple[int, int, int, int]] = (),
    level0_size: tuple[int, int] | None = None,
    selection: str = "uncertainty",
) -> list[dict]:
    """Non-overlapping patches chosen by ``selection`` (service.inference.selection) as queue items
    (bbox in level-0 px and in µm), in that strategy's order. Random draws are seeded by the slide.

    With ``level0_size`` (width, height), a patch that would reach past the slide is never proposed:
    every item can be corrected exactly as proposed. A patch overlapping any ``reviewed`` box (level-0
    x, y, width, height: patches corrected or skipped, and corrections, whatever their size) is never
    proposed either: reviewed tissue stays out of the queue after a model or a patch size changes.
    """
    k = patch_cells(patch_px, stats.cell)
    size_px = k * stats.cell
    cands = score_candidates(stats, k, scoring=scoring, min_tissue=min_tissue)
    to0 = mpp / level0_mpp
    size0 = round(size_px * to0)
    items = []

    def level0_xy(c: Candidate) -> tuple[int, int]:
        return round(c.col * stats.cell * to0), round(c.row * stats.cell * to0)

    if level0_size is not None:
        w0, h0 = level0_size
        cands = [c for c in cands if all(v + size0 <= lim for v, lim in zip(level0_xy(c), (w0, h0), strict=True))]
    if len(reviewed) and cands:
        boxes = np.asarray(reviewed, dtype=np.int64).reshape(-1, 4)
        xy = np.array([level0_xy(c) for c in cands], dtype=np.int64)
        overlaps = (
            (xy[:, None, 0] < boxes[None, :, 0] + boxes[None, :, 2])
            & (boxes[None, :, 0] < xy[:, None, 0] + size0)
            & (xy[:, None, 1] < boxes[None, :, 1] + boxes[None, :, 3])
            & (boxes[None, :, 1] < xy[:, None, 1] + size0)
        ).any(axis=1)
        cands = [c for c, hit in zip(cands, overlaps, strict=True) if not hit]
    rng = np.random.default_rng(int(hashlib.sha256(slide_key.encode()).hexdigest()[:8], 16))
    for rank, c in enumerate(select(selection, cands, k, top, rng), start=1):
        x0, y0 = level0_xy(c)
        items.append(
            {
                "id": item_id(slide_key, x0, y0, size0),
                "rank": rank,
                "bbox_level0": {"x": x0, "y": y0, "width": size0, "height": size0},
                "bbox_um": {
                    "x": round(x0 * level0_mpp, 1),
                    "y": round(y0 * level0_mpp, 1),
                    "width": round(size0 * level0_mpp, 1),
                    "height": round(size0 * level0_mpp, 1),
                },
                "score": round(c.score, 6),
                "measure": measure,
                "scoring": scoring,
                "selection": selection,
                "mean_uncertainty": round(c.mean_uncertainty, 6),
                "mean_probability": round(c.mean_probability, 6),
                "tissue_fraction": round(c.tissue_fraction, 4),
                "model_version": model_version,
                "status": "pending",
            }
        )
    return items
