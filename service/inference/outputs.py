"""Artifact writers: pyramidal TIFF maps, overlay PNG, QuPath GeoJSON, summary JSON. All atomic."""

from __future__ import annotations

import io
import json
from concurrent.futures import Executor, Future
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import measure as skmeasure  # noqa: E402

from service.fsutil import atomic_write_bytes, atomic_write_json  # noqa: E402
from service.inference.uncertainty import STORAGE_MAX  # noqa: E402
from service.vocabulary import ARTIFACTS  # noqa: E402
from service.wsi.pyramid import write_pyramid_tiff  # noqa: E402
from service.wsi.raster import RasterFile  # noqa: E402


def write_map_tiff(out_dir: Path, name: str, raster: RasterFile, mpp: float) -> str:
    """One pyramidal TIFF of a map (uint8; value = pixel / 255 x storage max, stated in the description)."""
    scale = STORAGE_MAX.get(name, 1.0)
    desc = json.dumps({"uga_map": name, "mpp": mpp, "value": f"pixel / 255 * {scale}"})
    path = out_dir / ARTIFACTS[name]
    write_pyramid_tiff(path, raster, mpp, compression="deflate", description=desc)
    return path.name


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


PANEL_PX = 640  # an overlay panel's side in the 1400 x 740 px figure (at most)


def fit_to_panel(image: np.ndarray) -> np.ndarray:
    """A uint8 image (H, W[, C]) area-averaged down so that its longest side is at most ``PANEL_PX``."""
    h, w = image.shape[:2]
    scale = PANEL_PX / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


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
) -> bytes:
    """Two panels: slide + tumour outline + numbered review boxes; uncertainty heat map + the boxes.

    Each image is first reduced to the panel's size in uint8 (matplotlib's own resampling of a
    1024² float image peaks near 100 MiB); axes keep the preview's pixel coordinates."""
    h, w = heat.shape
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    fig, axes = plt.subplots(1, 2, figsize=(14, 7.4), dpi=100, constrained_layout=True)
    axes[0].imshow(fit_to_panel(thumbnail[:h, :w]), extent=extent)
    if mask_preview.max() >= 128:
        small = fit_to_panel(mask_preview[:h, :w])
        ys, xs = ((np.arange(n) + 0.5) * size / n - 0.5 for n, size in zip(small.shape, (h, w), strict=True))
        axes[0].contour(xs, ys, small >= 128, levels=[0.5], colors=["#00d000"], linewidths=1.0)
    axes[0].set_title("slide, predicted tumour (green), review queue (numbered)")
    vmax = STORAGE_MAX[measure]
    cmap = matplotlib.colormaps["inferno"]
    coloured = cmap(fit_to_panel(heat), bytes=True)  # uint8 RGBA from the stored 0..255 levels (0..vmax)
    coloured[fit_to_panel(tissue[:h, :w].astype(np.uint8) * 255) < 128] = (208, 208, 208, 255)  # grey = no tissue
    axes[1].imshow(coloured, extent=extent)
    axes[1].set_title(f"uncertainty on tissue: {measure} (bits; grey = no tissue)")
    fig.colorbar(ScalarMappable(Normalize(0, vmax), cmap), ax=axes[1], shrink=0.8)
    for ax in axes:
        ax.set_axis_off()
        for item in queue:
            b = item["bbox_level0"]
            x, y = b["x"] / level0_per_px, b["y"] / level0_per_px
            s = b["width"] / level0_per_px
            ax.add_patch(Rectangle((x, y), s, s, fill=False, edgecolor="#00a0ff", linewidth=1.6))
            ax.text(
                x + 2,
                y + 2,
                str(item["rank"]),
                color="white",
                fontsize=9,
                va="top",
                ha="left",
                bbox={"facecolor": "#0070c0", "edgecolor": "none", "pad": 1.0},
            )
    fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_text_artifacts(out_dir: Path, *, overlay: bytes, features: dict, queue: list[dict], summary: dict) -> None:
    atomic_write_bytes(out_dir / ARTIFACTS["overlay"], overlay)
    atomic_write_json(out_dir / ARTIFACTS["geojson"], features)
    atomic_write_json(out_dir / ARTIFACTS["queue"], queue)
    atomic_write_json(out_dir / ARTIFACTS["summary"], summary)
