"""Clinician corrections: decode + validate a mask (PNG or GeoJSON), then store it durably with the
image crop read from the slide at ingest time. Validation is pure; nothing is written unless all of
it passes. Files are made durable (temp dir, fsync, rename) before the database row is committed, so
a crash leaves either a complete correction or an orphan directory that is never counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage import draw

from service.errors import InvalidInput, Unprocessable
from service.fsutil import fsync_dir
from service.store import Correction
from service.wsi.slide import Slide

MAX_MASK_SIDE = 8192


class CorrectionError(Unprocessable):
    """A correction that cannot be used as sent (wrong size, not binary, outside the slide, ...)."""


class MalformedCorrection(InvalidInput, CorrectionError):
    """A correction body that is empty or does not parse."""


@dataclass(frozen=True)
class Region:
    """A square or rectangular slide region: level-0 pixels plus the µm/px of its mask."""

    x: int
    y: int
    width: int
    height: int
    mpp: float

    def mask_shape(self, level0_mpp: float) -> tuple[int, int]:
        f = level0_mpp / self.mpp
        return max(1, round(self.height * f)), max(1, round(self.width * f))


def check_region(region: Region, slide_dims: tuple[int, int]) -> None:
    w0, h0 = slide_dims
    if region.width <= 0 or region.height <= 0:
        raise CorrectionError("invalid_region", "region width and height must be positive")
    if region.x < 0 or region.y < 0 or region.x + region.width > w0 or region.y + region.height > h0:
        raise CorrectionError(
            "region_outside_slide",
            f"region lies outside the slide ({w0}x{h0} level-0 pixels)",
            {"region": region.__dict__, "slide": [w0, h0]},
        )


def decode_png_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """A binary PNG (values {0,1} or {0,255}) of exactly ``shape`` (rows, cols) -> bool array."""
    if not data:
        raise MalformedCorrection("empty_body", "the request body is empty; send the mask as PNG")
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "PNG":
            raise CorrectionError("invalid_png", f"expected a PNG image, got {img.format}")
        if max(img.size) > MAX_MASK_SIDE:
            raise CorrectionError("mask_too_large", f"mask sides may not exceed {MAX_MASK_SIDE} px")
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise CorrectionError("invalid_png", "the body does not decode as a PNG image") from None
    arr = np.asarray(img.convert("L") if img.mode in ("1", "P") else img)
    if arr.ndim == 3:
        if not (arr[..., :3] == arr[..., :1]).all():
            raise CorrectionError("mask_not_binary", "mask must be single-channel (grey) 0/1 or 0/255")
        arr = arr[..., 0]
    if arr.shape != tuple(shape):
        raise CorrectionError(
            "mask_size_mismatch",
            f"mask is {arr.shape[1]}x{arr.shape[0]} px but the region needs {shape[1]}x{shape[0]} px at its µm/px",
            {"expected": [shape[1], shape[0]], "got": [arr.shape[1], arr.shape[0]]},
        )
    values = np.unique(arr)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        raise CorrectionError(
            "mask_not_binary", "mask values must be 0/1 or 0/255 only", {"values": values[:8].tolist()}
        )
    return arr > 0


def _rings(geometry: dict) -> list[list]:
    """Polygons of a GeoJSON geometry as lists of rings (outer first); refuse anything else."""
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    coords = geometry.get("coordinates") if isinstance(geometry, dict) else None
    if kind == "Polygon":
        return [coords]
    if kind == "MultiPolygon":
        return list(coords or [])
    raise CorrectionError("invalid_geojson", f"only Polygon and MultiPolygon geometries are accepted, got {kind}")


def rasterize_geojson(
    data: bytes, shape: tuple[int, int], origin: tuple[float, float] = (0, 0), scale: float = 1.0
) -> np.ndarray:
    """Fill GeoJSON polygons (holes subtracted) into a bool mask of ``shape``.

    Coordinates are (x, y); pixel = (coordinate - origin) * scale, so region coordinates use the
    defaults and QuPath's absolute level-0 coordinates use origin = region corner, scale = 1/f.
    """
    if not data:
        raise MalformedCorrection("empty_body", "the request body is empty; send GeoJSON polygons")
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MalformedCorrection("malformed_json", "the body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise CorrectionError("invalid_geojson", "expected a GeoJSON object")
    if obj.get("type") == "FeatureCollection":
        geometries = [f.get("geometry") for f in obj.get("features") or [] if isinstance(f, dict)]
    elif obj.get("type") == "Feature":
        geometries = [obj.get("geometry")]
    else:
        geometries = [obj]
    mask = np.zeros(shape, bool)
    if not geometries:
        raise CorrectionError(
            "invalid_geojson",
            "no geometry found (an empty mask is sent as an empty Polygon list "
            "is not allowed; send a PNG of zeros instead)",
        )
    try:
        for geometry in geometries:
            for polygon in _rings(geometry):
                for k, ring in enumerate(polygon):
                    pts = np.asarray(ring, dtype=np.float64)
                    if pts.ndim != 2 or pts.shape[1] < 2 or len(pts) < 3 or not np.isfinite(pts).all():
                        raise CorrectionError("invalid_geojson", "each ring needs >= 3 finite [x, y] points")
                    cols = (pts[:, 0] - origin[0]) * scale
                    rows = (pts[:, 1] - origin[1]) * scale
                    rr, cc = draw.polygon(rows, cols, shape=shape)
                    mask[rr, cc] = k == 0  # outer ring fills, holes clear
    except (TypeError, ValueError):
        raise CorrectionError("invalid_geojson", "polygon coordinates must be arrays of [x, y] numbers") from None
    return mask


def correction_id(slide: str, region: Region, mask: np.ndarray) -> str:
    """Content hash: the same mask for the same region of the same slide is the same correction."""
    h = hashlib.sha256()
    h.update(json.dumps([slide, region.x, region.y, region.width, region.height, round(region.mpp, 6)]).encode())
    h.update(np.packbits(mask.astype(bool)).tobytes())
    h.update(str(mask.shape).encode())
    return h.hexdigest()[:32]


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_correction_files(root: Path, cid: str, image: np.ndarray, mask: np.ndarray) -> Path:
    """image.png + mask.png in ``root/cid``: built in a temp dir, fsynced, renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / cid
    tmp = Path(tempfile.mkdtemp(prefix=f".{cid}.", dir=root))
    try:
        for name, arr in (("image.png", image), ("mask.png", np.where(mask, 255, 0).astype(np.uint8))):
            with open(tmp / name, "wb") as f:
                f.write(_png_bytes(arr))
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # an orphan from an earlier crash between files and row: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_crop(slide: Slide, region: Region) -> np.ndarray:
    """The slide's RGB pixels under the region, at the region's µm/px (the mask's shape)."""
    return slide.read_box(region.x, region.y, region.width, region.height, region.mpp)


