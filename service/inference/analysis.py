"""One streaming pass over the stitched maps: binary mask, queue cell sums, previews, slide statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.inference.engine import SegmentResult
from service.inference.queue import PAPER_FRACTION, CellStats, cell_sums
from service.inference.uncertainty import from_uint8
from service.vocabulary import NOVELTY
from service.wsi.raster import RasterFile, UpsampledRaster

QUEUE_CELL = 64  # analysis pixels per queue cell
PREVIEW_MAX = 1024  # longest side of preview images


def preview_factor(height: int, width: int, limit: int = PREVIEW_MAX) -> int:
    """Smallest power of two that brings the longest side to ``limit`` or below (at most 512)."""
    f = 1
    while max(height, width) / f > limit and f < 512:
        f *= 2
    return f


def block_mean(values: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f blocks (edges padded with zeros, then divided by full block area).

    Summed as f strided row slices, then f strided column slices: 2f vectorised adds instead of a
    reduction over two strided axes (13x faster at f = 4)."""
    if f == 1:
        return values.astype(np.float32)
    h, w = values.shape
    gh, gw = -(-h // f), -(-w // f)
    rows = np.zeros((gh, w), np.float32)
    for i in range(min(f, h)):
        part = values[i::f]
        rows[: part.shape[0]] += part
    out = np.zeros((gh, gw), np.float32)
    for j in range(min(f, w)):
        part = rows[:, j::f]
        out[:, : part.shape[1]] += part
    out /= f * f
    return out


def weighted_cell_sums(rasters: dict[str, RasterFile | UpsampledRaster], weights: np.ndarray, y0: int) -> dict:
    """Per map: sums of its values x ``weights`` (tissue, rows y0..) over every queue cell. Per-cell maps
    are summed at their own resolution (each model cell's value x its tissue pixels): the same sums
    without repeating every cell to pixels."""
    sums, per_cell = {}, {}
    for name, raster in rasters.items():
        f = raster.factor if isinstance(raster, UpsampledRaster) else 1
        if f > 1 and QUEUE_CELL % f == 0 and y0 % f == 0:
            if f not in per_cell:
                per_cell[f] = cell_sums(weights, f)  # tissue pixels in each model cell
            rows = raster.coarse.read_rows(y0 // f, y0 // f + per_cell[f].shape[0])
            values = from_uint8(rows, name)[:, : per_cell[f].shape[1]] * per_cell[f]
            sums[name] = cell_sums(values, QUEUE_CELL // f)
        else:
            sums[name] = cell_sums(from_uint8(raster.read_rows(y0, y0 + weights.shape[0]), name) * weights, QUEUE_CELL)
    return sums


@dataclass
class SlideAnalysis:
    mask: RasterFile  # uint8 0/255 at analysis resolution
    cells: CellStats
    previews: dict[str, np.ndarray]  # uint8 images at 1/preview_f scale: probability, mask, <measure>
    preview_f: int
    tissue_px: int
    tumour_px: int
    mean_uncertainty: dict[str, float]  # per measure, over tissue pixels
    novelty_share: float | None = None  # tissue share above the model's novelty threshold (novelty models)


def analyse(
    result: SegmentResult, workdir: Path, *, measure: str, threshold: float, novelty_threshold: float | None = None
) -> SlideAnalysis:
    """Read every map once in bands; write the mask raster; accumulate queue and summary statistics.

    With a novelty map and its threshold, also the share of tissue beyond it."""
    maps = result.maps
    embedding = [name for name in maps if name.startswith("embedding_")]
    names = tuple(name for name in maps if name not in embedding)
    novelty = NOVELTY in maps and novelty_threshold is not None
    novel_px = 0
    h, w = maps["probability"].height, maps["probability"].width
    f = preview_factor(h, w)
    band = max(128, f)  # a multiple of QUEUE_CELL and of f (powers of two); small, so memory ~ width only
    mask = RasterFile(workdir / "mask.raw", h, w, create=True)
    cut = int(np.ceil(threshold * 255 - 1e-9))
    above_cut = PAPER_FRACTION * result.maxima.get(measure, 0)
    grids: dict[str, list[np.ndarray]] = {
        k: [] for k in ("tissue", "unc", "prob", "above", "neg", "neg_unc", *embedding)
    }
    prev: dict[str, list[np.ndarray]] = {k: [] for k in ("probability", "mask", measure)}
    tissue_px = tumour_px = 0
    sums = dict.fromkeys(names, 0.0)
    for y0 in range(0, h, band):
        y1 = min(h, y0 + band)
        tissue = result.tissue.crop(y0, 0, y1 - y0, w, result.mpp)
        bands = {name: maps[name].read_rows(y0, y1) for name in names}
        m = np.where(bands["probability"] >= cut, 255, 0).astype(np.uint8)
        mask.write_block(y0, 0, m)
        t = tissue.astype(np.float32)
        tissue_px += int(tissue.sum())
        tumour_px += int(np.count_nonzero(m.astype(bool) & tissue))
        for name in names:
            sums[name] += float((from_uint8(bands[name], name) * t).sum())
        if novelty:
            novel_px += int(np.count_nonzero((from_uint8(bands[NOVELTY], NOVELTY) > novelty_threshold) & tissue))
        measured = from_uint8(bands[measure], measure)
        normal = t * (m == 0)  # tissue the model calls normal
        grids["tissue"].append(cell_sums(t, QUEUE_CELL))
        grids["unc"].append(cell_sums(measured * t, QUEUE_CELL))
        grids["neg"].append(cell_sums(normal, QUEUE_CELL))
        grids["neg_unc"].append(cell_sums(measured * normal, QUEUE_CELL))
        grids["prob"].append(cell_sums(from_uint8(bands["probability"], "probability") * t, QUEUE_CELL))
        grids["above"].append(cell_sums(((bands[measure] > above_cut) & tissue).astype(np.float32), QUEUE_CELL))
        for name, weighted in weighted_cell_sums({name: maps[name] for name in embedding}, t, y0).items():
            grids[name].append(weighted)
        prev["probability"].append(block_mean(bands["probability"], f))
        prev["mask"].append(block_mean(m, f))
        prev[measure].append(block_mean(bands[measure], f))
    cells = CellStats(
        cell=QUEUE_CELL,
        tissue=np.concatenate(grids["tissue"]),
        uncertainty=np.concatenate(grids["unc"]),
        probability=np.concatenate(grids["prob"]),
        above=np.concatenate(grids["above"]),
        embedding=np.stack([np.concatenate(grids[name]) for name in embedding]) if embedding else None,
        negative=np.concatenate(grids["neg"]),
        negative_uncertainty=np.concatenate(grids["neg_unc"]),
    )
    previews = {k: np.clip(np.rint(np.concatenate(v)), 0, 255).astype(np.uint8) for k, v in prev.items()}
    means = {name: (sums[name] / tissue_px if tissue_px else 0.0) for name in names if name != "probability"}
    share = (novel_px / tissue_px if tissue_px else 0.0) if novelty else None
    return SlideAnalysis(mask, cells, previews, f, tissue_px, tumour_px, means, share)
