"""Correction decoding/validation (pure), content hashing, and crash safety of the durable write."""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from service.loop.corrections import (
    CorrectionError,
    Region,
    build_record,
    correction_id,
    decode_png_mask,
    held_out_for_gate,
    load_pair,
    rasterize_geojson,
    sweep_orphans,
    write_correction_files,
)
from service.store import Store


def png(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def code_of(fn, *args) -> str:
    with pytest.raises(CorrectionError) as exc:
        fn(*args)
    return exc.value.code


def test_png_masks_accept_0_255_and_0_1():
    m = np.zeros((8, 6), np.uint8)
    m[2:5, 1:3] = 255
    assert decode_png_mask(png(m), (8, 6)).sum() == 6
    assert decode_png_mask(png((m > 0).astype(np.uint8)), (8, 6)).sum() == 6


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", "empty_body"),
        (b"\x89PNG\r\n\x1a\nnot really", "invalid_png"),
        (b"GIF89a....", "invalid_png"),
    ],
)
def test_png_refusals(payload, code):
    assert code_of(decode_png_mask, payload, (8, 6)) == code


def test_png_size_values_and_format_are_checked():
    assert code_of(decode_png_mask, png(np.zeros((6, 8), np.uint8)), (8, 6)) == "mask_size_mismatch"
    grey = np.full((8, 6), 128, np.uint8)
    assert code_of(decode_png_mask, png(grey), (8, 6)) == "mask_not_binary"
    colour = np.zeros((8, 6, 3), np.uint8)
    colour[..., 0] = 255
    assert code_of(decode_png_mask, png(colour), (8, 6)) == "mask_not_binary"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 6), np.uint8)).save(buf, format="JPEG")
    assert code_of(decode_png_mask, buf.getvalue(), (8, 6)) == "invalid_png"


def _poly(rings, kind="Polygon"):
    return json.dumps(
        {
            "type": "FeatureCollection",
            "features": [{"type": "Feature", "geometry": {"type": kind, "coordinates": rings}, "properties": {}}],
        }
    ).encode()


def test_geojson_polygons_fill_and_holes_subtract():
    outer = [[10, 10], [50, 10], [50, 50], [10, 50], [10, 10]]
    hole = [[20, 20], [30, 20], [30, 30], [20, 30], [20, 20]]
    m = rasterize_geojson(_poly([outer, hole]), (64, 64))
    assert m[15, 15] and not m[25, 25] and not m[5, 5]
    assert 40 * 40 - 10 * 10 - 200 <= m.sum() <= 40 * 40 - 10 * 10 + 200


def test_geojson_in_level0_coordinates_as_qupath_exports():
    # region at level-0 (1000, 2000), mask at 1 µm/px from a 0.5 µm/px slide: scale 0.5
    square = [[1000, 2000], [1200, 2000], [1200, 2200], [1000, 2200], [1000, 2000]]
    m = rasterize_geojson(_poly([square]), (128, 128), origin=(1000, 2000), scale=0.5)
    assert m[:100, :100].mean() > 0.95 and m[101:, 101:].sum() == 0


def test_geojson_as_a_bare_array_of_features_as_qupath_exports_by_default():
    square = [[1000, 2000], [1200, 2000], [1200, 2200], [1000, 2200], [1000, 2000]]
    hole = [[1050, 2050], [1100, 2050], [1100, 2100], [1050, 2100], [1050, 2050]]
    qupath = [  # "Export objects as GeoJSON" without "Export as FeatureCollection": one Feature per object
        {
            "type": "Feature",
            "id": "6c1f2d4e-0000-4000-8000-000000000001",
            "geometry": {"type": "Polygon", "coordinates": [square, hole]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "MultiPolygon", "coordinates": [[[[1300, 2000], [1400, 2000], [1400, 2100]]]]},
            "properties": {"objectType": "annotation"},
        },
    ]
    as_array = rasterize_geojson(json.dumps(qupath).encode(), (256, 256), origin=(1000, 2000), scale=0.5)
    collection = json.dumps({"type": "FeatureCollection", "features": qupath}).encode()
    np.testing.assert_array_equal(as_array, rasterize_geojson(collection, (256, 256), origin=(1000, 2000), scale=0.5))
    assert as_array[10, 10] and not as_array[37, 37] and as_array[10, 190] and not as_array[200, 10]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"[]", "invalid_geojson"),
        (b"[1, 2]", "invalid_geojson"),
        (b'[{"type": "Feature", "geometry": null}]', "invalid_geojson"),
        (b"", "empty_body"),
        (b"{not json", "malformed_json"),
        (json.dumps({"type": "Point", "coordinates": [1, 2]}).encode(), "invalid_geojson"),
        (json.dumps({"type": "FeatureCollection", "features": []}).encode(), "invalid_geojson"),
        (_poly([[[0, 0], [1, 1]]]), "invalid_geojson"),
        (_poly([[["a", "b"], [1, 1], [2, 0]]]), "invalid_geojson"),
    ],
)
def test_geojson_refusals(payload, code):
    assert code_of(rasterize_geojson, payload, (16, 16)) == code


