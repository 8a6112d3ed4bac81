"""Ensemble inference over a slide's tissue tiles, stitched into disk rasters.

Three stages overlap: a reader thread pulls tiles from OpenSlide, the calling thread runs the
predictor (one ONNX Runtime session) on batches, and a stitcher thread computes uncertainty, blends and writes. This
module never imports torch.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.heap import release_free_heap
from service.inference.ensemble import Predictor
from service.inference.stitch import Stitcher
from service.inference.tiling import TileGrid
from service.inference.uncertainty import all_measures, to_uint8
from service.options import SegmentationOptions
from service.vocabulary import MAP_NAMES, NOVELTY
from service.wsi.raster import RasterFile, UpsampledRaster
from service.wsi.slide import RegionReader, Slide, analysis_shape
from service.wsi.tissue import TissueMask, tissue_mask

Progress = Callable[[int, int], None]


@dataclass
class SegmentResult:
    """Disk rasters (uint8, analysis resolution) plus what a summary needs."""

    maps: dict[str, RasterFile | UpsampledRaster]  # per-cell maps are stored per cell, read per pixel
    tissue: TissueMask
    grid: TileGrid
    mpp: float
    tiles_total: int
    tiles_computed: int
    model_version: str
    providers: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        for r in self.maps.values():
            r.close()


_END = object()


def _positions(grid: TileGrid) -> Iterator[tuple[int, int]]:
    for r in range(grid.rows):
        for c in range(grid.cols):
            yield r, c


def cells_to_pixels(cells: np.ndarray, tile: int) -> np.ndarray:
    """A (h, w) map of feature cells repeated up to the (tile, tile) pixels they cover."""
    f = tile // cells.shape[0]
    return np.repeat(np.repeat(cells.astype(np.float32), f, axis=0), f, axis=1)


def segment(
    slide: Slide,
    ensemble: Predictor,
    workdir: Path,
    options: SegmentationOptions | None = None,
    progress: Progress | None = None,
) -> SegmentResult:
    """Run the ensemble over the slide's tissue and stream every map into rasters under ``workdir``."""
    opt = options or SegmentationOptions()
    t_start = time.perf_counter()
    tissue = tissue_mask(slide)
    release_free_heap()  # the mask's transients: the tiles' phase should not start on top of them
    height, width = analysis_shape(slide, opt.mpp)
    grid = TileGrid(height, width, opt.tile, opt.overlap)
    occupied = grid.occupied(tissue, opt.mpp)
    total = int(occupied.sum())
    workdir.mkdir(parents=True, exist_ok=True)
    with_novelty = bool(getattr(ensemble, "novelty", False))
    embedding = tuple(f"embedding_{i}" for i in range(getattr(ensemble, "embedding_dims", 0)))
    cell_names = ((NOVELTY,) if with_novelty else ()) + embedding  # embedding_<i>: internal, never a file
    # per-cell outputs are blended and stored per cell (64x fewer values) when the tiles align with the cells
    cell = int(getattr(ensemble, "cell_px", 0))
    at_cells = bool(cell_names) and cell > 0 and opt.tile % cell == 0 and opt.overlap % cell == 0
    pixel_names = MAP_NAMES + (() if at_cells else cell_names)
    stored = {name: RasterFile(workdir / f"{name}.raw", height, width, create=True) for name in pixel_names}
    maps: dict[str, RasterFile | UpsampledRaster] = dict(stored)
    if at_cells:
        cells_h, cells_w = -(-height // cell), -(-width // cell)
        for name in cell_names:
            stored[name] = RasterFile(workdir / f"{name}.raw", cells_h, cells_w, create=True)
            maps[name] = UpsampledRaster(stored[name], cell, height, width)
    maxima = dict.fromkeys(maps, 0)
    timings = {"tissue_s": time.perf_counter() - t_start, "read_s": 0.0, "infer_s": 0.0, "stitch_s": 0.0}

    def sink_for(names: tuple[str, ...]) -> Callable[[int, int, np.ndarray], None]:
        def sink(y: int, x: int, values: np.ndarray) -> None:
            for i, name in enumerate(names):
                q = to_uint8(values[i], name)
                maxima[name] = max(maxima[name], int(q.max()))
                stored[name].write_block(y, x, q)

        return sink

    stitcher = Stitcher(height, width, opt.tile, opt.overlap, len(pixel_names), sink_for(pixel_names))
    cell_stitcher = (
        Stitcher(cells_h, cells_w, opt.tile // cell, opt.overlap // cell, len(cell_names), sink_for(cell_names))
        if at_cells
        else None
    )
    reader = RegionReader(slide, opt.mpp)
    tiles_q: queue.Queue = queue.Queue(maxsize=2 * opt.batch + 2)
    results_q: queue.Queue = queue.Queue(maxsize=2)
    errors: list[BaseException] = []
    stop = threading.Event()

    def read_tiles() -> None:
        try:
            for r, c in _positions(grid):
                if stop.is_set():
                    break
                if occupied[r, c]:
                    t0 = time.perf_counter()
                    y, x = grid.origin(r, c)
                    img = reader.read(y, x, opt.tile, opt.tile)
                    timings["read_s"] += time.perf_counter() - t0
                    tiles_q.put((r, c, img))
                else:
                    tiles_q.put((r, c, None))
        except BaseException as exc:  # noqa: BLE001 - surfaced in the caller
            errors.append(exc)
        finally:
            tiles_q.put(_END)

    def stitch_results() -> None:
        done = 0
        try:
            while (item := results_q.get()) is not _END:
                positions, outputs = item
                t0 = time.perf_counter()
                k = 0
                for r, c, present in positions:
                    if present:
                        m = all_measures(outputs["member_probs"][k])
                        per_cell = {NOVELTY: outputs[NOVELTY][k, 0]} if with_novelty else {}
                        per_cell.update((name, outputs["embedding"][k, i]) for i, name in enumerate(embedding))
                        if cell_stitcher:
                            cell_stitcher.add(r, c, np.stack([per_cell[n] for n in cell_names]).astype(np.float32))
                        else:
                            m.update((n, cells_to_pixels(v, opt.tile)) for n, v in per_cell.items())
                        stitcher.add(r, c, np.stack([m[n] for n in pixel_names]))
                        k += 1
                    else:
                        stitcher.add(r, c, None)
                        if cell_stitcher:
                            cell_stitcher.add(r, c, None)
                done += k
                timings["stitch_s"] += time.perf_counter() - t0
                if progress and k:
                    progress(done, total)
            stitcher.finish()
            if cell_stitcher:
                cell_stitcher.finish()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            while results_q.get() is not _END:  # drain so the producer never blocks
                pass

    reader_thread = threading.Thread(target=read_tiles, name="uga-reader", daemon=True)
    stitch_thread = threading.Thread(target=stitch_results, name="uga-stitch", daemon=True)
    reader_thread.start()
    stitch_thread.start()
    try:
        pending: list[tuple[int, int, bool]] = []
        batch: list[np.ndarray] = []
        finished = False
        while not finished:
            item = tiles_q.get()
            if item is _END:
                finished = True
            else:
                r, c, img = item
                pending.append((r, c, img is not None))
                if img is not None:
                    batch.append(img)
            if batch and (len(batch) == opt.batch or finished) or (finished and pending):
                outputs = {}
                if batch:
                    t0 = time.perf_counter()
                    tiles = np.stack(batch)
                    rich = with_novelty or embedding
                    outputs = ensemble.predict_outputs(tiles) if rich else {"member_probs": ensemble.predict(tiles)}
                    timings["infer_s"] += time.perf_counter() - t0
                results_q.put((pending, outputs))
                pending, batch = [], []
            if errors:
                break
    finally:
        stop.set()
        results_q.put(_END)
        while reader_thread.is_alive():  # unblock a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                tiles_q.get(timeout=0.1)
        reader_thread.join()
        stitch_thread.join()
    if errors:
        for r in stored.values():
            r.close()
        raise errors[0]
    timings["total_s"] = time.perf_counter() - t_start
    return SegmentResult(
        maps=maps,
        tissue=tissue,
        grid=grid,
        mpp=opt.mpp,
        tiles_total=grid.rows * grid.cols,
        tiles_computed=total,
        model_version=ensemble.version,
        providers=ensemble.providers,
        timings=timings,
        maxima=maxima,
    )
