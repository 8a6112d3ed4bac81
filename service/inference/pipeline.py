"""Segment one slide end to end: engine -> analysis pass -> queue -> every artifact in one directory."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from service.config import Settings
from service.inference import outputs
from service.inference.analysis import analyse
from service.inference.engine import Ensemble, Progress, SegmentOptions, segment
from service.inference.queue import build_queue
from service.inference.uncertainty import MEASURES
from service.wsi.slide import RegionReader, choose_level, open_slide


class OutputError(ValueError):
    """The output directory cannot be used; one line for the user."""


@dataclass
class RunOptions:
    mpp: float = 1.0
    slide_mpp: float | None = None
    tile: int = 256
    overlap: int = 32
    batch: int = 2
    threshold: float = 0.5
    measure: str = "uga"
    scoring: str = "mean"
    queue_size: int = 10
    patch_um: float = 1024.0
    min_tissue: float = 0.5

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: object) -> RunOptions:
        """The settings' defaults, with every override that is not None applied on top."""
        values = {
            "mpp": settings.mpp,
            "tile": settings.tile,
            "overlap": settings.overlap,
            "batch": settings.batch,
            "threshold": settings.threshold,
            "measure": settings.uncertainty,
            "scoring": settings.scoring,
            "queue_size": settings.queue_size,
            "patch_um": settings.patch_um,
            "min_tissue": settings.min_tissue,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def prepare_output_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` if needed and prove it is writable (OutputError otherwise)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output path {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"output directory {out_dir} is not writable ({exc.strerror or exc})") from None
    return out_dir


def run_segmentation(
    slide_path: Path,
    out_dir: Path,
    ensemble: Ensemble,
    options: RunOptions | None = None,
    *,
    slide_key: str | None = None,
    progress: Progress | None = None,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> dict:
    """Segment ``slide_path`` and write all artifacts to ``out_dir``. Returns the summary dict."""
    opt = options or RunOptions()
    if opt.measure not in MEASURES:
        raise ValueError(f"unknown uncertainty measure {opt.measure!r}; use one of {', '.join(MEASURES)}")
    if opt.tile % 8 or opt.overlap * 2 > opt.tile:
        raise ValueError("tile must be a multiple of 8 and overlap at most half the tile")
    slide = open_slide(slide_path, opt.slide_mpp)  # refuse a bad slide before touching the output
    try:
        out_dir = prepare_output_dir(out_dir)
    except OutputError:
        slide.close()
        raise
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out_dir))
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="uga-tiff")
    try:
        seg_opts = SegmentOptions(
            mpp=opt.mpp, tile=opt.tile, overlap=opt.overlap, batch=opt.batch, threshold=opt.threshold
        )
        result = segment(slide, ensemble, work, seg_opts, progress=progress)
        t_seg = time.perf_counter()
        analysis = analyse(result, work, measure=opt.measure, threshold=opt.threshold)
        key = slide_key or Path(slide_path).name
        queue = build_queue(
            analysis.cells,
            patch_px=max(1, round(opt.patch_um / opt.mpp)),
            top=opt.queue_size,
            scoring=opt.scoring,
            min_tissue=opt.min_tissue,
            mpp=opt.mpp,
            level0_mpp=slide.mpp,
            slide_key=key,
            measure=opt.measure,
            model_version=ensemble.version,
            exclude=exclude,
        )
        rasters = {"mask": analysis.mask, **result.maps}
        tiffs = outputs.start_map_tiffs(out_dir, rasters, opt.mpp, pool)
        artifacts = {name: outputs.ARTIFACTS[name] for name in rasters}
        f = analysis.preview_f
        preview = analysis.previews[opt.measure]
        thumb = RegionReader(slide, opt.mpp * f).read(0, 0, *preview.shape)
        level0_per_px = f * opt.mpp / slide.mpp
        px_area_mm2 = (opt.mpp / 1000.0) ** 2
        summary = {
            "slide": Path(slide_path).name,
            "slide_key": key,
            "model_version": ensemble.version,
            "ensemble_members": ensemble.members,
            "providers": ensemble.providers,
            "mpp": opt.mpp,
            "slide_mpp": slide.mpp,
            "slide_mpp_source": slide.mpp_source,
            "slide_vendor": slide.vendor,
            "slide_dimensions": list(slide.dimensions),
            "pyramid_level_read": choose_level(slide.handle.level_downsamples, slide.mpp, opt.mpp),
            "analysis_shape": [result.grid.height, result.grid.width],
            "threshold": opt.threshold,
            "tiles": {
                "computed": result.tiles_computed,
                "grid": result.tiles_total,
                "size": opt.tile,
                "overlap": opt.overlap,
            },
            "tissue_area_mm2": round(analysis.tissue_px * px_area_mm2, 4),
            "tumour_area_mm2": round(analysis.tumour_px * px_area_mm2, 4),
            "tumour_fraction_of_tissue": round(analysis.tumour_px / analysis.tissue_px, 4)
            if analysis.tissue_px
            else 0.0,
            "mean_uncertainty": {k: round(v, 6) for k, v in analysis.mean_uncertainty.items()},
            "queue": {
                "measure": opt.measure,
                "scoring": opt.scoring,
                "size": len(queue),
                "requested": opt.queue_size,
                "patch_um": opt.patch_um,
                "min_tissue": opt.min_tissue,
            },
            "artifacts": {**artifacts, **{k: outputs.ARTIFACTS[k] for k in ("overlay", "geojson", "queue")}},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        rings = outputs.tumour_polygons(analysis.previews["mask"], level0_per_px)
        features = outputs.geojson(rings, queue, ensemble.version)
        overlay = outputs.overlay_png(
            thumb,
            preview,
            result.tissue.crop(0, 0, *preview.shape, opt.mpp * f),
            analysis.previews["mask"],
            queue,
            measure=opt.measure,
            level0_per_px=level0_per_px,
            title=f"{summary['slide']}  ·  model {ensemble.version}  ·  "
            f"tumour {summary['tumour_area_mm2']:.2f} mm²  ·  "
            f"mean {opt.measure} {analysis.mean_uncertainty[opt.measure]:.3f}",
        )
        pool.shutdown(wait=True)
        for future in tiffs.values():
            future.result()  # surface any write error
        t_end = time.perf_counter()
        summary["timings_s"] = {
            **{k: round(v, 3) for k, v in result.timings.items()},
            "outputs_s": round(t_end - t_seg, 3),
            "wall_s": round(t_end - t0, 3),
        }
        tissue_mp = analysis.tissue_px / 1e6
        summary["throughput"] = {
            "tissue_megapixels": round(tissue_mp, 3),
            "tissue_mp_per_s": round(tissue_mp / max(1e-9, t_seg - t0), 4),
            "tiles_per_s": round(result.tiles_computed / max(1e-9, result.timings["total_s"]), 3),
        }
        outputs.write_text_artifacts(out_dir, overlay=overlay, features=features, queue=queue, summary=summary)
        analysis.mask.close()
        result.close()
        return summary
    finally:
        pool.shutdown(wait=True)  # writers read the rasters in ``work``: finish before removing it
        slide.close()
        shutil.rmtree(work, ignore_errors=True)
