"""Artifact writers: pyramidal TIFF maps, overlay PNG, QuPath GeoJSON, summary JSON. All atomic."""

from __future__ import annotations

import io
import json
from concurrent.futures import Executor, Future
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage import measure as skmeasure

from service.fsutil import atomic_write_bytes, atomic_write_json
from service.inference.heatmap import heat_rgba, legend, outline_rgba
from service.inference.uncertainty import STORAGE_MAX
from service.vocabulary import ARTIFACTS
from service.wsi.pyramid import write_pyramid_tiff
from service.wsi.raster import RasterFile


def write_map_tiff(out_dir: Path, name: str, raster: RasterFile, mpp: float) -> tuple[int, int]:
    """One pyramidal TIFF of a map (uint8; value = pixel / 255 x storage max, stated in the description).
    Returns the written file's identity (device, inode), so a failed run removes only its own files."""
    scale = STORAGE_MAX.get(name, 1.0)
    desc = json.dumps({"uga_map": name, "mpp": mpp, "value": f"pixel / 255 * {scale}"})
    path = out_dir / ARTIFACTS[name]
    write_pyramid_tiff(path, raster, mpp, compression="deflate", description=desc)
    written = path.stat()
    return written.st_dev, written.st_ino


def start_map_tiffs(out_dir: Path, rasters: dict[str, RasterFile], mpp: float, pool: Executor) -> dict[str, Future]:
    """Write every map's TIFF in ``pool`` (deflate releases the GIL, so this overlaps the overlay rendering)."""
    return {name: pool.submit(write_map_tiff, out_dir, name, raster, mpp) for name, raster in rasters.items()}


def tumour_polygons(mask_preview: np.ndarray, to_level0: float) -> list[list[list[float]]]:
    """Closed tumour outlines (level-0 coordinates) traced on a downsampled mask."""
    padded = np.pad(mask_preview >= 128, 1).astype(np.float32)
    rings = []
    for contour in skmeasure.find_contours(padded, 0.5):
        if len(contour) < 4:
            continue
        xy = (contour[:, ::-1] - 1 + 0.5) * to_level0
        ring = [[round(float(x), 1), round(float(y), 1)] for x, y in xy]
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        rings.append(ring)
    return rings


def geojson(rings: list, queue: list[dict], model_version: str, source: dict | None = None) -> dict:
    """QuPath-importable FeatureCollection: tumour outlines and review patches (scores as measurements).
    ``source``: a DICOM slide's identifiers (UIDs, accession number), on every feature."""
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "annotation",
                "name": "Tumour (predicted)",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
                "model_version": model_version,
                **({"source_identifiers": source} if source else {}),
            },
        }
        for ring in rings
    ]
    for item in queue:
        b = item["bbox_level0"]
        x0, y0, x1, y1 = b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                },
                "properties": {
                    "objectType": "annotation",
                    "name": f"Review #{item['rank']}",
                    "classification": {"name": "Review", "color": [0, 160, 255]},
                    "queue_item_id": item["id"],
                    **({"source_identifiers": source} if source else {}),
                    "measurements": {
                        "rank": item["rank"],
                        "score": item["score"],
                        "mean_uncertainty": item["mean_uncertainty"],
                        "mean_probability": item["mean_probability"],
                        "tissue_fraction": item["tissue_fraction"],
                    },
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


PANEL_PX = 640  # an overlay panel's side (at most) in the OVERLAY_SIZE picture
OVERLAY_SIZE = (1400, 740)
PANEL_ORIGINS = ((20, 56), (680, 56))  # top-left corner of each panel's box
NO_TISSUE_RGB = (255, 255, 255)  # the heat panel: the slide in grey where there is tissue, white elsewhere
FRAME_RGB = (170, 170, 170)
BOX_RGB, LABEL_RGB = (0, 160, 255), (0, 112, 192)
INK = (30, 30, 30)
ALERT_RGB = (200, 30, 30)  # the out-of-distribution verdict, when the slide is flagged


def fit_to_panel(image: np.ndarray) -> np.ndarray:
    """A uint8 image (H, W[, C]) area-averaged down so that its longest side is at most ``PANEL_PX``."""
    h, w = image.shape[:2]
    scale = PANEL_PX / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


FONT = Path(__file__).with_name("fonts") / "DejaVuSans.ttf"  # vendored (LICENSE_DEJAVU): Latin, Greek, symbols


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT), size)


