"""End to end against a real `bentoml serve`: health, metrics, restart after kill -9, crash during ingests.

The HTTP contract itself (jobs, queue, corrections, refusals) is tested in-process in test_http.py."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.server import Server, finished_patch_job, hostile_slide_root, wait_job

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env(tmp_path_factory, source_slide):
    root = tmp_path_factory.mktemp("svc")
    slides = hostile_slide_root(root, source_slide)
    server = Server(root / "data", slides).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def finished(env):
    with env.client("annotator") as c:
        return finished_patch_job(c)


def test_health_and_metrics(env, finished, tmp_path):
    import httpx

    assert httpx.get(f"{env.url}/livez").status_code == 200
    assert httpx.get(f"{env.url}/readyz").status_code == 200
    text = httpx.get(f"{env.url}/metrics").text
    assert 'uga_jobs{state="succeeded"}' in text
    assert "uga_queue_pending" in text and "uga_model_info{version=" in text
    assert "uga_slide_mean_uncertainty_bucket" in text and "uga_tiles_processed_total" in text
    assert "cases/a.tif" not in text  # no slide identifiers in labels
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt install prometheus)")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_restart_keeps_finished_jobs_and_recovers_interrupted_ones(env, finished):
    with env.client("annotator") as c:
        r = c.post("/v1/jobs", json={"slide": "cases/a.tif", "options": {"patch_um": 512, "queue_size": 2}})
        job_id = r.json()["id"]
    env.kill()  # crash: possibly mid-job
    env.start()
    with env.client("viewer") as c:
        again = c.get(f"/v1/jobs/{finished['id']}").json()
        assert again["state"] == "succeeded"
        assert c.get(again["artifacts"]["summary"]).json()["model_version"] == finished["model_version"]
        job = wait_job(c, job_id, timeout=120)  # requeued after its heartbeat went stale, then ran
        assert job["state"] == "succeeded", job
    assert json.loads(json.dumps(job))["progress"]["fraction"] == 1.0


# -- corrections over HTTP: every refusal writes nothing -----------------------------------------


def _png(arr) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_kill_9_during_ingests_loses_no_acknowledged_correction_and_counts_no_orphan(env, finished):
    import threading

    import httpx

    acknowledged, stop = [], threading.Event()

    def post_forever(seed: int):
        rng = np.random.default_rng(seed)
        with env.client("annotator") as c:
            while not stop.is_set():
                mask = (rng.random((128, 128)) > 0.5).astype(np.uint8) * 255
                try:
                    r = c.post(
                        "/v1/corrections?slide=cases/a.tif&x=256&y=256&width=256&height=256",
                        content=_png(mask),
                        headers={"content-type": "image/png"},
                    )
                except httpx.HTTPError:
                    return  # the server died under us
                if r.status_code == 201:
                    acknowledged.append(r.json()["id"])

    threads = [threading.Thread(target=post_forever, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    wait = __import__("tests.server", fromlist=["wait_for"]).wait_for
    wait(lambda: len(acknowledged) >= 5, timeout=60, interval=0.05, what="some acknowledged ingests")
    env.kill()  # kill -9 of the server and its workers in the middle of ingests
    stop.set()
    for t in threads:
        t.join()
    env.start()
    with env.client("viewer") as c:
        stored = {rec["id"]: rec for rec in c.get("/v1/corrections", params={"limit": 5000}).json()["corrections"]}
        assert set(acknowledged) <= set(stored)  # a 2xx means it is on disk
        for cid, rec in stored.items():  # every counted correction is complete
            side = rec["width"] // 2  # level-0 px at 0.5 µm/px -> mask px at 1 µm/px
            for name in ("image", "mask"):
                r = c.get(f"/v1/corrections/{cid}/{name}.png")
                assert r.status_code == 200 and Image.open(__import__("io").BytesIO(r.content)).size == (side, side)
    on_disk = {p.name for p in (env.data_dir / "corrections").iterdir() if not p.name.startswith(".")}
    assert set(stored) <= on_disk  # orphans (files without a row) may exist but are never counted


def test_store_counters_do_not_grow_with_scrapes_and_every_scrape_lints(env, finished):
    import re

    import httpx

    scrapes = [httpx.get(f"{env.url}/metrics").text for _ in range(5)]

    def value(text: str, name: str) -> float:
        found = re.findall(rf"^{name} ([0-9.e+]+)$", text, flags=re.M)
        assert len(found) == 1, (name, found)  # once: no duplicated families
        return float(found[0])

    with env.client("viewer") as c:
        truth = len(c.get("/v1/corrections", params={"limit": 5000}).json()["corrections"])
    for text in scrapes:
        assert value(text, "uga_corrections_total") == truth  # the store's count, not count x scrapes
        assert text.count("# HELP uga_jobs ") == 1
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt install prometheus)")
    for text in scrapes[1:]:  # not just the first scrape
        proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
