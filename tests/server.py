"""A real `bentoml serve` process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
TOKENS = {
    "admin": "admin-token-0123456789abcdef",
    "annotator": "annotator-token-0123456789ab",
    "viewer": "viewer-token-0123456789abcdef",
}


def hostile_slide_root(root: Path, source_slide: Path) -> Path:
    """``root/slides`` with cases/a.tif (+ its mask), a non-slide, and a symlink leading out of the root."""
    slides = root / "slides"
    (slides / "cases").mkdir(parents=True)
    shutil.copy(source_slide, slides / "cases" / "a.tif")
    shutil.copy(source_slide.with_name(source_slide.stem + ".mask.tif"), slides / "cases" / "a.mask.tif")
    (slides / "notes.svs").write_text("not a slide")
    outside = root / "secret.tif"
    shutil.copy(source_slide, outside)
    (slides / "escape.tif").symlink_to(outside)
    return slides


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    Ports the kernel hands out (outgoing connections, BentoML's ``bind(0)`` reservations) come from
    the ephemeral range, so a port picked here cannot be taken by one of those before its server binds it.
    """
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-32000")


class PortTaken(RuntimeError):
    """The server could not bind a port another process took after it was chosen."""


class Server:
    def __init__(self, data_dir: Path, slide_root: Path, name: str = "", **env: str):
        self.data_dir, self.slide_root, self.extra_env = data_dir, slide_root, env
        self.name = name or data_dir.name  # replicas sharing one data directory need their own names
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = data_dir.parent / f"server-{self.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90, attempts: int = 3) -> Server:
        """Start and wait for /readyz; a port taken between choosing and binding it is retried.

        Ports are picked free and bound a moment later (ours, and BentoML's circus control ports), so a
        concurrent test process can take one in between: that start fails with EADDRINUSE and is retried.
        """
        for attempt in range(attempts):
            try:
                return self._start_once(timeout)
            except PortTaken:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> Server:
        self.port = free_port()
        env = {
            **os.environ,
            "UGA_DATA_DIR": str(self.data_dir),
            "UGA_SLIDE_ROOT": str(self.slide_root),
            "UGA_AUTH_TOKENS": ",".join(f"{r}:{t}" for r, t in TOKENS.items()),
            "UGA_ORT_THREADS": "2",
            "UGA_PORT": str(self.port),
            "UGA_JOB_STALE_S": "3",
            # BentoML keeps the multiprocess metrics under its home and clears them when a server
            # starts: one home per server, so servers of concurrent test runs never wipe each other's.
            "BENTOML_HOME": str(self.data_dir.parent / f"bentoml-home-{self.name}"),
            **self.extra_env,
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        bentoml = Path(sys.executable).with_name("bentoml")
        cmd = [str(bentoml), "serve", "service.api:UGAService", "--host", "127.0.0.1", "--port", str(self.port)]
        log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.log.read_bytes()[log_start:].decode(errors="replace")
                if "Address already in use" in output:
                    raise PortTaken(output[-500:])
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{output[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Graceful: SIGTERM to the main process (BentoML drains and stops its workers)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def pids(self) -> set[int]:
        """The main process and its workers (a job's ``worker`` is ``host-pid`` of one of them)."""
        if not self.proc:
            return set()
        main = psutil.Process(self.proc.pid)
        return {main.pid} | {p.pid for p in main.children(recursive=True)}

    def kill(self) -> None:
        """Crash: SIGKILL the main process and every worker (they run in their own sessions)."""
        if not self.proc:
            return
        procs = [psutil.Process(self.proc.pid)]
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += procs[0].children(recursive=True)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        self.proc = None

    def client(self, role: str | None = "admin") -> httpx.Client:
        headers = {"Authorization": f"Bearer {TOKENS[role]}"} if role else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {job['state']} after {timeout}s")


def wait_started(client, job_id: str, timeout: float = 120) -> dict:
    """The job once it has computed its first tiles."""
    return wait_for(
        lambda: (job := client.get(f"/v1/jobs/{job_id}").json())["progress"]["done"] > 0 and job,
        timeout,
        interval=0.1,
        what=f"job {job_id} running",
    )


def finished_patch_job(client) -> dict:
    """Submit cases/a.tif with 256-µm patches and a queue of 4; the job once it has finished."""
    r = client.post("/v1/jobs", json={"slide": "cases/a.tif", "options": {"patch_um": 256, "queue_size": 4}})
    assert r.status_code == 202, r.text
    assert r.headers["location"].endswith(r.json()["id"])
    return wait_job(client, r.json()["id"])


class RunnerProcess:
    """`uga runner` as its own process, sharing the server's data directory."""

    def __init__(self, server: Server, **env: str):
        self.server, self.env = server, env
        self.proc: subprocess.Popen | None = None
        self.log = server.data_dir.parent / "runner.log"
        self.metrics_port = 0

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> RunnerProcess:
        self.metrics_port = free_port()
        env = {
            **os.environ,
            "UGA_DATA_DIR": str(self.server.data_dir),
            "UGA_SLIDE_ROOT": str(self.server.slide_root),
            "UGA_RUNNER_METRICS_PORT": str(self.metrics_port),
            **self.server.extra_env,
            **self.env,
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "runner"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached in {timeout}s")


def wait_every_worker_serves(base_url: str, version: str, workers: int, timeout: float = 60) -> list:
    """Wait until each of ``workers`` serving processes reports ``version`` in its own ``uga_model_served``.

    Asking ``/v1/models/current`` repeatedly proves nothing: keep-alive requests all land on one worker.
    """

    def served():
        text = httpx.get(f"{base_url}/metrics", timeout=10).text
        pairs = re.findall(r'^uga_model_served\{pid="(\d+)",version="([^"]+)"\} 1\.0$', text, flags=re.M)
        return pairs if len({pid for pid, _ in pairs}) == workers and {v for _, v in pairs} == {version} else None

    return wait_for(served, timeout, interval=0.25, what=f"{workers} workers serving {version}")


def mask_png(mask) -> bytes:
    """A uint8 mask (0/255) as PNG bytes, the body of a correction."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def correct_disagreeing(client, items: list[dict]) -> None:
    """For each queue item, post the model's own mask inverted: the clinician disagrees everywhere."""
    import io

    import numpy as np
    from PIL import Image

    for item in items:
        predicted = np.asarray(Image.open(io.BytesIO(client.get(item["links"]["mask"]).content)))
        r = client.post(
            f"/v1/queue/items/{item['id']}/correction",
            content=mask_png(np.where(predicted > 0, 0, 255)),
            headers={"content-type": "image/png"},
        )
        assert r.status_code == 201, r.text


def finished_run(client, timeout: float = 600) -> dict:
    """The first fine-tune run that ended (promoted, rejected or failed)."""

    def ended():
        runs = client.get("/v1/finetune/runs").json()["runs"]
        return next((r for r in runs if r["state"] in ("promoted", "rejected", "failed")), None)

    return wait_for(ended, timeout=timeout, interval=1, what="a finished fine-tune run")
