"""Segment one slide end to end: engine -> analysis pass -> queue -> every artifact in one directory."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from service.errors import Unprocessable
from service.heap import release_free_heap
from service.inference import outputs
from service.inference.analysis import QUEUE_CELL, analyse
from service.inference.engine import Progress, segment
from service.inference.ensemble import Predictor
from service.inference.queue import build_queue, patch_cells
from service.inference.selection import require_embedding
from service.options import SegmentationOptions
from service.vocabulary import NOVELTY
from service.wsi.slide import RegionReader, Slide, choose_level, open_slide


class OutputError(Unprocessable):
    """The output directory cannot be used; one line for the user."""

    def __init__(self, message: str):
        super().__init__("unusable_output_dir", message)


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
    ensemble: Predictor,
    options: SegmentationOptions | None = None,
    *,
    slide_key: str | None = None,
    progress: Progress | None = None,
    reviewed: Sequence[tuple[int, int, int, int]] = (),
) -> dict:
    """Segment ``slide_path`` and write all artifacts to ``out_dir``. Returns the summary dict.
    ``reviewed``: level-0 boxes of tissue already reviewed, kept out of the queue."""
    opt = options or SegmentationOptions()
    require_embedding(opt.selection, getattr(ensemble, "embedding_dims", 0))  # before any work
    slide = open_slide(slide_path, opt.slide_mpp)  # refuse a bad slide before touching the output
    with slide:
        out_dir = prepare_output_dir(out_dir)
        return _run(slide, out_dir, ensemble, opt, slide_key or Path(slide_path).name, progress, reviewed)


def remove_if_same(path: Path, identity: tuple[int, int]) -> None:
    """Remove ``path`` if it is still the file with ``identity`` (device, inode)."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == identity:
        path.unlink(missing_ok=True)


def novelty_summary(analysis, threshold: float, flag_share: float) -> dict:
    """The slide's out-of-distribution verdict from its feature-space novelty map."""
    share = analysis.novelty_share
    return {
        "mean": round(analysis.mean_uncertainty[NOVELTY], 4),
        "threshold": threshold,
        "share_beyond_threshold": round(share, 4),
        "flag_share": flag_share,
        "out_of_distribution": share > flag_share,
    }


def novelty_footnote(novelty: dict | None) -> dict:
    """The overlay's line on the out-of-distribution verdict (none for a model without novelty)."""
    if novelty is None:
        return {}
    share = f"{novelty['share_beyond_threshold']:.1%} of the tissue is unlike the training data"
    if novelty["out_of_distribution"]:
        return {"footnote": f"OUT OF DISTRIBUTION: {share} (flagged above {novelty['flag_share']:.0%})", "alert": True}
    return {"footnote": f"{share} (flagged above {novelty['flag_share']:.0%})"}


def _run(
    slide: Slide,
    out_dir: Path,
    ensemble: Predictor,
    opt: SegmentationOptions,
    key: str,
    progress: Progress | None,
    reviewed: Sequence[tuple[int, int, int, int]],
) -> dict:
    """The segmentation proper, on an open slide and a writable output directory."""
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out_dir))
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="uga-tiff")
    tiffs: dict = {}
    try:
        result = segment(slide, ensemble, work, opt, progress=progress)
        release_free_heap()  # the stitcher's and reader's buffers, before the outputs' phase
        t_seg = time.perf_counter()
        maps = {k: v for k, v in result.maps.items() if k in outputs.ARTIFACTS}
        tiffs = outputs.start_map_tiffs(out_dir, maps, opt.mpp, pool)  # while the analysis reads the same maps
        novelty_threshold = getattr(ensemble, "novelty_threshold", None)
        analysis = analyse(
            result, work, measure=opt.uncertainty, threshold=opt.threshold, novelty_threshold=novelty_threshold
        )
        queue = build_queue(
            analysis.cells,
            patch_px=opt.patch_px,
            top=opt.queue_size,
            scoring=opt.scoring,
            min_tissue=opt.min_tissue,
            mpp=opt.mpp,
            level0_mpp=slide.mpp,
            slide_key=key,
            measure=opt.uncertainty,
            model_version=ensemble.version,
            reviewed=reviewed,
            level0_size=slide.dimensions,
            selection=opt.selection,
        )
        tiffs |= outputs.start_map_tiffs(out_dir, {"mask": analysis.mask}, opt.mpp, pool)
        artifacts = {name: outputs.ARTIFACTS[name] for name in ("mask", *maps)}
        f = analysis.preview_f
        preview = analysis.previews[opt.uncertainty]
        thumb = RegionReader(slide, opt.mpp * f).read(0, 0, *preview.shape)
        level0_per_px = f * opt.mpp / slide.mpp
        px_area_mm2 = (opt.mpp / 1000.0) ** 2
        summary = {
            "slide": slide.path.name,
            "slide_key": key,
            "model_version": ensemble.version,
            "ensemble_members": ensemble.members,
            "providers": ensemble.providers,
            "mpp": opt.mpp,
            "slide_mpp": slide.mpp,
            "slide_mpp_source": slide.mpp_source,
            "slide_vendor": slide.vendor,
            "slide_dimensions": list(slide.dimensions),
            "source_identifiers": slide.identifiers,  # a DICOM series: Study/Series UIDs, accession number
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
            "mean_uncertainty": {k: round(v, 6) for k, v in analysis.mean_uncertainty.items() if k != NOVELTY},
            "queue": {
                "measure": opt.uncertainty,
                "scoring": opt.scoring,
                "selection": opt.selection,
                "size": len(queue),
                "requested": opt.queue_size,
                "patch_um": round(patch_cells(opt.patch_px, QUEUE_CELL) * QUEUE_CELL * opt.mpp, 3),  # as cut
                "requested_patch_um": opt.patch_um,  # differs where the side snaps to whole cells
                "min_tissue": opt.min_tissue,
            },
            "artifacts": {**artifacts, **{k: outputs.ARTIFACTS[k] for k in ("overlay", "geojson", "queue")}},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if analysis.novelty_share is not None:
            summary["novelty"] = novelty_summary(analysis, novelty_threshold, ensemble.novelty_flag_share)
        rings = outputs.tumour_polygons(analysis.previews["mask"], level0_per_px)
        if slide.identifiers:  # a DICOM source: every output names it
            queue = [{**item, "source_identifiers": slide.identifiers} for item in queue]
        features = outputs.geojson(rings, queue, ensemble.version, slide.identifiers)
        overlay = outputs.overlay_png(
            thumb,
            preview,
            result.tissue.crop(0, 0, *preview.shape, opt.mpp * f),
            analysis.previews["mask"],
            queue,
            measure=opt.uncertainty,
            level0_per_px=level0_per_px,
            title=f"{summary['slide']}  ·  model {ensemble.version}  ·  "
            f"tumour {summary['tumour_area_mm2']:.2f} mm²  ·  "
            f"mean {opt.uncertainty} {analysis.mean_uncertainty[opt.uncertainty]:.3f}",
            **novelty_footnote(summary.get("novelty")),
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
    except BaseException:
        # a failed job leaves no map behind: writers not yet started are cancelled, running ones finish,
        # then every map file they wrote is removed (only theirs: a run that lost its job to another
        # worker must not remove the files that worker has written since)
        pool.shutdown(wait=True, cancel_futures=True)
        for name, future in tiffs.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                remove_if_same(out_dir / outputs.ARTIFACTS[name], future.result())
        raise
    finally:
        pool.shutdown(wait=True)  # writers read the rasters in ``work``: finish before removing it
        shutil.rmtree(work, ignore_errors=True)
