"""Segmentation jobs as use cases: submit one (deduplicated by its identity), and rescore every
segmented slide after the model changed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.config import Settings
from service.errors import NotFound
from service.options import SegmentationOptions
from service.store import Job, Store
from service.wsi.slide import SlideError, SlidePathError, open_slide, resolve_slide_path


def job_identity(slide_file: Path, slide: str, options: SegmentationOptions, model_version: str) -> str:
    """Same slide file (name, size, mtime), same resolved options and same model version = same job."""
    stat = slide_file.stat()
    src = {
        "slide": slide,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "options": options.key(),
        "model_version": model_version,
    }
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()


def submit_segmentation(
    store: Store,
    settings: Settings,
    slide: str,
    requested: Mapping[str, Any],
    *,
    model_version: str,
    actor: str | None,
    check_slide: bool = True,
) -> tuple[Job, bool]:
    """Queue a segmentation of ``slide`` (relative to the slide root) with the requested options on top
    of the settings. Returns (job, created): an identical earlier job is returned instead of a new one."""
    path = resolve_slide_path(settings.slide_root, slide)
    options = SegmentationOptions.resolve(settings, requested)
    if check_slide:
        open_slide(path, options.slide_mpp).close()  # refuse an unusable slide now, not in the worker
    rel = path.relative_to(settings.slide_root.resolve()).as_posix()
    return store.jobs.submit(
        slide=rel,
        options=dict(requested),
        resolved=options.model_dump(),
        model_version=model_version,
        dedup_key=job_identity(path, rel, options, model_version),
        actor=actor,
    )


def get_job(store: Store, job_id: str) -> Job:
    job = store.jobs.get(job_id)
    if job is None:
        raise NotFound("job_not_found", f"no job {job_id!r}")
    return job


def enqueue_rescoring(store: Store, settings: Settings, version: str, actor: str) -> list[str]:
    """After a model change: re-segment every slide's latest finished job with the new version, so the
    queue is rescored by the model now serving (corrected / skipped patches stay out of it)."""
    created = []
    for slide in store.jobs.segmented_slides():
        latest = store.jobs.latest_for_slide(slide)
        if latest is None or latest.model_version == version:
            continue
        try:
            job, new = submit_segmentation(
                store, settings, slide, latest.options, model_version=version, actor=actor, check_slide=False
            )
        except (SlideError, SlidePathError):
            continue  # the slide is gone; its old queue stays readable
        if new:
            created.append(job.id)
    return created
