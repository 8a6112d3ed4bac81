"""The overlay PNG: panel-sized uint8 images, drawn with Pillow where the maps and boxes belong."""

import io
import subprocess
import sys

import numpy as np
from PIL import Image, ImageFont

from service.inference.outputs import FONT, PANEL_ORIGINS, PANEL_PX, fit_to_panel, overlay_png


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
    png = overlay_png(
        thumb, heat, tissue, mask, queue, measure="uga", level0_per_px=2.0, title="slide · 1.0 mm² · 0.5 µm"
    )
    image = Image.open(io.BytesIO(png))
    assert image.size == (1400, 740)
    rgb = np.asarray(image.convert("RGB")).astype(int)
    # the heat panel: the preview's (256..512)² square at full uncertainty lands at panel scale 640 / 1024
    x0, y0 = PANEL_ORIGINS[1]
    hot = rgb[y0 + 190 : y0 + 300, x0 + 190 : x0 + 300]  # inside the queue box, clear of its label
    assert (hot[..., 0] > 150).all() and (hot[..., 1] < 80).all()  # the ramp's top (deep red) over the slide
    assert (rgb[y0 + 20 : y0 + 70, x0 + 20 : x0 + 600] == 255).all()  # no tissue: white
    calm = rgb[y0 + 400 : y0 + 500, x0 + 100 : x0 + 150]  # tissue where the model is sure: the slide in grey
    assert (calm == calm[..., :1]).all() and (calm < 255).all()
    # the left panel: the tumour outline in green around the (300..400)² mask, the box in blue on both
    lx, ly = PANEL_ORIGINS[0]
    outline = rgb[ly + 185 : ly + 255, lx + 185 : lx + 255]
    assert ((outline == (0, 200, 70)).all(axis=2)).sum() > 100
    for px, py in PANEL_ORIGINS:  # the box's top edge: level-0 y 512 -> preview 256 -> panel 160
        edge = rgb[py + 159 : py + 162, px + 170 : px + 300]
        assert ((edge == (0, 160, 255)).all(axis=2)).any(axis=0).mean() > 0.9


def test_drawing_the_overlay_needs_no_plotting_library():
    """The serving process renders the overlay with Pillow and a vendored font: matplotlib (about 35 MiB
    of a worker's memory) is never imported, and glyphs like ² and µ are in the font."""
    code = "import sys, service.inference.pipeline; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    font = ImageFont.truetype(str(FONT), 15)
    notdef = np.asarray(font.getmask("\uffff")).tobytes()
    assert all(np.asarray(font.getmask(c)).tobytes() != notdef for c in "²µ·×–≥")


def test_a_small_preview_fills_its_panel_and_a_long_title_is_cut_to_the_picture():
    h, w = 40, 64  # a tiny slide: enlarged 10x by whole pixels, the box grid enlarged with it
    heat = np.zeros((h, w), np.uint8)
    heat[:, : w // 2] = 255
    queue = [{"bbox_level0": {"x": 0, "y": 0, "width": 40, "height": 40}, "rank": 1}]
    png = overlay_png(
        np.full((h, w, 3), 200, np.uint8),
        heat,
        np.ones((h, w), bool),
        np.zeros((h, w), np.uint8),
        queue,
        measure="entropy",
        level0_per_px=2.0,
        title="slide-" + "x" * 500,
    )
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    x0, y0 = PANEL_ORIGINS[1]
    top = y0 + (PANEL_PX - h * 10) // 2  # 640 // 64 = 10
    red = (rgb[top + 250 : top + 350, x0 + 250 : x0 + 300, 1] < 80).all()  # the left half at full entropy
    calm = (rgb[top + 250 : top + 350, x0 + 400 : x0 + 600] == 200 // 2 + 128).all()  # the right half: slide in grey
    assert red and calm
    box = (rgb[top + 199 : top + 202, x0 + 30 : x0 + 190] == (0, 160, 255)).all(axis=2).any(axis=0)  # 20 px -> 200
    assert box.mean() > 0.9
    assert (rgb[0:40, :8] == 255).all() and (rgb[0:40, -8:] == 255).all()  # the title stays inside the picture


def test_the_out_of_distribution_verdict_is_written_under_the_slide_panel_in_red_when_flagged():
    from service.inference.outputs import ALERT_RGB, OVERLAY_SIZE
    from service.inference.pipeline import novelty_footnote

    flagged = novelty_footnote({"share_beyond_threshold": 0.86, "flag_share": 0.1, "out_of_distribution": True})
    calm = novelty_footnote({"share_beyond_threshold": 0.02, "flag_share": 0.1, "out_of_distribution": False})
    assert flagged["alert"] and flagged["footnote"].startswith("OUT OF DISTRIBUTION: 86.0% of the tissue")
    assert not calm.get("alert")
    assert calm["footnote"] == "2.0% of the tissue is unlike the training data (flagged above 10%)"
    assert novelty_footnote(None) == {}

    def strip(**verdict) -> np.ndarray:
        h = w = 32
        png = overlay_png(
            np.full((h, w, 3), 200, np.uint8),
            np.zeros((h, w), np.uint8),
            np.ones((h, w), bool),
            np.zeros((h, w), np.uint8),
            [],
            measure="uga",
            level0_per_px=1.0,
            title="t",
            **verdict,
        )
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        return rgb[OVERLAY_SIZE[1] - 24 : OVERLAY_SIZE[1] - 6, PANEL_ORIGINS[0][0] : PANEL_ORIGINS[1][0] - 20]

    red = (np.abs(strip(**flagged) - ALERT_RGB).sum(axis=2) < 60).sum()
    assert red > 100  # the words, in red
    dark = strip(**calm).sum(axis=2) < 200
    assert dark.sum() > 100 and (np.abs(strip(**calm) - ALERT_RGB).sum(axis=2) < 60).sum() == 0
    assert (strip() == 255).all()  # a model without novelty: nothing written there
