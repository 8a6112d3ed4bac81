"""The HTTP contract in-process (the ASGI app with a real store, model and job worker, no server
process): jobs, artifacts, queue, models, every refusal with its JSON error and nothing written."""

from __future__ import annotations

import io
import json
import re
import struct

import numpy as np
import openslide
import pytest
from PIL import Image

from service.vocabulary import ARTIFACTS
from tests.inprocess import InProcessService
from tests.server import finished_patch_job, hostile_slide_root, wait_job


@pytest.fixture(scope="module")
def env(tmp_path_factory, source_slide):
    root = tmp_path_factory.mktemp("svc")
    slides = hostile_slide_root(root, source_slide)
    service = InProcessService(root / "data", slides)
    yield service
    service.close()


@pytest.fixture(scope="module")
def finished(env):
    with env.client("annotator") as c:
        return finished_patch_job(c)


def test_job_runs_to_completion_with_progress_and_summary(env, finished):
    assert finished["state"] == "succeeded", finished["error"]
    assert finished["progress"]["done"] == finished["progress"]["total"] > 0
    s = finished["summary"]
    assert s["model_version"] == finished["model_version"]
    assert s["queue"]["size"] == 4 and s["tissue_area_mm2"] > 0


def test_every_artifact_downloads_and_tiffs_open_in_openslide(env, finished, tmp_path):
    with env.client("viewer") as c:
        for name, url in finished["artifacts"].items():
            r = c.get(url)
            assert r.status_code == 200, (name, r.text)
            path = tmp_path / ARTIFACTS[name]
            path.write_bytes(r.content)
            if path.suffix == ".tif":
                s = openslide.OpenSlide(str(path))
                assert float(s.properties["openslide.mpp-x"]) == pytest.approx(1.0)
                assert s.level_count >= 2
        assert c.get(finished["artifacts"]["overlay"]).headers["content-type"] == "image/png"
        gj = c.get(finished["artifacts"]["geojson"]).json()
        assert gj["type"] == "FeatureCollection"


def test_same_submission_returns_the_existing_job(env, finished):
    with env.client("annotator") as c:
        r = c.post("/v1/jobs", json={"slide": "cases/a.tif", "options": {"patch_um": 256, "queue_size": 4}})
        assert r.status_code == 200 and r.json()["deduplicated"] is True
        assert r.json()["id"] == finished["id"]


def test_queue_items_link_to_patch_image_and_predicted_mask_and_can_be_skipped(env, finished):
    with env.client("viewer") as c:
        q = c.get("/v1/queue", params={"slide": "cases/a.tif"}).json()["items"]
        assert len(q) == 4 and [i["rank"] for i in q] == [1, 2, 3, 4]
        pooled = c.get("/v1/queue", params={"k": 2}).json()["items"]
        assert [i["id"] for i in pooled] == [i["id"] for i in q[:2]]
        img = Image.open(__import__("io").BytesIO(c.get(q[0]["links"]["image"]).content))
        mask = Image.open(__import__("io").BytesIO(c.get(q[0]["links"]["mask"]).content))
        assert img.size == mask.size == (256, 256) and img.mode == "RGB"
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
    with env.client("annotator") as c:
        r = c.post(q[0]["links"]["skip"])
        assert r.status_code == 200 and r.json()["status"] == "skipped"
        left = c.get("/v1/queue", params={"slide": "cases/a.tif"}).json()["items"]
        assert q[0]["id"] not in [i["id"] for i in left] and len(left) == 3


def test_models_listing(env):
    with env.client("viewer") as c:
        models = c.get("/v1/models").json()
        assert models["current"].startswith("baseline-")
        assert models["models"][0]["metrics"]["dice_source_holdout"] > 0.85
        assert c.get("/v1/models/current").json()["current"] is True


# -- refusals: JSON error envelope, fitting status, nothing written ---------------------------------


def _jobs(env) -> int:
    with env.client("viewer") as c:
        return len(c.get("/v1/jobs", params={"limit": 500}).json()["jobs"])


