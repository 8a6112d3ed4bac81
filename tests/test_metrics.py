"""QC metrics in-process: request labels from route templates and status classes, sites from a
configured list, per-slide histograms, gate metrics, and which process exports the store's metrics."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from service.config import Settings
from service.errors import Unavailable
from service.http.metrics import forget_dead_processes, model_swapped, observe_segmentation
from service.loop.runner import Runner
from service.loop.store_metrics import gate_families, store_metrics
from service.store import FinetuneRun, Job, Store
from tests.inprocess import InProcessService
from tests.server import free_port, hostile_slide_root, wait_job

SITES = "site-a,scanner-2"


@pytest.fixture(scope="module")
def env(tmp_path_factory, source_slide):
    root = tmp_path_factory.mktemp("metrics")
    service = InProcessService(root / "data", hostile_slide_root(root, source_slide), sites=SITES)
    yield service
    service.close()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def request_labels() -> set[tuple[str, str, str]]:
    return {
        (s.labels["route"], s.labels["method"], s.labels["status_class"])
        for m in REGISTRY.collect()
        if m.name == "uga_http_requests"
        for s in m.samples
        if s.name == "uga_http_requests_total"
    }


def test_request_metrics_are_labelled_by_route_template_and_status_class_only(env):
    before = sample("uga_http_requests_total", route="/v1/jobs/{job_id}", method="GET", status_class="4xx")
    with env.client("viewer") as c:
        for i in range(3):
            assert c.get(f"/v1/jobs/no-such-job-{i}").status_code == 404
        assert c.get("/v1/made-up/../path/%2e%2e").status_code == 404
        assert c.delete("/v1/models").status_code in (404, 405)
    with env.client(None) as c:
        assert c.get("/v1/jobs").status_code == 401  # refused before a route ran: counted all the same
    after = sample("uga_http_requests_total", route="/v1/jobs/{job_id}", method="GET", status_class="4xx")
    assert after - before == 3
    assert sample("uga_http_requests_total", route="/v1/jobs", method="GET", status_class="4xx") >= 1
    labels = request_labels()
    routes = {r for r, _, _ in labels}
    assert "/v1/{unknown}" in routes
    assert not [r for r in routes if "no-such-job" in r or "made-up" in r], routes  # nothing a caller chose
    assert {s for _, _, s in labels} <= {"1xx", "2xx", "3xx", "4xx", "5xx", "other"}
    assert sample("uga_http_request_duration_seconds_count", route="/v1/jobs/{job_id}", status_class="4xx") >= 3


def test_a_job_may_name_a_configured_site_which_labels_its_slide_metrics(env):
    with env.client("annotator") as c:
        r = c.post("/v1/jobs", json={"slide": "cases/a.tif", "options": {"patch_um": 512}, "site": "scanner-2"})
        assert r.status_code == 202, r.text
        assert r.json()["site"] == "scanner-2"
        job = wait_job(c, r.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    version, fraction = job["model_version"], job["summary"]["tumour_fraction_of_tissue"]
    labels = {"model_version": version, "site": "scanner-2"}
    assert sample("uga_slide_tumour_fraction_count", **labels) == 1
    assert sample("uga_slide_tumour_fraction_sum", **labels) == pytest.approx(fraction)
    assert sample("uga_slide_mean_uncertainty_count", measure="uga", **labels) == 1
    mean_uga = job["summary"]["mean_uncertainty"]["uga"]
    assert sample("uga_slide_mean_uncertainty_sum", measure="uga", **labels) == pytest.approx(mean_uga)


def test_an_unknown_site_is_refused_and_nothing_is_queued(env):
    jobs_before = env.runtime.store.jobs.counts()
    with env.client("annotator") as c:
        for site in ("site-b", "Site-A", "x" * 60, "patient-4711"):
            r = c.post("/v1/jobs", json={"slide": "cases/a.tif", "options": {"patch_um": 256}, "site": site})
            assert r.status_code in (400, 422), r.text
            if r.status_code == 400:
                assert r.json()["error"]["code"] == "unknown_site"
                assert "site-a, scanner-2" in r.json()["error"]["message"]
    assert env.runtime.store.jobs.counts() == jobs_before


def test_site_names_are_checked_when_the_settings_load(tmp_path):
    assert Settings(sites=" a , b,a ").site_names == ("a", "b")
    assert Settings().site_names == ()
    for bad in ("Hospital A", "ok,../x", ",".join(f"s{i}" for i in range(65))):
        with pytest.raises(ValidationError):
            Settings(sites=bad)


def test_gate_metrics_describe_the_last_candidate_the_gate_judged():
    run = FinetuneRun(
        id="r1",
        state="rejected",
        trigger="threshold",
        created_at=1.0,
        finished_at=2.0,
        metrics={
            "passed": False,
            "duration_s": 12.5,
            "source_holdout_dice": {"current": 0.8, "candidate": 0.7},
            "heldout_dice": {"current": 0.5, "candidate": 0.6},
            "heldout_corrections": 3,
        },
    )
    families = {f.name: f for f in gate_families(run)}
    dice = {(s.labels["holdout"], s.labels["model"]): s.value for s in families["uga_last_gate_dice"].samples}
    assert dice == {
        ("source", "current"): 0.8,
        ("source", "candidate"): 0.7,
        ("corrections", "current"): 0.5,
        ("corrections", "candidate"): 0.6,
    }
    assert families["uga_last_gate_passed"].samples[0].value == 0.0
    assert families["uga_last_gate_heldout_corrections"].samples[0].value == 3
    assert families["uga_finetune_duration_seconds"].samples[0].value == 12.5


def test_known_failure_reasons_and_outcomes_are_exported_at_zero(tmp_path, env):
    text = store_metrics(env.runtime.store)
    for reason in ("job_timeout", "interrupted", "internal_error"):
        assert f'uga_job_failures_total{{reason="{reason}"}} 0.0' in text
    assert 'uga_finetune_runs_total{outcome="promoted"} 0.0' in text


@pytest.mark.parametrize("exporter", ["runner", "serve"])
def test_the_runner_serves_metrics_and_the_store_metrics_only_when_it_is_the_exporter(env, exporter):
    port = free_port()
    settings = env.settings.model_copy(update={"store_metrics": exporter, "runner_metrics_port": port})
    runner = Runner(settings)
    runner.serve_metrics()
    runner.heartbeat.set_to_current_time()
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert "uga_runner_heartbeat_timestamp_seconds " in text
    assert ('uga_jobs{state="succeeded"}' in text) == (exporter == "runner")


def test_the_data_volume_is_exported_as_the_operating_system_reports_it(env):
    families = {f.name: f for f in text_string_to_metric_families(store_metrics(env.runtime.store))}
    free = families["uga_data_volume_free_bytes"].samples[0].value
    size = families["uga_data_volume_size_bytes"].samples[0].value
    usage = shutil.disk_usage(env.runtime.store.data_dir)
    assert size == usage.total and 0 < free <= size
    assert abs(free - usage.free) < 0.01 * size  # other writers on this machine move it a little


def _summary(version: str, tissue_mm2: float) -> dict:
    """A finished job's summary as the worker reports it (no tissue: every mean 0, as the pipeline writes)."""
    some = tissue_mm2 > 0
    return {
        "model_version": version,
        "timings_s": {"wall_s": 2.0},
        "tiles": {"computed": 10 if some else 0},
        "throughput": {"tiles_per_s": 5.0 if some else 0.0},
        "tissue_area_mm2": tissue_mm2,
        "mean_uncertainty": {"uga": 0.4 if some else 0.0},
        "tumour_fraction_of_tissue": 0.2 if some else 0.0,
        "novelty": {"share_beyond_threshold": 0.5 if some else 0.0, "out_of_distribution": some},
    }


