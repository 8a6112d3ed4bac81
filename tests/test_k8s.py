"""Offline checks of the Kubernetes manifests in k8s/: the overlays (cpu, gpu, scale-out), each alone
and with every optional component (monitoring, alerts, network-policy, ingress, keda).

Renders with `kubectl kustomize` (no cluster needed), validates every document of a kind the
validator has a schema for with kubernetes-validate in strict mode (unknown fields rejected); the
CRD kinds (PodMonitor, PrometheusRule, ScaledObject) have no bundled schema and are checked
structurally. Then the wiring people rely on: the safe default topology, restricted containers,
probes, mounts, the image tags `make image` builds, GPU vs CPU, and what each component points at.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import posixpath
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to parse rendered manifests")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("cpu", "gpu", "scale-out")
COMPONENTS = (
    "monitoring",
    "alerts",
    "network-policy",
    "ingress",
    "keda",
    "cloudnative-pg",
    "cloudnative-pg-backup",
    "cloudnative-pg-network-policy",
)
SCALE_OUT_ONLY = ("keda", "cloudnative-pg", "cloudnative-pg-backup", "cloudnative-pg-network-policy")
KUBECTL = shutil.which("kubectl")
# Oldest supported cluster (preStop `sleep` needs 1.30) and the newest schema bundled.
K8S_VERSIONS = ("1.30.0", None)
# Kinds served by CRDs: kubernetes-validate has no schema for them; checked structurally below.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("postgresql.cnpg.io/v1", "Cluster"),
    ("postgresql.cnpg.io/v1", "ScheduledBackup"),
    ("barmancloud.cnpg.io/v1", "ObjectStore"),
}
NAMESPACE = "uga"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
CONFIG = {
    "UGA_DATA_DIR": "/data",
    "UGA_SLIDE_ROOT": "/slides",
    "UGA_WORKERS": "2",
    "UGA_ORT_THREADS": "2",
    "UGA_QUEUE_SIZE": "10",
    "UGA_PATCH_UM": "256",
    "UGA_MAX_BODY_MB": "64",
    "UGA_FINETUNE_MIN_CORRECTIONS": "5",
    "UGA_AUTH_TOKENS_FILE": "/etc/uga/tokens",
    "UGA_STORE_METRICS": "runner",
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
    "uga_corrections_withdrawn",
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
    "uga_slide_novelty_share_sum",
    "uga_slides_out_of_distribution_total",
    "uga_callback_deliveries",
    "uga_http_request_duration_seconds_bucket",
    "uga_data_volume_free_bytes",
    "uga_data_volume_size_bytes",
}
METRIC_RE = re.compile(r"(?<![A-Za-z0-9_])((?:uga|bentoml)_[a-z0-9_]+)")

pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not on PATH: cannot render kustomize (apt package kubectl)"
)


# ---------------------------------------------------------------- rendering and lookup helpers


_RENDERED: dict[tuple[str, bool], list[dict]] = {}


def render(overlay: str, components: bool = False, tmp: Path | None = None) -> list[dict]:
    """The overlay rendered, alone or with every optional component (keda only with scale-out)."""
    key = (overlay, components)
    if key not in _RENDERED:
        target = K8S / "overlays" / overlay
        if components:
            target = ROOT / "build" / "k8s-test" / overlay
            target.mkdir(parents=True, exist_ok=True)
            used = [c for c in COMPONENTS if c not in SCALE_OUT_ONLY or overlay == "scale-out"]
            kustomization = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / overlay, target)],
                "components": [os.path.relpath(K8S / "components" / c, target) for c in used],
            }
            (target / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        proc = subprocess.run([KUBECTL, "kustomize", str(target)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
        _RENDERED[key] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return copy.deepcopy(_RENDERED[key])


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


def pods(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "Deployment"]


def containers(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(deployment, container) for every container of every Deployment."""
    return [(d, c) for d in pods(docs) for c in d["spec"]["template"]["spec"]["containers"]]


def named(docs: list[dict], container_name: str) -> tuple[dict, dict]:
    [found] = [(d, c) for d, c in containers(docs) if c["name"] == container_name]
    return found


def effective_env(docs: list[dict], c: dict) -> dict[str, str | None]:
    """Env a container really sees: envFrom ConfigMaps, then env entries (which win; None = valueFrom).
    An optional Secret (credentials the operator creates) adds nothing that is known here."""
    env: dict[str, str | None] = {}
    for src in c.get("envFrom", []):
        if "secretRef" in src:
            assert src["secretRef"].get("optional") is True, "a Secret the manifests do not create must be optional"
            continue
        cm = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == src["configMapRef"]["name"]]
        assert len(cm) == 1, f"envFrom references missing ConfigMap {src['configMapRef']['name']}"
        env.update(cm[0]["data"])
    for e in c.get("env", []):
        env[e["name"]] = e.get("value")
    return env


