"""Per-process Prometheus metrics of a serving process (prometheus_client, multiprocess-safe under
BentoML): requests, swaps, and the segmentations this process ran. Summed across processes and pods.

The deployment's store-derived metrics live in ``service.loop.store_metrics``. Labels never carry a
slide or patient identifier, nor any value a caller chose (sites come from a configured list).
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram, multiprocess

from service.store import Job
from service.vocabulary import MEASURES

SEGMENTATION_SECONDS = Histogram(
    "uga_segmentation_duration_seconds",
    "Wall time of one successful slide segmentation: the ensemble over the tissue, then its maps, queue and "
    "overlay (not a DICOMweb download, nor the DICOM SEG / FHIR outputs; a job that timed out or failed is "
    "in uga_job_failures_total)",
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 2400, 3600, 5400, 7200, 14400),  # UGA_MAX_JOB_S: 7200 s default
)
TILES = Counter("uga_tiles_processed_total", "Tiles run through the ensemble")
TILES_PER_SECOND = Gauge(
    "uga_tiles_per_second", "Tiles per second of the most recent segmentation", multiprocess_mode="mostrecent"
)
TISSUE_MM2 = Counter("uga_tissue_area_mm2_total", "Tissue area segmented, mm²")
# Placed where real slides fall: printed by bench/metric_buckets.py (the shipped baseline on the demo
# and test slides, in and out of domain: uga 0.38-0.68 bits, entropy 0.31-0.49, BALD 0.05-0.15,
# tumour fraction 0.09-0.25; the baseline of 2026-11-30); dense there, coarse elsewhere. Rerun it after a new baseline.
UNCERTAINTY_BUCKETS = (
    *(0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16, 0.18, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65),
    *(0.7, 0.75, 1.0, 2.0, 3.0),
)
TUMOUR_FRACTION_BUCKETS = (0.05, 0.1, 0.15, 0.16, 0.18, 0.2, 0.22, 0.24, 0.26, 0.28, 0.4, 0.6, 0.8, 1.0)
SLIDE_UNCERTAINTY = Histogram(
    "uga_slide_mean_uncertainty",
    "Per-slide mean uncertainty over tissue (bits), by model version, measure and site: drift shows here",
    ["model_version", "measure", "site"],
    buckets=UNCERTAINTY_BUCKETS,
)
SLIDE_TUMOUR_FRACTION = Histogram(
    "uga_slide_tumour_fraction",
    "Per-slide tumour fraction of the tissue, by model version and site",
    ["model_version", "site"],
    buckets=TUMOUR_FRACTION_BUCKETS,
)
SLIDE_NOVELTY_SHARE = Histogram(
    "uga_slide_novelty_share",
    "Per-slide share of tissue unlike the training data (beyond the model's novelty threshold), by model "
    "version and site (models with a novelty output only)",
    ["model_version", "site"],
    buckets=(0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0),
)
SLIDES_OUT_OF_DISTRIBUTION = Counter(
    "uga_slides_out_of_distribution",
    "Slides flagged out of distribution (novelty share above the model's flag share), by model version and site",
    ["model_version", "site"],
)
SLIDES_WITHOUT_TISSUE = Counter(
    "uga_slides_without_tissue",
    "Slides in which no tissue was found (blank, or a stain the tissue mask misses), by site: kept out of the "
    "per-slide histograms, where they would read as certain, tumour-free and in distribution",
    ["site"],
)
SWAPS = Counter("uga_model_swaps_total", "Hot swaps of the served model (per serving process)")
MODEL_SERVED = Gauge(
    "uga_model_served",
    "1 for the model version this serving process runs now, 0 for one it ran before (pid label per process)",
    ["version"],
    multiprocess_mode="liveall",
)
REQUESTS = Counter(
    "uga_http_requests",
    "API requests by route template, method and status class (2xx, 4xx, 5xx)",
    ["route", "method", "status_class"],
)
REQUEST_SECONDS = Histogram(
    "uga_http_request_duration_seconds",
    "API request duration by route template and status class",
    ["route", "status_class"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
NO_SITE = "none"


def forget_dead_processes(directory: str | None = None) -> list[int]:
    """Drop the live-gauge files of serving processes that are gone (killed without a clean exit, e.g.
    by the OOM killer), and this process's own (a reused pid): otherwise a dead process would report
    the version it served as served until the pod restarts. Returns the pids forgotten."""
    directory = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not os.path.isdir(directory):
        return []
    pids = {int(p) for f in Path(directory).glob("gauge_live*_*.db") if (p := f.stem.rpartition("_")[2]).isdigit()}
    gone = sorted(pid for pid in pids if pid == os.getpid() or not _running(pid))
    for pid in gone:
        multiprocess.mark_process_dead(pid, directory)
    return gone


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    return True


def model_swapped(old: str | None, new: str, sites: tuple[str, ...] = ()) -> None:
    """This process now serves ``new`` (after its first load, ``old`` is None). The per-slide series of
    ``new`` start at 0 for every configured site: a series born at its first slide would already hold
    that slide, which ``increase()`` never counts (a new site's first flagged slide, say)."""
    if old is not None:
        SWAPS.inc()
        MODEL_SERVED.labels(old).set(0)
    MODEL_SERVED.labels(new).set(1)
    for site in (*sites, NO_SITE):
        for measure in MEASURES:
            SLIDE_UNCERTAINTY.labels(new, measure, site)
        SLIDE_TUMOUR_FRACTION.labels(new, site)
        SLIDE_NOVELTY_SHARE.labels(new, site)
        SLIDES_OUT_OF_DISTRIBUTION.labels(new, site)
        SLIDES_WITHOUT_TISSUE.labels(site)


def observe_segmentation(job: Job, summary: dict) -> None:
    """Record one finished segmentation from its job and summary. The per-slide histograms describe
    slides as they arrive: a rescoring after a model change (every slide again) counts as work only."""
    site = job.site or NO_SITE
    SEGMENTATION_SECONDS.observe(summary["timings_s"]["wall_s"])
    TILES.inc(summary["tiles"]["computed"])
    TILES_PER_SECOND.set(summary["throughput"]["tiles_per_s"])
    TISSUE_MM2.inc(summary["tissue_area_mm2"])
    if job.origin == "rescoring":
        return
    if summary["tissue_area_mm2"] <= 0:
        SLIDES_WITHOUT_TISSUE.labels(site).inc()
        return
    for measure, value in summary["mean_uncertainty"].items():
        SLIDE_UNCERTAINTY.labels(summary["model_version"], measure, site).observe(value)
    if summary.get("tumour_fraction_of_tissue") is not None:
        SLIDE_TUMOUR_FRACTION.labels(summary["model_version"], site).observe(summary["tumour_fraction_of_tissue"])
    if novelty := summary.get("novelty"):
        SLIDE_NOVELTY_SHARE.labels(summary["model_version"], site).observe(novelty["share_beyond_threshold"])
        SLIDES_OUT_OF_DISTRIBUTION.labels(summary["model_version"], site).inc(int(novelty["out_of_distribution"]))


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    """One answered API request (``route`` is a template, never the caller's path)."""
    status_class = f"{status // 100}xx" if 100 <= status < 600 else "other"
    REQUESTS.labels(route, method if method in METHODS else "OTHER", status_class).inc()
    REQUEST_SECONDS.labels(route, status_class).observe(seconds)


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