@pytest.mark.parametrize(
    ("role", "body", "status", "code"),
    [
        ("annotator", {"slide": "/etc/passwd"}, 400, "invalid_slide_path"),
        ("annotator", {"slide": "../secret.tif"}, 400, "invalid_slide_path"),
        ("annotator", {"slide": "cases/../../secret.tif"}, 400, "invalid_slide_path"),
        ("annotator", {"slide": "escape.tif"}, 400, "invalid_slide_path"),
        ("annotator", {"slide": "cases/missing.tif"}, 404, "slide_not_found"),
        ("annotator", {"slide": "0" * 1000}, 400, "invalid_slide_path"),  # longer than a file name may be
        ("annotator", {"slide": "notes.svs"}, 422, "unusable_slide"),
        ("annotator", {"slide": "cases/a.tif", "options": {"uncertainty": "vibes"}}, 422, "invalid_request"),
        ("annotator", {"slide": "cases/a.tif", "extra": 1}, 422, "invalid_request"),
        (None, {"slide": "cases/a.tif"}, 401, "unauthenticated"),
        ("viewer", {"slide": "cases/a.tif"}, 403, "forbidden"),
    ],
)
def test_bad_submissions_are_refused_and_write_nothing(env, finished, role, body, status, code):
    before = _jobs(env)
    with env.client(role) as c:
        r = c.post("/v1/jobs", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    assert _jobs(env) == before


def test_wrong_token_malformed_json_and_oversize_body(env, finished):
    before = _jobs(env)
    with env.client(None) as c:
        r = c.get("/v1/jobs", headers={"Authorization": "Bearer not-a-real-token-at-all"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    with env.client("annotator") as c:
        r = c.post("/v1/jobs", content=b'{"slide": ', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
        r = c.post("/v1/jobs", content=b"x" * (65 * 1024), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert "UGA_MAX_JSON_KB" in r.json()["error"]["message"]
    assert _jobs(env) == before


def test_a_method_the_path_does_not_take_is_405_with_allow(env, finished):
    with env.client("admin") as c:
        for method, path, allow in [
            ("DELETE", f"/v1/jobs/{finished['id']}", ["GET"]),
            ("GET", "/v1/finetune", ["POST"]),
            ("PUT", "/v1/models/rollback", ["POST"]),
        ]:
            r = c.request(method, path)
            assert r.status_code == 405, (method, path, r.text)
            assert r.json()["error"]["code"] == "method_not_allowed" and r.json()["error"]["details"]["allow"] == allow
            assert r.headers["allow"] == ", ".join(allow)
        assert c.delete("/v1/no-such-thing").status_code == 404


@pytest.mark.parametrize(
    "url", ["/v1/jobs/ab%00cd", "/v1/queue?slide=cases/a%00.tif", "/v1/queue?measure=uga%0a", "/v1/models/v%1f/promote"]
)
def test_a_control_character_in_the_url_is_400_before_any_route(env, url):
    before = _jobs(env)
    with env.client("admin") as c:
        r = c.post(url) if url.endswith("promote") else c.get(url)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_characters", r.text
    assert _jobs(env) == before


def test_an_unknown_queue_measure_is_refused(env, finished):
    with env.client("viewer") as c:
        r = c.get("/v1/queue", params={"slide": "cases/a.tif", "measure": "zzz"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_unknown_resources_are_404_json(env, finished):
    with env.client("viewer") as c:
        for url, code in [
            ("/v1/jobs/nope", "job_not_found"),
            (f"/v1/jobs/{finished['id']}/artifacts/passwords", "artifact_not_found"),
            ("/v1/queue/items/nope", "queue_item_not_found"),
            ("/v1/queue?slide=never/seen.tif", "slide_not_segmented"),
            ("/v1/no-such-route", "not_found"),
        ]:
            r = c.get(url)
            assert r.status_code == 404 and r.json()["error"]["code"] == code, (url, r.text)


# -- corrections over HTTP: every refusal writes nothing -----------------------------------------


def _png(arr) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# A DirectDraw Surface header with a pixel format Pillow's DDS decoder does not know (it used to raise
# NotImplementedError from inside Pillow: a 500).
DDS_HEADER = (
    b"DDS "
    + struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0)
    + b"\0" * 44
    + struct.pack("<8I", 32, 0x800, 0, 0, 0, 0, 0, 0)
    + struct.pack("<5I", 0x1000, 0, 0, 0, 0)
    + b"\0" * 64
)


def _polygon_json(x: str) -> bytes:
    """A GeoJSON triangle whose first x coordinate is the JSON text ``x``."""
    return f'{{"type": "Polygon", "coordinates": [[[{x}, 0], [10, 0], [10, 10], [{x}, 0]]]}}'.encode()


def _corrections_state(env):
    with env.client("viewer") as c:
        n = len(c.get("/v1/corrections").json()["corrections"])
    d = env.data_dir / "corrections"
    return n, sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_correction_refusals(env, finished):
    with env.client("viewer") as c:
        item = c.get("/v1/queue", params={"slide": "cases/a.tif"}).json()["items"][0]
    url = f"/v1/queue/items/{item['id']}/correction"
    side = item["bbox_level0"]["width"] // 2  # mask pixels at the job's 1 µm/px on a 0.5 µm/px slide
    good = np.zeros((side, side), np.uint8)
    before = _corrections_state(env)
    cases = [
        ("annotator", url, _png(np.zeros((100, side), np.uint8)), "image/png", 422, "mask_size_mismatch"),
        ("annotator", url, _png(np.full((side, side), 7, np.uint8)), "image/png", 422, "mask_not_binary"),
        ("annotator", url, b"\x89PNG\r\n\x1a\n garbage", "image/png", 422, "invalid_png"),
        ("annotator", url, b"", "image/png", 400, "empty_body"),
        ("annotator", url, b'{"type": "Point", "coordinates": [1, 2]}', "application/geo+json", 422, "invalid_geojson"),
        ("annotator", url, DDS_HEADER, "image/png", 422, "invalid_png"),  # another format Pillow would try
        ("annotator", url, _polygon_json("1" * 5000), "application/geo+json", 400, "malformed_json"),
        ("annotator", url, _polygon_json("1" * 400), "application/geo+json", 422, "invalid_geojson"),
        ("annotator", url, _polygon_json('"1"'), "application/geo+json", 422, "invalid_geojson"),
        ("annotator", url, _polygon_json("true"), "application/geo+json", 422, "invalid_geojson"),
        ("annotator", url, b'{"type": "Polygon", "coordinates": []}', "application/geo+json", 422, "invalid_geojson"),
        (
            "annotator",
            url,
            b'{"type": "MultiPolygon", "coordinates": []}',
            "application/geo+json",
            422,
            "invalid_geojson",
        ),
        ("annotator", url, _png(good), "text/plain", 415, "unsupported_media_type"),
        ("annotator", "/v1/queue/items/nope/correction", _png(good), "image/png", 404, "queue_item_not_found"),
        (
            "annotator",
            "/v1/corrections?slide=cases/a.tif&x=1900&y=0&width=512&height=512",
            _png(good),
            "image/png",
            422,
            "region_outside_slide",
        ),
        (
            "annotator",
            "/v1/corrections?slide=cases/nope.tif&x=0&y=0&width=512&height=512",
            _png(good),
            "image/png",
            404,
            "slide_not_found",
        ),
        ("viewer", url, _png(good), "image/png", 403, "forbidden"),
        (None, url, _png(good), "image/png", 401, "unauthenticated"),
    ]
    for role, u, body, ctype, status, code in cases:
        with env.client(role) as c:
            r = c.post(u, content=body, headers={"content-type": ctype})
        assert r.status_code == status and r.json()["error"]["code"] == code, (code, r.status_code, r.text[:300])
    with env.client("annotator") as c:
        r = c.post(url, content=b"0" * (65 * 1024 * 1024), headers={"content-type": "image/png"})
        assert r.status_code == 413 and "UGA_MAX_BODY_MB" in r.json()["error"]["message"]
        r = c.post(url, content=b" " * (9 * 1024 * 1024), headers={"content-type": "application/geo+json"})
        assert r.status_code == 413 and "UGA_MAX_GEOJSON_MB" in r.json()["error"]["message"]
        r = c.post(url, content=b"0" * (9 * 1024 * 1024), headers={"content-type": "image/png"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_png"  # a mask may be that large
    assert _corrections_state(env) == before


def test_geojson_correction_is_stored_with_crop_and_is_idempotent(env, finished):
    with env.client("viewer") as c:
        items = c.get("/v1/queue", params={"slide": "cases/a.tif"}).json()["items"]
    item = items[-1]
    b = item["bbox_level0"]
    square = [
        [b["x"], b["y"]],
        [b["x"] + 200, b["y"]],
        [b["x"] + 200, b["y"] + 200],
        [b["x"], b["y"] + 200],
        [b["x"], b["y"]],
    ]
    body = json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}}).encode()
    with env.client("annotator") as c:
        url = f"/v1/queue/items/{item['id']}/correction?coords=level0"
        r = c.post(url, content=body, headers={"content-type": "application/geo+json"})
        assert r.status_code == 201, r.text
        rec = r.json()
        side = b["width"] // 2
        assert rec["tumour_fraction"] == pytest.approx((100 * 100) / side**2, abs=0.01)  # 200 level-0 px = 100 µm
        assert rec["queue_item_id"] == item["id"] and rec["annotator"].startswith("annotator:")
        again = c.post(url, content=body, headers={"content-type": "application/geo+json"})
        assert again.status_code == 200 and again.json()["duplicate"] is True and again.json()["id"] == rec["id"]
        crop = Image.open(__import__("io").BytesIO(c.get(rec["links"]["image"]).content))
        assert crop.size == (side, side)
        assert c.get(f"/v1/queue/items/{item['id']}").json()["status"] == "corrected"
        r = c.post(f"/v1/queue/items/{item['id']}/skip")
        assert r.status_code == 409 and r.json()["error"]["code"] == "already_corrected"


def test_a_bug_is_a_logged_json_500_with_a_request_id(env, monkeypatch, caplog):
    def broken(*_args, **_kwargs):
        raise ValueError("an internal mistake, not the caller's")

    monkeypatch.setattr(env.runtime.store.jobs, "list", broken)
    with caplog.at_level("ERROR", logger="uga.http"), env.client("viewer") as c:
        r = c.get("/v1/jobs")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["code"] == "internal_error" and "internal mistake" not in err["message"]
    request_id = err["details"]["request_id"]
    assert request_id in err["message"]
    logged = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert logged and logged[0].exc_info and logged[0].exc_info[0] is ValueError  # the traceback is in the log


def test_every_answer_forbids_sniffing_framing_and_caching(env):
    with env.client("viewer") as c:
        answers = [c.get("/v1/models"), c.get("/v1/no-such"), c.post("/v1/finetune"), c.get("/v1/jobs/x")]
    with env.client(None) as c:
        answers.append(c.get("/v1/models"))
    assert [r.status_code for r in answers] == [200, 404, 403, 404, 401]
    for r in answers:
        assert (r.headers["x-content-type-options"], r.headers["x-frame-options"]) == ("nosniff", "DENY")
        assert r.headers["cache-control"] == "no-store"


def test_openapi_documents_every_status_and_the_correction_bodies(env):
    with env.client(None) as c:
        paths = c.get("/v1/openapi.json").json()["paths"]
        for page in ("/v1/docs", "/v1/redoc"):  # pages that would load Swagger UI / ReDoc from a CDN
            r = c.get(page)
            assert r.status_code == 404 and r.json()["error"]["message"].endswith("see /v1/openapi.json")
    for route in ("/queue/items/{item_id}/correction", "/corrections"):
        op = paths[route]["post"]
        assert {"image/png", "application/geo+json"} <= set(op["requestBody"]["content"])
        assert {"200", "201", "401", "403", "413", "415", "422"} <= set(op["responses"])
    assert {"200", "202", "429"} <= set(paths["/jobs"]["post"]["responses"])
    assert "409" in paths["/queue/items/{item_id}/skip"]["post"]["responses"]
    assert "409" in paths["/jobs/{job_id}/artifacts/{name}"]["get"]["responses"]
    assert all("500" in op["responses"] for ops in paths.values() for op in ops.values())


def _raw_post(app, url: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, int]:
    """POST straight through ASGI; returns (status, JSON body, how often the app asked for the body)."""
    path, _, query = url.partition("?")
    import anyio

    asked, sent = [], []

    async def receive():
        asked.append(1)
        return {"type": "http.request", "body": b'{"slide": "cases/a.tif"}', "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    anyio.run(app, scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), len(asked)


@pytest.mark.parametrize(
    ("path", "role", "ctype", "status", "code"),
    [
        ("/v1/jobs", None, b"application/json", 401, "unauthenticated"),
        ("/v1/jobs", "viewer", b"application/json", 403, "forbidden"),
        ("/v1/corrections?slide=cases/a.tif&x=0&y=0&width=8&height=8", None, b"image/png", 401, "unauthenticated"),
        (
            "/v1/corrections?slide=cases/a.tif&x=0&y=0&width=8&height=8",
            "annotator",
            b"text/plain",
            415,
            "unsupported_media_type",
        ),
        ("/v1/models/rollback", "annotator", b"application/json", 403, "forbidden"),
    ],
)
def test_no_body_is_read_before_the_caller_is_authorised_and_the_type_accepted(env, path, role, ctype, status, code):
    from tests.server import TOKENS

    headers = [(b"content-type", ctype), (b"content-length", b"24")]
    if role:
        headers.append((b"authorization", f"Bearer {TOKENS[role]}".encode()))
    got, body, reads = _raw_post(env.app, path, headers)
    assert got == status and body["error"]["code"] == code
    assert reads == 0  # refused from the headers alone


def test_a_full_disk_is_507_in_the_contract_and_stores_nothing(env, monkeypatch):
    import errno

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("service.loop.ingest.write_correction_files", disk_full)
    before = _corrections_state(env)
    with env.client("annotator") as c:
        r = c.post(
            "/v1/corrections?slide=cases/a.tif&x=0&y=0&width=64&height=64",
            content=_png(np.zeros((32, 32), np.uint8)),
            headers={"content-type": "image/png"},
        )
    assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage"
    assert _corrections_state(env) == before


def test_each_correction_records_how_far_the_model_was_from_it(env, finished):
    from service.loop.store_metrics import store_metrics

    with env.client("viewer") as c:
        item = c.get("/v1/queue", params={"slide": "cases/a.tif"}).json()["items"][0]
        predicted = np.asarray(Image.open(io.BytesIO(c.get(item["links"]["mask"]).content)))
    with env.client("annotator") as c:
        same = c.post(
            f"/v1/queue/items/{item['id']}/correction", content=_png(predicted), headers={"content-type": "image/png"}
        ).json()
        flipped = c.post(
            "/v1/corrections",
            params={"slide": "cases/a.tif", **{k: item["bbox_level0"][k] for k in ("x", "y", "width", "height")}},
            content=_png(255 - predicted),
            headers={"content-type": "image/png"},
        ).json()
    assert same["model_dice"] == 1.0  # the clinician kept the model's mask
    assert flipped["model_dice"] is not None and flipped["model_dice"] < 0.5  # ... or inverted it
    text = store_metrics(env.runtime.store)
    version = item["model_version"]
    assert f'uga_correction_agreement_dice_bucket{{le="1.0",model_version="{version}"}}' in text
    assert f'uga_correction_agreement_dice_count{{model_version="{version}"}}' in text
    corrected = re.search(r'^uga_queue_items\{status="corrected"\} (\S+)$', text, re.M)
    assert corrected and float(corrected[1]) >= 1


def test_a_finished_job_has_a_valid_fhir_diagnostic_report(env, finished):
    from tests.dicom import check_fhir_report

    with env.client("viewer") as c:
        report = c.get(finished["artifacts"]["fhir_report"]).json()
    check_fhir_report(report, finished)
    assert report["identifier"] == [{"system": "urn:uga-serve:job", "value": finished["id"]}]  # no DICOM source


@pytest.mark.slow  # over 5 s on 2 cores: not in make test-fast
def test_a_slide_without_um_per_px_is_reviewed_and_corrected_at_its_jobs_slide_mpp(env, finished):
    """The job was given options.slide_mpp; the queue's patches and corrections read the slide at it."""
    import tifffile

    with openslide.OpenSlide(str(env.slide_root / "cases" / "a.tif")) as s:
        pixels = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
        mpp = float(s.properties[openslide.PROPERTY_NAME_MPP_X])
    tifffile.imwrite(env.slide_root / "cases" / "nompp.tif", pixels, tile=(256, 256))  # no µm/px anywhere
    with env.client("annotator") as c:
        r = c.post("/v1/jobs", json={"slide": "cases/nompp.tif", "options": {"patch_um": 256, "queue_size": 2}})
        assert r.status_code == 422 and "options.slide_mpp" in r.json()["error"]["message"]
        options = {"patch_um": 256, "queue_size": 2, "slide_mpp": mpp}
        r = c.post("/v1/jobs", json={"slide": "cases/nompp.tif", "options": options})
        assert r.status_code == 202, r.text
        assert wait_job(c, r.json()["id"])["state"] == "succeeded"
        item = c.get("/v1/queue", params={"slide": "cases/nompp.tif"}).json()["items"][0]
        image = c.get(f"/v1/queue/items/{item['id']}/image.png")
        assert image.status_code == 200
        side = Image.open(io.BytesIO(image.content)).size
        r = c.post(
            f"/v1/queue/items/{item['id']}/correction",
            content=_png(np.zeros(side[::-1], np.uint8)),
            headers={"content-type": "image/png"},
        )
        assert r.status_code == 201, r.text
        b = item["bbox_level0"]
        region = {"slide": "cases/nompp.tif", "x": b["x"], "y": b["y"], "width": b["width"], "height": b["height"]}
        r = c.post(
            "/v1/corrections",
            params=region,
            content=_png(np.full(side[::-1], 255, np.uint8)),
            headers={"content-type": "image/png"},
        )
        assert r.status_code == 201, r.text
