"""Offline checks of the Kubernetes manifests in k8s/ (kustomize base + cpu/gpu overlays).

Renders each overlay with `kubectl kustomize` (no cluster needed), validates every document whose
kind has a bundled schema with kubernetes-validate in strict mode (unknown fields rejected), checks
CRD-based documents (ServiceMonitor) structurally, and asserts the wiring people rely on: probes,
GPU vs CPU, secret/config/volume mounts, selectors, the runner singleton and the QC dashboard.
"""

from __future__ import annotations

import base64
import copy
import json
import posixpath
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to parse rendered manifests")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBECTL = shutil.which("kubectl")
# Oldest supported cluster (preStop `sleep` needs 1.30) and the newest schema bundled.
K8S_VERSIONS = ("1.30.0", None)
# Kinds served by CRDs: kubernetes-validate has no schema for them; checked structurally below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor")}
NAMESPACE = "uga"
SERVE_LABELS = {"app.kubernetes.io/name": "uga-serve", "app.kubernetes.io/component": "server"}
CONFIG = {
    "UGA_DATA_DIR": "/data",
    "UGA_SLIDE_ROOT": "/slides",
    "UGA_WORKERS": "2",
    "UGA_ORT_THREADS": "2",
    "UGA_QUEUE_SIZE": "10",
    "UGA_PATCH_UM": "1024",
    "UGA_MAX_BODY_MB": "64",
    "UGA_FINETUNE_MIN_CORRECTIONS": "5",
    "UGA_AUTH_TOKENS_FILE": "/etc/uga/tokens",
}
DASHBOARD_METRICS = {
    "uga_tiles_processed_total",
    "uga_segmentation_duration_seconds_bucket",
    "uga_tissue_area_mm2_total",
    "uga_slide_mean_uncertainty_sum",
    "uga_slide_mean_uncertainty_count",
    "uga_slide_mean_uncertainty_bucket",
    "uga_queue_pending",
    "uga_jobs",
    "uga_model_info",
    "uga_model_served",
    "uga_http_requests_total",
    "uga_job_failures_total",
    "uga_corrections_total",
    "uga_finetune_runs_total",
    "uga_last_gate_dice",
    "uga_last_gate_passed",
    "uga_slide_tumour_fraction_sum",
    "uga_correction_agreement_dice_bucket",
    "uga_queue_items",
    "uga_oldest_queued_job_age_seconds",
    "uga_runner_heartbeat_timestamp_seconds",
    "uga_model_swaps_total",
    "uga_model_rollbacks_total",
}
METRIC_RE = re.compile(r"(?<![A-Za-z0-9_])((?:uga|bentoml)_[a-z0-9_]+)")

pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not on PATH: cannot render kustomize (apt package kubectl)"
)


# ---------------------------------------------------------------- rendering and lookup helpers


_RENDERED: dict[str, list[dict]] = {}


