"""The images, built by `image/build.sh` and run with podman exactly as the default pod spec says.

The pod of `k8s/overlays/cpu` (serving + runner containers) becomes a podman pod: each container's
command, environment (ConfigMap + env + resource fields), user, read-only root filesystem, dropped
capabilities and volume mounts come from the rendered manifest; PVCs, the Secret and the emptyDir
become host directories with the same ownership and modes. Then the loop runs through it: ready,
a job, corrections, the runner container fine-tunes and promotes, the serving container swaps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.server import (
    REPO,
    TOKENS,
    correct_disagreeing,
    finished_run,
    free_port,
    wait_every_worker_serves,
    wait_for,
    wait_job,
)

pytestmark = pytest.mark.e2e
TOOLS = ("podman", "mmdebstrap", "kubectl")
BUILD = REPO / "build" / "image"


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(BUILD / "containers.conf")}
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} failed:\n{proc.stderr[-2000:]}")
    return proc


def version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install podman buildah mmdebstrap runc kubectl)")
    tags = {role: f"localhost/uga-{role}:{version()}" for role in ("serve", "runner")}
    if os.environ.get("UGA_TEST_PREBUILT_IMAGES") == "1":  # iterating on this test: images made by `make image`
        return tags
    proc = subprocess.run(["bash", "image/build.sh", "serve", "runner"], cwd=REPO, capture_output=True, text=True)
    environmental = ("could not get the wheels", "could not make the Debian base", "cannot run containers")
    if proc.returncode != 0 and any(reason in proc.stderr for reason in environmental):
        pytest.skip(proc.stderr.strip().splitlines()[-1])  # this machine, not the recipe
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stderr + proc.stdout)
    return tags


def rendered_pod() -> tuple[dict, dict[str, str]]:
    """The default overlay's pod spec and its ConfigMap data."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "k8s" / "overlays" / "cpu")], capture_output=True, text=True, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [config] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("uga-config")]
    return deployment["spec"]["template"]["spec"], config["data"]


def container_env(c: dict, config: dict[str, str]) -> dict[str, str]:
    env = dict(config) if any("configMapRef" in s for s in c.get("envFrom", [])) else {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif field := e.get("valueFrom", {}).get("resourceFieldRef"):
            assert field["resource"] == "limits.cpu"
            env[e["name"]] = str(int(c["resources"]["limits"]["cpu"]))
        else:
            raise AssertionError(f"no local equivalent for {e}")
    return env


class Pod:
    """The pod spec run as a podman pod on loopback ports; volumes are host directories."""

    def __init__(self, root: Path, spec: dict, config: dict[str, str], images: dict[str, str], slide: Path):
        self.name = f"uga-test-{os.getpid()}"
        self.port, self.metrics_port = free_port(), free_port()
        security = spec["securityContext"]
        uid, gid, fs_group = security["runAsUser"], security["runAsGroup"], security["fsGroup"]
        volumes = {}
        for volume in spec["volumes"]:
            path = root / volume["name"]
            path.mkdir()
            if "secret" in volume:  # the token file, mode defaultMode, group fsGroup
                tokens = path / "tokens"
                tokens.write_text("".join(f"{r} {t}\n" for r, t in TOKENS.items()))
                os.chown(tokens, 0, fs_group)
                tokens.chmod(volume["secret"]["defaultMode"])
            elif volume.get("persistentVolumeClaim", {}).get("claimName") == "uga-slides":
                shutil.copy(slide, path / "ood.tif")
            elif "emptyDir" in volume:
                path.chmod(0o1777)
            os.chown(path, 0 if "secret" in volume else uid, fs_group)
            volumes[volume["name"]] = path
        # A pod's containers share one network namespace: the first owns it (and the published
        # ports), the others join it (no pause container needed).
        self.containers: list[str] = []
        for c in sorted(spec["containers"], key=lambda c: c["name"] != "uga-serve"):
            sc = c["securityContext"]
            args = ["run", "-d", "--name", f"{self.name}-{c['name']}"]
            if self.containers:
                args += ["--network", f"container:{self.containers[0]}"]
            else:
                args += ["-p", f"127.0.0.1:{self.port}:3000", "-p", f"127.0.0.1:{self.metrics_port}:9464"]
            self.containers.append(f"{self.name}-{c['name']}")
            args += ["--user", f"{sc.get('runAsUser', uid)}:{sc.get('runAsGroup', gid)}", "--group-add", str(fs_group)]
            if sc["readOnlyRootFilesystem"]:
                args += ["--read-only", "--read-only-tmpfs=false"]  # no writable /tmp unless mounted
            args += [f"--cap-drop={cap}" for cap in sc["capabilities"]["drop"]]
            if sc["allowPrivilegeEscalation"] is False:
                args += ["--security-opt", "no-new-privileges"]
            for key, value in container_env(c, config).items():
                args += ["-e", f"{key}={value}"]
            for m in c["volumeMounts"]:
                args += ["-v", f"{volumes[m['name']]}:{m['mountPath']}:{'ro' if m.get('readOnly') else 'rw'}"]
            image = images["runner" if "runner" in c["image"] else "serve"]
            assert c["image"].split(":")[1] == image.split(":")[1], "the manifest's tag is what make image built"
            args += [image, *c["command"]]
            podman(*args)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, role: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKENS[role]}"}, timeout=60)

    def logs(self) -> str:
        return "\n".join(podman("logs", "--tail", "40", name, check=False).stderr for name in self.containers)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def remove(self) -> None:
        for name in reversed(self.containers):
            podman("rm", "-f", "-t", "20", name, check=False)