def test_content_hash_identifies_the_same_correction():
    r = Region(0, 0, 64, 64, 1.0)
    m = np.zeros((32, 32), bool)
    m[3:9, 4:8] = True
    assert correction_id("a.tif", r, m) == correction_id("a.tif", r, m.copy())
    assert correction_id("a.tif", r, m) != correction_id("b.tif", r, m)
    m2 = m.copy()
    m2[0, 0] = True
    assert correction_id("a.tif", r, m) != correction_id("a.tif", r, m2)


def test_crash_between_files_and_row_leaves_no_correction(tmp_path):
    """Files are written first; without the committed row nothing counts, and the orphan is swept."""
    store = Store(tmp_path / "data")
    root = tmp_path / "data" / "corrections"
    image = np.full((32, 32, 3), 200, np.uint8)
    mask = np.zeros((32, 32), bool)
    region = Region(0, 0, 64, 64, 1.0)
    cid = correction_id("a.tif", region, mask)
    write_correction_files(root, cid, image, mask)  # ... and the process dies here, before add_correction
    assert store.corrections.list() == [] and store.corrections.unused_for_training(None) == []
    old = time.time() - 3600
    os.utime(root / cid, (old, old))
    assert sweep_orphans(root, lambda c: c in store.corrections.ids()) == [cid]
    assert not (root / cid).exists()
    [kept] = (tmp_path / "data" / "orphans" / "corrections").iterdir()  # moved aside, not deleted:
    assert kept.name.startswith(cid) and (kept / "mask.png").exists()  # a wrong store must not cost data


