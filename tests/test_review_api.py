"""What the review page reads, in-process: deep-zoom tiles of a slide (OpenSlide's DeepZoomGenerator,
a bounded cache), a finished job's overlays with legends, a patch's uncertainty inset, the caller's
role; authorised like the rest of the API, slide paths checked as jobs check them, errors as JSON."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from service.inference.heatmap import DISPLAY_MAX, heat_rgba, legend, outline_rgba
from service.wsi.deepzoom import DeepZoomSlides, TileCache
from tests.inprocess import InProcessService
from tests.server import finished_patch_job, hostile_slide_root


@pytest.fixture(scope="module")
def env(tmp_path_factory, source_slide):
    root = tmp_path_factory.mktemp("review")
    slides = hostile_slide_root(root, source_slide)
    _flat_slide(slides / "flat.tif", 4200)
    service = InProcessService(root / "data", slides, tile_cache_mb=1)
    yield service
    service.close()


@pytest.fixture(scope="module")
def finished(env):
    with env.client("annotator") as c:
        job = finished_patch_job(c)
    assert job["state"] == "succeeded", job
    return job


def _flat_slide(path, side: int) -> None:
    """A single-level tiled TIFF (no pyramid) at 0.5 µm/px: its coarse deep-zoom levels read it whole."""
    tile = np.full((256, 256, 3), 230, np.uint8)
    n = ((side + 255) // 256) ** 2
    tifffile.imwrite(
        path,
        (tile for _ in range(n)),
        shape=(side, side, 3),
        dtype=np.uint8,
        tile=(256, 256),
        photometric="rgb",
        compression="deflate",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )


def _image(response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_tiles_are_the_slide_through_openslide_deep_zoom(env, finished, source_slide):
    with env.client("viewer") as c:
        info = c.get("/v1/slides/cases/a.tif/info").json()
        assert (info["width"], info["height"], info["mpp"]) == (2048, 2048, 0.5)
        assert info["job"] == finished["id"] and info["tile_size"] == 254 and info["overlap"] == 1
        dzi = c.get(info["links"]["dzi"])
        assert dzi.status_code == 200 and 'Width="2048"' in dzi.text and 'TileSize="254"' in dzi.text
        top = info["levels"] - 1  # full resolution: tile (1, 1) starts at 254 - 1 overlap
        r = c.get(f"{info['links']['tiles']}{top}/1_1.jpeg")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.headers["cache-control"] == "no-store"  # patient data: never in a disk cache
        tile = _image(r).astype(int)
    with openslide.OpenSlide(str(source_slide)) as ref:
        expected = np.asarray(ref.read_region((253, 253), 0, (256, 256)).convert("RGB")).astype(int)
        elsewhere = np.asarray(ref.read_region((253 + 32, 253), 0, (256, 256)).convert("RGB")).astype(int)
    assert tile.shape == (256, 256, 3)
    error = np.abs(tile - expected).mean()
    assert error < 6 and np.abs(tile - elsewhere).mean() > 3 * error  # that region, up to JPEG at quality 85


def test_tile_requests_outside_the_pyramid_or_the_root_are_json_refusals(env, finished):
    cases = [
        ("viewer", "/v1/slides/cases/a.tif/slide_files/12/0_0.jpeg", 404, "tile_not_found"),
        ("viewer", "/v1/slides/cases/a.tif/slide_files/11/9_0.jpeg", 404, "tile_not_found"),
        ("viewer", "/v1/slides/escape.tif/slide_files/0/0_0.jpeg", 400, "invalid_slide_path"),
        ("viewer", "/v1/slides/cases%2F..%2F..%2Fsecret.tif/info", 400, "invalid_slide_path"),
        ("viewer", "/v1/slides/missing.tif/slide.dzi", 404, "slide_not_found"),
        ("viewer", "/v1/slides/notes.svs/info", 422, "unusable_slide"),
        ("viewer", "/v1/slides/dicomweb/main/1.2/1.3/info", 400, "unknown_pacs"),
        (None, "/v1/slides/cases/a.tif/slide_files/0/0_0.jpeg", 401, "unauthenticated"),
        (None, "/v1/jobs/x/overlays/uga.png", 401, "unauthenticated"),
    ]
    for role, url, status, code in cases:
        with env.client(role) as c:
            r = c.get(url)
        assert r.status_code == status and r.json()["error"]["code"] == code, (url, r.status_code, r.text)


def test_a_zoom_that_would_read_a_whole_unpyramided_slide_is_refused(env):
    with env.client("viewer") as c:
        info = c.get("/v1/slides/flat.tif/info").json()
        assert info["width"] == 4200 and info["mpp"] == 0.5
        r = c.get("/v1/slides/flat.tif/slide_files/0/0_0.jpeg")  # 1 px showing 4200² px read at once
        assert r.status_code == 422 and r.json()["error"]["code"] == "tile_too_costly", r.text
        assert c.get(f"/v1/slides/flat.tif/slide_files/{info['levels'] - 1}/3_3.jpeg").status_code == 200


def test_tile_cache_holds_at_most_its_bytes_least_recently_used_out(source_slide):
    cache = TileCache(max_bytes=100)
    for i in range(5):
        cache.put(("t", i), bytes(30))
    assert cache.used == 90 and len(cache) == 3 and cache.get(("t", 0)) is None
    cache.get(("t", 2))  # now the most recent: ("t", 3) goes first
    cache.put(("t", 5), bytes(30))
    assert cache.get(("t", 3)) is None and cache.get(("t", 2)) is not None
    cache.put(("big",), bytes(101))  # over the whole budget: not kept, nothing evicted for it
    assert cache.get(("big",)) is None and cache.used == 90

    tiles = DeepZoomSlides(cache_bytes=200_000, max_open=1)
    top = tiles.descriptor(source_slide).levels - 1
    first = tiles.tile(source_slide, top, 0, 0)
    assert tiles.tile(source_slide, top, 0, 0) == first and tiles.cache.hits == 1
    for col in range(8):
        tiles.tile(source_slide, top, col, 1)
    assert tiles.cache.used <= 200_000


def test_overlays_cover_the_slide_with_legends_in_words(env, finished):
    with env.client("viewer") as c:
        index = c.get(f"/v1/jobs/{finished['id']}/overlays").json()
        assert index["extent_level0"] == [2048, 2048] and index["mpp"] == 1.0 and index["size"] == [1024, 1024]
        names = [o["name"] for o in index["overlays"]]
        assert names == ["outline", "uga", "entropy", "mutual_information", "novelty"]
        uga = next(o for o in index["overlays"] if o["name"] == "uga")["legend"]
        assert uga["unit"] == "bits" and "agree" in uga["low"] and "look here" in uga["high"]
        outline = _image(c.get(index["overlays"][0]["url"]))
        mask = tifffile.imread(io.BytesIO(c.get(f"/v1/jobs/{finished['id']}/artifacts/mask").content))
        heat = _image(c.get(f"/v1/jobs/{finished['id']}/overlays/uga.png"))
        assert outline.shape == heat.shape == (1024, 1024, 4)
        tumour = (mask[..., 0] if mask.ndim == 3 else mask) > 127  # the job's mask at 1 µm/px: the overlay's grid
        assert tumour.any()
        np.testing.assert_array_equal(outline[..., 3] > 0, outline_rgba(tumour)[..., 3] > 0)  # its boundary
        r = c.get(f"/v1/jobs/{finished['id']}/overlays/probability.png")
        assert r.status_code == 404 and r.json()["error"]["code"] == "overlay_not_found"
        verdict = index["novelty"]  # the shipped baseline's out-of-distribution verdict on this slide
        assert verdict["out_of_distribution"] == (verdict["share_beyond_threshold"] > verdict["flag_share"])
        assert _image(c.get(f"/v1/jobs/{finished['id']}/overlays/novelty.png")).shape == (1024, 1024, 4)


def test_a_patch_has_an_uncertainty_inset_the_size_of_its_image(env, finished):
    with env.client("viewer") as c:
        item = c.get("/v1/queue", params={"slide": "cases/a.tif"}).json()["items"][0]
        image = _image(c.get(item["links"]["image"]))
        inset = _image(c.get(f"/v1/queue/items/{item['id']}/uncertainty.png"))
        assert inset.shape == image.shape[:2] + (4,)
        assert inset[..., 3].any()  # the top patch is where the model is unsure
        r = c.get(f"/v1/queue/items/{item['id']}/uncertainty.png", params={"measure": "nope"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "overlay_not_found"


@pytest.mark.parametrize(
    ("role", "correct", "admin"), [("viewer", False, False), ("annotator", True, False), ("admin", True, True)]
)
def test_the_page_learns_the_callers_role(env, role, correct, admin):
    with env.client(role) as c:
        me = c.get("/v1/me").json()
    assert me["role"] == role and me["can_correct"] is correct and me["can_administer"] is admin


def test_heat_map_and_outline_rendering():
    values = np.array([[0.0, 0.5, 1.0, 2.0]])
    rgba = heat_rgba(values, "entropy")
    assert rgba[0, 0, 3] == 0 and rgba[0, 2, 3] == rgba[0, 3, 3] == 217  # sure: clear; at/above the top: opaque
    assert list(rgba[0, 3, :3]) == [189, 0, 38]
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    edge = outline_rgba(mask, width=1)[..., 3] > 0
    assert edge.sum() == 20 and not edge[3:7, 3:7].any() and edge[2, 2:8].all()
    for measure in DISPLAY_MAX:
        assert legend(measure)["stops"][-1]["value"] == DISPLAY_MAX[measure]


def test_a_qupath_export_as_a_bare_array_of_features_is_a_correction(env, finished):
    with env.client("viewer") as c:
        item = c.get("/v1/queue", params={"slide": "cases/a.tif"}).json()["items"][-1]
    b = item["bbox_level0"]
    square = [[b["x"] + dx, b["y"] + dy] for dx, dy in ((0, 0), (100, 0), (100, 100), (0, 100), (0, 0))]
    body = json.dumps([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}, "properties": {}}])
    with env.client("annotator") as c:
        r = c.post(
            f"/v1/queue/items/{item['id']}/correction?coords=level0",
            content=body.encode(),
            headers={"content-type": "application/geo+json"},
        )
    assert r.status_code == 201, r.text
    side = b["width"] // 2  # the mask at 1 µm/px of a 0.5 µm/px slide
    assert r.json()["tumour_fraction"] == pytest.approx(50 * 50 / side**2, abs=0.01)


def test_the_review_page_is_served_with_its_vendored_viewer_and_a_strict_policy():
    from fastapi.testclient import TestClient

    from service.http.review_page import create_review_app

    with TestClient(create_review_app()) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
        scripts = re.findall(r'<script src="([^"]+)"', page.text)
        assert scripts == ["vendor/openseadragon/openseadragon.min.js", "review.js"]  # no CDN
        for src in scripts:
            assert c.get(f"/{src}").status_code == 200
        assert "openseadragon 5.0.1" in c.get("/vendor/openseadragon/openseadragon.min.js").text[:100]
        assert c.get("/vendor/openseadragon/LICENSE.txt").status_code == 200
        assert c.get("/..%2F..%2Fapi.py").status_code == 404
        assert c.get("/config.json").json() == {"oidc": None}  # tokens only
        assert "connect-src 'self';" in page.headers["content-security-policy"]


def test_the_hospital_sign_in_is_configured_complete_and_is_the_one_other_origin_the_page_may_call():
    from fastapi.testclient import TestClient
    from pydantic import ValidationError

    from service.config import Settings
    from service.http.review_page import create_review_app, sign_in_config

    idp = {"oidc_issuer": "https://idp.example/realms/p", "oidc_client_id": "uga-review"}
    with pytest.raises(ValidationError, match="UGA_OIDC_AUTHORIZE_URL"):
        Settings(**idp)
    with pytest.raises(ValidationError, match="https://"):
        Settings(**idp, oidc_authorize_url="http://idp.example/auth", oidc_token_url="https://idp.example/token")
    settings = Settings(
        **idp, oidc_authorize_url="https://idp.example/auth", oidc_token_url="https://idp.example:8443/token"
    )
    with TestClient(create_review_app(sign_in_config(settings))) as c:
        config = c.get("/config.json").json()["oidc"]
        policy = c.get("/").headers["content-security-policy"]
    assert config == {
        "client_id": "uga-review",
        "authorize_url": "https://idp.example/auth",
        "token_url": "https://idp.example:8443/token",
        "scope": "openid profile",
        "token": "id_token",
    }
    assert "connect-src 'self' https://idp.example:8443;" in policy and "form-action 'none'" in policy


def test_a_correction_shows_the_mask_it_corrected_and_no_after_until_a_new_model_resegments(env, finished):
    with env.client("viewer") as c:
        item = c.get("/v1/queue", params={"slide": "cases/a.tif"}).json()["items"][0]
        model = _image(c.get(item["links"]["mask"]))
    drawn = np.zeros_like(model)
    drawn[: model.shape[0] // 2] = 255  # the top half is tumour
    buf = io.BytesIO()
    Image.fromarray(drawn).save(buf, format="PNG")
    with env.client("annotator") as c:
        r = c.post(
            f"/v1/queue/items/{item['id']}/correction", content=buf.getvalue(), headers={"content-type": "image/png"}
        )
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
    with env.client("viewer") as c:
        seen = c.get(f"/v1/corrections/{cid}/outcome")
        assert seen.status_code == 200, seen.text
        body = seen.json()
        assert body["before"]["job_id"] == finished["id"] and body["after"] is None
        assert body["before"]["model_version"] == finished["summary"]["model_version"]
        assert body["before"]["dice"] == pytest.approx(r.json()["model_dice"], abs=1e-6)
        before = _image(c.get(body["links"]["before"]))
        assert np.array_equal(before, model)  # the very mask the pathologist saw and corrected
        after = c.get(body["links"]["after"])
        assert after.status_code == 404 and after.json()["error"]["code"] == "not_resegmented"
        assert c.get("/v1/corrections/nope/outcome").json()["error"]["code"] == "correction_not_found"
