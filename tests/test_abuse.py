"""The abuse suite: each attack a hostile or careless client can make, against a real `uga serve`.

Each asserts the refusal, its JSON error body and that nothing was written; how much memory and
time the attacks cost while in flight is measured by bench/bench_abuse.py, not asserted here.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from tests.hostile import deep, png, png_header_bomb, polygon, square_ring
from tests.server import TOKENS, Server, hostile_slide_root, wait_job, wait_started

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory, source_slide):
    root = tmp_path_factory.mktemp("abuse")
    slides = hostile_slide_root(root, source_slide)
    srv = Server(
        root / "data",
        slides,
        UGA_HEADER_TIMEOUT_S="2",
        UGA_BODY_TIMEOUT_S="2",
        UGA_BODY_TOTAL_S="4",
        UGA_MAX_CORRECTION_PX="2048",
        UGA_MAX_JOB_TILES="100",  # the 2048² slide: 25 tiles at 1 µm/px, 84 at 0.5, 335 at 0.25
    ).start()
    with srv.client("annotator") as c:
        job = wait_job(c, c.post("/v1/jobs", json={"slide": "cases/a.tif", "options": {"patch_um": 256}}).json()["id"])
        assert job["state"] == "succeeded", job
    yield srv
    srv.stop()


def _state(server) -> tuple:
    """What a refused request must leave unchanged: jobs, corrections and their files."""
    with server.client("viewer") as c:
        jobs = len(c.get("/v1/jobs", params={"limit": 500}).json()["jobs"])
        corrections = len(c.get("/v1/corrections").json()["corrections"])
    d = server.data_dir / "corrections"
    return jobs, corrections, sorted(p.name for p in d.iterdir()) if d.exists() else []


def _item(server) -> dict:
    with server.client("viewer") as c:
        return c.get("/v1/queue", params={"slide": "cases/a.tif"}).json()["items"][0]


@pytest.mark.parametrize(
    ("name", "url", "body", "ctype", "status", "code"),
    [
        (
            "geojson vertex flood",
            "item",
            polygon(square_ring(0, 0, 200, 120_000)),
            "application/geo+json",
            422,
            "too_many_vertices",
        ),
        ("geojson nested deep", "item", deep(100_000), "application/geo+json", 422, "invalid_geojson"),
        (
            "geojson features not a list",
            "item",
            b'{"type": "FeatureCollection", "features": 5}',
            "application/geo+json",
            422,
            "invalid_geojson",
        ),
        ("png header bomb", "item", png_header_bomb, "image/png", 422, "mask_size_mismatch"),  # built when run
        (
            "region far too large",
            "/v1/corrections?slide=cases/a.tif&x=0&y=0&width=2048&height=2048&mpp=0.25",
            png(np.zeros((8, 8), np.uint8)),
            "image/png",
            422,
            "region_too_large",
        ),
    ],
)
def test_hostile_corrections_are_refused_and_write_nothing(server, name, url, body, ctype, status, code):
    body = body() if callable(body) else body  # a costly body is made only when its case runs, not when collected
    before = _state(server)
    if url == "item":
        url = f"/v1/queue/items/{_item(server)['id']}/correction"
    with server.client("annotator") as c:
        r = c.post(url, content=body, headers={"content-type": ctype})
    assert r.status_code == status and r.json()["error"]["code"] == code, (name, r.status_code, r.text[:300])
    assert _state(server) == before
    assert httpx.get(f"{server.url}/livez", timeout=5).status_code == 200


def test_concurrent_identical_corrections_are_one_record_and_never_fail(server):
    item = _item(server)
    side = item["bbox_level0"]["width"] // 2
    mask = np.zeros((side, side), np.uint8)
    mask[: side // 2] = 255
    body, statuses = png(mask), []

    def post() -> None:
        with server.client("annotator") as c:
            for _ in range(6):
                r = c.post(
                    f"/v1/queue/items/{item['id']}/correction", content=body, headers={"content-type": "image/png"}
                )
                statuses.append((r.status_code, r.json().get("id")))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted({s for s, _ in statuses}) in ([200, 201], [201]) and len({i for _, i in statuses}) == 1
    assert [s for s, _ in statuses].count(201) == 1
    cid = statuses[0][1]
    with server.client("viewer") as c:
        for name in ("image", "mask"):
            assert c.get(f"/v1/corrections/{cid}/{name}.png").status_code == 200


def test_every_queue_item_is_correctable_as_proposed(server):
    with server.client("viewer") as c:
        items = c.get("/v1/queue", params={"slide": "cases/a.tif", "k": 50}).json()["items"]
    assert items
    with server.client("annotator") as c:
        for item in items:
            side = round(item["bbox_level0"]["width"] / 2)  # 0.5 µm/px slide, 1 µm/px job
            r = c.post(
                f"/v1/queue/items/{item['id']}/correction",
                content=png(np.zeros((side, side), np.uint8)),
                headers={"content-type": "image/png"},
            )
            assert r.status_code in (200, 201), r.text


def test_slow_headers_are_cut_off_and_the_service_stays_responsive(server):
    conns = []
    for _ in range(6):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"GET /v1/jobs HTTP/1.1\r\n")
        conns.append(s)
    closed_at = {}
    t0 = time.monotonic()
    while len(closed_at) < len(conns) and time.monotonic() - t0 < 20:
        for k, s in enumerate(conns):
            if k in closed_at:
                continue
            try:
                s.sendall(b"X")  # one byte of a header line at a time
            except OSError:
                closed_at[k] = time.monotonic() - t0
        assert httpx.get(f"{server.url}/livez", timeout=5).status_code == 200
        time.sleep(0.5)
    for s in conns:
        s.close()
    assert len(closed_at) == len(conns), f"still open after 20 s: {len(conns) - len(closed_at)}"
    assert max(closed_at.values()) < 15  # the header deadline is 2 s here


def test_a_stalled_body_gets_408_and_writes_nothing(server):
    before = _state(server)
    s = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    s.sendall(
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
        + f"Authorization: Bearer {TOKENS['annotator']}\r\n\r\n".encode()
        + b'{"slide": '
    )
    reply = b""
    while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
    s.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:200]
    assert json.loads(body)["error"]["code"] == "body_timeout"
    assert _state(server) == before


def test_an_unauthenticated_flood_is_refused_before_its_body_is_read(server):
    before = _state(server)
    mask = b"\x89PNG" + b"x" * (21 * 1024 * 1024)  # under UGA_MAX_BODY_MB: only authentication stops it
    url = f"{server.url}/v1/corrections?slide=cases/a.tif&x=0&y=0&width=64&height=64"
    r = httpx.post(url, content=mask, headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    body = b'{"slide": "cases/a.tif", "pad": "' + b"x" * (21 * 1024 * 1024) + b'"}'  # over UGA_MAX_JSON_KB
    r = httpx.post(f"{server.url}/v1/jobs", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert _state(server) == before


def test_a_chunked_body_over_the_limit_is_413(server):
    def chunks():
        for _ in range(70):
            yield b"0" * (1024 * 1024)

    before = _state(server)
    with server.client("annotator") as c:
        r = c.post(
            "/v1/corrections?slide=cases/a.tif&x=0&y=0&width=64&height=64",
            content=chunks(),
            headers={"content-type": "image/png"},
        )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert _state(server) == before


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({}, "no API tokens configured"),
        ({"UGA_AUTH_TOKENS": "admin:0123456789abcdef0123", "UGA_TILE": "132"}, "multiple of 8"),
        ({"UGA_AUTH_TOKENS": "admin short"}, "shorter than 16"),
    ],
)
def test_plain_bentoml_serve_with_a_fatal_misconfiguration_exits_with_one_line(tmp_path, env, reason):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.server import REPO, free_port

    base = {k: v for k, v in os.environ.items() if not k.startswith("UGA_")}
    base.update(UGA_DATA_DIR=str(tmp_path / "data"), UGA_SLIDE_ROOT=str(tmp_path), **env)
    bentoml = Path(sys.executable).with_name("bentoml")
    proc = subprocess.run(
        [str(bentoml), "serve", "service.api:UGAService", "--port", str(free_port())],
        cwd=REPO,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("uga: error:")]
    assert len(lines) == 1 and reason in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_slide_mpp_cannot_turn_a_small_job_into_hours(server):
    before = _state(server)
    with server.client("annotator") as c:
        r = c.post("/v1/jobs", json={"slide": "cases/a.tif", "options": {"slide_mpp": 4, "mpp": 0.25}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unusable_slide"
    assert _state(server) == before


def test_a_burst_of_submissions_is_bounded_with_retry_after(server):
    codes = []
    with server.client("viewer") as v, server.client("annotator") as c:
        for n in range(60):
            r = c.post("/v1/jobs", json={"slide": "cases/a.tif", "options": {"queue_size": n + 1, "mpp": 8}})
            codes.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["error"]["code"] in ("too_many_jobs", "queue_full") and int(r.headers["retry-after"])
        active = [
            j for j in v.get("/v1/jobs", params={"limit": 500}).json()["jobs"] if j["state"] in ("queued", "running")
        ]
        for job in active:  # leave nothing queued for the tests after this one
            c.post(f"/v1/jobs/{job['id']}/cancel")
    assert codes.count(429) > 0 and codes.count(202) >= 20
    assert len(active) <= 20  # UGA_MAX_ACTIVE_JOBS_PER_CALLER


def test_the_bearer_scheme_is_case_insensitive(server):
    for scheme in ("bearer", "BEARER"):
        r = httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": f"{scheme} {TOKENS['viewer']}"})
        assert r.status_code == 200, (scheme, r.text)


def test_request_metrics_are_labelled_by_route_template_not_by_what_callers_send(server):
    import re

    with server.client("viewer") as c:
        job_id = c.get("/v1/jobs").json()["jobs"][0]["id"]
        c.get(f"/v1/jobs/{job_id}")
        for n in range(40):
            c.get(f"/v1/jobs/MRN-{n:08d}")  # looks like a record number
            c.get(f"/v1/invented-{n}/path")
            httpx.get(f"{server.url}/also-invented-{n}")
        c.get("/v1/openapi.json")
    httpx.get(f"{server.url}/review/")
    httpx.get(f"{server.url}/review/vendor/invented-{n}.js")
    text = httpx.get(f"{server.url}/metrics").text
    assert "MRN-" not in text and "invented-" not in text and job_id not in text
    endpoints = set(re.findall(r'endpoint="([^"]*)"', text))
    assert {"/v1/jobs/{job_id}", "/v1/{unknown}", "/{unknown}", "/v1/openapi.json", "/review/{path}"} <= endpoints
    assert len(endpoints) < 40  # bounded by the routes, not by the requests


def test_a_job_over_the_tile_limit_is_refused_at_submit(server):
    before = _state(server)
    with server.client("annotator") as c:
        r = c.post("/v1/jobs", json={"slide": "cases/a.tif", "options": {"mpp": 0.25}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_much_work"
    assert "UGA_MAX_JOB_TILES" in r.json()["error"]["message"] and r.json()["error"]["details"]["tiles"] > 100
    assert _state(server) == before


def test_a_running_job_is_cancelled_within_a_few_tiles_and_leaves_no_files(server):
    with server.client("annotator") as c:
        job = c.post("/v1/jobs", json={"slide": "cases/a.tif", "options": {"mpp": 0.5, "queue_size": 7}}).json()
        wait_started(c, job["id"])
        r = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 202 and r.json()["cancel_requested"] is True
        done = wait_job(c, job["id"], timeout=60)
    assert done["state"] == "cancelled" and done["progress"]["done"] < done["progress"]["total"]
    assert not (server.data_dir / "jobs" / job["id"]).exists()


def test_a_trickled_body_is_cut_off_by_the_total_deadline(server):
    before = _state(server)
    s = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    s.sendall(
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
        + f"Authorization: Bearer {TOKENS['annotator']}\r\n\r\n".encode()
    )
    t0, reply = time.monotonic(), b""
    s.settimeout(1.0)
    while time.monotonic() - t0 < 15 and b"\r\n\r\n" not in reply:
        try:
            s.sendall(b" ")  # one byte a second: never stalls for UGA_BODY_TIMEOUT_S (2 s)
            reply += s.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
    s.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.monotonic() - t0 < 10  # UGA_BODY_TOTAL_S is 4 s here
    assert _state(server) == before
