"""Ingest a clinician's correction: validate, decode, deduplicate, crop, write durably, record."""

from __future__ import annotations

import logging

import numpy as np

from service.config import Settings
from service.errors import DomainError, UnsupportedMedia
from service.inference.evaluation import dice
from service.loop.corrections import (
    Region,
    build_record,
    check_region,
    correction_id,
    correction_lock,
    decode_png_mask,
    rasterize_geojson,
    read_crop,
    write_correction_files,
)
from service.loop.review import check_unclaimed, get_item, item_job, model_mask
from service.loop.slides import cached_slide, local_name, parse_dicomweb
from service.store import Correction, Job, Store
from service.wsi.slide import open_slide

log = logging.getLogger("uga.corrections")
MEDIA_TYPES = ("image/png", "application/geo+json", "application/json")


def check_media_type(media_type: str) -> None:
    """Refuse a body that is neither a PNG nor GeoJSON (before it is even read)."""
    if media_type not in MEDIA_TYPES:
        raise UnsupportedMedia(
            "unsupported_media_type", "send the mask as image/png or GeoJSON polygons as application/geo+json"
        )


def ingest_correction(
    store: Store,
    settings: Settings,
    *,
    slide: str,
    region: Region,
    body: bytes,
    media_type: str,
    coords: str,
    annotator: str,
    proposed_by: str,
    queue_item_id: str | None = None,
    proposing_job: Job | None = None,
) -> tuple[Correction, bool]:
    """Store the correction (files durable before the row). Returns (record, created); the same
    correction sent twice is one record. Nothing is written when anything is refused.

    The record carries how far the proposing model's mask was from the correction (Dice on the
    region), the QC signal of whether fine-tuning helps where clinicians disagree.

    A DICOMweb series is read from the cache its job filled (a request never calls a PACS); a slide
    without µm/px is read at the µm/px its job was given (``options.slide_mpp``)."""
    check_media_type(media_type)
    path = cached_slide(settings, slide)
    if not parse_dicomweb(slide):  # one name per slide (a DICOM series: its folder)
        slide = local_name(settings, path)
    latest = store.jobs.latest_for_slide(slide)
    known = proposing_job or latest
    with open_slide(path, known.options.get("slide_mpp") if known else None) as handle:
        check_region(region, handle.dimensions, handle.mpp, settings.max_correction_px)
        shape = region.mask_shape(handle.mpp)
        if media_type == "image/png":
            mask = decode_png_mask(body, shape)
        else:
            f = region.mpp / handle.mpp
            origin, scale = ((region.x, region.y), 1 / f) if coords == "level0" else ((0, 0), 1.0)
            mask = rasterize_geojson(body, shape, origin, scale, max_vertices=settings.max_geojson_vertices)
        cid = correction_id(slide, region, mask)
        existing = store.corrections.get(cid)
        if existing is not None and existing.withdrawn_at is None:  # a withdrawn one sent again: reinstated
            return existing, False
        image = read_crop(handle, region)
    if proposing_job is None:
        proposing_job = latest if latest is not None and latest.model_version == proposed_by else None
    record = build_record(
        cid,
        slide,
        region,
        mask,
        annotator=annotator,
        queue_item_id=queue_item_id,
        proposed_by=proposed_by,
        holdout_every=settings.holdout_every,
        model_dice=model_agreement(store, proposing_job, region, mask),
        earlier=store.corrections.on_slide(slide),
    )
    with correction_lock(settings.data_dir, cid):  # the same correction sent concurrently: one writer
        existing = store.corrections.get(cid)
        if existing is not None and existing.withdrawn_at is None:
            return existing, False
        write_correction_files(settings.data_dir / "corrections", cid, image, mask)
        created = store.corrections.add(record, annotator)
    fresh = created and existing is None  # else the stored row (a reinstated one keeps its own)
    return (record if fresh else store.corrections.get(cid)), created


def model_agreement(store: Store, job: Job | None, region: Region, mask: np.ndarray) -> float | None:
    """Dice of ``job``'s predicted mask against the corrected ``mask`` on the region (None when the job
    is unknown, was made at another µm/px, or its mask cannot be read: a QC signal, never a refusal)."""
    if job is None or job.summary is None or job.summary.get("mpp") != region.mpp:
        return None
    try:
        predicted = model_mask(store, job, (region.x, region.y, region.width, region.height))
    except (DomainError, OSError) as exc:
        log.warning("no model agreement for a correction on %s: %s", job.slide, exc)
        return None
    return dice(predicted, mask) if predicted.shape == mask.shape else None


def ingest_item_correction(
    store: Store, settings: Settings, item_id: str, *, body: bytes, media_type: str, coords: str, annotator: str
) -> tuple[Correction, bool]:
    """A correction of a queue item: its region at the µm/px of the job that proposed it."""
    item = get_item(store, item_id)
    check_unclaimed(store, item, annotator)
    b = item.bbox_level0
    region = Region(b["x"], b["y"], b["width"], b["height"], item_job(store, item).summary["mpp"])
    return ingest_correction(
        store,
        settings,
        slide=item.slide,
        region=region,
        body=body,
        media_type=media_type,
        coords=coords,
        annotator=annotator,
        proposed_by=item.model_version,
        queue_item_id=item.id,
        proposing_job=item_job(store, item),
    )
