"""The HTTP API contract: pydantic request, response and error models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Measure = Literal["uga", "entropy", "mutual_information"]
Scoring = Literal["mean", "paper"]
JobState = Literal["queued", "running", "succeeded", "failed"]
Role = Literal["viewer", "annotator", "admin"]


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. slide_not_found")
    message: str = Field(description="what was wrong and how to fix it")
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class JobOptions(BaseModel):
    """Segmentation options; defaults come from the server settings."""

    model_config = ConfigDict(extra="forbid")

    mpp: float | None = Field(None, ge=0.25, le=16, description="analysis µm/px (default: server's, 1.0)")
    slide_mpp: float | None = Field(None, ge=0.05, le=100, description="level-0 µm/px if the slide lacks it")
    uncertainty: Measure | None = Field(None, description="ranking measure")
    scoring: Scoring | None = None
    queue_size: int | None = Field(None, ge=1, le=200)
    patch_um: float | None = Field(None, ge=64, le=8192, description="review patch side in µm")


class JobSubmit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slide: str = Field(min_length=1, max_length=1024, description="path relative to the server's slide root")
    options: JobOptions = Field(default_factory=JobOptions)


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
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    summary: dict | None = None
    artifacts: dict[str, str] = Field(default_factory=dict, description="artifact name -> URL")
    deduplicated: bool = Field(False, description="true when an identical earlier job was returned")


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
    status: Literal["pending", "skipped", "corrected"]
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
