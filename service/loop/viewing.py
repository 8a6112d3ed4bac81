"""Viewing a slide in the review page: which slides are segmented, a slide's deep-zoom layout and tiles.

Slide names resolve as jobs resolve them (``service.loop.slides``: under the slide root, no path
traversal; a DICOM series by its folder); a DICOMweb series is viewed from the local cache only.
"""

from __future__ import annotations

from urllib.parse import quote

from service.config import Settings
from service.loop.slides import cached_slide, slide_name
from service.store import Store
from service.wsi.deepzoom import DeepZoomSlides


def segmented_slides(store: Store, limit: int) -> list[dict]:
    """Slides with a finished segmentation, most recently segmented first, with that job."""
    jobs = [store.jobs.latest_for_slide(s) for s in store.jobs.segmented_slides()]
    jobs = sorted((j for j in jobs if j is not None), key=lambda j: j.finished_at or 0, reverse=True)
    return [
        {"slide": j.slide, "job": j.id, "model_version": j.model_version, "finished_at": j.finished_at}
        for j in jobs[:limit]
    ]


def _slide(store: Store, settings: Settings, name: str):
    """(name as jobs use it, local path, the µm/px a job gave a slide without metadata, latest job)."""
    path = cached_slide(settings, name)
    name = slide_name(settings, name)
    job = store.jobs.latest_for_slide(name)
    slide_mpp = (job.options or {}).get("slide_mpp") if job is not None else None
    return name, path, slide_mpp, job


def slide_info(store: Store, settings: Settings, tiles: DeepZoomSlides, name: str, base: str) -> dict:
    """A slide's size, µm/px and deep-zoom layout, its latest finished job, and links to its tiles."""
    name, path, slide_mpp, job = _slide(store, settings, name)
    d = tiles.descriptor(path, slide_mpp)
    root = f"{base}/slides/{quote(name, safe='/')}"
    return {
        "slide": name,
        "width": d.width,
        "height": d.height,
        "mpp": d.mpp,
        "levels": d.levels,
        "tile_size": d.tile_size,
        "overlap": d.overlap,
        "format": d.format,
        "job": job.id if job is not None else None,
        "model_version": job.model_version if job is not None else None,
        "links": {"dzi": f"{root}/slide.dzi", "tiles": f"{root}/slide_files/"},
    }


def slide_dzi(store: Store, settings: Settings, tiles: DeepZoomSlides, name: str) -> str:
    """The slide's Deep Zoom Image descriptor (XML); its tiles are under ``slide_files/`` next to it."""
    _, path, slide_mpp, _ = _slide(store, settings, name)
    return tiles.descriptor(path, slide_mpp).dzi()


def slide_tile(
    store: Store, settings: Settings, tiles: DeepZoomSlides, name: str, level: int, col: int, row: int
) -> bytes:
    """JPEG bytes of one deep-zoom tile of the slide."""
    _, path, slide_mpp, _ = _slide(store, settings, name)
    return tiles.tile(path, level, col, row, slide_mpp)
