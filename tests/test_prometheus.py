"""The QC dashboard and alerts, proven against a live Prometheus.

A real Prometheus (Debian's `prometheus`, on loopback) scrapes a real `uga serve` (two workers) and
the runner, laid out as in Kubernetes: the runner is the one exporter of the store-derived metrics
(UGA_STORE_METRICS=runner). A short loop runs (a job with a site, corrections, a fine-tune, a
promotion, the hot swap); then every expression of the Grafana dashboard and every alert rule is
evaluated through Prometheus's HTTP API, and its counters are compared with the store's truth.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from service.store import Store
from tests.server import REPO, RunnerProcess, Server, correct_disagreeing, finished_run, free_port, wait_for, wait_job

pytestmark = pytest.mark.e2e
PROMETHEUS = shutil.which("prometheus")
DASHBOARD = REPO / "k8s" / "base" / "grafana-dashboard.json"
RULES = REPO / "k8s" / "components" / "alerts" / "prometheusrule.yaml"
# what Grafana substitutes in the dashboard's expressions
VARIABLES = {"$__rate_interval": "1m", "$measure": ".*", "$site": ".*"}
LOOP_ENV = {
    "UGA_WORKERS": "2",
    "UGA_STORE_METRICS": "runner",
    "UGA_SITES": "site-a,site-b",
    "UGA_FINETUNE_MIN_CORRECTIONS": "2",
    "UGA_FINETUNE_STEPS": "5",
    "UGA_FINETUNE_THREADS": "2",
    "UGA_HOLDOUT_EVERY": "0",
    "UGA_GATE_MARGIN": "1.0",  # this test is about the metrics of a promotion, not the gate's judgement
    "UGA_RUNNER_POLL_S": "1",
    "UGA_MODEL_POLL_S": "0.5",
}


class Prometheus:
    """A Prometheus server on a free loopback port, scraping ``targets`` every second."""

    def __init__(self, root: Path, targets: dict[str, tuple[str, str]], rule_file: Path):
        self.root, self.port = root, free_port()
        jobs = [
            {
                "job_name": job,
                "scrape_interval": "1s",
                "static_configs": [{"targets": [address], "labels": {"pod": pod, "namespace": "uga"}}],
            }
            for job, (address, pod) in targets.items()
        ]
        config = {"global": {"evaluation_interval": "1s"}, "rule_files": [str(rule_file)], "scrape_configs": jobs}
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = root / "prometheus.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={root / 'prometheus.yml'}",
                    f"--storage.tsdb.path={root / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, timeout=60, interval=0.3, what="prometheus ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{self.log.read_text()[-2000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, path: str, **params: str) -> dict:
        body = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/{path}", params=params, timeout=30).json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float:
        [series] = self.query(expr)
        return float(series["value"][1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, expression with Grafana's variables filled in, legend) of every panel target."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            found.append((panel["title"], expr, target.get("legendFormat", "")))
    return found


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, ood_slide):
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (apt install prometheus; .ci/run installs it)")
    root = tmp_path_factory.mktemp("prometheus")
    slides = root / "slides"
    slides.mkdir()
    shutil.copy(ood_slide, slides / "ood.tif")
    server = Server(root / "data", slides, **LOOP_ENV).start()
    runner = RunnerProcess(server).start()
    rules = root / "rules.yml"
    rules.write_text(yaml.safe_dump(yaml.safe_load(RULES.read_text())["spec"]))
    try:
        wait_for(lambda: _up(runner.metrics_url), timeout=60, interval=0.3, what="runner metrics")
        prometheus = Prometheus(
            root,
            {
                "uga-serve": (f"127.0.0.1:{server.port}", "uga-serve-0"),
                "uga-runner": (f"127.0.0.1:{runner.metrics_port}", "uga-runner-0"),
            },
            rules,
        )
    except Exception:
        runner.stop()
        server.stop()
        raise
    state = {"server": server, "runner": runner, "prometheus": prometheus}
    yield state
    prometheus.stop()
    runner.stop()
    server.stop()


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def loop(deployment):
    """A job (site-a), two corrections, a fine-tune the runner promotes, every worker swapped."""
    server, prometheus = deployment["server"], deployment["prometheus"]
    with server.client("annotator") as c:
        request = {"slide": "ood.tif", "site": "site-a", "options": {"patch_um": 256, "queue_size": 3}}
        r = c.post("/v1/jobs", json=request)
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        items = c.get("/v1/queue", params={"slide": "ood.tif", "k": 2}).json()["items"]
        correct_disagreeing(c, items)
        assert c.get("/v1/jobs/no-such-job").status_code == 404  # an error for the errors panel
    with server.client("admin") as c:
        run = finished_run(c)
        assert run["state"] == "promoted", run
        new = run["candidate"]

        # every worker serves the new version, as Prometheus sees it (per process, not the pointer)
        def served() -> list[str]:
            return [s["metric"]["version"] for s in prometheus.query("uga_model_served == 1")]

        wait_for(
            lambda: served() == [new, new],
            timeout=60,
            interval=0.5,
            what="both workers serving the promoted version in Prometheus",
        )

        def rescored():  # the promotion re-segments the slide with the new version
            jobs = c.get("/v1/jobs", params={"limit": 50}).json()["jobs"]
            return all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs) and any(
                j["model_version"] == new and j["state"] == "succeeded" for j in jobs
            )

        wait_for(rescored, timeout=300, interval=1, what="the rescoring job with the new version")
    time.sleep(4)  # a few more scrapes and rule evaluations after the last change
    return {"job": job, "new": new, "baseline": job["model_version"]}


def test_every_dashboard_panel_returns_data_with_the_labels_it_uses(deployment, loop):
    prometheus = deployment["prometheus"]
    empty, unlabelled = [], []
    targets = dashboard_targets()
    assert len(targets) >= 20
    for title, expr, legend in targets:
        result = prometheus.query(expr)
        if not result:
            empty.append(f"{title}: {expr}")
            continue
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            missing = [s["metric"] for s in result if not s["metric"].get(label)]
            if missing:
                unlabelled.append(f"{title}: {{{{{label}}}}} absent from {missing[:2]}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert not unlabelled, "\n".join(unlabelled)
    for variable in ("measure", "site"):  # the dashboard's template variables have values
        values = prometheus.api(f"label/{variable}/values", **{"match[]": "uga_slide_mean_uncertainty_count"})
        assert values, variable
    assert "site-a" in prometheus.api("label/site/values", **{"match[]": "uga_slide_tumour_fraction_count"})


def test_every_alert_rule_loads_and_evaluates(deployment, loop):
    prometheus = deployment["prometheus"]
    wanted = [r["alert"] for g in yaml.safe_load(RULES.read_text())["spec"]["groups"] for r in g["rules"]]
    loaded = {r["name"]: r for g in prometheus.api("rules")["groups"] for r in g["rules"]}
    assert sorted(loaded) == sorted(wanted)
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert rule["lastEvaluation"] and not rule["lastEvaluation"].startswith("0001"), name
    # a healthy loop fires none of ours; the replica alert needs kube-state-metrics, absent here, and
    # the volume alert is about this host's disk, which the loop does not own: it may fire only if true
    expected = {"UGANoReadyReplica"}
    usage = shutil.disk_usage(deployment["server"].data_dir)
    if usage.free / usage.total < 0.10:
        expected.add("UGADataVolumeFilling")
    firing = {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]}
    assert firing <= expected, firing


def test_counters_in_prometheus_equal_the_store(deployment, loop):
    prometheus, server = deployment["prometheus"], deployment["server"]
    store = Store(server.data_dir)
    try:
        assert prometheus.value("sum(uga_corrections_total)") == store.corrections.count() == 2
        assert prometheus.value('sum(uga_finetune_runs_total{outcome="promoted"})') == 1
        assert prometheus.value("sum(uga_model_promotions_total)") == 1
        assert prometheus.value("sum(uga_model_rollbacks_total)") == 0
        jobs = {s["metric"]["state"]: float(s["value"][1]) for s in prometheus.query("sum by (state) (uga_jobs)")}
        assert jobs == {state: float(n) for state, n in store.jobs.counts().items()}
        agreement = prometheus.value(f'sum(uga_correction_agreement_dice_count{{model_version="{loop["baseline"]}"}})')
        assert agreement == 2
    finally:
        store.close()
    # the store's metrics come from the runner alone; per-process ones from the serving pod
    assert {s["metric"]["job"] for s in prometheus.query("uga_jobs")} == {"uga-runner"}
    assert {s["metric"]["job"] for s in prometheus.query("uga_tiles_processed_total")} == {"uga-serve"}
    # the slide arrived once: the rescoring after the promotion is work, not a second arrival
    assert prometheus.value('sum(uga_slide_tumour_fraction_count{site="site-a"})') == 1
    assert prometheus.value("sum(uga_segmentation_duration_seconds_count)") == 2  # baseline + rescoring
    errors = 'sum(uga_http_requests_total{route="/v1/jobs/{job_id}", status_class="4xx"})'
    assert prometheus.value(errors) >= 1
    assert prometheus.value("sum(uga_last_gate_passed)") == 1


def test_every_scrape_of_every_target_passes_promtool(deployment, loop):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt install prometheus)")
    server, runner = deployment["server"], deployment["runner"]
    for url in (f"{server.url}/metrics", runner.metrics_url):
        for _ in range(3):
            text = httpx.get(url).text
            proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
            assert proc.returncode == 0, (url, proc.stdout + proc.stderr)
