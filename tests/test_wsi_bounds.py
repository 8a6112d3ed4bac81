"""Memory bounds of slide reads: regions with no pyramid level near the target µm/px are read in blocks.

A single-level TIFF (or a target far coarser than the finest level) used to be read with one
read_region of the whole level region: a 20000² px file of a few hundred KB took the worker to GBs
while building the tissue mask. RegionReader now reads such regions in blocks of at most
``MAX_READ_PIXELS`` level pixels; these tests check that the blocks give the one-shot result and that
memory stays bounded on such a slide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

import service.wsi.slide as slide_mod
import service.wsi.tissue as tissue_mod
from service.wsi.slide import RegionReader, SlideError, open_slide

REPO = Path(__file__).resolve().parent.parent
ONE_SHOT = 1 << 62  # a budget no region reaches: the single read_region of before


def write_tiled_tiff(path: Path, shape: tuple[int, int], tile: int, mpp: float, tile_at: Callable) -> None:
    """Single-level tiled RGB TIFF that OpenSlide opens as generic-tiff with µm/px (resolution tags).

    ``tile_at(ty, tx)`` gives a (tile, tile, 3) uint8 array, a ready deflate-encoded ``bytes``, or None for a
    missing tile (no data: OpenSlide reads it as transparent). Tiles are streamed: nothing image-sized is
    held, so the file can claim any size.
    """

    def tiles():
        for ty in range(-(-shape[0] // tile)):
            for tx in range(-(-shape[1] // tile)):
                t = tile_at(ty, tx)
                yield b"" if t is None else t if isinstance(t, bytes) else zlib.compress(t.tobytes(), 6)

    res = 1e4 / mpp
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            tiles(),
            shape=(*shape, 3),
            dtype=np.uint8,
            tile=(tile, tile),
            photometric="rgb",
            compression="deflate",
            resolution=(res, res),
            resolutionunit="CENTIMETER",
            metadata=None,
        )


@pytest.fixture(scope="module")
def single_level_tiff(tmp_path_factory) -> Path:
    """3000 x 2300 px at 0.25 µm/px, one level: gradients, stripes, noise and a few missing (transparent) tiles."""
    path = tmp_path_factory.mktemp("bounds") / "single.tif"
    h, w, tile = 2300, 3000, 256
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack(
        [
            128 + 100 * np.sin(xx / 37.0) * np.cos(yy / 53.0),
            200 - (yy * 150) // h,
            90 + (xx * 160) // w + 60 * ((xx // 5 + yy // 7) % 2),
        ],
        axis=-1,
    )
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    padded = np.zeros((-(-h // tile) * tile, -(-w // tile) * tile, 3), np.uint8)
    padded[:h, :w] = img

    def tile_at(ty, tx):
        if (ty, tx) in {(1, 2), (4, 7), (8, 0), (8, 1)}:
            return None
        return np.ascontiguousarray(padded[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile])

    write_tiled_tiff(path, (h, w), tile, 0.25, tile_at)
    return path


def _windows(reader: RegionReader) -> list[tuple[int, int, int, int]]:
    """The whole slide, an inner window, and windows that reach past the right/bottom edge (mirrored)."""
    H, W = reader.shape
    return [
        (0, 0, H, W),
        (H // 5, W // 7, max(1, H // 2), max(1, W // 3)),
        (H // 2, W - max(1, W // 4), H, W // 2),  # reaches past both edges
        (max(0, H - 3), 1, 40, max(1, W - 1)),
    ]


def _compare(monkeypatch, path: Path, mpp: float, budget: int, tol: int) -> int:
    """Max |blocks - one-shot| over the windows, asserting ``tol``; checks that the whole-slide window went
    through several blocks and that no block exceeded the budget by more than one row of itself."""
    blocks: list[tuple[int, int]] = []
    level_rgb = RegionReader._level_rgb

    def spy(self, lx, ly, lw, lh):
        blocks.append((lw, lh))
        return level_rgb(self, lx, ly, lw, lh)

    worst = 0
    with open_slide(path) as slide:
        reader = RegionReader(slide, mpp)
        for window in _windows(reader):
            monkeypatch.setattr(slide_mod, "MAX_READ_PIXELS", ONE_SHOT)
            one_shot = reader.read(*window).astype(np.int16)
            monkeypatch.setattr(slide_mod, "MAX_READ_PIXELS", budget)
            monkeypatch.setattr(RegionReader, "_level_rgb", spy)
            blocks.clear()
            banded = reader.read(*window)
            monkeypatch.setattr(RegionReader, "_level_rgb", level_rgb)
            assert banded.shape == one_shot.shape and banded.dtype == np.uint8
            diff = int(np.abs(one_shot - banded).max())
            assert diff <= tol, (path.name, mpp, window, diff)
            worst = max(worst, diff)
            assert all(lw * lh <= budget + lw for lw, lh in blocks), (budget, blocks)
            if window == (0, 0, *reader.shape):
                assert len(blocks) > 1
    return worst


# Downsampling (bilinear) at level 0: the CMU SVS has one level. Upsampling is checked on the pyramid slide:
# 0.35 / 0.5 = 7/10 puts no output pixel centre exactly on a source pixel edge, where the nearest-like BOX
# upsampling may pick the other neighbour in a block than in the one-shot read (e.g. 0.25 / 0.499 does).
@pytest.mark.parametrize("mpp", [0.6, 1.0, 2.5, 8.0])
def test_banded_read_equals_one_shot_on_real_svs(monkeypatch, cmu_svs, mpp):
    _compare(monkeypatch, cmu_svs, mpp, budget=60_000, tol=1)


@pytest.mark.parametrize("mpp", [0.35, 0.77, 1.0, 3.3, 8.0, 16.0])  # levels 0, 0, 1, 2, 3, 3
def test_banded_read_equals_one_shot_on_pyramid_slide(monkeypatch, source_slide, mpp):
    _compare(monkeypatch, source_slide, mpp, budget=40_000, tol=1)


@pytest.mark.parametrize("mpp", [1.0, 2.0, 8.0, 16.0])
def test_banded_read_equals_one_shot_on_single_level_tiff(monkeypatch, single_level_tiff, mpp):
    with open_slide(single_level_tiff) as slide:
        assert slide.handle.level_count == 1 and slide.mpp == pytest.approx(0.25)
    _compare(monkeypatch, single_level_tiff, mpp, budget=200_000, tol=1)


def test_missing_tiles_are_glass_in_blocks_as_in_one_shot(monkeypatch, single_level_tiff):
    # tile (1, 2) is missing: level px [256, 512) x [512, 768) -> at 1 µm/px rows 64..128, cols 128..192
    monkeypatch.setattr(slide_mod, "MAX_READ_PIXELS", 20_000)
    with open_slide(single_level_tiff) as slide:
        block = RegionReader(slide, 1.0).read(66, 130, 60, 60)
    assert (block == 255).all()


def test_column_blocks_when_one_row_band_is_too_wide(monkeypatch, cmu_svs):
    # a budget below one output row of the whole width: blocks are split into columns too. Both Pillow
    # passes then start from translated boxes, so a pixel may round differently in each: ±2 at most.
    _compare(monkeypatch, cmu_svs, 1.0, budget=4_000, tol=2)


def test_a_pixel_coarser_than_the_budget_is_refused_not_allocated(monkeypatch, single_level_tiff):
    # at 16 µm/px one output pixel covers 64x64 level px (192x192 under the bilinear filter)
    monkeypatch.setattr(slide_mod, "MAX_READ_PIXELS", 10_000)
    with open_slide(single_level_tiff) as slide:
        reader = RegionReader(slide, 16.0)
        with pytest.raises(SlideError, match="no level close enough"):
            reader.read(0, 0, *reader.shape)


def test_tissue_mask_is_capped_in_pixels_for_slides_claiming_huge_sizes(monkeypatch, cmu_svs):
    with open_slide(cmu_svs) as slide:
        full = tissue_mod.tissue_mask(slide)
        monkeypatch.setattr(tissue_mod, "MAX_MASK_PIXELS", full.mask.size // 9)
        capped = tissue_mod.tissue_mask(slide)
    assert capped.mask.size <= full.mask.size // 9
    assert capped.mpp > 2.9 * full.mpp
    assert capped.fraction() == pytest.approx(full.fraction(), abs=0.1)
    assert capped.crop(0, 0, 50, 40, 1.0).shape == (50, 40)  # still answers at any µm/px


# ---------------------------------------------------------------------------------------------------
# The slide-dimension bomb: a few hundred KB claiming 20000² px, one level

BOMB_SIDE, BOMB_TILE, BOMB_MPP = 20_000, 512, 0.25
MAX_GROWTH_MIB = 512

_MEASURE = r"""
import json, resource, sys
import service.wsi.slide as slide_mod
from service.wsi.tissue import tissue_mask
if len(sys.argv) > 2:
    slide_mod.MAX_READ_PIXELS = int(sys.argv[2])
unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
with slide_mod.open_slide(sys.argv[1]) as slide:
    mask = tissue_mask(slide)
    reader = slide_mod.RegionReader(slide, 16.0)
    img = reader.read(0, 0, *reader.shape)
    out = {"levels": slide.handle.level_count, "mpp": slide.mpp, "mask_shape": list(mask.mask.shape),
           "mask_mpp": mask.mpp, "tissue": mask.fraction(), "img_shape": list(img.shape),
           "expected_img": list(slide_mod.analysis_shape(slide, 16.0))}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
out["growth_mib"] = (peak - base) / 2**20
print(json.dumps(out))
"""


def measure_bomb(path: Path, budget: int | None = None) -> dict:
    """In a fresh process: tissue mask + one whole-slide read at 16 µm/px; peak RSS growth past the imports.

    ``budget`` overrides MAX_READ_PIXELS there (``ONE_SHOT`` reproduces the unbounded read of before).
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", _MEASURE, str(path)] + ([str(budget)] if budget is not None else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bomb_tiff(tmp_path_factory) -> Path:
    """20000 x 20000 px at 0.25 µm/px in one level: glass (missing tiles: transparent, composited to white)
    with a tissue-coloured disc and a striped ring. Three distinct tiles, encoded once."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.tif"
    t = BOMB_TILE
    tissue = np.full((t, t, 3), (205, 120, 175), np.uint8)
    ring = np.full((t, t, 3), (242, 240, 244), np.uint8)
    ring[:, t // 2 :] = (150, 60, 130)
    ring[::8] = (120, 40, 110)
    enc = {"tissue": zlib.compress(tissue.tobytes(), 6), "ring": zlib.compress(ring.tobytes(), 6)}
    n = -(-BOMB_SIDE // t)

    def tile_at(ty, tx):
        d2 = (ty - n / 2) ** 2 + (tx - n / 2) ** 2
        return enc["tissue"] if d2 < (n / 10) ** 2 else enc["ring"] if d2 < (n / 8) ** 2 else None

    write_tiled_tiff(path, (BOMB_SIDE, BOMB_SIDE), t, BOMB_MPP, tile_at)
    return path


def test_bomb_file_is_small_and_claims_a_huge_single_level(bomb_tiff):
    assert bomb_tiff.stat().st_size < 1_000_000
    s = openslide.OpenSlide(str(bomb_tiff))
    assert s.level_count == 1 and s.dimensions == (BOMB_SIDE, BOMB_SIDE)
    assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(BOMB_MPP)
    s.close()


@pytest.mark.slow  # 11 s: a whole-slide read of the bomb
def test_tissue_mask_and_whole_slide_read_of_the_bomb_stay_bounded(bomb_tiff):
    m = measure_bomb(bomb_tiff)
    assert m["levels"] == 1 and m["mpp"] == pytest.approx(BOMB_MPP)
    side = round(BOMB_SIDE * BOMB_MPP / tissue_mod.TISSUE_MASK_MPP)
    assert m["mask_shape"] == [side, side] and m["mask_mpp"] == tissue_mod.TISSUE_MASK_MPP
    assert 0.01 < m["tissue"] < 0.2  # the disc and the ring, not the glass
    assert m["img_shape"] == [*m["expected_img"], 3]
    # before blocks: one 20000² RGBA read_region plus its RGB copy, ~3.5 GiB
    assert m["growth_mib"] < MAX_GROWTH_MIB, m
