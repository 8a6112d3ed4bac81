"""What became of a correction: the proposing model's mask (before) and the newest segmentation's
(after, once a promoted model has re-segmented the slide), each against the pathologist's mask."""

from __future__ import annotations

import numpy as np
from PIL import Image

from service.config import Settings
from service.errors import NotFound
from service.loop.corrections import load_mask, region_of
from service.loop.ingest import model_agreement
from service.loop.review import model_mask
from service.store import Correction, Job, Store


def get_correction(store: Store, cid: str) -> Correction:
    rec = store.corrections.get(cid)
    if rec is None:
        raise NotFound("correction_not_found", f"no correction {cid!r}")
    return rec


def correction_jobs(store: Store, c: Correction) -> tuple[Job | None, Job | None]:
    """(the job whose mask the pathologist corrected, the slide's newest job by another model version)."""
    before = None
    if c.queue_item_id:
        item = store.queue.item(c.queue_item_id)
        before = store.jobs.get(item.job_id) if item is not None else None
    latest = store.jobs.latest_for_slide(c.slide)
    if before is None and latest is not None and latest.model_version == c.proposed_by_version:
        before = latest
    after = latest if latest is not None and latest.model_version != c.proposed_by_version else None
    return before, after


def outcome(store: Store, settings: Settings, cid: str) -> dict:
    """Dice of the model's mask against the correction before and (where re-segmented) after."""
    c = get_correction(store, cid)
    before, after = correction_jobs(store, c)
    mask = load_mask(settings.data_dir / "corrections", cid)

    def side(job: Job | None) -> dict | None:
        if job is None:
            return None
        agreement = model_agreement(store, job, region_of(c), mask.astype(bool))
        return {"job_id": job.id, "model_version": job.model_version, "dice": agreement}

    withdrawn = {"at": c.withdrawn_at, "by": c.withdrawn_by, "reason": c.withdrawn_reason} if c.withdrawn_at else None
    return {"correction": cid, "slide": c.slide, "before": side(before), "after": side(after), "withdrawn": withdrawn}


def outcome_mask(store: Store, settings: Settings, cid: str, which: str) -> np.ndarray:
    """The ``which`` ("before" | "after") model mask under the correction (0/255, the correction's shape)."""
    c = get_correction(store, cid)
    job = dict(zip(("before", "after"), correction_jobs(store, c), strict=True))[which]
    if job is None:
        code = "not_resegmented" if which == "after" else "no_proposing_job"
        raise NotFound(
            code,
            "no segmentation of this slide by a newer model yet (after a promotion the slide is re-segmented)"
            if which == "after"
            else "the correction was not made on a segmentation this service still holds",
        )
    mask = load_mask(settings.data_dir / "corrections", cid)
    predicted = model_mask(store, job, (c.x, c.y, c.width, c.height))
    if predicted.shape != mask.shape:  # another µm/px: shown at the correction's size
        predicted = np.asarray(Image.fromarray(predicted).resize(mask.shape[::-1], Image.NEAREST))
    return np.where(predicted, 255, 0).astype(np.uint8)