def _fit_text(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """``text``, cut with an ellipsis where it would be wider than ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _over(base: np.ndarray, rgba: np.ndarray) -> Image.Image:
    """``rgba`` (h, w, 4) uint8 composited over ``base`` (h, w, 3) uint8, as an RGB image."""
    return Image.alpha_composite(Image.fromarray(base).convert("RGBA"), Image.fromarray(rgba)).convert("RGB")


def _panel_to_picture(shape: tuple[int, int], preview_width: int, panel: int) -> tuple[float, int, int]:
    """(scale, x0, y0): preview pixel (x, y) lands at (x0 + x * scale, y0 + y * scale) in the picture,
    the panel image (``shape``) centred in its box."""
    h, w = shape
    x0, y0 = PANEL_ORIGINS[panel]
    return w / preview_width, x0 + (PANEL_PX - w) // 2, y0 + (PANEL_PX - h) // 2


def _draw_queue(draw: ImageDraw.ImageDraw, queue: list[dict], level0_per_px: float, to_picture: tuple) -> None:
    scale, x0, y0 = to_picture
    for item in queue:
        b = item["bbox_level0"]
        x, y = x0 + b["x"] / level0_per_px * scale, y0 + b["y"] / level0_per_px * scale
        side = max(3.0, b["width"] / level0_per_px * scale)
        draw.rectangle((x, y, x + side, y + side), outline=BOX_RGB, width=2)
        label = str(item["rank"])
        left, top, right, bottom = draw.textbbox((x + 3, y + 2), label, font=_font(11))
        draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=LABEL_RGB)
        draw.text((x + 3, y + 2), label, fill="white", font=_font(11))


def _colour_bar(draw: ImageDraw.ImageDraw, picture: Image.Image, key: dict) -> None:
    """The heat ramp of ``key`` (``heatmap.legend``) as a vertical bar right of the second panel,
    labelled in the measure's unit."""
    height, x, top = PANEL_PX - 80, PANEL_ORIGINS[1][0] + PANEL_PX + 12, PANEL_ORIGINS[1][1] + 40
    values = np.linspace(key["max"], 0.0, height)[:, None].repeat(16, axis=1)
    picture.paste(_over(np.full((height, 16, 3), 255, np.uint8), heat_rgba(values, key["measure"])), (x, top))
    draw.rectangle((x, top, x + 15, top + height - 1), outline=INK)
    for fraction in (0.0, 0.5, 1.0):
        y = top + round((1 - fraction) * (height - 1))
        draw.line((x + 16, y, x + 20, y), fill=INK)
        draw.text((x + 22, y), f"{fraction * key['max']:g}", fill=INK, font=_font(11), anchor="lm")
    draw.text((x, top + height + 8), key["unit"], fill=INK, font=_font(11))


def overlay_png(
    thumbnail: np.ndarray,
    heat: np.ndarray,
    tissue: np.ndarray,
    mask_preview: np.ndarray,
    queue: list[dict],
    *,
    measure: str,
    level0_per_px: float,
    title: str,
    footnote: str = "",
    alert: bool = False,
) -> bytes:
    """Two panels: slide + tumour outline + numbered review boxes; the uncertainty heat map (the review
    page's colours, ``service.inference.heatmap``) over the slide in grey + the boxes, with its colour bar.

    Every image is reduced to the panel's size in uint8 first and drawn with Pillow: a few MiB at most,
    whatever the slide's size. ``heat`` holds the stored 0..255 levels (0..``STORAGE_MAX[measure]``).
    ``footnote`` goes under the slide panel (the out-of-distribution verdict), in red when ``alert``."""
    h, w = heat.shape
    k = max(1, PANEL_PX // max(h, w))  # a small preview is enlarged by whole pixels to fill the panel

    def panel_sized(image: np.ndarray) -> np.ndarray:
        small = fit_to_panel(np.ascontiguousarray(image))
        return small.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else small

    slide = panel_sized(thumbnail[:h, :w])
    shape = slide.shape[:2]
    on_tissue = panel_sized(tissue[:h, :w].astype(np.uint8) * 255) >= 128
    tumour = panel_sized(mask_preview[:h, :w]) >= 128
    values = panel_sized(heat).astype(np.float32) * (STORAGE_MAX[measure] / 255.0)

    picture = Image.new("RGB", OVERLAY_SIZE, "white")
    draw = ImageDraw.Draw(picture)
    draw.text(
        (OVERLAY_SIZE[0] // 2, 10),
        _fit_text(title, _font(15), OVERLAY_SIZE[0] - 40),
        fill=INK,
        font=_font(15),
        anchor="ma",
    )
    outlined = _over(slide, outline_rgba(tumour)) if tumour.any() else Image.fromarray(slide)
    grey = np.asarray(Image.fromarray(slide).convert("L").convert("RGB")) // 2 + 128  # light, so the heat reads
    grey[~on_tissue] = NO_TISSUE_RGB
    panels = (
        (outlined, "slide, predicted tumour (green), review queue (numbered)"),
        (_over(grey, heat_rgba(values, measure)), f"uncertainty on tissue: {measure} (white = no tissue)"),
    )
    for panel, (image, caption) in enumerate(panels):
        to_picture = _panel_to_picture(shape, w, panel)
        picture.paste(image, to_picture[1:])
        x0, y0 = to_picture[1:]
        draw.rectangle((x0 - 1, y0 - 1, x0 + shape[1], y0 + shape[0]), outline=FRAME_RGB)
        draw.text((PANEL_ORIGINS[panel][0], PANEL_ORIGINS[panel][1] - 20), caption, fill=INK, font=_font(13))
        _draw_queue(draw, queue, level0_per_px, to_picture)
    key = legend(measure)
    _colour_bar(draw, picture, key)
    draw.text((PANEL_ORIGINS[1][0], OVERLAY_SIZE[1] - 22), key["what"], fill=INK, font=_font(11))
    if footnote:
        width = PANEL_ORIGINS[1][0] - PANEL_ORIGINS[0][0] - 20
        ink = ALERT_RGB if alert else INK
        draw.text(
            (PANEL_ORIGINS[0][0], OVERLAY_SIZE[1] - 22), _fit_text(footnote, _font(11), width), fill=ink, font=_font(11)
        )
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def write_text_artifacts(out_dir: Path, *, overlay: bytes, features: dict, queue: list[dict], summary: dict) -> None:
    atomic_write_bytes(out_dir / ARTIFACTS["overlay"], overlay)
    atomic_write_json(out_dir / ARTIFACTS["geojson"], features)
    atomic_write_json(out_dir / ARTIFACTS["queue"], queue)
    atomic_write_json(out_dir / ARTIFACTS["summary"], summary)
