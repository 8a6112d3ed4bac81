"""The human-in-the-loop end to end: real server, real runner process, real fine-tuning on CPU.

Out-of-domain slide -> top-5 queue -> ground-truth corrections -> runner fine-tunes and promotes ->
every worker swaps -> the slide is rescored by the new version and Dice on its held-out area rises.
"""

from __future__ import annotations

import io
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from service.inference.evaluation import dice
from service.wsi.slide import RegionReader, open_slide
from tests.server import RunnerProcess, Server, wait_every_worker_serves, wait_for, wait_job

pytestmark = pytest.mark.e2e
LOOP_ENV = {
    "UGA_WORKERS": "2",
    "UGA_FINETUNE_MIN_CORRECTIONS": "5",
    "UGA_FINETUNE_STEPS": "30",
    "UGA_FINETUNE_THREADS": "2",
    "UGA_HOLDOUT_EVERY": "0",
    "UGA_RUNNER_POLL_S": "1",
    "UGA_MODEL_POLL_S": "0.5",
    "UGA_GATE_MARGIN": "0.05",  # small CPU budget in tests; the default margin is 0.03
}


def png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def loop(tmp_path_factory, ood_slide):
    root = tmp_path_factory.mktemp("loop")
    slides = root / "slides"
    slides.mkdir()
    shutil.copy(ood_slide, slides / "ood.tif")
    shutil.copy(ood_slide.with_name(ood_slide.stem + ".mask.tif"), slides / "ood.mask.tif")
    server = Server(root / "data", slides, **LOOP_ENV).start()
    state = {"server": server, "truth": open_slide(slides / "ood.mask.tif")}
    yield state
    for key in ("runner",):
        if key in state:
            state[key].stop()
    server.stop()


def truth_for(loop, item: dict) -> np.ndarray:
    b = item["bbox_level0"]
    return loop["truth"].read_box(b["x"], b["y"], b["width"], b["height"], 1.0)[..., 0] > 127  # job mpp 1.0


def heldout_dice(server: Server, job: dict, boxes: list[dict], truth) -> float:
    with server.client("viewer") as c:
        data = c.get(job["artifacts"]["mask"]).content
    path = server.data_dir.parent / f"mask-{job['id']}.tif"
    path.write_bytes(data)
    m = open_slide(path)
    w, h = m.dimensions
    pred = RegionReader(m, 1.0).read(0, 0, h, w)[..., 0] > 127
    gt = RegionReader(truth, 1.0).read(0, 0, h, w)[..., 0] > 127
    keep = np.ones((h, w), bool)
    for b in boxes:
        x, y, s = b["x"] // 2, b["y"] // 2, b["width"] // 2
        keep[y : y + s, x : x + s] = False
    return dice(pred[keep], gt[keep])