def mount_for(dep: dict, c: dict, path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) mounted exactly at `path` in container `c`."""
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"{c['name']}: nothing (or several) mounted at {path}"
    vols = [v for v in dep["spec"]["template"]["spec"].get("volumes", []) if v["name"] == mounts[0]["name"]]
    assert len(vols) == 1
    return mounts[0], vols[0]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def port_names(docs: list[dict]) -> set[str]:
    return {p["name"] for _, c in containers(docs) for p in c.get("ports", [])}


# ---------------------------------------------------------------- schema validation


@pytest.mark.parametrize("with_components", [False, True], ids=["alone", "components"])
def test_strict_schema_validation(overlay, with_components):
    kv = pytest.importorskip("kubernetes_validate", reason="pip package kubernetes-validate is needed")
    docs = render(overlay, with_components)
    versions = [v or kv.latest_version() for v in K8S_VERSIONS]
    crds = [d for d in docs if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    for d in docs:
        if d in crds:
            continue  # structural checks in the component tests
        for version in versions:
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(
                    f"{d['kind']}/{d['metadata']['name']} invalid for k8s {version}: {e.message} at {list(e.path)}"
                )
            except kv.SchemaNotFoundError:
                pytest.fail(f"no schema for {d['apiVersion']} {d['kind']}: add it to CRD_KINDS with structural checks")
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, d["metadata"]["name"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "uga"
    # Negative control: strict mode really rejects an unknown field.
    bad = copy.deepcopy(pods(docs)[0])
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, versions[-1], strict=True)


# ---------------------------------------------------------------- topology


def test_the_default_is_one_pod_with_serving_and_runner_on_one_rwo_volume():
    for overlay in ("cpu", "gpu"):
        docs = render(overlay, components=True)
        [dep] = pods(docs)
        assert dep["spec"]["replicas"] == 1
        assert dep["spec"]["strategy"] == {"type": "Recreate"}  # the old pod is gone before the new starts
        assert sorted(c["name"] for c in dep["spec"]["template"]["spec"]["containers"]) == ["uga-runner", "uga-serve"]
        assert one(docs, "PersistentVolumeClaim", "uga-data")["spec"]["accessModes"] == ["ReadWriteOnce"]
        kinds = {d["kind"] for d in docs}
        assert not kinds & {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ScaledObject"}, kinds
        for _, c in containers(docs):
            assert "UGA_DATABASE_URL" not in effective_env(docs, c)  # SQLite, in this one pod only


def test_scale_out_shares_postgresql_never_sqlite():
    docs = render("scale-out", components=True)
    serve, runner = one(docs, "Deployment", "uga-serve"), one(docs, "Deployment", "uga-runner")
    assert [c["name"] for c in serve["spec"]["template"]["spec"]["containers"]] == ["uga-serve"]
    assert "replicas" not in serve["spec"], "KEDA (or the HPA) owns the replica count"
    assert serve["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert runner["spec"]["replicas"] == 1 and runner["spec"]["strategy"] == {"type": "Recreate"}
    for _, c in containers(render("scale-out")):
        [url] = [e for e in c["env"] if e["name"] == "UGA_DATABASE_URL"]
        assert url["valueFrom"]["secretKeyRef"] == {"name": "uga-database", "key": "url"}
    cluster = one(docs, "Cluster", "uga-db")  # with components/cloudnative-pg: its app Secret instead
    assert cluster["spec"]["instances"] >= 2
    for _, c in containers(docs):
        [url] = [e for e in c["env"] if e["name"] == "UGA_DATABASE_URL"]
        assert url["valueFrom"]["secretKeyRef"] == {"name": "uga-db-app", "key": "uri"}
    assert one(docs, "PersistentVolumeClaim", "uga-data")["spec"]["accessModes"] == ["ReadWriteMany"]
    pdb = one(docs, "PodDisruptionBudget", "uga-serve")
    assert selects(pdb["spec"]["selector"], serve["spec"]["template"]["metadata"]["labels"])
    assert not selects(pdb["spec"]["selector"], runner["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"]  # drains proceed
    hpa = one(render("scale-out"), "HorizontalPodAutoscaler", "uga-serve")  # without KEDA
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "uga-serve"}


def test_the_service_routes_to_serving_pods_only(docs):
    svc = one(docs, "Service", "uga-serve")
    assert svc["spec"]["type"] == "ClusterIP"
    [port] = svc["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("http", 3000, "http")
    routed = [
        d
        for d in pods(docs)
        if selects({"matchLabels": svc["spec"]["selector"]}, d["spec"]["template"]["metadata"]["labels"])
    ]
    assert [d["metadata"]["name"] for d in routed] == ["uga-serve"]
    for d in pods(docs):
        assert selects(d["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])


# ---------------------------------------------------------------- containers


def test_every_container_is_restricted_and_writes_only_to_its_volumes(docs):
    for dep, c in containers(docs):
        pod = dep["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1034
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert "emptyDir" in mount_for(dep, c, "/tmp")[1]
        env = effective_env(docs, c)
        assert "PROMETHEUS_MULTIPROC_DIR" not in env  # BentoML ignores it; its home is /tmp/bentoml (image)
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert writable == {"/tmp", env["UGA_DATA_DIR"]}, writable
        assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
        assert c["command"][:3] == ["python", "-m", "service.cli"]


def test_serving_probes_and_runner_liveness(docs):
    _, serve = named(docs, "uga-serve")
    assert serve["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert serve["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert serve["startupProbe"]["httpGet"]["port"] == "http"
    _, runner = named(docs, "uga-runner")
    assert runner["command"] == ["python", "-m", "service.cli", "runner"]
    assert runner["livenessProbe"]["exec"]["command"] == ["python", "-m", "service.cli", "runner", "--check"]
    assert "readinessProbe" not in runner
    [port] = runner["ports"]
    env = effective_env(docs, runner)
    assert (port["name"], port["containerPort"]) == ("metrics", int(env["UGA_RUNNER_METRICS_PORT"]))
    assert env["UGA_RUNNER_METRICS_HOST"] == "0.0.0.0"


def test_callbacks_in_the_configmap_never_stop_the_runner_which_cannot_read_their_secret(docs, monkeypatch):
    """The operator configures UGA_CALLBACKS in the ConfigMap and UGA_CALLBACK_SECRET in uga-secrets,
    which only the serving container reads: the runner's settings must still load."""
    import copy

    from service.config import Settings

    docs = copy.deepcopy(docs)
    _, runner = named(docs, "uga-runner")
    [ref] = [s["configMapRef"]["name"] for s in runner["envFrom"] if "configMapRef" in s]
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ref]
    config["data"]["UGA_CALLBACKS"] = "lis=https://lis.example.org/uga-events"
    assert not any("secretRef" in s for s in runner["envFrom"])
    for name in [n for n in os.environ if n.startswith("UGA_")]:
        monkeypatch.delenv(name)
    for name, value in effective_env(docs, runner).items():
        if name.startswith("UGA_") and value is not None:
            monkeypatch.setenv(name, value)
    assert Settings().callbacks == ""