def test_writing_a_correction_that_is_already_in_place_never_removes_it(tmp_path):
    """Another host ingested the same correction a moment ago (its lock is not ours) and answered
    201: our write keeps its folder; a folder with other content is moved aside, never deleted."""
    root = tmp_path / "data" / "corrections"
    image = np.full((32, 32, 3), 200, np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    cid = correction_id("a.tif", Region(0, 0, 32, 32, 1.0), mask)
    first = write_correction_files(root, cid, image, mask)
    inode = first.stat().st_ino
    assert write_correction_files(root, cid, image, mask).stat().st_ino == inode  # kept, not replaced
    assert sorted(p.name for p in root.iterdir()) == [cid]  # no temp left either
    changed = np.full((32, 32, 3), 90, np.uint8)  # the slide changed under its name
    write_correction_files(root, cid, changed, mask)
    assert load_pair(root, cid)[0][0, 0].tolist() == [90, 90, 90]
    [aside] = (tmp_path / "data" / "orphans" / "corrections").iterdir()
    assert load_pair(aside.parent, aside.name)[0][0, 0].tolist() == [200, 200, 200]


def test_acknowledged_correction_survives_reopen_and_is_idempotent(tmp_path):
    store = Store(tmp_path / "data")
    root = tmp_path / "data" / "corrections"
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    region = Region(0, 0, 32, 32, 1.0)
    cid = correction_id("a.tif", region, mask)
    write_correction_files(root, cid, np.zeros((16, 16, 3), np.uint8), mask)
    record = build_record(
        cid, "a.tif", region, mask, annotator="ann", queue_item_id=None, proposed_by="v1", holdout_every=0
    )
    assert store.corrections.add(record, "ann") is True
    assert store.corrections.add(record, "ann") is False  # the same correction twice = one record
    store.close()
    again = Store(tmp_path / "data")  # a new process after a crash sees it
    assert [c.id for c in again.corrections.list()] == [cid]
    image, m = load_pair(root, cid)
    assert m.sum() == 16 and image.shape == (16, 16, 3)


def test_the_same_region_corrected_again_keeps_its_gate_role():
    masks = [np.zeros((16, 16), bool) for _ in range(8)]
    for i, m in enumerate(masks):
        m[: i + 1] = True  # eight different answers for one region (other pathologists, later models)
    for x in range(0, 40 * 32, 32):
        region = Region(x, 0, 32, 32, 1.0)
        roles = {
            build_record(
                correction_id("a.tif", region, m),
                "a.tif",
                region,
                m,
                annotator="a",
                queue_item_id=None,
                proposed_by="v1",
                holdout_every=3,
            ).holdout
            for m in masks
        }
        assert len(roles) == 1, region  # never trained on by one correction and gated on by another
    drawn = [held_out_for_gate("a.tif", Region(x, 0, 32, 32, 1.0), 3) for x in range(0, 300 * 32, 32)]
    assert 0.2 < np.mean(drawn) < 0.47  # about one region in three


def test_a_polygon_whose_fill_would_take_seconds_is_refused_at_once():
    zigzag = [[float(i % 2) * 4000, float(i)] for i in range(0, 40_000, 1)]  # edges spanning ~all rows each
    zigzag = [[x, (i % 2) * 4095.0] for i, (x, _) in enumerate(zigzag)] + [[0.0, 0.0]]
    assert code_of(rasterize_geojson, _poly([zigzag]), (4096, 4096)) == "polygons_too_complex"


def test_corrections_from_jobs_at_another_resolution_reach_the_model_at_its_own(tmp_path):
    """A job may run at any µm/px; the model learns (and is gated) at the one it was trained at, so a
    correction made at 2 µm/px is upsampled to the model's 1 µm/px, its tumour area unchanged."""
    from service.loop.candidate import pairs

    store = Store(tmp_path / "data")
    root = tmp_path / "data" / "corrections"
    stored = []
    for mpp, side in ((1.0, 64), (2.0, 32), (0.5, 128)):  # the same 64 µm square at three resolutions
        mask = np.zeros((side, side), bool)
        mask[: side // 2, : side // 4] = True  # its top-left eighth is tumour
        image = np.where(mask[..., None], (120, 60, 150), (230, 150, 190)).astype(np.uint8)
        region = Region(0, 0, 64, 64, mpp)
        cid = correction_id("a.tif", region, mask)
        write_correction_files(root, cid, image, mask)
        record = build_record(
            cid, "a.tif", region, mask, annotator="ann", queue_item_id=None, proposed_by="v1", holdout_every=0
        )
        store.corrections.add(record, "ann")
        stored.append(record)
    images, masks = pairs(root, stored, 1.0, max_side=4096)
    assert [m.shape for m in masks] == [(64, 64)] * 3 and [i.shape for i in images] == [(64, 64, 3)] * 3
    for image, mask in zip(images, masks, strict=True):
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        assert abs(mask.mean() - 1 / 8) < 0.02  # the drawn tumour, at the model's scale
        assert image[5, 5].tolist() == [120, 60, 150] and image[60, 60].tolist() == [230, 150, 190]
    np.testing.assert_array_equal(pairs(root, stored[:1], 1.0, 4096)[1][0], load_pair(root, stored[0].id)[1])


def test_a_thin_tumour_shrunk_below_the_models_pixels_keeps_its_place():
    """A 2 px wide tumour line at 0.25 µm/px covers at most half of a 1 µm/px pixel: it stays where it
    was drawn instead of turning the clinician's correction into 'all benign'."""
    from service.loop.candidate import at_mpp

    mask = np.zeros((64, 64), np.uint8)
    mask[:, 30:32] = 1
    image = np.full((64, 64, 3), 200, np.uint8)
    _, small = at_mpp(image, mask, 0.25, 1.0, max_side=4096)
    assert small.shape == (16, 16) and small.any()
    assert set(np.flatnonzero(small.any(axis=0))) <= {7, 8}  # the line's column, 30-31 / 4
    empty = at_mpp(image, np.zeros_like(mask), 0.25, 1.0, 4096)[1]
    assert not empty.any()  # no tumour drawn: none made


def test_a_correction_too_large_at_the_models_resolution_is_used_through_a_window_on_its_tumour():
    """4 µm/px to 1 µm/px multiplies each side by 4: a 64 px correction with max_side 64 is read through
    its 16 px window around the tumour, resampled to 64 px, never 256 (memory stays bounded)."""
    from service.loop.candidate import at_mpp

    mask = np.zeros((64, 64), np.uint8)
    mask[40:48, 50:58] = 1  # tumour near the lower right
    image = np.where(mask[..., None] > 0, (120, 60, 150), (230, 150, 190)).astype(np.uint8)
    big_image, big_mask = at_mpp(image, mask, 4.0, 1.0, max_side=64)
    assert big_mask.shape == (64, 64) and big_image.shape == (64, 64, 3)
    assert abs(big_mask.mean() - (8 * 8) / (16 * 16)) < 0.05  # the whole tumour, inside the window


def test_a_correction_over_an_earlier_ones_tissue_takes_that_ones_gate_role():
    from service.loop.corrections import gate_role, region_of

    def record(slide, region, earlier=()):
        mask = np.zeros((region.height, region.width), bool)
        return build_record(
            correction_id(slide, region, mask), slide, region, mask, annotator="a", queue_item_id=None,
            proposed_by="v1", holdout_every=2, earlier=earlier,
        )  # fmt: skip

    first = record("a.tif", Region(0, 0, 32, 32, 1.0))
    for dx in range(1, 32):  # shifted over it: whatever its own hash says, it follows the first
        region = Region(dx, 8, 32, 32, 1.0)
        assert record("a.tif", region, [first]).holdout == first.holdout
    for region, slide in ((Region(32, 0, 32, 32, 1.0), "a.tif"), (Region(0, 0, 32, 32, 1.0), "b.tif")):
        alone = gate_role(slide, region, [], 2)  # touching its edge, or on another slide: its own hash
        assert record(slide, region, [first]).holdout == alone
    roles = {gate_role("a.tif", Region(dx, 0, 32, 32, 1.0), [], 2) for dx in range(1, 32)}
    assert roles == {0, 1}  # so the shifted ones above really were pulled to the first one's role
    assert region_of(first) == Region(0, 0, 32, 32, 1.0)
