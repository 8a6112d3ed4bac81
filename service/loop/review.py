"""Reviewing the queue: look up an item, the patch as the model saw it, its predicted mask, skipping it."""

from __future__ import annotations

import time

import numpy as np

from service.config import Settings
from service.errors import Conflict, NotFound
from service.loop.jobs import artifact_path
from service.loop.slides import cached_slide, slide_name
from service.store import Job, QueueItem, Store
from service.wsi.slide import open_slide


def get_item(store: Store, item_id: str) -> QueueItem:
    item = store.queue.item(item_id)
    if item is None:
        raise NotFound("queue_item_not_found", f"no queue item {item_id!r}")
    return item


def pending_queue(
    store: Store,
    slide: str | None,
    k: int,
    measure: str | None,
    settings: Settings | None = None,
    reviewer: str | None = None,
) -> list[QueueItem]:
    """Pending patches in the selection's order: of one segmented slide, or pooled across slides (taken
    in turn); for a ``reviewer``, without those another reviewer has open."""
    if slide is not None and settings is not None:
        slide = slide_name(settings, slide)
    if slide is not None and store.jobs.latest_for_slide(slide) is None:
        raise NotFound("slide_not_segmented", f"no finished segmentation of {slide!r}; submit a job first")
    return store.queue.pending(slide, k, measure, reviewer=reviewer)


def reviewed_boxes(store: Store, slide: str) -> list[tuple[int, int, int, int]]:
    """Level-0 boxes (x, y, width, height) of the slide's tissue already reviewed: patches someone
    corrected or skipped, and corrections that stand (also those sent without a queue item). No later
    queue proposes a patch overlapping one, whatever its size or model."""
    corrected = {(c.x, c.y, c.width, c.height) for c in store.corrections.on_slide(slide)}
    return sorted(store.queue.handled_boxes(slide) | corrected)


def _taken(holder: str, until: float) -> Conflict:
    minutes = max(1, round((until - time.time()) / 60))
    return Conflict(
        "claimed_by_another",
        f"{holder} has this patch open (for up to {minutes} more min); take another patch",
        {"claimed_by": holder, "until": until},
    )


def claim_item(store: Store, settings: Settings, item_id: str, reviewer: str) -> dict:
    """Hold a patch for the reviewer who opened it (renewed while it stays open), so that no other
    reviewer corrects it at the same time; 409 while another reviewer holds it."""
    item = get_item(store, item_id)
    holder, until = store.queue.claim(item.slide, item.id, reviewer, settings.review_claim_s)
    if holder != reviewer:
        raise _taken(holder, until)
    return {"item_id": item.id, "claimed_by": holder, "until": until, "hold_s": settings.review_claim_s}


def release_item(store: Store, item_id: str, reviewer: str, *, anyones: bool = False) -> None:
    """Let go of the reviewer's hold on the patch (``anyones``: an admin breaking another's hold)."""
    item = get_item(store, item_id)
    store.queue.release(item.slide, item.id, None if anyones else reviewer)


def check_unclaimed(store: Store, item: QueueItem, actor: str) -> None:
    """Refuse a decision on a patch another reviewer has open."""
    held = store.queue.holder(item.slide, item.id)
    if held is not None and held[0] != actor:
        raise _taken(*held)


def item_job(store: Store, item: QueueItem) -> Job:
    """The finished job that proposed the item (its summary holds the analysis and slide µm/px)."""
    return store.jobs.get(item.job_id)


def item_image(store: Store, settings: Settings, item_id: str) -> np.ndarray:
    """The patch as the model saw it: RGB at the job's µm/px."""
    item = get_item(store, item_id)
    job = item_job(store, item)
    b = item.bbox_level0
    path = cached_slide(settings, item.slide)  # a request never calls a PACS
    with open_slide(path, job.options.get("slide_mpp")) as slide:
        return slide.read_box(b["x"], b["y"], b["width"], b["height"], job.summary["mpp"])


def item_mask(store: Store, item_id: str) -> np.ndarray:
    """The model's predicted tumour mask for the patch (0/255, the shape of ``item_image``)."""
    item = get_item(store, item_id)
    b = item.bbox_level0
    mask = model_mask(store, item_job(store, item), (b["x"], b["y"], b["width"], b["height"]))
    return np.where(mask, 255, 0).astype(np.uint8)


def model_mask(store: Store, job: Job, box: tuple[float, float, float, float]) -> np.ndarray:
    """The job's predicted tumour mask (bool) under a level-0 box of its slide, at the job's µm/px."""
    mpp, slide_mpp = job.summary["mpp"], job.summary["slide_mpp"]
    with open_slide(artifact_path(store, job.id, "mask")) as mask:  # its level 0 is the job's µm/px
        to_mask = slide_mpp / mask.mpp
        return mask.read_box(*(v * to_mask for v in box), mpp)[..., 0] > 127


def skip_item(store: Store, item_id: str, actor: str) -> QueueItem:
    """Take the patch out of the queue without a correction."""
    item = get_item(store, item_id)
    if item.status == "corrected":
        raise Conflict("already_corrected", "this patch already has a correction; it cannot be skipped")
    check_unclaimed(store, item, actor)
    store.queue.set_status(item.slide, item_id, "skipped", actor)
    return get_item(store, item_id)