def test_a_rescoring_counts_as_work_but_not_as_an_arriving_slide():
    """After a promotion every slide is segmented again: the drift and out-of-distribution signals
    describe slides as they arrive, so a rescoring must not add them again."""
    summary = _summary("v-metrics-test", tissue_mm2=1.5)
    labels = {"model_version": "v-metrics-test", "site": "none"}

    def job(origin: str | None) -> Job:
        return Job(id="j", slide="a.tif", options={}, model_version="v-metrics-test", state="succeeded",
                   created_at=0.0, origin=origin)  # fmt: skip

    tiles = sample("uga_tiles_processed_total")
    observe_segmentation(job("rescoring"), summary)
    assert sample("uga_tiles_processed_total") == tiles + 10  # the work is counted
    assert sample("uga_slide_tumour_fraction_count", **labels) == 0
    assert sample("uga_slides_out_of_distribution_total", **labels) == 0
    assert sample("uga_slide_mean_uncertainty_count", measure="uga", **labels) == 0
    for origin in ("client", None):  # None: a job from before origins were recorded
        observe_segmentation(job(origin), summary)
    assert sample("uga_slide_tumour_fraction_count", **labels) == 2
    assert sample("uga_slides_out_of_distribution_total", **labels) == 2


def test_a_slide_without_tissue_is_counted_apart_not_as_a_certain_tumour_free_slide():
    """A blank slide (or a stain the tissue mask misses) has means of 0 over no tissue: in the drift
    and out-of-distribution histograms it would read as certain and in distribution."""
    summary = _summary("v-blank-test", tissue_mm2=0.0)
    job = Job(id="j", slide="blank.tif", options={}, model_version="v-blank-test", state="succeeded",
              created_at=0.0, origin="client", site=None)  # fmt: skip
    blank = sample("uga_slides_without_tissue_total", site="none")
    observe_segmentation(job, summary)
    assert sample("uga_slides_without_tissue_total", site="none") == blank + 1
    labels = {"model_version": "v-blank-test", "site": "none"}
    assert sample("uga_slide_mean_uncertainty_count", measure="uga", **labels) == 0
    assert sample("uga_slide_tumour_fraction_count", **labels) == 0
    assert sample("uga_slide_novelty_share_count", **labels) == 0