def build_record(
    cid: str,
    slide: str,
    region: Region,
    mask: np.ndarray,
    *,
    annotator: str,
    queue_item_id: str | None,
    proposed_by: str | None,
    holdout_every: int,
) -> Correction:
    """The correction's record; every ``holdout_every``-th by hash is held out for the gate."""
    return Correction(
        id=cid,
        slide=slide,
        x=region.x,
        y=region.y,
        width=region.width,
        height=region.height,
        mpp=region.mpp,
        queue_item_id=queue_item_id,
        proposed_by_version=proposed_by,
        annotator=annotator,
        tumour_fraction=round(float(mask.mean()), 6),
        holdout=int(holdout_every > 0 and int(cid[:8], 16) % holdout_every == 0),
        created_at=time.time(),
    )


def load_pair(root: Path, cid: str) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 RGB, mask uint8 0/1) of a stored correction."""
    image = np.asarray(Image.open(root / cid / "image.png").convert("RGB"))
    mask = (np.asarray(Image.open(root / cid / "mask.png")) > 127).astype(np.uint8)
    return image, mask


def sweep_orphans(root: Path, known: set[str], older_than_s: float = 60.0) -> list[str]:
    """Remove correction directories without a database row (a crash before commit) and stale temps."""
    removed = []
    if not root.exists():
        return removed
    now = time.time()
    for d in root.iterdir():
        if d.name in known or now - d.stat().st_mtime < older_than_s:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    return removed