def render(overlay: str) -> list[dict]:
    if overlay not in _RENDERED:
        proc = subprocess.run(
            [KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
        _RENDERED[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return copy.deepcopy(_RENDERED[overlay])


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def docs(overlay) -> list[dict]:
    return render(overlay)


def one(docs: list[dict], kind: str, name: str, *, generated: bool = False) -> dict:
    """The single doc of `kind` named `name` (or `name-<hash>` for kustomize generators)."""
    pat = re.compile(re.escape(name) + (r"(-[a-z0-9]{10})?$" if generated else "$"))
    found = [d for d in docs if d["kind"] == kind and pat.match(d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(dep: dict) -> dict:
    cs = dep["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1, "one container per pod expected"
    return cs[0]


def effective_env(docs: list[dict], dep: dict) -> dict[str, str]:
    """Env a container really sees: envFrom ConfigMaps, then env entries (which win)."""
    c = container(dep)
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        cm = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == src["configMapRef"]["name"]]
        assert len(cm) == 1, f"envFrom references missing ConfigMap {src['configMapRef']['name']}"
        env.update(cm[0]["data"])
    for e in c.get("env", []):
        env[e["name"]] = e.get("value")
    return env


def mount_for(dep: dict, path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) mounted exactly at `path`."""
    c = container(dep)
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"{dep['metadata']['name']}: nothing (or several) mounted at {path}"
    vols = [v for v in dep["spec"]["template"]["spec"].get("volumes", []) if v["name"] == mounts[0]["name"]]
    assert len(vols) == 1
    return mounts[0], vols[0]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def gpu_requested(obj) -> bool:
    return "nvidia.com/gpu" in json.dumps(obj)


# ---------------------------------------------------------------- schema validation


def test_renders_expected_objects_in_namespace(docs):
    kinds = sorted((d["kind"], re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"])) for d in docs)
    assert kinds == sorted(
        [
            ("Namespace", "uga"),
            ("ConfigMap", "uga-config"),
            ("ConfigMap", "uga-grafana-dashboard"),
            ("Secret", "uga-auth"),
            ("PersistentVolumeClaim", "uga-data"),
            ("PersistentVolumeClaim", "uga-slides"),
            ("Deployment", "uga-serve"),
            ("Deployment", "uga-runner"),
            ("Service", "uga-serve"),
            ("HorizontalPodAutoscaler", "uga-serve"),
            ("PodDisruptionBudget", "uga-serve"),
            ("ServiceMonitor", "uga-serve"),
            ("PodMonitor", "uga-runner"),
        ]
    )
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, d["metadata"]["name"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "uga"


def test_strict_schema_validation(docs):
    kv = pytest.importorskip(
        "kubernetes_validate", reason="pip package kubernetes-validate is needed for schema checks"
    )
    versions = [v or kv.latest_version() for v in K8S_VERSIONS]
    checked = 0
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CRD_KINDS:
            continue  # structural checks in test_servicemonitor
        for version in versions:
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as e:
                where = f"{d['kind']}/{d['metadata']['name']}"
                pytest.fail(f"{where} invalid for k8s {version}: {e.message} at {list(e.path)}")
            except kv.SchemaNotFoundError:
                pytest.fail(f"no schema for {d['apiVersion']} {d['kind']}: add it to CRD_KINDS with structural checks")
        checked += 1
    assert checked == len(docs) - len([d for d in docs if (d["apiVersion"], d["kind"]) in CRD_KINDS])
    # Negative control: strict mode really rejects an unknown field.
    bad = copy.deepcopy(one(docs, "Deployment", "uga-serve"))
    container(bad)["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": "http"}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, versions[-1], strict=True)


def test_servicemonitor(docs):
    sm = one(docs, "ServiceMonitor", "uga-serve")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sm["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    ep = sm["spec"]["endpoints"]
    assert len(ep) == 1
    assert ep[0]["port"] == "http"
    assert ep[0]["path"] == "/metrics"
    assert ep[0]["interval"] == "30s"
    assert set(ep[0]) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
    svc = one(docs, "Service", "uga-serve")
    assert selects(sm["spec"]["selector"], svc["metadata"]["labels"]), "ServiceMonitor does not select the Service"
    assert "http" in [p["name"] for p in svc["spec"]["ports"]]


# ---------------------------------------------------------------- serving pod


def test_serve_container_contract(docs):
    dep = one(docs, "Deployment", "uga-serve")
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert c["image"] == "uga-serve:0.1.0"
    assert c["command"] == ["python", "-m", "service.cli", "serve", "--host", "0.0.0.0", "--port", "3000"]
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("http", 3000)]
    assert pod["terminationGracePeriodSeconds"] == 60
    # Security: restricted Pod Security Standard + read-only root with a writable /tmp.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    _, tmp = mount_for(dep, "/tmp")
    assert "emptyDir" in tmp
    env = effective_env(docs, dep)
    _, prom = mount_for(dep, env["PROMETHEUS_MULTIPROC_DIR"])
    assert "emptyDir" in prom
    res = c["resources"]
    assert res["requests"]["cpu"] == "2" and res["requests"]["memory"] == "4Gi"
    assert res["limits"]["cpu"] == "4" and res["limits"]["memory"] == "8Gi"


def test_probes_hit_health_endpoints_on_http_port(docs):
    c = container(one(docs, "Deployment", "uga-serve"))
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    if "startupProbe" in c:
        assert c["startupProbe"]["httpGet"]["path"] in ("/livez", "/readyz")
        assert c["startupProbe"]["httpGet"]["port"] == "http"


def test_config_values(docs, overlay):
    for name in ("uga-serve", "uga-runner"):
        env = effective_env(docs, one(docs, "Deployment", name))
        for k, v in CONFIG.items():
            assert env[k] == v, f"{name}: {k}={env.get(k)!r}, expected {v!r}"
    serve_env = effective_env(docs, one(docs, "Deployment", "uga-serve"))
    assert serve_env["UGA_PROVIDERS"] == {"cpu": "cpu", "gpu": "cuda"}[overlay]


def test_gpu_only_in_gpu_overlay():
    cpu, gpu = render("cpu"), render("gpu")
    assert not gpu_requested(cpu), "cpu overlay must not mention nvidia.com/gpu anywhere"
    assert effective_env(cpu, one(cpu, "Deployment", "uga-serve"))["UGA_PROVIDERS"] == "cpu"

    serve = one(gpu, "Deployment", "uga-serve")
    assert str(container(serve)["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert effective_env(gpu, serve)["UGA_PROVIDERS"] == "cuda"
    pod = serve["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod.get("nodeSelector") or pod.get("affinity", {}).get("nodeAffinity")
    # The runner gets no GPU, so it must not ask ONNX Runtime for CUDA.
    runner = one(gpu, "Deployment", "uga-runner")
    assert not gpu_requested(runner["spec"]["template"]["spec"]["containers"])
    assert effective_env(gpu, runner)["UGA_PROVIDERS"] == "cpu"


# ---------------------------------------------------------------- secret and volumes


@pytest.mark.parametrize("name", ["uga-serve", "uga-runner"])
def test_secret_mounted_where_tokens_file_points(docs, name):
    dep = one(docs, "Deployment", name)
    secret = one(docs, "Secret", "uga-auth", generated=True)
    tokens_file = effective_env(docs, dep)["UGA_AUTH_TOKENS_FILE"]
    mount, vol = mount_for(dep, posixpath.dirname(tokens_file))
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "subPath mounts never see secret rotation"
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    key = posixpath.basename(tokens_file)
    assert set(secret["data"]) == {key}
    lines = base64.b64decode(secret["data"][key]).decode().splitlines()
    roles = {}
    for line in lines:
        role, token = line.split()
        roles[role] = token
        assert "REPLACE-ME" in token, "shipped tokens must be obvious placeholders"
    assert set(roles) == {"viewer", "annotator", "admin"}


@pytest.mark.parametrize("name", ["uga-serve", "uga-runner"])
def test_data_and_slide_volumes(docs, name):
    dep = one(docs, "Deployment", name)
    env = effective_env(docs, dep)
    mount, vol = mount_for(dep, env["UGA_DATA_DIR"])
    assert not mount.get("readOnly")
    assert vol["persistentVolumeClaim"]["claimName"] == "uga-data"
    mount, vol = mount_for(dep, env["UGA_SLIDE_ROOT"])
    assert mount["readOnly"] is True
    assert vol["persistentVolumeClaim"]["claimName"] == "uga-slides"

    data = one(docs, "PersistentVolumeClaim", "uga-data")
    assert data["spec"]["accessModes"] == ["ReadWriteMany"]
    assert data["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert one(docs, "PersistentVolumeClaim", "uga-slides")["spec"]["accessModes"] == ["ReadOnlyMany"]


# ---------------------------------------------------------------- runner, scaling, selectors


def test_runner_metrics_are_scraped_by_a_podmonitor_and_only_the_runner_exports_store_metrics(docs):
    pm = one(docs, "PodMonitor", "uga-runner")
    assert set(pm["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
    [ep] = pm["spec"]["podMetricsEndpoints"]
    assert (ep["port"], ep["path"]) == ("metrics", "/metrics")
    dep = one(docs, "Deployment", "uga-runner")
    assert selects(pm["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
    serve_pods = one(docs, "Deployment", "uga-serve")["spec"]["template"]["metadata"]["labels"]
    assert not selects(pm["spec"]["selector"], serve_pods)
    c = container(dep)
    [port] = c["ports"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert (port["name"], port["containerPort"]) == ("metrics", int(env["UGA_RUNNER_METRICS_PORT"]))
    assert env["UGA_RUNNER_METRICS_HOST"] == "0.0.0.0"
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("uga-config"))
    assert config["data"]["UGA_STORE_METRICS"] == "runner"  # one exporter: sums across serve pods stay right


def test_runner_is_a_singleton_without_http(docs):
    dep = one(docs, "Deployment", "uga-runner")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    c = container(dep)
    assert c["command"] == ["python", "-m", "service.cli", "runner"]
    assert c["livenessProbe"]["exec"]["command"] == ["python", "-m", "service.cli", "runner", "--check"]
    assert c["livenessProbe"]["periodSeconds"] >= 60
    assert [p["name"] for p in c["ports"]] == ["metrics"] and "readinessProbe" not in c
    assert "httpGet" not in json.dumps(c)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in mount_for(dep, "/tmp")[1]
    assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
    # No HPA may scale it and no Service may route to it.
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert all(h["spec"]["scaleTargetRef"]["name"] != "uga-runner" for h in hpas)
    runner_labels = dep["spec"]["template"]["metadata"]["labels"]
    for d in docs:
        if d["kind"] == "Service":
            assert not all(runner_labels.get(k) == v for k, v in d["spec"]["selector"].items())
        if d["kind"] == "PodDisruptionBudget":
            assert not selects(d["spec"]["selector"], runner_labels)


def test_hpa_targets_serve_deployment(docs):
    hpa = one(docs, "HorizontalPodAutoscaler", "uga-serve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "uga-serve"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    dep = one(docs, "Deployment", "uga-serve")
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert container(dep)["resources"]["requests"]["cpu"], "CPU utilisation needs a CPU request"


def test_selectors_match_serve_pods_only(docs):
    dep = one(docs, "Deployment", "uga-serve")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in SERVE_LABELS.items())
    assert selects(dep["spec"]["selector"], pod_labels)

    pdb = one(docs, "PodDisruptionBudget", "uga-serve")
    assert pdb["spec"]["minAvailable"] == 1
    assert selects(pdb["spec"]["selector"], pod_labels)

    svc = one(docs, "Service", "uga-serve")
    assert svc["spec"]["type"] == "ClusterIP"
    sel = svc["spec"]["selector"]
    assert sel and all(pod_labels.get(k) == v for k, v in sel.items())
    [port] = svc["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("http", 3000, "http")

    # Nothing else in the namespace carries the serve pods' labels.
    others = [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "Deployment"
        and d is not dep
        and all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())
    ]
    assert not others


# ---------------------------------------------------------------- Grafana dashboard


def _targets(dashboard: dict):
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    for p in walk(dashboard["panels"]):
        if p["type"] == "row":
            assert not p.get("targets")
            continue
        assert p.get("targets"), f"panel {p['title']!r} has no targets"
        for t in p["targets"]:
            yield p, t


def test_dashboard_source_file_parses():
    dash = json.loads((K8S / "base" / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] and dash["title"]


def test_dashboard_configmap_and_metrics(docs):
    cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(cms) == 1
    [(fname, text)] = cms[0]["data"].items()
    assert fname.endswith(".json")
    dash = json.loads(text)
    seen: set[str] = set()
    for panel, target in _targets(dash):
        metrics = set(METRIC_RE.findall(target["expr"]))
        assert metrics, f"panel {panel['title']!r}: target {target['expr']!r} uses no uga_/bentoml_ metric"
        seen |= metrics
    for var in dash.get("templating", {}).get("list", []):
        if var["type"] == "query":
            seen |= set(METRIC_RE.findall(json.dumps(var["query"])))
    missing = DASHBOARD_METRICS - seen
    assert not missing, f"dashboard lacks panels for {sorted(missing)}"
