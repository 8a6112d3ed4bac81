"""Clinician corrections: decode + validate a mask (PNG or GeoJSON), then store it durably with the
image crop read from the slide at ingest time. Validation is pure; nothing is written unless all of
it passes. Files are made durable (temp dir, fsync, rename) before the database row is committed, so
a crash leaves either a complete correction or an orphan directory that is never counted.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from service.errors import InvalidInput, Unprocessable
from service.fsutil import durable_dir, fsync_dir, quarantine
from service.store import Correction
from service.wsi.slide import Slide, box_window

MAX_EDGE_ROWS = 2e7  # a GeoJSON fill costs ~ sum over edges of the rows each spans: ~0.5 s here at most


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
        """(rows, cols) of the region's mask at its µm/px on a slide of ``level0_mpp``."""
        return box_window(self.x, self.y, self.width, self.height, level0_mpp / self.mpp)[2:]


def check_region(region: Region, slide_dims: tuple[int, int], slide_mpp: float, max_side: int) -> None:
    """The region lies on the slide and its mask (at the region's µm/px) is at most ``max_side`` a side."""
    w0, h0 = slide_dims
    if region.width <= 0 or region.height <= 0:
        raise CorrectionError("invalid_region", "region width and height must be positive")
    if region.x < 0 or region.y < 0 or region.x + region.width > w0 or region.y + region.height > h0:
        raise CorrectionError(
            "region_outside_slide",
            f"region lies outside the slide ({w0}x{h0} level-0 pixels)",
            {"region": region.__dict__, "slide": [w0, h0]},
        )
    rows, cols = region.mask_shape(slide_mpp)
    if max(rows, cols) > max_side:
        raise CorrectionError(
            "region_too_large",
            f"the region's mask would be {cols}x{rows} px at {region.mpp} µm/px; at most {max_side} px a side "
            "(UGA_MAX_CORRECTION_PX): split it, or use a coarser mpp",
            {"limit": max_side, "mask": [cols, rows]},
        )


def decode_png_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """A binary PNG (values {0,1} or {0,255}) of exactly ``shape`` (rows, cols) -> bool array.

    The size is read from the header and compared before anything is decoded, so the work is
    bounded by ``shape`` (itself bounded by UGA_MAX_CORRECTION_PX), whatever the header claims.
    """
    if not data:
        raise MalformedCorrection("empty_body", "the request body is empty; send the mask as PNG")
    try:
        img = Image.open(io.BytesIO(data), formats=["PNG"])  # no other decoder ever sees the body
    except Image.DecompressionBombError:
        raise CorrectionError(
            "mask_size_mismatch", f"the PNG claims a size far beyond {shape[1]}x{shape[0]} px"
        ) from None
    except Exception:  # a hostile body may raise anything from inside the decoder
        raise CorrectionError("invalid_png", "the body does not decode as a PNG image") from None
    width, height = img.size
    if (height, width) != tuple(shape):
        raise CorrectionError(
            "mask_size_mismatch",
            f"mask is {width}x{height} px but the region needs {shape[1]}x{shape[0]} px at its µm/px",
            {"expected": [shape[1], shape[0]], "got": [width, height]},
        )
    try:
        img.load()
    except Exception:
        raise CorrectionError("invalid_png", "the body does not decode as a PNG image") from None
    arr = np.asarray(img.convert("L") if img.mode in ("1", "P") else img)
    if arr.ndim == 3:
        if not (arr[..., :3] == arr[..., :1]).all():
            raise CorrectionError("mask_not_binary", "mask must be single-channel (grey) 0/1 or 0/255")
        arr = arr[..., 0]
    values = np.unique(arr)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        raise CorrectionError(
            "mask_not_binary", "mask values must be 0/1 or 0/255 only", {"values": values[:8].tolist()}
        )
    return arr > 0


def _geometries(obj: object) -> list:
    """The geometries of a GeoJSON object (FeatureCollection, Feature or bare geometry), or of a bare
    array of features / geometries (what QuPath's "Export objects as GeoJSON" writes by default)."""
    if isinstance(obj, list) and all(isinstance(item, dict) for item in obj):
        return [geometry for item in obj for geometry in _geometries(item)]
    if not isinstance(obj, dict):
        raise CorrectionError(
            "invalid_geojson", "expected a GeoJSON object (FeatureCollection, Feature, geometry) or array of features"
        )
    if obj.get("type") == "FeatureCollection":
        features = obj.get("features")
        if not isinstance(features, list):
            raise CorrectionError("invalid_geojson", "a FeatureCollection's features must be a list")
        return [f.get("geometry") for f in features if isinstance(f, dict)]
    if obj.get("type") == "Feature":
        return [obj.get("geometry")]
    return [obj]


