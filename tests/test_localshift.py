"""The benchmark's slides with local errors (bench/PROTOCOL.md): matched real textures, shifts that
vary over the slide, artefacts, a family outside the training augmentation."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
from skimage.color import rgb2hsv

from models.data import localshift
from models.data.localshift import ARTEFACT_SHARE, LOCAL_CENTRES, build_local_slide
from models.data.slidegen import companion_paths
from models.data.textures import block_stats, texture_bank

SIZE = (2048, 2048)  # 1 mm: wider than the shortest correlation length of the shift fields


@pytest.fixture(scope="module")
def bank():
    return texture_bank()


@pytest.fixture(scope="module")
def slides(bank, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    built = {}
    for centre in ("source", "stain", "nonhed"):
        path = out / f"{centre}.tif"
        built[centre] = (path, build_local_slide(path, size=SIZE, centre=centre, seed=11, bank=bank))
    return built


def _level0(path) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))


def test_bank_has_several_real_sources_per_class_at_two_scales(bank):
    for label in ("tumour", "normal"):
        names = {t.name for t in bank if t.label == label}
        assert len(names) >= 2, (label, names)
        for name in names:
            assert sorted(t.scale for t in bank if t.name == name) == [0.8, 1.25]


def test_classes_have_the_same_colour_sharpness_and_spread(bank):
    """What the shortcut gate measures is matched per texture, hence per class: sharpness within
    10 % (the protocol's bound), mean colour within 1 % of the range."""
    by_class = {
        label: np.mean([block_stats(t.rgb) for t in bank if t.label == label], axis=0) for label in ("tumour", "normal")
    }
    tumour, normal = by_class["tumour"], by_class["normal"]
    assert np.all(np.abs(tumour[:3] - normal[:3]) < 0.01), (tumour, normal)
    assert abs(tumour[3] / normal[3] - 1) < 0.10, (tumour[3], normal[3])
    assert abs(tumour[4] / normal[4] - 1) < 0.10, (tumour[4], normal[4])


def test_same_seed_same_layout_in_every_centre_and_same_pixels_when_rebuilt(bank, slides, tmp_path):
    masks = {c: _level0(companion_paths(p)[0]) for c, (p, _) in slides.items()}
    assert np.array_equal(masks["source"], masks["stain"]) and np.array_equal(masks["source"], masks["nonhed"])
    again = tmp_path / "again.tif"
    build_local_slide(again, size=SIZE, centre="stain", seed=11, bank=bank)
    assert np.array_equal(_level0(again), _level0(slides["stain"][0]))


def test_mask_matches_meta_and_tumour_lies_in_tissue(slides):
    path, meta = slides["source"]
    mask = _level0(companion_paths(path)[0])[..., 0] > 127
    rgb = _level0(path)
    assert abs(mask.mean() - meta.tumour_fraction * meta.tissue_fraction) < 0.01
    assert 0.1 < meta.tumour_fraction < 0.4 and 0.4 < meta.tissue_fraction < 0.8
    assert rgb[mask].mean() < 200  # tumour pixels are tissue, not glass


def test_the_shift_varies_over_the_slide(slides):
    """Errors are meant to be local: the stain centre's departure from the source slide (same
    layout) differs a lot between tissue blocks."""
    source, stain = _level0(slides["source"][0]).astype(float), _level0(slides["stain"][0]).astype(float)
    mask = _level0(companion_paths(slides["source"][0])[0])[..., 0]
    b = 128
    shifts = []
    for y in range(0, SIZE[1], b):
        for x in range(0, SIZE[0], b):
            block = source[y : y + b, x : x + b]
            if block.mean() < 200 and (mask[y : y + b, x : x + b] == 0).all():  # normal tissue
                shifts.append(np.abs(stain[y : y + b, x : x + b] - block).mean())
    shifts = np.array(shifts)
    assert len(shifts) > 20 and shifts.mean() > 5
    assert shifts.std() / shifts.mean() > 0.15, (shifts.mean(), shifts.std())


def test_nonhed_centre_is_brown_where_source_is_pink(slides):
    def brown_share(path):
        rgb = _level0(path)[::4, ::4]
        hsv = rgb2hsv(rgb)
        tissue = (hsv[..., 1] > 0.15) & (rgb.mean(axis=2) < 220)
        return float(np.mean(hsv[..., 0][tissue] < 0.1))  # orange-brown hues; H&E sits at 0.7-1.0

    assert brown_share(slides["source"][0]) < 0.01
    assert brown_share(slides["nonhed"][0]) > 0.25
    assert LOCAL_CENTRES["nonhed"].covered is False
    assert all(c.covered for name, c in LOCAL_CENTRES.items() if name != "nonhed")


def test_artefacts_stay_within_their_share_of_the_tissue():
    low = (160, 160)
    tissue = np.zeros(low, bool)
    tissue[20:140, 20:140] = True
    for seed in range(5):
        lay = localshift._layout(low, LOCAL_CENTRES["source"], seed, 0.5, 3, tissue)
        any_artefact = np.maximum(np.maximum(lay.pen, lay.fold), lay.focus) > 0
        assert not any_artefact[~tissue].any()
        assert any_artefact[tissue].mean() <= ARTEFACT_SHARE + 1e-6


def test_unknown_centre_is_refused(bank, tmp_path):
    with pytest.raises(ValueError, match="unknown centre 'mars'"):
        build_local_slide(tmp_path / "x.tif", size=(256, 256), centre="mars", seed=1, bank=bank)
