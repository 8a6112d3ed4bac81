"""Metrics derived from the shared store: one custom collector, metric families built at collect time.

Exported by exactly one process per deployment (``UGA_STORE_METRICS``): the serving process when one
pod serves (the embedded default), or the single runner when several replicas do. A ``sum`` across
pods is then right, and a scrape never changes a value: counters are counts of durable rows, which
are never deleted. Labels carry states, reasons and model versions, never a slide or patient id.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from service.store import FinetuneRun, Store
from service.vocabulary import GATED_RUN_STATES, PROMOTE_ACTIONS, ROLLBACK_ACTIONS

log = logging.getLogger("uga.metrics")
AGREEMENT_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class StoreCollector:
    """The deployment's state as metric families (never client Counter/Gauge objects: in BentoML's
    multiprocess mode those persist in the shared directory, so re-creating them each scrape added the
    whole count again and duplicated their HELP lines)."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self) -> Iterator[Metric]:
        """Every family, or, when the store cannot be read, ``uga_store_up 0`` alone: a store outage
        must not take the scrape (and the process's other metrics, or the runner's heartbeat) with it."""
        try:
            families = [
                *self._jobs(),
                *self._queue(),
                *self._models(),
                *self._corrections(),
                *self._finetune(),
                *self._volume(),
            ]
        except Exception:  # noqa: BLE001 - any store error: reported as a metric, the scrape goes on
            log.warning("store metrics: the store cannot be read", exc_info=True)
            families = []
        up = float(bool(families))
        yield GaugeMetricFamily("uga_store_up", "1 when the store could be read for this scrape", value=up)
        yield from families

    def _jobs(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("uga_jobs", "Segmentation jobs by state", labels=["state"])
        for state, n in self.store.jobs.counts().items():
            jobs.add_metric([state], n)
        yield jobs
        age = GaugeMetricFamily(
            "uga_oldest_queued_job_age_seconds",
            "How long the oldest queued job has waited (0 when none waits), by origin: a client's, or a "
            "rescoring after a model change (every slide again; clients' jobs run first)",
            labels=["origin"],
        )
        for origin, seconds in self.store.jobs.oldest_queued_age_s().items():
            age.add_metric([origin], seconds)
        yield age
        failures = CounterMetricFamily("uga_job_failures", "Failed jobs by reason code", labels=["reason"])
        for reason, n in self.store.jobs.failure_counts().items():
            failures.add_metric([reason], n)
        yield failures
        deliveries = GaugeMetricFamily(
            "uga_callback_deliveries", "Callback events in the outbox by state", labels=["state"]
        )
        for state, n in self.store.deliveries.counts().items():
            deliveries.add_metric([state], n)
        yield deliveries

    def _queue(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "uga_queue_pending", "Review patches waiting for a clinician", value=self.store.queue.pending_count()
        )
        items = GaugeMetricFamily("uga_queue_items", "Patches of the current queues by status", labels=["status"])
        for status, n in self.store.queue.status_counts().items():
            items.add_metric([status], n)
        yield items

    def _models(self) -> Iterator[Metric]:
        models = self.store.models
        info = GaugeMetricFamily("uga_model_info", "The store's current model pointer (value 1)", labels=["version"])
        info.add_metric([models.current() or "none"], 1)
        yield info
        yield CounterMetricFamily(
            "uga_model_promotions",
            "Pointer moves to a new version (runner or admin)",
            value=models.count_actions(PROMOTE_ACTIONS),
        )
        yield CounterMetricFamily(
            "uga_model_rollbacks",
            "Pointer moves back (admin rollback or failed load)",
            value=models.count_actions(ROLLBACK_ACTIONS),
        )

    def _corrections(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "uga_corrections", "Corrections ingested (distinct)", value=self.store.corrections.count()
        )
        yield GaugeMetricFamily(
            "uga_corrections_withdrawn",
            "Corrections withdrawn now by their annotator or an admin: kept, never trained on again",
            value=self.store.corrections.withdrawn_count(),
        )
        yield agreement_histogram(self.store.corrections.agreement())

    def _finetune(self) -> Iterator[Metric]:
        runs = CounterMetricFamily("uga_finetune_runs", "Fine-tune runs by outcome", labels=["outcome"])
        for outcome, n in self.store.runs.counts().items():
            runs.add_metric([outcome], n)
        yield runs
        history = self.store.runs.list(20)
        running = next((r for r in history if r.state == "running"), None)
        yield GaugeMetricFamily(
            "uga_finetune_progress_ratio",
            "Progress of the running fine-tune (0 when idle)",
            value=running.progress_done / running.progress_total if running and running.progress_total else 0.0,
        )
        gated = next((r for r in history if r.state in GATED_RUN_STATES and r.metrics), None)
        if gated is not None:
            yield from gate_families(gated)

    def _volume(self) -> Iterator[Metric]:
        """The data volume (jobs' maps, corrections, models; SQLite too): a full one refuses every write."""
        usage = shutil.disk_usage(self.store.data_dir)
        yield GaugeMetricFamily(
            "uga_data_volume_free_bytes", "Free bytes on the data directory's volume", value=usage.free
        )
        yield GaugeMetricFamily(
            "uga_data_volume_size_bytes", "Size of the data directory's volume in bytes", value=usage.total
        )


def gate_families(run: FinetuneRun) -> Iterator[Metric]:
    """What the gate measured on the last candidate it judged (promoted or rejected)."""
    m = run.metrics or {}
    yield GaugeMetricFamily(
        "uga_last_gate_passed",
        "1 if the last gated candidate passed the gate, else 0",
        value=float(bool(m.get("passed"))),
    )
    yield GaugeMetricFamily(
        "uga_last_gate_timestamp_seconds", "When the last gated fine-tune ended", value=run.finished_at or 0.0
    )
    yield GaugeMetricFamily(
        "uga_finetune_duration_seconds", "Duration of the last gated fine-tune run", value=m.get("duration_s", 0.0)
    )
    dice = GaugeMetricFamily(
        "uga_last_gate_dice",
        "Dice of the current model and of the candidate on each gate holdout, for the last gated run",
        labels=["holdout", "model"],
    )
    for holdout, key in (("source", "source_holdout_dice"), ("corrections", "heldout_dice")):
        for model, value in (m.get(key) or {}).items():
            dice.add_metric([holdout, model], value)
    yield dice
    yield GaugeMetricFamily(
        "uga_last_gate_heldout_corrections",
        "Held-out corrections the last gated candidate was judged on",
        value=m.get("heldout_corrections", 0),
    )


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


def store_registry(store: Store) -> CollectorRegistry:
    """A registry holding only the store collector (what the exporting process adds to its own)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    return registry


def store_metrics(store: Store) -> str:
    """Exposition text of the store-derived metrics."""
    return generate_latest(store_registry(store)).decode()
