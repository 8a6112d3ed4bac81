"""The engine's tile pipeline with model doubles: coverage of tissue, failures surface instead of hanging."""

import threading

import numpy as np
import pytest

from service.inference.engine import segment
from service.options import SegmentationOptions
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