def _polygons(geometry: object) -> list:
    """Polygons of a GeoJSON geometry as lists of rings (outer first); refuse anything else."""
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    coords = geometry.get("coordinates") if isinstance(geometry, dict) else None
    if kind == "Polygon":
        polygons = [coords]
    elif kind == "MultiPolygon":
        polygons = coords
    else:
        raise CorrectionError("invalid_geojson", f"only Polygon and MultiPolygon geometries are accepted, got {kind}")
    if not isinstance(polygons, list) or not polygons or not all(isinstance(p, list) and p for p in polygons):
        raise CorrectionError(
            "invalid_geojson", "polygon coordinates must be non-empty arrays of rings of [x, y] numbers"
        )
    return polygons


def _is_point(point: object) -> bool:
    """[x, y] or [x, y, z] of JSON numbers (not strings, not booleans)."""
    return isinstance(point, list) and 2 <= len(point) <= 3 and all(type(v) in (int, float) for v in point)


def _ring_points(ring: object) -> np.ndarray:
    if not isinstance(ring, list) or not all(_is_point(p) for p in ring):
        raise CorrectionError("invalid_geojson", "polygon coordinates must be arrays of [x, y] numbers")
    try:
        pts = np.array([p[:2] for p in ring], dtype=np.float64).reshape(-1, 2)
    except OverflowError:
        raise CorrectionError("invalid_geojson", "a coordinate is too large to be a number of pixels") from None
    if len(pts) < 3 or not np.isfinite(pts).all():
        raise CorrectionError("invalid_geojson", "each ring needs >= 3 finite [x, y] points")
    return pts


def rasterize_geojson(
    data: bytes,
    shape: tuple[int, int],
    origin: tuple[float, float] = (0, 0),
    scale: float = 1.0,
    *,
    max_vertices: int = 100_000,
) -> np.ndarray:
    """Fill GeoJSON polygons (holes subtracted) into a bool mask of ``shape``.

    Coordinates are (x, y); pixel = (coordinate - origin) * scale, so region coordinates use the
    defaults and QuPath's absolute level-0 coordinates use origin = region corner, scale = 1/f.
    At most ``max_vertices`` points in all; the fill is a C scanline (time ~ vertices + pixels).
    """
    if not data:
        raise MalformedCorrection("empty_body", "the request body is empty; send GeoJSON polygons")
    try:
        obj = json.loads(data)
    except ValueError:  # not JSON, not UTF-8, or an integer too long to convert
        raise MalformedCorrection("malformed_json", "the body is not valid JSON") from None
    except RecursionError:
        raise CorrectionError("invalid_geojson", "the GeoJSON is nested too deeply") from None
    geometries = _geometries(obj)
    if not geometries:
        raise CorrectionError(
            "invalid_geojson",
            "no geometry found (an empty mask is sent as an empty Polygon list "
            "is not allowed; send a PNG of zeros instead)",
        )
    rings: list[tuple[np.ndarray, bool]] = []  # (points, is the outer ring)
    vertices, crossings = 0, 0.0
    for geometry in geometries:
        for polygon in _polygons(geometry):
            for k, ring in enumerate(polygon):
                pts = _ring_points(ring)
                vertices += len(pts)
                if vertices > max_vertices:
                    raise CorrectionError(
                        "too_many_vertices",
                        f"the polygons have more than {max_vertices} vertices (UGA_MAX_GEOJSON_VERTICES); "
                        "simplify them or send a PNG mask",
                        {"limit": max_vertices},
                    )
                rings.append((pts, k == 0))
                rows = np.clip((pts[:, 1] - origin[1]) * scale, 0, shape[0])
                crossings += float(np.abs(np.diff(rows)).sum())  # the fill's cost: each edge, each row it spans
                if crossings > MAX_EDGE_ROWS:
                    raise CorrectionError(
                        "polygons_too_complex",
                        f"the polygons' edges cross more than {MAX_EDGE_ROWS:.0e} pixel rows in all; "
                        "simplify them or send a PNG mask",
                        {"limit": MAX_EDGE_ROWS},
                    )
    height, width = shape
    canvas = Image.new("L", (width, height), 0)
    pen = ImageDraw.Draw(canvas)
    bound = 4.0 * max(height, width) + 16  # far outside the mask: clipped the same, no int overflow
    for pts, outer in rings:
        xy = np.clip((pts - origin) * scale, -bound, bound)
        pen.polygon([tuple(p) for p in xy.tolist()], fill=1 if outer else 0)  # outer rings fill, holes clear
    return np.asarray(canvas) > 0


def _region_bytes(slide: str, region: Region) -> bytes:
    return json.dumps([slide, region.x, region.y, region.width, region.height, round(region.mpp, 6)]).encode()


