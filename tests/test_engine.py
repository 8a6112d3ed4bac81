"""The engine's tile pipeline with model doubles: coverage of tissue, failures surface instead of hanging."""

import threading

import numpy as np
import pytest

from service.inference.analysis import block_mean, weighted_cell_sums
from service.inference.engine import segment
from service.inference.uncertainty import to_uint8
from service.options import SegmentationOptions
from service.wsi.raster import RasterFile, UpsampledRaster
from service.wsi.slide import open_slide
from service.wsi.tissue import tissue_mask


class ConstantModel:
    """Stands in for the ONNX session: every member says 0.8 everywhere."""

    version, members, providers = "const", 3, ["none"]

    def predict(self, tiles):
        return np.full((len(tiles), self.members, *tiles.shape[1:3]), 0.8, np.float32)


class BrokenModel(ConstantModel):
    def predict(self, tiles):
        raise RuntimeError("CUDA error: device lost")


def test_every_tissue_pixel_is_predicted_although_glass_tiles_are_skipped(source_slide, tmp_path):
    slide = open_slide(source_slide)
    res = segment(slide, ConstantModel(), tmp_path, SegmentationOptions(tile=256, overlap=32))
    assert res.tiles_computed < res.tiles_total
    prob = res.maps["probability"].read_rows(0, res.grid.height)
    tissue = res.tissue.crop(0, 0, res.grid.height, res.grid.width, 1.0)
    assert (prob[tissue] == round(0.8 * 255)).all()  # blended constant, no seams, no holes
    assert (res.maps["mutual_information"].read_rows(0, res.grid.height)[tissue] == 0).all()
    res.close()


class CellModel(ConstantModel):
    """A model double with per-cell outputs (one value per 8 x 8 px cell), like a novelty graph."""

    novelty, embedding_dims, cell_px = True, 2, 8

    def predict_outputs(self, tiles):
        b, h, w = len(tiles), tiles.shape[1] // 8, tiles.shape[2] // 8
        return {
            "member_probs": self.predict(tiles),
            "novelty": np.full((b, 1, h, w), 2.0, np.float32),
            "embedding": np.full((b, 2, h, w), -1.5, np.float32),
        }


@pytest.mark.parametrize(("overlap", "stored_per_cell"), [(32, True), (20, False)])
def test_per_cell_outputs_are_stored_per_cell_and_read_per_pixel(source_slide, tmp_path, overlap, stored_per_cell):
    """Tiles aligned with the cells: novelty and embedding are blended and stored per cell (64x fewer
    values); otherwise per pixel as before. Either way they read back per pixel, seamless."""
    slide = open_slide(source_slide)
    res = segment(slide, CellModel(), tmp_path, SegmentationOptions(tile=256, overlap=overlap))
    h, w = res.grid.height, res.grid.width
    tissue = res.tissue.crop(0, 0, h, w, 1.0)
    per_cell = -(-h // 8) * -(-w // 8)
    for name, value in (("novelty", 2.0), ("embedding_1", -1.5)):
        assert (tmp_path / f"{name}.raw").stat().st_size == (per_cell if stored_per_cell else h * w)
        assert isinstance(res.maps[name], UpsampledRaster) is stored_per_cell
        full = res.maps[name].read_rows(0, h)
        assert full.shape == (h, w) and (full[tissue] == to_uint8(np.float32(value), name)).all()
    assert (res.maps["probability"].read_rows(0, h)[tissue] == round(0.8 * 255)).all()
    res.close()


def test_an_upsampled_raster_reads_any_rows_like_the_repeated_cells(tmp_path):
    cells = np.random.default_rng(0).integers(0, 256, (13, 11), dtype=np.uint8)
    coarse = RasterFile(tmp_path / "c.raw", 13, 11, create=True)
    coarse.write_block(0, 0, cells)
    view = UpsampledRaster(coarse, 8, 100, 85)  # cropped: 13 x 8 = 104 rows, 11 x 8 = 88 columns
    full = np.repeat(np.repeat(cells, 8, axis=0), 8, axis=1)[:100, :85]
    for y0, y1 in ((0, 100), (3, 9), (7, 8), (16, 24), (95, 130)):
        np.testing.assert_array_equal(view.read_rows(y0, y1), full[y0:y1])
    assert np.array_equal(np.concatenate([rows for _, rows in view.iter_bands(30)]), full)
    with pytest.raises(ValueError, match="cover"):
        UpsampledRaster(coarse, 8, 105, 85)
    view.close()


def test_model_failure_is_raised_not_hung(source_slide, tmp_path):
    slide = open_slide(source_slide)
    outcome = {}

    def run():
        try:
            segment(slide, BrokenModel(), tmp_path, SegmentationOptions(tile=128, overlap=16, batch=1))
        except RuntimeError as exc:
            outcome["error"] = str(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "segment() hung after the model failed"
    assert outcome["error"] == "CUDA error: device lost"


def test_tissue_mask_of_glass_only_slide_is_empty(tmp_path):
    from service.wsi.pyramid import write_pyramid_tiff
    from service.wsi.raster import RasterFile

    r = RasterFile(tmp_path / "g.raw", 600, 600, 3, create=True)
    r.write_block(0, 0, np.full((600, 600, 3), 238, np.uint8))
    write_pyramid_tiff(tmp_path / "glass.tif", r, 0.5)
    assert tissue_mask(open_slide(tmp_path / "glass.tif")).fraction() == pytest.approx(0.0)


def test_per_cell_maps_give_the_same_queue_cell_sums_as_their_pixels(tmp_path):
    """Summed at cell resolution (cell value x tissue pixels in it) or per pixel: the same tissue-weighted
    sums per 64-px queue cell, ragged edges included."""
    rng = np.random.default_rng(1)
    cells = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    coarse = RasterFile(tmp_path / "e.raw", 17, 23, create=True)
    coarse.write_block(0, 0, cells)
    full = RasterFile(tmp_path / "f.raw", 130, 181, create=True)
    full.write_block(0, 0, np.repeat(np.repeat(cells, 8, axis=0), 8, axis=1)[:130, :181])
    view = UpsampledRaster(coarse, 8, 130, 181)
    for y0, y1 in ((0, 128), (128, 130)):
        tissue = (rng.random((y1 - y0, 181)) > 0.3).astype(np.float32)
        by_cell = weighted_cell_sums({"embedding_0": view}, tissue, y0)["embedding_0"]
        by_pixel = weighted_cell_sums({"embedding_0": full}, tissue, y0)["embedding_0"]
        assert by_cell.shape == by_pixel.shape == (-(-(y1 - y0) // 64), 3)
        np.testing.assert_allclose(by_cell, by_pixel, rtol=1e-9)
    view.close()
    full.close()


@pytest.mark.parametrize(("h", "w", "f"), [(128, 4096, 4), (7, 9, 4), (1, 5, 4), (3, 1, 8), (97, 333, 8), (64, 64, 64)])
def test_block_mean_is_the_mean_of_zero_padded_blocks(h, w, f):
    values = np.random.default_rng(h * w + f).integers(0, 256, (h, w), dtype=np.uint8)
    gh, gw = -(-h // f), -(-w // f)
    padded = np.zeros((gh * f, gw * f))
    padded[:h, :w] = values
    expected = padded.reshape(gh, f, gw, f).mean(axis=(1, 3))
    got = block_mean(values, f)
    assert got.dtype == np.float32 and got.shape == (gh, gw)
    np.testing.assert_allclose(got, expected, atol=1e-4)