def test_1_segment_ood_slide_and_post_ground_truth_for_top5(loop):
    server = loop["server"]
    with server.client("annotator") as c:
        r = c.post("/v1/jobs", json={"slide": "ood.tif", "options": {"patch_um": 256, "queue_size": 5}})
        job = wait_job(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        items = c.get("/v1/queue", params={"slide": "ood.tif", "k": 5}).json()["items"]
        assert len(items) == 5
        for item in items:
            r = c.post(
                f"/v1/queue/items/{item['id']}/correction",
                content=png(truth_for(loop, item)),
                headers={"content-type": "image/png"},
            )
            assert r.status_code == 201, r.text
            assert r.json()["proposed_by_version"] == job["model_version"]
        again = c.post(
            f"/v1/queue/items/{items[0]['id']}/correction",
            content=png(truth_for(loop, items[0])),
            headers={"content-type": "image/png"},
        )
        assert again.status_code == 200 and again.json()["duplicate"] is True
        assert c.get("/v1/queue", params={"slide": "ood.tif", "k": 5}).json()["items"] == []  # all corrected
        assert len(c.get("/v1/corrections").json()["corrections"]) == 5
    loop.update(
        baseline_job=job,
        boxes=[i["bbox_level0"] for i in items],
        baseline=job["model_version"],
        corrected={i["id"] for i in items},
    )


def test_2_runner_crash_mid_training_changes_nothing(loop):
    server = loop["server"]
    runner = RunnerProcess(server, UGA_FINETUNE_STEPS="5000").start()
    with server.client("viewer") as c:
        run = wait_for(
            lambda: next(
                (
                    r
                    for r in c.get("/v1/finetune/runs").json()["runs"]
                    if r["state"] == "running" and r["progress"]["done"] > 0
                ),
                None,
            ),
            timeout=120,
            what="a running fine-tune with progress",
        )
        assert run["progress"]["total"] == 5000 * 5
        runner.kill()  # kill -9 mid-training
        assert c.get("/v1/models/current").json()["version"] == loop["baseline"]
        assert [m["version"] for m in c.get("/v1/models").json()["models"]] == [loop["baseline"]]
        r = c.get("/v1/queue", params={"k": 1})
        assert r.status_code == 200  # serving carries on
    assert not [d for d in (server.data_dir / "models").iterdir() if not d.name.startswith(".staging")]


def test_3_runner_restarts_finetunes_promotes_and_every_worker_swaps(loop):
    server = loop["server"]
    loop["runner"] = RunnerProcess(server).start()
    with server.client("admin") as c:

        def finished_run():
            runs = c.get("/v1/finetune/runs").json()["runs"]
            return next((r for r in runs if r["state"] in ("promoted", "rejected")), None)

        run = wait_for(finished_run, timeout=600, interval=2, what="a finished fine-tune run")
        assert run["state"] == "promoted", run
        states = {r["state"] for r in c.get("/v1/finetune/runs").json()["runs"]}
        assert "failed" in states  # the killed run is recorded as failed, not left running
        new = run["candidate"]
        promoted_at = time.monotonic()

        served = wait_every_worker_serves(server.url, new, workers=2)
        print(f"both workers serve {new} {time.monotonic() - promoted_at:.1f}s after the promotion was seen")
        assert len(served) == 2 and c.get("/v1/models/current").json()["served_by_this_worker"] == new
        models = {m["version"]: m for m in c.get("/v1/models").json()["models"]}
        assert models[new]["status"] == "promoted" and models[new]["parent"] == loop["baseline"]
        assert sorted(models[new]["corrections"]["train"]) and models[new]["metrics"]["passed"] is True
        # the queue was rescored: a new job on the slide with the new version
        rescored = wait_for(
            lambda: next(
                (j for j in c.get("/v1/jobs").json()["jobs"] if j["model_version"] == new and j["slide"] == "ood.tif"),
                None,
            ),
            timeout=30,
            what="rescoring job",
        )
        rescored = wait_job(c, rescored["id"], timeout=300)
        assert rescored["state"] == "succeeded" and rescored["summary"]["model_version"] == new
        queue = c.get("/v1/queue", params={"slide": "ood.tif"}).json()["items"]
        assert queue and all(i["model_version"] == new for i in queue)
        # corrected patches never come back: not in the pending queue, and the rescoring job did not even
        # propose them again (item ids are stable per region, so the latest stored version of each
        # corrected item is still the baseline job's)
        assert len(loop["corrected"]) == 5
        assert not {i["id"] for i in queue} & loop["corrected"]
        corrected_boxes = [
            (x["x"], x["y"], x["width"], x["height"]) for x in c.get("/v1/corrections").json()["corrections"]
        ]
        for i in queue:  # nor any patch overlapping corrected tissue
            b = i["bbox_level0"]
            assert not any(
                b["x"] < x + w and x < b["x"] + b["width"] and b["y"] < y + h and y < b["y"] + b["height"]
                for x, y, w, h in corrected_boxes
            ), (b, corrected_boxes)
        for item_id in loop["corrected"]:
            item = c.get(f"/v1/queue/items/{item_id}").json()
            assert item["status"] == "corrected", item
            assert item["job_id"] == loop["baseline_job"]["id"] and item["model_version"] == loop["baseline"], item
        # each correction shows the loop closing: the mask it corrected (before) and the new model's (after)
        outcomes = [
            c.get(f"/v1/corrections/{x['id']}/outcome").json() for x in c.get("/v1/corrections").json()["corrections"]
        ]
        assert all(o["before"]["model_version"] == loop["baseline"] for o in outcomes)
        assert all(o["after"]["model_version"] == new and o["after"]["job_id"] == rescored["id"] for o in outcomes)
        before_dice = np.mean([o["before"]["dice"] for o in outcomes])
        after_dice = np.mean([o["after"]["dice"] for o in outcomes])
        print(f"Dice against the corrections: {before_dice:.3f} before -> {after_dice:.3f} after")
        assert after_dice > before_dice
        shown = c.get(outcomes[0]["links"]["after"])
        assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
    before = heldout_dice(server, loop["baseline_job"], loop["boxes"], loop["truth"])
    after = heldout_dice(server, rescored, loop["boxes"], loop["truth"])
    print(f"held-out Dice on the OOD slide: {before:.3f} -> {after:.3f}")
    assert after > before + 0.05
    text = httpx.get(f"{server.url}/metrics").text
    assert 'uga_finetune_runs_total{outcome="promoted"} 1.0' in text
    assert "uga_corrections_total 5.0" in text and 'uga_last_gate_dice{holdout="source",model=' in text
    loop["new"] = new


def test_4_swaps_under_steady_traffic_fail_no_request_and_rollback_is_audited(loop):
    server = loop["server"]
    failures, done, stop = [], [0], threading.Event()

    def traffic():
        with server.client("viewer") as c:
            while not stop.is_set():
                for url in ("/v1/models/current", "/v1/queue?k=3", "/v1/jobs?limit=5"):
                    r = c.get(url)
                    if r.status_code != 200:
                        failures.append((url, r.status_code, r.text[:200]))
                    done[0] += 1

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    with server.client("admin") as c:
        r = c.post("/v1/models/rollback", params={"from": loop["new"]})
        assert r.status_code == 200 and r.json()["version"] == loop["baseline"]
        r = c.post("/v1/models/rollback", params={"from": loop["new"]})  # a retry: nothing more rolled back
        assert r.status_code == 409 and r.json()["error"]["code"] == "pointer_moved"
        wait_every_worker_serves(server.url, loop["baseline"], workers=2)
        job = c.post("/v1/jobs", json={"slide": "ood.tif", "options": {"patch_um": 512, "queue_size": 2}}).json()
        r = c.post(f"/v1/models/{loop['new']}/promote")
        assert r.status_code == 200
        finished = wait_job(c, job["id"], timeout=300)
        history = c.get("/v1/models").json()["history"]
    stop.set()
    for t in threads:
        t.join()
    assert failures == [] and done[0] > 20
    assert finished["state"] == "succeeded"
    assert finished["summary"]["model_version"] in (loop["baseline"], loop["new"])  # one version for the whole job
    assert [h["action"] for h in history[:2]] == ["manual-promote", "rollback"]
    with server.client("viewer") as c:
        r = c.post("/v1/models/rollback")
        assert r.status_code == 403  # model actions need admin