def correction_id(slide: str, region: Region, mask: np.ndarray) -> str:
    """Content hash: the same mask for the same region of the same slide is the same correction."""
    h = hashlib.sha256()
    h.update(_region_bytes(slide, region))
    h.update(np.packbits(mask.astype(bool)).tobytes())
    h.update(str(mask.shape).encode())
    return h.hexdigest()[:32]


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@contextmanager
def correction_lock(data_dir: Path, cid: str) -> Iterator[None]:
    """Exclusive, across processes on this host, for one correction id: check, write and record it."""
    locks = Path(data_dir) / "locks" / "corrections"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{cid}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_correction_files(root: Path, cid: str, image: np.ndarray, mask: np.ndarray) -> Path:
    """image.png + mask.png in ``root/cid``: built in a temp dir, fsynced, renamed into place.

    Call under ``correction_lock``. An existing ``root/cid`` was renamed into place whole: with the
    same files it is kept (a crash before its row, or another host's ingest of the same correction,
    which may have been acknowledged); with other files (the slide changed under its name) it is
    moved to the orphans, never deleted.
    """
    durable_dir(root)
    final = root / cid
    files = {"image.png": _png_bytes(image), "mask.png": _png_bytes(np.where(mask, 255, 0).astype(np.uint8))}
    if final.is_dir() and all(_same_file(final / name, data) for name, data in files.items()):
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{cid}.", dir=root))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():
            quarantine(final, root.parent, "corrections")
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _same_file(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


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
    model_dice: float | None = None,
    earlier: Iterable[Correction] = (),
) -> Correction:
    """The correction's record and its gate role (``gate_role``, against the ``earlier`` corrections
    of its slide)."""
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
        holdout=gate_role(slide, region, earlier, holdout_every),
        created_at=time.time(),
        model_dice=None if model_dice is None else round(model_dice, 6),
    )


def held_out_for_gate(slide: str, region: Region, every: int) -> bool:
    """Every ``every``-th region (by hash of the slide and the region, not of the mask) is held out:
    the same region corrected again (another pathologist, a later model's queue) keeps its role, so
    no crop is both trained on and gated on."""
    return every > 0 and int(hashlib.sha256(_region_bytes(slide, region)).hexdigest()[:8], 16) % every == 0


def gate_role(slide: str, region: Region, earlier: Iterable[Correction], every: int) -> int:
    """Held out for the gate (1) or trained on (0): the role of the first of the ``earlier``
    corrections (in arrival order) whose box overlaps the region on the same slide, so that no
    tissue is both trained on and gated on (a later model's queue patch shifted over a corrected one);
    otherwise every ``every``-th region by hash. (A region overlapping two earlier corrections of
    different roles takes the first one's.)"""
    for c in earlier:
        if c.slide == slide and _overlap(region, c):
            return c.holdout
    return int(held_out_for_gate(slide, region, every))


def redrawn_roles(corrections: list[Correction], redraw: set[str], every: int) -> dict[str, int]:
    """New roles of the corrections in ``redraw`` (those no run has used) under the rule ``every``,
    taken in arrival order as ``gate_role`` takes them; the others keep theirs. Only changes."""
    by_slide: dict[str, list[Correction]] = {}
    changes = {}
    for c in sorted(corrections, key=lambda c: (c.created_at, c.id)):  # the store's arrival order
        earlier = by_slide.setdefault(c.slide, [])
        if c.id in redraw:
            role = gate_role(c.slide, region_of(c), earlier, every)
            if role != c.holdout:
                changes[c.id] = role
                c = replace(c, holdout=role)
        earlier.append(c)
    return changes


def region_of(c: Correction) -> Region:
    """The region a stored correction covers."""
    return Region(c.x, c.y, c.width, c.height, c.mpp)


def _overlap(region: Region, c: Correction) -> bool:
    """The two level-0 boxes share some area."""
    return (
        region.x < c.x + c.width
        and c.x < region.x + region.width
        and region.y < c.y + c.height
        and c.y < region.y + region.height
    )


def load_mask(root: Path, cid: str) -> np.ndarray:
    """The mask (uint8 0/1) of a stored correction."""
    return (np.asarray(Image.open(root / cid / "mask.png")) > 127).astype(np.uint8)


def load_pair(root: Path, cid: str) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 RGB, mask uint8 0/1) of a stored correction."""
    return np.asarray(Image.open(root / cid / "image.png").convert("RGB")), load_mask(root, cid)


def sweep_orphans(root: Path, is_known: Callable[[str], bool], older_than_s: float = 60.0) -> list[str]:
    """Remove stale temps of correction directories, and move complete ones without a database row (a
    crash before commit, or a store that is not this data directory's) to ``orphans/corrections``.

    Each under its correction's lock, re-checked there: an ingest of the same correction running
    meanwhile (another worker) is never undone.
    """
    removed = []
    if not root.exists():
        return removed
    for d in list(root.iterdir()):
        try:
            if time.time() - d.stat().st_mtime < older_than_s:
                continue
        except FileNotFoundError:  # renamed into place or removed meanwhile
            continue
        cid = d.name.split(".")[1] if d.name.startswith(".") else d.name
        with correction_lock(root.parent, cid):
            if d.exists() and d.name.startswith("."):  # never renamed into place: never acknowledged
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
            elif d.exists() and not is_known(cid):
                quarantine(d, root.parent, "corrections")
                removed.append(d.name)
    return removed