def test_a_new_versions_per_slide_series_start_at_zero_for_every_site():
    """A series born at its first slide already holds it, and increase() never counts a first value:
    a new site's first flagged slide would be invisible to the out-of-distribution alert."""
    model_swapped(None, "v-primed-test", ("north", "south"))
    for site in ("north", "south", "none"):
        labels = {"model_version": "v-primed-test", "site": site}
        assert REGISTRY.get_sample_value("uga_slides_out_of_distribution_total", labels) == 0
        assert REGISTRY.get_sample_value("uga_slide_novelty_share_count", labels) == 0
        assert REGISTRY.get_sample_value("uga_slide_tumour_fraction_count", labels) == 0
        assert REGISTRY.get_sample_value("uga_slide_mean_uncertainty_count", {**labels, "measure": "uga"}) == 0
        assert REGISTRY.get_sample_value("uga_slides_without_tissue_total", {"site": site}) is not None


def test_a_killed_serving_process_stops_reporting_the_version_it_served(tmp_path):
    """BentoML removes a worker's live-gauge files only on a clean exit: one killed by the OOM killer
    would report 'serving v1' until the pod restarts, unless the next process forgets it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = os.getppid()  # pytest's parent: running, and not this process
    for pid in (dead.pid, alive, os.getpid()):
        (tmp_path / f"gauge_liveall_{pid}.db").write_bytes(b"")
    (tmp_path / f"counter_{dead.pid}.db").write_bytes(b"")  # counters of the dead stay: their counts happened
    assert forget_dead_processes(str(tmp_path)) == sorted([dead.pid, os.getpid()])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"counter_{dead.pid}.db", f"gauge_liveall_{alive}.db"]
    assert forget_dead_processes(str(tmp_path / "missing")) == []


def test_a_store_outage_is_a_metric_not_a_failed_scrape(tmp_path, monkeypatch):
    store = Store(tmp_path / "data")
    assert "uga_store_up 1.0" in store_metrics(store)

    def down():
        raise Unavailable("store_unavailable", "cannot reach PostgreSQL")

    monkeypatch.setattr(store.jobs, "counts", down)  # what the PostgreSQL backend raises when it is down
    text = store_metrics(store)
    assert "uga_store_up 0.0" in text and "uga_jobs" not in text  # no stale or made-up numbers
    store.close()