def test_config_values(docs, overlay):
    for _, c in containers(docs):
        env = effective_env(docs, c)
        for k, v in CONFIG.items():
            assert env[k] == v, f"{c['name']}: {k}={env.get(k)!r}, expected {v!r}"
    expected = {"cpu": "cpu", "gpu": "cuda", "scale-out": "cpu"}[overlay]
    assert effective_env(docs, named(docs, "uga-serve")[1])["UGA_PROVIDERS"] == expected
    assert effective_env(docs, named(docs, "uga-runner")[1])["UGA_PROVIDERS"] == "cpu"  # never asks for CUDA


def test_images_are_the_tags_make_image_builds(docs, overlay):
    images = {c["name"]: c["image"] for _, c in containers(docs)}
    serve = "uga-serve-gpu" if overlay == "gpu" else "uga-serve"
    assert images == {"uga-serve": f"{serve}:{VERSION}", "uga-runner": f"uga-runner:{VERSION}"}
    build = (ROOT / "image" / "build.sh").read_text()
    for name in ("uga-serve", "uga-runner", "uga-serve-gpu"):
        assert f"localhost/{name}:$VERSION" in build


def test_gpu_only_in_gpu_overlay():
    assert "nvidia.com/gpu" not in json.dumps(render("cpu")) + json.dumps(render("scale-out"))
    gpu = render("gpu")
    dep, serve = named(gpu, "uga-serve")
    assert str(serve["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    pod = dep["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod.get("nodeSelector") or pod.get("affinity", {}).get("nodeAffinity")
    assert "nvidia.com/gpu" not in json.dumps(named(gpu, "uga-runner")[1])


def test_secret_mounted_where_tokens_file_points(docs):
    secret = one(docs, "Secret", "uga-auth", generated=True)
    for dep, c in containers(docs):
        tokens_file = effective_env(docs, c)["UGA_AUTH_TOKENS_FILE"]
        mount, vol = mount_for(dep, c, posixpath.dirname(tokens_file))
        assert mount.get("readOnly") is True
        assert "subPath" not in mount, "subPath mounts never see secret rotation"
        assert vol["secret"]["secretName"] == secret["metadata"]["name"]
        key = posixpath.basename(tokens_file)
    assert set(secret["data"]) == {key}
    roles = dict(line.split() for line in base64.b64decode(secret["data"][key]).decode().splitlines())
    assert set(roles) == {"viewer", "annotator", "admin"}
    assert all("REPLACE-ME" in token for token in roles.values()), "shipped tokens must be obvious placeholders"


def test_data_and_slide_volumes(docs):
    for dep, c in containers(docs):
        env = effective_env(docs, c)
        mount, vol = mount_for(dep, c, env["UGA_DATA_DIR"])
        assert not mount.get("readOnly") and vol["persistentVolumeClaim"]["claimName"] == "uga-data"
        mount, vol = mount_for(dep, c, env["UGA_SLIDE_ROOT"])
        assert mount["readOnly"] is True and vol["persistentVolumeClaim"]["claimName"] == "uga-slides"
    assert one(docs, "PersistentVolumeClaim", "uga-slides")["spec"]["accessModes"] == ["ReadOnlyMany"]


# ---------------------------------------------------------------- optional components


def test_podmonitor_scrapes_both_metrics_ports_of_every_uga_pod(overlay):
    docs = render(overlay, components=True)
    pm = one(docs, "PodMonitor", "uga-serve")
    assert set(pm["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
    endpoints = {(e["port"], e["path"]) for e in pm["spec"]["podMetricsEndpoints"]}
    assert endpoints == {("http", "/metrics"), ("metrics", "/metrics")}
    assert {p for p, _ in endpoints} <= port_names(docs)
    assert all(selects(pm["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]) for d in pods(docs))
    # the store's series (the runner's port) stay one series when the runner pod is replaced ...
    [runner] = [e for e in pm["spec"]["podMetricsEndpoints"] if e["port"] == "metrics"]
    relabel = runner["relabelings"]
    assert {"action": "replace", "targetLabel": "instance", "replacement": "uga-runner"} in relabel
    assert {"action": "labeldrop", "regex": "pod|container"} in relabel
    # ... and only there: per-process series need their pod (the dashboard's "by pod" panels)
    assert not [e for e in pm["spec"]["podMetricsEndpoints"] if e["port"] == "http" and e.get("relabelings")]
    assert all(effective_env(docs, c)["UGA_STORE_METRICS"] == "runner" for _, c in containers(docs))


def test_alerts_component_is_a_prometheusrule():
    rule = one(render("cpu", components=True), "PrometheusRule", "uga-serve")
    assert set(rule["spec"]) == {"groups"}
    assert all(r["alert"] and r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])


def test_network_policy_denies_by_default_and_names_real_ports(overlay):
    docs = render(overlay, components=True)
    policy = one(docs, "NetworkPolicy", "uga-serve")
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert all(selects(policy["spec"]["podSelector"], d["spec"]["template"]["metadata"]["labels"]) for d in pods(docs))
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == port_names(docs) | {"http"}
    sources = [
        s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for r in policy["spec"]["ingress"]
        for s in r["from"]
    ]
    assert sorted(sources) == ["ingress-nginx", "monitoring"]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 5432, 443} <= egress_ports
    peers = [
        peer for rule in policy["spec"]["egress"] if {p["port"] for p in rule["ports"]} == {5432} for peer in rule["to"]
    ]
    assert {"podSelector": {"matchLabels": {"cnpg.io/cluster": "uga-db"}}} in peers  # cloudnative-pg's own pods


def test_the_database_pods_take_postgresql_from_the_uga_pods_only():
    docs = render("scale-out", components=True)
    policy = one(docs, "NetworkPolicy", "uga-db")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"cnpg.io/cluster": "uga-db"}}  # the operator's label
    assert one(docs, "Cluster", "uga-db")["metadata"]["name"] == "uga-db"
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    [postgres] = [r for r in policy["spec"]["ingress"] if {p["port"] for p in r["ports"]} == {5432}]
    app_pods = [d["spec"]["template"]["metadata"]["labels"] for d in pods(docs)]
    peers = [p["podSelector"] for p in postgres["from"]]
    assert all(p.keys() == {"podSelector"} for p in postgres["from"])  # this namespace's pods, no namespace-wide rule
    assert all(any(selects(s, labels) for s in peers) for labels in app_pods)  # serving and runner reach it
    assert {"matchLabels": {"cnpg.io/cluster": "uga-db"}} in peers  # replication between instances
    [status] = [r for r in policy["spec"]["ingress"] if {p["port"] for p in r["ports"]} == {8000}]
    assert {"podSelector": {"matchLabels": {"cnpg.io/cluster": "uga-db"}}} in status["from"]  # the primary's probe
    egress_ports = {p["port"] for r in policy["spec"]["egress"] for p in r["ports"]}
    assert {53, 5432, 8000, 443} <= egress_ports  # DNS, replication, status, the API server and the object store


def test_the_database_is_archived_to_an_object_store_and_backed_up_nightly():
    docs = render("scale-out", components=True)
    cluster, store = one(docs, "Cluster", "uga-db"), one(docs, "ObjectStore", "uga-db-backup")
    [plugin] = cluster["spec"]["plugins"]
    assert plugin["isWALArchiver"] is True and plugin["parameters"]["barmanObjectName"] == "uga-db-backup"
    assert cluster["spec"]["instances"] >= 2  # the patch kept the component's Cluster whole
    config = store["spec"]["configuration"]
    assert config["destinationPath"].startswith("s3://") and config["endpointURL"].startswith("https://")
    assert {v["name"] for v in config["s3Credentials"].values()} == {"uga-db-backup"}  # a Secret, never inline
    assert re.fullmatch(r"\d+d", store["spec"]["retentionPolicy"])
    nightly = one(docs, "ScheduledBackup", "uga-db-nightly")["spec"]
    assert nightly["cluster"] == {"name": "uga-db"} and nightly["method"] == "plugin"
    assert nightly["pluginConfiguration"]["name"] == plugin["name"]
    assert len(nightly["schedule"].split()) == 6  # CloudNativePG's schedule has a seconds field


def test_ingress_terminates_tls_and_matches_the_service_limits():
    docs = render("cpu", components=True)
    ingress = one(docs, "Ingress", "uga-serve")
    [tls] = ingress["spec"]["tls"]
    assert tls["secretName"] and tls["hosts"] == [ingress["spec"]["rules"][0]["host"]]
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{CONFIG['UGA_MAX_BODY_MB']}m"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 300  # the BentoML traffic timeout
    backends = {p["backend"]["service"]["name"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
    assert backends == {"uga-serve"}
    assert all("/metrics" not in p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"])
    paths = {p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
    assert {"/v1", "/review", "/readyz"} <= paths  # the pathologists' page and its sign-in redirect too


def test_keda_scales_serving_on_queued_jobs_instead_of_the_hpa():
    docs = render("scale-out", components=True)
    scaled = one(docs, "ScaledObject", "uga-serve")
    assert scaled["spec"]["scaleTargetRef"] == {"name": "uga-serve"}
    assert scaled["spec"]["minReplicaCount"] >= 1
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "uga_jobs" in trigger["metadata"]["query"]
    # a missing metric (the runner that exports it is down) holds replicas instead of reading "no jobs"
    assert trigger["metadata"]["ignoreNullValues"] == "false" and scaled["spec"]["fallback"]["replicas"] >= 2
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"], "KEDA makes its own HPA"


# ---------------------------------------------------------------- Grafana dashboard


def _targets(dashboard: dict):
    for p in dashboard["panels"]:
        if p["type"] == "row":
            assert not p.get("targets")
            continue
        assert p.get("targets"), f"panel {p['title']!r} has no targets"
        for t in p["targets"]:
            yield p, t


def test_dashboard_configmap_and_metrics(docs):
    cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(cms) == 1
    [(fname, text)] = cms[0]["data"].items()
    assert fname.endswith(".json")
    dash = json.loads(text)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["title"]
    seen: set[str] = set()
    for panel, target in _targets(dash):
        metrics = set(METRIC_RE.findall(target["expr"]))
        assert metrics, f"panel {panel['title']!r}: target {target['expr']!r} uses no uga_/bentoml_ metric"
        seen |= metrics
    missing = DASHBOARD_METRICS - seen
    assert not missing, f"dashboard lacks panels for {sorted(missing)}"
