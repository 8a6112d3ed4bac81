"""Overlay images of a finished job for the review page: the predicted tumour outline and each
uncertainty heat map over the whole slide (longest side at most UGA_OVERLAY_MAX_PX), and a queue
patch's uncertainty inset. Read from the job's pyramidal TIFFs; PNG bytes, cached like tiles."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service.config import Settings
from service.errors import NotFound
from service.inference.heatmap import heat_rgba, legend, outline_rgba
from service.inference.uncertainty import from_uint8
from service.loop.jobs import artifact_path, get_job
from service.loop.review import get_item, item_job
from service.store import Job, Store
from service.vocabulary import MEASURES, NOVELTY
from service.wsi.deepzoom import TileCache
from service.wsi.slide import open_slide

OVERLAYS = ("outline", *MEASURES, NOVELTY)  # novelty: only for jobs of a model that computes it


def _check_name(name: str) -> None:
    if name not in OVERLAYS:
        raise NotFound("overlay_not_found", f"unknown overlay {name!r}", {"known": list(OVERLAYS)})


def _geometry(store: Store, job: Job, max_px: int) -> dict:
    """Where the job's maps lie on the slide, and the µm/px an overlay of at most ``max_px`` a side has."""
    with open_slide(artifact_path(store, job.id, "mask")) as mask:
        width, height = mask.dimensions
        map_mpp = mask.mpp
    mpp = max(map_mpp, max(width, height) * map_mpp / max_px)
    slide_mpp = job.summary["slide_mpp"]
    return {
        "map_mpp": map_mpp,
        "mpp": mpp,
        "size": [max(1, round(width * map_mpp / mpp)), max(1, round(height * map_mpp / mpp))],
        "extent_level0": [width * map_mpp / slide_mpp, height * map_mpp / slide_mpp],
        "slide_mpp": slide_mpp,
    }


def overlay_index(store: Store, settings: Settings, job_id: str, base: str) -> dict:
    """The overlays of a finished job: their size, µm/px, where they lie (level-0 px), legends, links."""
    job = get_job(store, job_id)
    geometry = _geometry(store, job, settings.overlay_max_px)
    url = f"{base}/jobs/{job_id}/overlays"
    items = [{"name": "outline", "what": "predicted tumour outline", "url": f"{url}/outline.png"}]
    heat = [*MEASURES, *([NOVELTY] if NOVELTY in job.summary.get("artifacts", {}) else [])]
    items += [{"name": m, "what": legend(m)["what"], "legend": legend(m), "url": f"{url}/{m}.png"} for m in heat]
    return {
        "job": job_id,
        "slide": job.slide,
        "model_version": job.model_version,
        "ranking_measure": (job.resolved or {}).get("uncertainty"),
        "novelty": job.summary.get(NOVELTY),  # the slide's out-of-distribution verdict, if the model gives one
        **geometry,
        "overlays": items,
    }


def overlay_png(store: Store, settings: Settings, cache: TileCache, job_id: str, name: str) -> bytes:
    """The overlay ``name`` of a finished job as an RGBA PNG over the whole slide (cached)."""
    _check_name(name)
    job = get_job(store, job_id)
    key = ("overlay", job_id, name, settings.overlay_max_px)
    cached = cache.get(key)
    if cached is not None:
        return cached
    geometry = _geometry(store, job, settings.overlay_max_px)
    source = "mask" if name == "outline" else name
    with open_slide(artifact_path(store, job_id, source)) as raster:
        width, height = raster.dimensions
        stored = raster.read_box(0, 0, width, height, geometry["mpp"])[..., 0]
    rgba = outline_rgba(stored > 127) if name == "outline" else heat_rgba(from_uint8(stored, name), name)
    data = png_bytes(rgba)
    cache.put(key, data)
    return data


def item_uncertainty_png(store: Store, item_id: str, measure: str | None) -> bytes:
    """A queue patch's uncertainty as a heat map (RGBA PNG, the size of its image.png); default: the
    measure it was ranked by."""
    item = get_item(store, item_id)
    measure = measure or item.measure
    if measure not in MEASURES:
        raise NotFound("overlay_not_found", f"unknown measure {measure!r}", {"known": list(MEASURES)})
    job = item_job(store, item)
    b = item.bbox_level0
    with open_slide(artifact_path(store, job.id, measure)) as raster:
        to_map = job.summary["slide_mpp"] / raster.mpp
        box = (b["x"] * to_map, b["y"] * to_map, b["width"] * to_map, b["height"] * to_map)
        stored = raster.read_box(*box, job.summary["mpp"])[..., 0]
    return png_bytes(heat_rgba(from_uint8(stored, measure), measure))


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
