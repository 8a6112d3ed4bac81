"""The overlay PNG's image reduction: panel-sized uint8 images, same picture."""

import io

import numpy as np
from PIL import Image

from service.inference.outputs import PANEL_PX, fit_to_panel, overlay_png


def test_images_are_area_averaged_to_the_panel_and_small_ones_left_alone():
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (1024, 768, 3), dtype=np.uint8)
    small = fit_to_panel(big)
    assert small.dtype == np.uint8 and small.shape == (PANEL_PX, 480, 3)  # aspect kept
    assert abs(float(small.mean()) - float(big.mean())) < 1.0  # an average, not a crop
    flat = np.full((1024, 1024), 200, np.uint8)
    assert (fit_to_panel(flat) == 200).all()
    tiny = big[:300, :200]
    assert fit_to_panel(tiny) is tiny


def test_the_overlay_is_a_two_panel_png_with_the_boxes_on_the_preview_grid():
    h = w = 1024
    thumb = np.full((h, w, 3), 230, np.uint8)
    heat = np.zeros((h, w), np.uint8)
    heat[256:512, 256:512] = 255
    tissue = np.zeros((h, w), bool)
    tissue[128:896, 128:896] = True
    mask = np.zeros((h, w), np.uint8)
    mask[300:400, 300:400] = 255
    queue = [{"bbox_level0": {"x": 512, "y": 512, "width": 512, "height": 512}, "rank": 1}]
    png = overlay_png(thumb, heat, tissue, mask, queue, measure="uga", level0_per_px=2.0, title="t")
    image = Image.open(io.BytesIO(png))
    assert image.size == (1400, 740)
    rgb = np.asarray(image.convert("RGB")).astype(int)
    right = rgb[:, 700:]
    hot = (right[..., 0] > 200) & (right[..., 1] > 200) & (right[..., 2] < 150)  # inferno's top: pale yellow
    grey = (np.abs(right - 208) <= 2).all(axis=2)  # no tissue
    assert hot.sum() > 1000 and grey.sum() > 1000
