"""Prometheus metrics. Process-local ones use prometheus_client (multiprocess-safe under BentoML);
store-derived gauges (jobs by state, queue length, current model) are rendered at scrape time.

Labels never carry patient or slide identifiers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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


def observe_segmentation(summary: dict) -> None:
    """Record one finished segmentation from its summary."""
    SEGMENTATION_SECONDS.observe(summary["timings_s"]["wall_s"])
    TILES.inc(summary["tiles"]["computed"])
    TILES_PER_SECOND.set(summary["throughput"]["tiles_per_s"])
    TISSUE_MM2.inc(summary["tissue_area_mm2"])
    for measure, value in summary["mean_uncertainty"].items():
        SLIDE_UNCERTAINTY.labels(summary["model_version"], measure).observe(value)


def store_metrics(job_counts: dict[str, int], queue_pending: int, current_version: str) -> str:
    """Exposition text of the gauges derived from the shared store (same on every worker)."""
    reg = CollectorRegistry()
    jobs = Gauge("uga_jobs", "Segmentation jobs by state", ["state"], registry=reg)
    for state, n in job_counts.items():
        jobs.labels(state).set(n)
    Gauge("uga_queue_pending", "Review patches waiting for a clinician", registry=reg).set(queue_pending)
    Gauge("uga_model_info", "Current model version (value 1)", ["version"], registry=reg).labels(current_version).set(1)
    return generate_latest(reg).decode()
