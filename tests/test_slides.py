from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from service.inference.tiling import TileGrid
from service.wsi.pyramid import downsample2, write_pyramid_tiff
from service.wsi.raster import RasterFile
from service.wsi.slide import RegionReader, SlideError, analysis_shape, choose_level, open_slide
from service.wsi.tissue import TissueMask, tissue_from_rgb, tissue_mask

DOWNS = (1.0, 2.0, 4.0, 8.0, 16.0)


@pytest.mark.parametrize(
    ("level0_mpp", "target", "expected"),
    [
        (0.25, 0.25, 0),  # native
        (0.25, 1.0, 2),  # 40x scan read at 1 µm/px: level with ds 4 exactly
        (0.25, 0.9, 1),  # never coarser than asked: ds 2 (0.5) then resample
        (0.5, 1.0, 1),
        (0.5, 8.0, 4),
        (0.5, 100.0, 4),  # coarsest available
        (1.0, 0.5, 0),  # finer than the scan: level 0, upsampled
        (0.2527, 1.0108, 2),  # float noise in metadata still picks the exact level
    ],
)
def test_choose_level(level0_mpp, target, expected):
    assert choose_level(DOWNS, level0_mpp, target) == expected


def _pyramid(tmp_path: Path, rgb: np.ndarray, mpp: float) -> Path:
    r = RasterFile(tmp_path / "l0.raw", rgb.shape[0], rgb.shape[1], 3, create=True)
    r.write_block(0, 0, rgb)
    path = tmp_path / "s.tif"
    write_pyramid_tiff(path, r, mpp, compression="deflate")
    r.close()
    return path


def test_pyramid_writer_output_opens_in_openslide_with_levels_and_mpp(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (1500, 1100, 3), dtype=np.uint8)
    path = _pyramid(tmp_path, rgb, 0.5)
    s = openslide.OpenSlide(str(path))
    assert s.properties["openslide.vendor"] == "generic-tiff"
    assert s.level_dimensions[:3] == ((1100, 1500), (550, 750), (275, 375))
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    got = np.asarray(s.read_region((100, 200), 0, (300, 250)).convert("RGB"))
    np.testing.assert_array_equal(got, rgb[200:450, 100:400])  # lossless at level 0
    # level 1 is the 2x2 mean, rounded half up, of level 0
    mean = rgb.reshape(750, 2, 550, 2, 3).astype(np.float64).mean(axis=(1, 3))
    level1 = np.asarray(s.read_region((0, 0), 1, (550, 750)).convert("RGB"))
    np.testing.assert_array_equal(level1, np.floor(mean + 0.5).astype(np.uint8))


def test_downsample2_replicates_odd_edges_and_keeps_the_full_range():
    rows = np.array([[255, 255, 7], [255, 255, 9], [0, 1, 5]], np.uint8)
    np.testing.assert_array_equal(downsample2(rows), [[255, 8], [1, 5]])  # (0+1+0+1+2)//4 = 1


def test_region_reader_resamples_to_target_mpp(tmp_path):
    # vertical stripes 8 px wide at 0.25 µm/px => 2 µm wide; at 1 µm/px they are 2 px wide
    x = np.arange(2048)
    stripes = np.where((x // 8) % 2 == 0, 0, 255).astype(np.uint8)
    rgb = np.repeat(np.repeat(stripes[None, :, None], 1024, 0), 3, 2)
    slide = open_slide(_pyramid(tmp_path, rgb, 0.25))
    assert analysis_shape(slide, 1.0) == (256, 512)
    reader = RegionReader(slide, 1.0)
    assert reader.level == 2
    tile = reader.read(0, 0, 64, 64)
    assert tile.shape == (64, 64, 3)
    np.testing.assert_array_equal(tile[10, :8, 0], [0, 0, 255, 255, 0, 0, 255, 255])


def test_region_reader_mirrors_beyond_the_slide_edge(tmp_path):
    rgb = np.full((512, 512, 3), 120, np.uint8)
    slide = open_slide(_pyramid(tmp_path, rgb, 1.0))
    tile = RegionReader(slide, 1.0).read(400, 400, 256, 256)
    assert (tile == 120).all()  # no white frame from outside the slide


def test_missing_and_non_slide_files_are_refused(tmp_path):
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "nope.svs")
    junk = tmp_path / "notes.svs"
    junk.write_text("not a slide")
    with pytest.raises(SlideError, match="not a slide format"):
        open_slide(junk)


def test_slide_without_mpp_needs_caller_value(tmp_path):
    path = tmp_path / "nompp.tif"
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256))
    with pytest.raises(SlideError, match="no µm/px"):
        open_slide(path)
    slide = open_slide(path, slide_mpp=0.5)
    assert slide.mpp == 0.5 and slide.mpp_source == "caller"
    with pytest.raises(SlideError, match="plausible"):
        open_slide(path, slide_mpp=1e9)


def test_tissue_mask_of_composite_matches_its_metadata(source_slide):
    import json

    meta = json.loads(source_slide.with_suffix(".json").read_text())
    tm = tissue_mask(open_slide(source_slide))
    assert tm.fraction() == pytest.approx(meta["tissue_fraction"], abs=0.08)


def _tissue_reference(rgb: np.ndarray, min_saturation: int = 20) -> np.ndarray:
    """The mask as skimage computes it on the whole image at once (what tissue_from_rgb must equal)."""
    from scipy import ndimage
    from skimage import filters, morphology

    chroma = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2).astype(np.int16)
    if chroma.max() <= min_saturation:
        return np.zeros(chroma.shape, bool)
    thr = max(min_saturation, float(filters.threshold_otsu(chroma)))
    mask = (chroma > thr) & (rgb.astype(np.float32).mean(axis=2) < 235)
    mask = ndimage.binary_closing(mask, morphology.disk(2))
    mask = morphology.remove_small_objects(mask, max_size=8)
    return morphology.remove_small_holes(mask, max_size=64)


def test_tissue_from_rgb_equals_the_whole_image_reference_with_small_temporaries(source_slide, ood_slide):
    import tracemalloc

    rng = np.random.default_rng(3)
    images = [np.full((40, 50, 3), 128, np.uint8), np.full((40, 50, 3), 250, np.uint8)]  # one grey each
    images += [np.full((40, 50, 3), (200, 50, 50), np.uint8), np.full((1, 1, 3), (200, 50, 50), np.uint8)]  # one colour
    images.append(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))  # speckle: many tiny objects and holes
    for path in (source_slide, ood_slide):
        with open_slide(path) as slide:  # 1024² px: finer than the mask's 8 µm/px, more objects and holes
            images.append(RegionReader(slide, 1.0).read(0, 0, *analysis_shape(slide, 1.0)))
    checked = 0
    for rgb in images:
        tracemalloc.start()
        got = tissue_from_rgb(rgb)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        np.testing.assert_array_equal(got, _tissue_reference(rgb))
        pixels = rgb.shape[0] * rgb.shape[1]
        if pixels >= 1 << 20:  # a 4096² mask must not cost hundreds of MiB (int64 labels, float copies)
            assert peak < 8 * pixels, f"{peak / pixels:.1f} bytes per pixel"
            checked += 1
    assert checked == 2


def test_tile_grid_skips_tiles_without_tissue():
    mask = np.zeros((64, 64), bool)
    mask[:8, :8] = True  # tissue only in the top-left corner (mask at 8 µm/px)
    tm = TissueMask(mask, 8.0)
    grid = TileGrid(512, 512, 128, 16)
    occ = grid.occupied(tm, 1.0)
    assert occ.shape == (5, 5)
    assert occ[0, 0] and occ.sum() == 1
