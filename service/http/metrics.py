"""Prometheus metrics. Process-local ones use prometheus_client (multiprocess-safe under BentoML);
store-derived gauges (jobs by state, queue length, current model) are rendered at scrape time.

Labels never carry patient or slide identifiers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

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
MODEL_SERVED = Gauge(
    "uga_model_served",
    "1 for the model version this serving process runs now, 0 for one it ran before (pid label per process)",
    ["version"],
    multiprocess_mode="liveall",
)


def model_swapped(old: str | None, new: str) -> None:
    """This process now serves ``new`` (after its first load, ``old`` is None)."""
    if old is not None:
        SWAPS.inc()
        MODEL_SERVED.labels(old).set(0)
    MODEL_SERVED.labels(new).set(1)


def observe_segmentation(summary: dict) -> None:
    """Record one finished segmentation from its summary."""
    SEGMENTATION_SECONDS.observe(summary["timings_s"]["wall_s"])
    TILES.inc(summary["tiles"]["computed"])
    TILES_PER_SECOND.set(summary["throughput"]["tiles_per_s"])
    TISSUE_MM2.inc(summary["tissue_area_mm2"])
    for measure, value in summary["mean_uncertainty"].items():
        SLIDE_UNCERTAINTY.labels(summary["model_version"], measure).observe(value)


class StoreCollector:
    """Values derived from the shared store, built as metric families at collect time.

    Never client Counter/Gauge objects: in BentoML's multiprocess mode those write their values into
    the shared directory, so creating them on every scrape added the whole count again each time
    (the prometheus-client pitfall) and duplicated their HELP lines. Counters here are counts of
    durable rows (monotonic: rows are never deleted).
    """

    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        store = self.store
        jobs = GaugeMetricFamily("uga_jobs", "Segmentation jobs by state", labels=["state"])
        for state, n in store.jobs.counts().items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily(
            "uga_queue_pending", "Review patches waiting for a clinician", value=store.queue.pending_count()
        )
        items = GaugeMetricFamily("uga_queue_items", "Patches of the current queues by status", labels=["status"])
        for status, n in store.queue.status_counts().items():
            items.add_metric([status], n)
        yield items
        yield GaugeMetricFamily(
            "uga_oldest_queued_job_age_seconds",
            "How long the oldest queued job has waited (0 when none waits)",
            value=store.jobs.oldest_queued_age_s(),
        )
        failures = CounterMetricFamily("uga_job_failures", "Failed jobs by reason code", labels=["reason"])
        for reason, n in store.jobs.failure_counts().items():
            failures.add_metric([reason], n)
        yield failures
        info = GaugeMetricFamily("uga_model_info", "Current model version (value 1)", labels=["version"])
        info.add_metric([store.models.current() or "none"], 1)
        yield info
        yield CounterMetricFamily("uga_corrections", "Corrections ingested (distinct)", value=store.corrections.count())
        runs = CounterMetricFamily("uga_finetune_runs", "Fine-tune runs by outcome", labels=["outcome"])
        for outcome, n in store.runs.counts().items():
            runs.add_metric([outcome], n)
        yield runs
        yield CounterMetricFamily(
            "uga_model_promotions",
            "Pointer moves to a new version (runner or admin)",
            value=store.models.count_actions(PROMOTE_ACTIONS),
        )
        yield CounterMetricFamily(
            "uga_model_rollbacks",
            "Pointer moves back (admin rollback or failed load)",
            value=store.models.count_actions(ROLLBACK_ACTIONS),
        )
        yield agreement_histogram(store.corrections.agreement())
        history = store.runs.list(20)
        running = next((r for r in history if r.state == "running"), None)
        yield GaugeMetricFamily(
            "uga_finetune_progress_ratio",
            "Progress of the running fine-tune (0 when idle)",
            value=running.progress_done / running.progress_total if running and running.progress_total else 0.0,
        )
        finished = next((r for r in history if r.state in GATED_RUN_STATES and r.metrics), None)
        if finished:
            m = finished.metrics
            yield GaugeMetricFamily(
                "uga_finetune_duration_seconds",
                "Duration of the last finished fine-tune run",
                value=m.get("duration_s", 0.0),
            )
            dice = GaugeMetricFamily(
                "uga_holdout_dice", "Frozen source-holdout Dice of the last gated run", labels=["model"]
            )
            for model, value in (m.get("source_holdout_dice") or {}).items():
                dice.add_metric([model], value)
            yield dice


AGREEMENT_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def agreement_histogram(measured: list[tuple[str, float]]) -> HistogramMetricFamily:
    """Dice of each proposing model's mask against the clinician's correction, by model version."""
    family = HistogramMetricFamily(
        "uga_correction_agreement_dice",
        "Dice of the proposing model's mask against each ingested correction, by model version",
        labels=["model_version"],
    )
    by_version: dict[str, list[float]] = {}
    for version, value in measured:
        by_version.setdefault(version, []).append(value)
    for version, values in sorted(by_version.items()):
        buckets = [(str(le), sum(v <= le for v in values)) for le in AGREEMENT_BUCKETS]
        family.add_metric([version], buckets + [("+Inf", len(values))], sum_value=sum(values))
    return family


def store_metrics(store: Store) -> str:
    """Exposition text of the store-derived metrics (the same on every worker and replica)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return generate_latest(registry).decode()
