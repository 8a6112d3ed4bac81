"""Prometheus metrics. Process-local ones use prometheus_client (multiprocess-safe under BentoML);
store-derived gauges (jobs by state, queue length, current model) are rendered at scrape time.

Labels never carry patient or slide identifiers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.store import Store
from service.vocabulary import GATED_RUN_STATES, PROMOTE_ACTIONS, ROLLBACK_ACTIONS

SEGMENTATION_SECONDS = Histogram(
    "uga_segmentation_duration_seconds",
    "Wall time of one slide segmentation (engine + outputs)",
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 2400, 3600),
)
TILES = Counter("uga_tiles_processed_total", "Tiles run through the ensemble")
TILES_PER_SECOND = Gauge(
    "uga_tiles_per_second", "Tiles per second of the most recent segmentation", multiprocess_mode="mostrecent"
)
TISSUE_MM2 = Counter("uga_tissue_area_mm2_total", "Tissue area segmented, mm²")
SLIDE_UNCERTAINTY = Histogram(
    "uga_slide_mean_uncertainty",
    "Per-slide mean uncertainty over tissue (bits), by model version and measure: drift shows here",
    ["model_version", "measure"],
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
)
JOBS_FAILED = Counter("uga_jobs_failed_total", "Segmentation jobs that failed")
SWAPS = Counter("uga_model_swaps_total", "Hot swaps of the served model (per serving process)")


def observe_segmentation(summary: dict) -> None:
    """Record one finished segmentation from its summary."""
    SEGMENTATION_SECONDS.observe(summary["timings_s"]["wall_s"])
    TILES.inc(summary["tiles"]["computed"])
    TILES_PER_SECOND.set(summary["throughput"]["tiles_per_s"])
    TISSUE_MM2.inc(summary["tissue_area_mm2"])
    for measure, value in summary["mean_uncertainty"].items():
        SLIDE_UNCERTAINTY.labels(summary["model_version"], measure).observe(value)


def store_metrics(store: Store) -> str:
    """Exposition text of the gauges derived from the shared store (the same on every worker/replica).

    Counters here are counts of durable rows (monotonic: rows are never deleted).
    """
    reg = CollectorRegistry()
    jobs = Gauge("uga_jobs", "Segmentation jobs by state", ["state"], registry=reg)
    for state, n in store.jobs.counts().items():
        jobs.labels(state).set(n)
    Gauge("uga_queue_pending", "Review patches waiting for a clinician", registry=reg).set(store.queue.pending_count())
    current = store.models.current() or "none"
    Gauge("uga_model_info", "Current model version (value 1)", ["version"], registry=reg).labels(current).set(1)
    _counter(reg, "uga_corrections", "Corrections ingested (distinct)", store.corrections.count())
    runs = Counter("uga_finetune_runs", "Fine-tune runs by outcome", ["outcome"], registry=reg)
    for outcome, n in store.runs.counts().items():
        runs.labels(outcome).inc(n)
    _counter(
        reg,
        "uga_model_promotions",
        "Pointer moves to a new version (runner or admin)",
        store.models.count_actions(PROMOTE_ACTIONS),
    )
    _counter(
        reg,
        "uga_model_rollbacks",
        "Pointer moves back (admin rollback or failed load)",
        store.models.count_actions(ROLLBACK_ACTIONS),
    )
    history = store.runs.list(20)
    running = next((r for r in history if r.state == "running"), None)
    Gauge("uga_finetune_progress_ratio", "Progress of the running fine-tune (0 when idle)", registry=reg).set(
        running.progress_done / running.progress_total if running and running.progress_total else 0.0
    )
    finished = next((r for r in history if r.state in GATED_RUN_STATES and r.metrics), None)
    if finished:
        m = finished.metrics
        Gauge("uga_finetune_duration_seconds", "Duration of the last finished fine-tune run", registry=reg).set(
            m.get("duration_s", 0.0)
        )
        dice = Gauge("uga_holdout_dice", "Frozen source-holdout Dice of the last gated run", ["model"], registry=reg)
        for model, value in (m.get("source_holdout_dice") or {}).items():
            dice.labels(model).set(value)
    return generate_latest(reg).decode()


def _counter(reg: CollectorRegistry, name: str, doc: str, value: float) -> None:
    c = Counter(name, doc, registry=reg)
    c.inc(value)
