"""Typed records the store returns (one per table a caller reads)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from service.vocabulary import DeliveryState, ItemStatus, JobState, ModelStatus, RunState


def _from(cls, row: dict | None):
    """A record from a decoded row (unknown columns ignored); None stays None."""
    if row is None:
        return None
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in row.items() if k in names})


@dataclass(frozen=True)
class Job:
    id: str
    slide: str
    options: dict  # as requested (None = server default)
    model_version: str
    state: JobState
    created_at: float
    resolved: dict | None = None  # the segmentation options it runs with
    cancel_requested: int = 0
    dedup_key: str | None = None
    progress_done: int = 0
    progress_total: int = 0
    error: str | None = None
    summary: dict | None = None
    submitted_by: str | None = None
    attempts: int = 0
    worker: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    site: str | None = None  # one of UGA_SITES, or None
    callback: str | None = None  # one of UGA_CALLBACKS, told when the job ends
    stow: str | None = None  # one of UGA_PACS: the job's DICOM SEG is stored there (STOW-RS)
    expired_at: float | None = None  # its files were removed by retention (a newer job replaced it)
    origin: str | None = None  # "rescoring": the system re-segmented the slide after a model change

    from_row = classmethod(_from)


@dataclass(frozen=True)
class QueueItem:
    """A review patch of a finished job, with its status on the slide."""

    id: str
    slide: str
    job_id: str
    rank: int
    bbox_level0: dict
    bbox_um: dict
    score: float
    measure: str
    scoring: str
    mean_uncertainty: float
    mean_probability: float
    tissue_fraction: float
    model_version: str
    status: ItemStatus = "pending"

    from_row = classmethod(_from)


@dataclass(frozen=True)
class Correction:
    id: str
    slide: str
    x: int
    y: int
    width: int
    height: int
    mpp: float
    annotator: str
    tumour_fraction: float
    holdout: int
    created_at: float
    queue_item_id: str | None = None
    proposed_by_version: str | None = None
    model_dice: float | None = None  # the proposing model's mask against this one (QC)
    withdrawn_at: float | None = None  # withdrawn: kept for the record, never trained on or gated with
    withdrawn_by: str | None = None
    withdrawn_reason: str | None = None

    from_row = classmethod(_from)


@dataclass(frozen=True)
class ModelVersion:
    version: str
    sha256: str
    path: str
    status: ModelStatus
    created_at: float
    parent: str | None = None
    reason: str | None = None
    metrics: dict = field(default_factory=dict)
    corrections: dict = field(default_factory=dict)  # correction ids used: train / holdout

    @classmethod
    def from_row(cls, row: dict | None) -> ModelVersion | None:
        if row is None:
            return None
        return _from(cls, {**row, "metrics": row.get("metrics") or {}, "corrections": row.get("corrections") or {}})


@dataclass(frozen=True)
class FinetuneRun:
    id: str
    state: RunState
    trigger: str
    created_at: float
    parent: str | None = None
    candidate: str | None = None
    corrections: dict | None = None
    progress_done: int = 0
    progress_total: int = 0
    metrics: dict | None = None
    reason: str | None = None
    requested_by: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None

    from_row = classmethod(_from)


@dataclass(frozen=True)
class ApiToken:
    """A named user's API token, as the store describes it: never its secret nor the secret's hash."""

    id: str
    name: str
    role: str
    created_at: float
    revoked_at: float | None = None
    last_used_at: float | None = None

    from_row = classmethod(_from)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def as_dict(record: Any) -> dict:
    """A record as a plain dict (JSON responses)."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


@dataclass(frozen=True)
class Delivery:
    """One callback event in the outbox and how sending it went."""

    id: str
    job_id: str
    target: str
    event: str
    payload: str  # the exact JSON body that is signed and sent
    state: DeliveryState
    created_at: float
    next_at: float
    attempts: int = 0
    lease_until: float | None = None
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None

    from_row = classmethod(_from)
