"""Segmentation jobs as use cases: submit one (deduplicated by its identity), and rescore every
segmented slide after the model changed, and remove superseded jobs' files after their retention."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.config import Settings
from service.errors import Conflict, DomainError, Gone, InvalidInput, NotAllowed, NotFound, Unprocessable
from service.inference.tiling import TileGrid
from service.loop.slides import check_dicomweb_source, local_name, parse_dicomweb
from service.options import SegmentationOptions
from service.store import Job, Store
from service.vocabulary import ACTIVE_JOB_STATES, ARTIFACTS, JOB_STATES
from service.wsi.slide import analysis_shape, canonical_slide, open_slide, resolve_slide_path, slide_fingerprint

log = logging.getLogger("uga.jobs")


def job_identity(slide_file: Path, slide: str, options: SegmentationOptions, model_version: str) -> str:
    """Same slide (a file by name, size and mtime; a DICOM series by its SeriesInstanceUID), same resolved
    options and same model version = same job."""
    fingerprint = slide_fingerprint(slide_file)
    src = {
        "slide": slide if "series_instance_uid" not in fingerprint else None,
        **fingerprint,
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
    from_client: bool = True,
    site: str | None = None,
    callback: str | None = None,
    stow: str | None = None,
) -> tuple[Job, bool]:
    """Queue a segmentation of ``slide`` (relative to the slide root, or a ``dicomweb/...`` name) with the
    requested options on top of the settings. Returns (job, created): an identical earlier job is
    returned instead of a new one. A DICOMweb series is fetched by the worker (its work limits are
    checked there); ``stow`` names the PACS its DICOM SEG goes back to.

    A client's submission is checked against the work limits first (the slide must open, its tiles,
    the review patch size, the active jobs); the system's own rescoring is not limited. ``site``, if
    given, must be one of UGA_SITES (it labels the per-slide metrics; it is not part of the job's key).
    """
    check_site(settings, site)
    check_callback(settings, callback)
    options = SegmentationOptions.resolve(settings, requested)
    remote = parse_dicomweb(slide)
    if remote is not None:
        rel = check_dicomweb_source(settings, *remote)  # also when named in `slide`: a configured PACS, UIDs
        key = remote_identity(remote[2], options, model_version)
    else:
        path = canonical_slide(resolve_slide_path(settings.slide_root, slide))  # a DICOM series: its folder
        if from_client:
            check_work(settings, path, options)
        rel = local_name(settings, path)
        key = job_identity(path, rel, options, model_version)
    if callback or stow:  # what the caller asks to be told or stored is part of the job
        key = hashlib.sha256(json.dumps([key, callback, stow]).encode()).hexdigest()
    return store.jobs.submit(
        slide=rel,
        options=dict(requested),
        resolved=options.model_dump(),
        model_version=model_version,
        dedup_key=key,
        actor=actor,
        limits=(settings.max_active_jobs, settings.max_active_jobs_per_caller) if from_client else None,
        site=site,
        callback=callback,
        stow=stow,
        origin="client" if from_client else "rescoring",
    )


def remote_identity(series_uid: str, options: SegmentationOptions, model_version: str) -> str:
    """A DICOMweb series is the same slide as that series anywhere: its SeriesInstanceUID."""
    src = {"slide": None, "series_instance_uid": series_uid, "options": options.key(), "model_version": model_version}
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()


def check_callback(settings: Settings, callback: str | None) -> None:
    """A named callback must be configured (UGA_CALLBACKS): the service never calls a URL from a request."""
    if callback is None or callback in settings.callback_targets:
        return
    names = ", ".join(settings.callback_targets) or "none configured (UGA_CALLBACKS)"
    raise InvalidInput(
        "unknown_callback", f"unknown callback {callback[:40]!r}: use one of {names}", {"callbacks": names}
    )


def check_site(settings: Settings, site: str | None) -> None:
    """A named site must be one the operator configured (UGA_SITES): metric labels stay a bounded set."""
    if site is None or site in settings.site_names:
        return
    if not settings.site_names:
        raise InvalidInput("unknown_site", "this service has no sites configured (UGA_SITES): leave out 'site'")
    raise InvalidInput(
        "unknown_site",
        f"unknown site {site[:40]!r}: use one of {', '.join(settings.site_names)} (UGA_SITES)",
        {"sites": list(settings.site_names)},
    )


def check_work(settings: Settings, slide_file: Path, options: SegmentationOptions) -> None:
    """Refuse, before anything is queued, a slide that does not open or a job over the work limits."""
    with open_slide(slide_file, options.slide_mpp) as slide:
        height, width = analysis_shape(slide, options.mpp)
    grid = TileGrid(height, width, options.tile, options.overlap)
    tiles = grid.rows * grid.cols
    if tiles > settings.max_job_tiles:
        raise Unprocessable(
            "too_much_work",
            f"this slide at {options.mpp} µm/px is {tiles} tiles; one job may have at most {settings.max_job_tiles} "
            "(UGA_MAX_JOB_TILES): use a coarser mpp, or ask the operator to raise the limit",
            {"tiles": tiles, "limit": settings.max_job_tiles},
        )
    if options.patch_px > settings.max_correction_px:
        raise Unprocessable(
            "patch_too_large",
            f"review patches of {options.patch_um:g} µm at {options.mpp} µm/px are {options.patch_px} px, larger than "
            f"a correction may be ({settings.max_correction_px} px, UGA_MAX_CORRECTION_PX): use smaller patch_um",
            {"patch_px": options.patch_px, "limit": settings.max_correction_px},
        )


def get_job(store: Store, job_id: str) -> Job:
    job = store.jobs.get(job_id)
    if job is None:
        raise NotFound("job_not_found", f"no job {job_id!r}")
    return job


def cancel_job(store: Store, job_id: str, *, actor: str, any_job: bool) -> Job:
    """Cancel a queued job, or ask a running one to stop within a few tiles (its scratch is removed).
    Without ``any_job`` (an admin's right), only the caller's own jobs."""
    job = get_job(store, job_id)
    if not any_job and job.submitted_by != actor:
        raise NotAllowed("not_your_job", "you may cancel only the jobs you submitted; an admin may cancel any")
    if job.state not in ACTIVE_JOB_STATES:
        raise Conflict("job_finished", f"job is {job.state}; only queued or running jobs can be cancelled")
    return store.jobs.cancel(job_id, actor)


def list_jobs(store: Store, state: str | None, limit: int) -> list[Job]:
    if state is not None and state not in JOB_STATES:
        raise InvalidInput("invalid_state", f"unknown state {state!r}; one of {', '.join(JOB_STATES)}")
    return store.jobs.list(state, limit)


def artifact_path(store: Store, job_id: str, name: str) -> Path:
    """The file of a finished job's artifact."""
    job = get_job(store, job_id)
    if name not in ARTIFACTS:
        raise NotFound("artifact_not_found", f"unknown artifact {name!r}", {"known": list(ARTIFACTS)})
    if job.state != "succeeded":
        raise Conflict("job_not_finished", f"job is {job.state}; artifacts exist once it succeeded")
    if job.expired_at is not None:
        raise Gone(
            "artifacts_expired",
            f"a newer segmentation of {job.slide} replaced this job and its files were removed after "
            "UGA_JOB_RETENTION_DAYS; use the slide's latest job (GET /v1/slides) or submit the slide again",
        )
    path = store.job_dir(job_id) / ARTIFACTS[name]
    if not path.exists():
        raise NotFound("artifact_missing", f"{ARTIFACTS[name]} is missing from the job directory")
    return path


def expire_superseded(store: Store, settings: Settings, now: float | None = None) -> list[str]:
    """Remove the files of jobs that a newer segmentation of their slide replaced more than
    UGA_JOB_RETENTION_DAYS ago (0: keep all). Rows stay (audit, lineage); their artifacts answer 410.
    The mark comes first (re-checking that no correction was made on the job meanwhile), then the
    files: a crash in between leaves files that the next start's sweep removes."""
    if settings.job_retention_days <= 0:
        return []
    cutoff = (time.time() if now is None else now) - settings.job_retention_days * 86400
    expired = [job_id for job_id in store.jobs.expirable(cutoff) if store.jobs.mark_expired(job_id)]
    for job_id in expired:
        shutil.rmtree(store.job_dir(job_id), ignore_errors=True)
    return expired


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
                store,
                settings,
                slide,
                latest.options,
                model_version=version,
                actor=actor,
                from_client=False,
                site=latest.site if latest.site in settings.site_names else None,
            )
        except DomainError as exc:  # the slide is gone or unusable: its old queue stays readable
            if exc.code == "store_unavailable":
                raise  # not the slide's fault: the caller retries (the runner, on its next poll)
            log.warning("slide %s not rescored: %s", slide, exc.message)
            continue
        if new:
            created.append(job.id)
    return created
