"""Serving latency with and without the fine-tune runner training next to it (prints a table).

    python bench/bench_latency.py [--requests 200]

Starts a real `bentoml serve` on a free port and a real `uga runner` with a long fine-tune budget,
then measures request latency (GET /v1/queue, GET /v1/jobs/{id}) and the wall time of one slide
segmentation, first with the runner idle, then while it trains. Compare the two columns as ratios.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.server import RunnerProcess, Server, wait_for, wait_job  # noqa: E402


def measure(server: Server, n: int, job_id: str) -> dict:
    lat = []
    with server.client("viewer") as c:
        for i in range(n):
            url = "/v1/queue?k=10" if i % 2 else f"/v1/jobs/{job_id}"
            t = time.perf_counter()
            r = c.get(url)
            lat.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
    a = np.array(lat) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "max_ms": float(a.max())}


def segment_once(server: Server, patch_um: int) -> float:
    with server.client("annotator") as c:
        t = time.perf_counter()
        r = c.post("/v1/jobs", json={"slide": "s.tif", "options": {"patch_um": patch_um, "queue_size": 3}})
        job = wait_job(c, r.json()["id"], timeout=600)
        assert job["state"] == "succeeded", job
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    from models.data.slidegen import build_slide
    from models.data.sources import ensure_sources

    root = Path(tempfile.mkdtemp(prefix="uga-latency-"))
    slides = root / "slides"
    slides.mkdir()
    print("building slide ...", file=sys.stderr)
    build_slide(slides / "s.tif", size=(3072, 3072), centre="mixed", seed=5, sources=ensure_sources())
    server = Server(
        root / "data", slides, UGA_FINETUNE_MIN_CORRECTIONS="1", UGA_FINETUNE_STEPS="100000", UGA_HOLDOUT_EVERY="0"
    ).start()
    runner = None
    try:
        t_idle = segment_once(server, 256)
        with server.client("viewer") as c:
            job_id = c.get("/v1/jobs").json()["jobs"][0]["id"]
            item = c.get("/v1/queue", params={"k": 1}).json()["items"][0]
        idle = measure(server, args.requests, job_id)
        side = item["bbox_level0"]["width"] // 2
        buf = io.BytesIO()
        Image.fromarray(np.zeros((side, side), np.uint8)).save(buf, format="PNG")
        with server.client("annotator") as c:
            c.post(
                f"/v1/queue/items/{item['id']}/correction",
                content=buf.getvalue(),
                headers={"content-type": "image/png"},
            )
        runner = RunnerProcess(server).start()
        with server.client("viewer") as c:
            wait_for(
                lambda: any(
                    r["state"] == "running" and r["progress"]["done"] > 0
                    for r in c.get("/v1/finetune/runs").json()["runs"]
                ),
                180,
                what="training",
            )
        busy = measure(server, args.requests, job_id)
        t_busy = segment_once(server, 512)
    finally:
        if runner:
            runner.kill()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print("| measure | runner idle | runner training | ratio |")
    print("|---|---|---|---|")
    for k in ("p50_ms", "p95_ms", "max_ms"):
        print(f"| request latency {k} | {idle[k]:.1f} | {busy[k]:.1f} | {busy[k] / idle[k]:.2f} |")
    print(f"| segmentation of a 3072² slide (s) | {t_idle:.1f} | {t_busy:.1f} | {t_busy / t_idle:.2f} |")


if __name__ == "__main__":
    main()
