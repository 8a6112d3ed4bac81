"""The names the whole service shares, each defined once: measures, scorings, states, artifacts.

Every other module imports these (type hints, pydantic fields, SQL CHECK constraints, CLI choices);
none spells them again.
"""

from __future__ import annotations

from typing import Literal, get_args

Measure = Literal["uga", "entropy", "mutual_information"]
MEASURES: tuple[str, ...] = get_args(Measure)

# How a patch is scored: the mean over its tissue, the paper's count of pixels near the slide's maximum,
# or the mean over the tissue the model calls normal (a region score aimed at missed tumour).
Scoring = Literal["mean", "paper", "negative"]
SCORINGS: tuple[str, ...] = get_args(Scoring)

# How the review queue picks its patches (service.inference.selection, shared with the experiment).
Selection = Literal["uncertainty", "class_balanced", "random", "uncertainty_diversity", "representative"]
SELECTIONS: tuple[str, ...] = get_args(Selection)

# Stitched per-pixel maps, in channel order: the mean probability, then every measure.
MapName = Literal["probability", "entropy", "mutual_information", "uga"]
MAP_NAMES: tuple[str, ...] = get_args(MapName)
# Written only by a model whose graph computes it (models/novelty.py): distance from the source in the
# network's features or in stain colour, whichever is larger.
NOVELTY = "novelty"

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = get_args(JobState)
ACTIVE_JOB_STATES: tuple[str, ...] = ("queued", "running")  # counted against the work limits
RETRYABLE_JOB_STATES: tuple[str, ...] = ("failed", "cancelled")  # resubmitting makes a new job
# reason codes of failures the job machinery itself records (a domain error adds its own code)
WORKER_FAILURE_CODES: tuple[str, ...] = ("job_timeout", "interrupted", "internal_error")

ItemStatus = Literal["pending", "skipped", "corrected"]
ITEM_STATUSES: tuple[str, ...] = get_args(ItemStatus)
HANDLED_ITEM_STATUSES: tuple[str, ...] = ("skipped", "corrected")  # stored; "pending" is their absence

RunState = Literal["requested", "running", "promoted", "rejected", "failed"]
RUN_STATES: tuple[str, ...] = get_args(RunState)
RUN_OUTCOMES: tuple[str, ...] = ("promoted", "rejected", "failed")
OPEN_RUN_STATES: tuple[str, ...] = ("requested", "running")
GATED_RUN_STATES: tuple[str, ...] = ("promoted", "rejected")  # the candidate reached the gate

ModelStatus = Literal["baseline", "promoted", "rejected", "failed", "candidate"]
MODEL_STATUSES: tuple[str, ...] = get_args(ModelStatus)

# Callback deliveries (the outbox): pending (due at next_at), sending (leased by one process),
# delivered, failed (gave up after UGA_CALLBACK_MAX_ATTEMPTS; an admin may retry).
DeliveryState = Literal["pending", "sending", "delivered", "failed"]
DELIVERY_STATES: tuple[str, ...] = get_args(DeliveryState)
FINAL_JOB_STATES: tuple[str, ...] = ("succeeded", "failed", "cancelled")  # each sends job.<state>

# Pointer moves: which count as promotions and which as rollbacks (metrics, history).
PointerAction = Literal["init", "promote", "manual-promote", "rollback", "auto-rollback"]
PROMOTE_ACTIONS: tuple[str, ...] = ("promote", "manual-promote")
ROLLBACK_ACTIONS: tuple[str, ...] = ("rollback", "auto-rollback")

Role = Literal["viewer", "annotator", "admin"]
ROLES: tuple[str, ...] = get_args(Role)  # in order of power

# Artifact name -> file name inside a job's directory.
ARTIFACTS: dict[str, str] = {
    "mask": "mask.tif",
    "probability": "probability.tif",
    "entropy": "uncertainty-entropy.tif",
    "mutual_information": "uncertainty-mutual_information.tif",
    "uga": "uncertainty-uga.tif",
    "novelty": "novelty.tif",
    "overlay": "overlay.png",
    "geojson": "annotations.geojson",
    "queue": "queue.json",
    "summary": "summary.json",
    "fhir_report": "report.fhir.json",  # written by the service's worker, not by `uga segment`
    "dicom_seg": "segmentation.dcm",  # the worker, for a DICOM source only
}


def sql_in(values: tuple[str, ...]) -> str:
    """``('a', 'b')`` for a CHECK constraint built from one of the tuples above."""
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"
