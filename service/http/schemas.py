"""The HTTP API contract: pydantic request, response and error models, and the record -> view maps."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from service.options import SegmentationRequest
from service.store import Delivery, FinetuneRun, Job, ModelVersion, QueueItem
from service.store.records import as_dict
from service.vocabulary import ARTIFACTS, ItemStatus, JobState


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. slide_not_found")
    message: str = Field(description="what was wrong and how to fix it")
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


WHY = {
    400: "malformed input: bad path, malformed JSON, empty body, a control character in the URL",
    401: "no token, or an unknown or revoked one",
    403: "the caller's role is too low",
    404: "the resource is unknown",
    409: "the resource's state does not allow this",
    410: "a superseded job's files were removed by retention (UGA_JOB_RETENTION_DAYS)",
    413: "the body is over its limit (UGA_MAX_BODY_MB, UGA_MAX_GEOJSON_MB, UGA_MAX_JSON_KB)",
    415: "the body's content type is not accepted here",
    422: "well-formed but unusable input (schema, slide, mask, limits)",
    429: "too many active jobs (see Retry-After)",
    500: "a bug: the body carries a request id that is in the server log",
    507: "the data volume is full; nothing was stored",
}


def errors(*statuses: int) -> dict[int, dict]:
    """OpenAPI responses: each status with the JSON error body."""
    return {s: {"model": ErrorBody, "description": WHY[s]} for s in statuses}


# Every route can answer these (authentication, the body limit, the error boundary).
COMMON_ERRORS = errors(400, 401, 403, 404, 413, 422, 500, 507)
GEOJSON_SCHEMA = {
    "description": "GeoJSON Polygon(s): a FeatureCollection, Feature or geometry, or a bare array of features "
    "(QuPath's default export)",
    "oneOf": [{"type": "object"}, {"type": "array", "items": {"type": "object"}}],
}
CORRECTION_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/geo+json": {"schema": GEOJSON_SCHEMA},
            "application/json": {"schema": GEOJSON_SCHEMA},
        },
    }
}


class DicomwebSource(BaseModel):
    """A series on a configured PACS (UGA_PACS), by its UIDs."""

    model_config = ConfigDict(extra="forbid")

    pacs: str = Field(min_length=1, max_length=32, description="the PACS' name in UGA_PACS")
    study: str = Field(min_length=1, max_length=64, description="StudyInstanceUID")
    series: str = Field(min_length=1, max_length=64, description="SeriesInstanceUID")
    store_seg: bool = Field(False, description="store the job's DICOM SEG back to this PACS (STOW-RS)")


class JobSubmit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slide: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="path relative to the server's slide root (a file, or a DICOM series' folder or instance)",
    )
    dicomweb: DicomwebSource | None = Field(None, description="instead of `slide`: a series on a configured PACS")
    options: SegmentationRequest = Field(default_factory=SegmentationRequest)
    site: str | None = Field(
        None, max_length=64, description="hospital, scanner or stain batch, one of the configured UGA_SITES (metrics)"
    )
    callback: str | None = Field(
        None, max_length=64, description="a configured callback (UGA_CALLBACKS) POSTed a signed event when the job ends"
    )

    @model_validator(mode="after")
    def _one_source(self) -> JobSubmit:
        if (self.slide is None) == (self.dicomweb is None):
            raise ValueError("give exactly one of `slide` (a path) and `dicomweb` (a PACS series)")
        return self


class Progress(BaseModel):
    done: int
    total: int
    fraction: float


class JobView(BaseModel):
    id: str
    slide: str
    state: JobState
    progress: Progress
    options: dict
    model_version: str
    site: str | None = None
    callback: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    summary: dict | None = None
    artifacts: dict[str, str] = Field(default_factory=dict, description="artifact name -> URL")
    deduplicated: bool = Field(False, description="true when an identical earlier job was returned")
    cancel_requested: bool = Field(False, description="a cancel was asked for; the running job stops shortly")
    expired_at: float | None = Field(
        None, description="when retention removed its files (a newer job of the slide replaced it); no artifacts"
    )


class JobList(BaseModel):
    jobs: list[JobView]


class PixelBox(BaseModel):
    x: int
    y: int
    width: int
    height: int


class Box(BaseModel):
    x: float
    y: float
    width: float
    height: float


class QueueItemView(BaseModel):
    id: str
    slide: str
    job_id: str
    rank: int
    bbox_level0: PixelBox
    bbox_um: Box
    score: float
    measure: str
    scoring: str
    mean_uncertainty: float
    mean_probability: float
    tissue_fraction: float
    model_version: str
    status: ItemStatus
    links: dict[str, str] = Field(default_factory=dict)


class QueueView(BaseModel):
    slide: str | None
    items: list[QueueItemView]


class ModelView(BaseModel):
    version: str
    current: bool
    status: str = Field(description="baseline, promoted, rejected, failed or candidate")
    reason: str | None = Field(None, description="why a candidate was rejected or failed")
    parent: str | None = None
    created_at: float
    metrics: dict = Field(default_factory=dict)
    corrections: dict = Field(default_factory=dict, description="correction ids used: train / holdout")
    served_by_this_worker: str | None = None


class ModelList(BaseModel):
    current: str
    served_by_this_worker: str | None
    models: list[ModelView]
    history: list[dict] = Field(default_factory=list, description="pointer changes, newest first")


def progress(done: int, total: int) -> dict:
    return {"done": done, "total": total, "fraction": round(done / total, 4) if total else 0.0}


def job_view(job: Job, base: str, deduplicated: bool = False) -> JobView:
    artifacts = {}
    if job.state == "succeeded" and job.expired_at is None:
        made = {*(job.summary or {}).get("artifacts", {}), "summary"}  # what this job wrote (SEG: DICOM only)
        artifacts = {name: f"{base}/jobs/{job.id}/artifacts/{name}" for name in ARTIFACTS if name in made}
    return JobView(
        id=job.id,
        slide=job.slide,
        state=job.state,
        progress=progress(job.progress_done, job.progress_total),
        options=job.options,
        model_version=job.model_version,
        site=job.site,
        callback=job.callback,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
        summary=job.summary,
        artifacts=artifacts,
        deduplicated=deduplicated,
        cancel_requested=bool(job.cancel_requested),
        expired_at=job.expired_at,
    )


def item_view(item: QueueItem, base: str) -> QueueItemView:
    links = {
        "self": f"{base}/queue/items/{item.id}",
        "image": f"{base}/queue/items/{item.id}/image.png",
        "mask": f"{base}/queue/items/{item.id}/mask.png",
        "skip": f"{base}/queue/items/{item.id}/skip",
    }
    return QueueItemView(**as_dict(item), links=links)


def model_view(v: ModelVersion, current: str | None, served: str | None = None) -> ModelView:
    return ModelView(
        version=v.version,
        current=v.version == current,
        status=v.status,
        reason=v.reason,
        parent=v.parent,
        created_at=v.created_at,
        metrics=v.metrics,
        corrections=v.corrections,
        served_by_this_worker=served,
    )


def run_view(run: FinetuneRun) -> dict:
    return {**as_dict(run), "progress": progress(run.progress_done, run.progress_total)}


class DeliveryView(BaseModel):
    """One callback event and how sending it went (the payload is what was signed and sent)."""

    id: str
    job_id: str
    target: str
    event: str
    state: str
    attempts: int
    next_at: float | None = Field(None, description="pending: when the next attempt is due")
    last_status: int | None = Field(None, description="the receiver's last HTTP status; null: no answer")
    last_error: str | None = None
    created_at: float
    delivered_at: float | None = None
    payload: dict


class DeliveryList(BaseModel):
    deliveries: list[DeliveryView]


def delivery_view(d: Delivery) -> DeliveryView:
    next_at = d.next_at if d.state == "pending" else None
    return DeliveryView(**{**as_dict(d), "next_at": next_at, "payload": json.loads(d.payload)})


class Withdrawal(BaseModel):
    """Why a correction is withdrawn (kept in its record and the audit log)."""

    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)] = Field(
        description="why (1-500 characters, not only spaces): kept in the record and the audit log"
    )
