"""/jobs: submit a slide for segmentation, follow it, download its artifacts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse

from service.http.deps import Annotator, Base, Rt, Viewer
from service.http.schemas import JobList, JobSubmit, JobView, errors, job_view
from service.loop.jobs import artifact_path, cancel_job, get_job, list_jobs, submit_segmentation
from service.loop.slides import check_dicomweb_source

router = APIRouter(tags=["jobs"])
MEDIA = {
    ".tif": "image/tiff",
    ".png": "image/png",
    ".geojson": "application/geo+json",
    ".json": "application/json",
    ".dcm": "application/dicom",
}


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobView,
    responses={200: {"model": JobView, "description": "an identical job exists (deduplicated)"}, **errors(429)},
)
def submit_job(body: JobSubmit, rt: Rt, base: Base, who: Annotator, response: Response) -> JobView:
    """Submit a slide (a path relative to the slide root, or a series on a PACS) for segmentation."""
    slide, stow = body.slide, None
    if body.dicomweb is not None:
        source = body.dicomweb
        slide = check_dicomweb_source(rt.settings, source.pacs, source.study, source.series)
        stow = source.pacs if source.store_seg else None
    job, created = submit_segmentation(
        rt.store,
        rt.settings,
        slide,
        body.options.model_dump(),
        model_version=rt.models.current().version,
        actor=who.name,
        site=body.site,
        callback=body.callback,
        stow=stow,
    )
    response.headers["Location"] = f"{base}/jobs/{job.id}"
    if not created:
        response.status_code = 200
    return job_view(job, base, deduplicated=not created)


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobView,
    responses={202: {"model": JobView, "description": "running: it stops within a few tiles"}, **errors(409)},
)
def cancel(job_id: str, rt: Rt, base: Base, who: Annotator, response: Response) -> JobView:
    """Cancel a job: a queued one at once (200), a running one within a few tiles (202). Annotators
    cancel their own jobs, admins any."""
    job = cancel_job(rt.store, job_id, actor=who.name, any_job=who.allows("admin"))
    if job.state == "running":
        response.status_code = 202
    return job_view(job, base)


@router.get("/jobs", response_model=JobList)
def list_job_views(
    rt: Rt, base: Base, _: Viewer, state: str | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> JobList:
    return JobList(jobs=[job_view(j, base) for j in list_jobs(rt.store, state, limit)])


@router.get("/jobs/{job_id}", response_model=JobView)
def get_job_view(job_id: str, rt: Rt, base: Base, _: Viewer) -> JobView:
    """State, progress (tiles done / total), and when finished the summary and artifact links."""
    return job_view(get_job(rt.store, job_id), base)


@router.get(
    "/jobs/{job_id}/artifacts/{name}",
    responses={200: {"content": {m: {} for m in MEDIA.values()}, "description": "the file"}, **errors(409, 410)},
)
def get_artifact(job_id: str, name: str, rt: Rt, _: Viewer):
    path = artifact_path(rt.store, job_id, name)
    return FileResponse(
        path, media_type=MEDIA.get(path.suffix, "application/octet-stream"), filename=f"{job_id}-{path.name}"
    )