@pytest.fixture(scope="module")
def pod(images, tmp_path_factory, ood_slide):
    spec, config = rendered_pod()
    pod = Pod(tmp_path_factory.mktemp("pod"), spec, config, images, ood_slide)
    started = time.monotonic()
    try:
        wait_for(pod.ready, timeout=180, interval=0.5, what="the serving container ready")
    except TimeoutError:
        logs = pod.logs()
        pod.remove()
        raise AssertionError(f"not ready:\n{logs}") from None
    print(f"container start to ready: {time.monotonic() - started:.1f} s")
    yield pod
    pod.remove()


def test_images_are_non_root_labelled_and_carry_only_what_their_role_needs(images):
    for role, image in images.items():
        info = json.loads(podman("image", "inspect", image).stdout)[0]
        labels = info["Config"]["Labels"]
        assert labels["org.opencontainers.image.version"] == version()
        assert len(labels["org.opencontainers.image.revision"].split("-")[0]) == 40
        card = json.loads((REPO / "models" / "baseline" / "card.json").read_text())
        assert labels["io.uga.model-version"] == card["version"]
        assert info["Config"]["User"] == "1034:1034"
        probe = (
            "import importlib.util as u; print(*(bool(u.find_spec(m)) for m in ('torch', 'onnxruntime', 'bentoml')))"
        )
        has = podman("run", "--rm", image, "python", "-c", probe).stdout.split()
        assert has == {"serve": ["False", "True", "True"], "runner": ["True", "True", "False"]}[role], (role, has)
        compilers = podman("run", "--rm", image, "sh", "-c", "command -v gcc cc c++ make", check=False)
        assert compilers.returncode != 0 and not compilers.stdout.strip(), compilers.stdout


def test_each_image_holds_exactly_the_wheels_its_lock_pins(images):
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    from tests.test_image_lock import LOCKS, read_lock

    listing = "import json, importlib.metadata as m; print(json.dumps({d.name: d.version for d in m.distributions()}))"
    for role, image in images.items():
        installed = json.loads(podman("run", "--rm", image, "python", "-c", listing).stdout)
        installed = {canonicalize_name(name): Version(v) for name, v in installed.items()}
        assert installed.pop("uga-serve") == Version(version())
        pins = read_lock(LOCKS / f"{role}.txt")
        if "setuptools" not in pins:
            installed.pop("setuptools", None)  # the venv's own, from Debian's python3-venv
        assert installed == pins, role


def test_the_pod_segments_ingests_fine_tunes_promotes_and_swaps(pod):
    with pod.client("annotator") as c:
        r = c.post("/v1/jobs", json={"slide": "ood.tif", "options": {"patch_um": 256, "queue_size": 5}})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"], timeout=300)
        assert job["state"] == "succeeded", job
        items = c.get("/v1/queue", params={"slide": "ood.tif", "k": 5}).json()["items"]
        assert len(items) == 5
        correct_disagreeing(c, items)
    with pod.client("admin") as c:
        run = finished_run(c)
        assert run["state"] in ("promoted", "rejected"), (run, pod.logs())
        if run["state"] == "rejected":  # the gate judged these corrections; promote to see the swap
            assert c.post(f"/v1/models/{run['candidate']}/promote").status_code == 200
        new = run["candidate"]
        wait_every_worker_serves(pod.url, new, workers=2)  # the base's UGA_WORKERS
    metrics = httpx.get(f"http://127.0.0.1:{pod.metrics_port}/metrics").text  # the runner's, in the same pod
    assert "uga_corrections_total 5.0" in metrics
