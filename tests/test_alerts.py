"""Alerting rules (k8s/components/alerts): they parse, and each fires on the series it is for and
stays quiet on healthy ones (`promtool test rules` on synthetic series)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to read the PrometheusRule")

RULE = Path(__file__).resolve().parent.parent / "k8s" / "components" / "alerts" / "prometheusrule.yaml"

# alert -> (interval, eval time, series (or a list of them) that must fire it, series (or a list) that must not)
CASES = {
    "UGAJobsFailing": (
        "1m",
        "40m",
        [
            {'uga_job_failures_total{reason="unusable_slide",pod="a"}': "0+1x60"},
            {  # three of each of two reasons in 30 min: six failures, though no reason alone passes 3
                'uga_job_failures_total{reason="job_timeout",pod="a"}': "0+0.1x60",
                'uga_job_failures_total{reason="internal_error",pod="a"}': "0+0.1x60",
            },
            {  # five PACS failures between two scrapes: a reason never seen before starts its series at 5
                'uga_job_failures_total{reason="unusable_slide",pod="a"}': "0x60",
                'uga_job_failures_total{reason="pacs_unreachable",pod="a"}': "_x30 5x30",
            },
        ],
        {'uga_job_failures_total{reason="unusable_slide",pod="a"}': "5x60"},
    ),
    "UGAQueueBackingUp": (
        "1m",
        "50m",
        {'uga_oldest_queued_job_age_seconds{origin="client",pod="a"}': "0+60x60"},
        {  # a promotion's rescoring backlog, clients' jobs served first
            'uga_oldest_queued_job_age_seconds{origin="client",pod="a"}': "0+10x60",
            'uga_oldest_queued_job_age_seconds{origin="rescoring",pod="a"}': "0+60x60",
        },
    ),
    "UGANoReadyReplica": (
        "1m",
        "10m",
        {'kube_deployment_status_replicas_available{deployment="uga-serve"}': "0x20"},
        {'kube_deployment_status_replicas_available{deployment="uga-serve"}': "2x20"},
    ),
    "UGAModelRolledBack": (
        "1m",
        "5m",
        {'uga_model_rollbacks_total{pod="a"}': "0 0 0 1 1 1 1 1 1 1"},
        {'uga_model_rollbacks_total{pod="a"}': "2x10"},
    ),
    "UGAFinetuneRejectedRepeatedly": (
        "1h",
        "5h",
        {'uga_finetune_runs_total{outcome="rejected",pod="a"}': "0+1x10"},
        {'uga_finetune_runs_total{outcome="rejected",pod="a"}': "0 0 0 0 1 1 1 1 1 1 1"},
    ),
    "UGACallbacksFailing": (
        "1m",
        "30m",
        {'uga_callback_deliveries{state="failed"}': "0 0 1x40"},
        {
            'uga_callback_deliveries{state="failed"}': "0 0 1 1 1 0x40",
            'uga_callback_deliveries{state="delivered"}': "5x40",
        },
    ),
    "UGASlidesOutOfDistribution": (
        "10m",
        "7h",
        [
            {  # 6 slides an hour, 2 of them flagged
                'uga_slide_novelty_share_count{site="a"}': "0+1x60",
                'uga_slides_out_of_distribution_total{site="a"}': "0+0.3333x60",
            },
            {  # a new site, a quarter of all slides, every one flagged: 25 % of all, not more
                'uga_slide_novelty_share_count{site="a"}': "0+1x60",
                'uga_slides_out_of_distribution_total{site="a"}': "0x60",
                'uga_slide_novelty_share_count{site="b"}': "0+0.3333x60",
                'uga_slides_out_of_distribution_total{site="b"}': "0+0.3333x60",
            },
        ],
        [
            {  # as many slides, 1 in 12 flagged
                'uga_slide_novelty_share_count{site="a"}': "0+1x60",
                'uga_slides_out_of_distribution_total{site="a"}': "0+0.0833x60",
            },
            {  # every slide flagged, but only 3 in 6 hours: too few to say
                'uga_slide_novelty_share_count{site="a"}': "0+0.0833x60",
                'uga_slides_out_of_distribution_total{site="a"}': "0+0.0833x60",
            },
        ],
    ),
    "UGARunnerDown": (
        "1m",
        "30m",
        {'uga_runner_heartbeat_timestamp_seconds{pod="r"}': "0+60x5 300x30"},  # beats, then stops at 5 min
        {'uga_runner_heartbeat_timestamp_seconds{pod="r"}': "0+60x40"},
    ),
    "UGAStoreDown": (
        "1m",
        "20m",
        {'uga_store_up{pod="r"}': "1x5 0x20"},
        {'uga_store_up{pod="r"}': "1x5 0x2 1x20"},  # a blip of two minutes
    ),
    "UGADataVolumeFilling": (
        "1m",
        "2h",
        [
            {  # 100 GB, 8 GB free and falling slowly
                'uga_data_volume_free_bytes{pod="r"}': "8e9-1e5x150",
                'uga_data_volume_size_bytes{pod="r"}': "1e11x150",
            },
            {  # half free, but 12 GB an hour go: full within the day
                'uga_data_volume_free_bytes{pod="r"}': "5e10-2e8x150",
                'uga_data_volume_size_bytes{pod="r"}': "1e11x150",
            },
        ],
        [
            {  # half free, steady
                'uga_data_volume_free_bytes{pod="r"}': "5e10x150",
                'uga_data_volume_size_bytes{pod="r"}': "1e11x150",
            },
            {  # 30 % free, a slow fill (6 MB an hour: years to full)
                'uga_data_volume_free_bytes{pod="r"}': "3e10-1e5x150",
                'uga_data_volume_size_bytes{pod="r"}': "1e11x150",
            },
            {  # a pod 40 minutes old that wrote 4 GB at start: too little history for a trend
                'uga_data_volume_free_bytes{pod="r"}': "_x80 5e10-1e8x40 4.6e10x30",
                'uga_data_volume_size_bytes{pod="r"}': "_x80 1e11x70",
            },
        ],
    ),
    "UGAUncertaintyDrift": (
        "1h",
        "106h",
        [
            {
                'uga_slide_mean_uncertainty_count{measure="uga",site="a"}': "0+10x108",
                'uga_slide_mean_uncertainty_sum{measure="uga",site="a"}': "0+10x96 980+20x11",  # 1.0 bit, then 2.0
            },
            {  # a new site from hour 96, a sixth of the slides, at 2.0 bits: all sites' mean moves to 1.17
                'uga_slide_mean_uncertainty_count{measure="uga",site="a"}': "0+10x108",
                'uga_slide_mean_uncertainty_sum{measure="uga",site="a"}': "0+10x108",
                'uga_slide_mean_uncertainty_count{measure="uga",site="b"}': "_x96 0+2x11",
                'uga_slide_mean_uncertainty_sum{measure="uga",site="b"}': "_x96 0+4x11",
            },
        ],
        [
            {
                'uga_slide_mean_uncertainty_count{measure="uga",site="a"}': "0+10x108",
                'uga_slide_mean_uncertainty_sum{measure="uga",site="a"}': "0+10x96 980+12x11",  # 1.2: within 50 %
            },
            {  # a quiet night, then one slide at 1.6 bits: one slide is not drift
                'uga_slide_mean_uncertainty_count{measure="uga",site="a"}': "0+10x94 940x10 941x3",
                'uga_slide_mean_uncertainty_sum{measure="uga",site="a"}': "0+10x94 940x10 941.6x3",
            },
        ],
    ),
}


@pytest.fixture(scope="module")
def rules(tmp_path_factory) -> Path:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (apt install prometheus)")
    doc = yaml.safe_load(RULE.read_text())
    assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1"
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


def test_every_alert_has_a_case():
    doc = yaml.safe_load(RULE.read_text())
    alerts = {r["alert"] for g in doc["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == set(CASES)


PER_SITE = {"UGAUncertaintyDrift", "UGASlidesOutOfDistribution"}  # one alert per site, labelled with it
SLOW_CASES = {"UGAUncertaintyDrift"}  # 106 h of series for promtool to evaluate: 12 s


@pytest.mark.parametrize(
    "alert", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_CASES else a for a in sorted(CASES)]
)
def test_the_alert_fires_on_its_series_and_not_on_healthy_ones(rules, tmp_path, alert):
    interval, at, bad, good = CASES[alert]
    rule = next(
        r for g in yaml.safe_load(RULE.read_text())["spec"]["groups"] for r in g["rules"] if r.get("alert") == alert
    )

    def expected(series: dict) -> dict:
        """The rule's labels and annotations; a per-site alert also names the site (in these cases,
        the last one in alphabetical order: the one that drifts)."""
        if alert not in PER_SITE:
            return {"exp_labels": rule["labels"], "exp_annotations": rule["annotations"]}
        site = sorted(set(re.findall(r'site="(\w+)"', " ".join(series))))[-1]
        notes = {k: v.replace("{{ $labels.site }}", site) for k, v in rule["annotations"].items()}
        return {"exp_labels": {**rule["labels"], "site": site}, "exp_annotations": notes}

    def case(series: dict, firing: bool) -> dict:
        return {
            "interval": interval,
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": [
                {
                    "eval_time": at,
                    "alertname": alert,
                    "exp_alerts": [expected(series)] if firing else [],
                }
            ],
        }

    test = tmp_path / "test.yaml"
    firing = bad if isinstance(bad, list) else [bad]
    healthy = good if isinstance(good, list) else [good]
    cases = [*(case(b, True) for b in firing), *(case(g, False) for g in healthy)]
    every = "1m" if interval == "1m" else "10m"  # rule evaluations: days of series at 1m cost minutes
    test.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": every, "tests": cases}))
    proc = subprocess.run(["promtool", "test", "rules", str(test)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_component_renders_into_an_overlay(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    k8s = RULE.parent.parent.parent
    relative = {  # kustomize refuses absolute paths
        "resources": [os.path.relpath(k8s / "overlays" / "cpu", overlay)],
        "components": [os.path.relpath(RULE.parent, overlay)],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(relative))
    proc = subprocess.run(
        [kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    rules = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "PrometheusRule"]
    source = yaml.safe_load(RULE.read_text())["spec"]["groups"]
    assert len(rules) == 1

    def alerts(groups):
        return [(r["alert"], r["labels"]) for g in groups for r in g["rules"]]

    assert alerts(rules[0]["spec"]["groups"]) == alerts(source)
