"""Slide access through OpenSlide (DICOM series through wsidicom, service.wsi.dicom): path checks, a
slide's identity, µm/px, pyramid level choice, regions at a target µm/px."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import openslide
from PIL import Image

from service.errors import DomainError, InvalidInput, NotFound, Unprocessable
from service.wsi.dicom import DicomHandle, DicomSeriesError, find_series, is_dicom

MPP_RANGE = (0.05, 100.0)  # plausible level-0 µm/px, from metadata or a caller
GLASS_RGB = (255, 255, 255)
# Level pixels one read_region may fetch (16 Mi px: 64 MiB RGBA). Larger regions (a slide without a
# level near the target µm/px, e.g. a single-level TIFF read whole at 8 µm/px) are read in blocks.
MAX_READ_PIXELS = 1 << 24
_FILTER_SUPPORT = {Image.Resampling.BILINEAR: 1.0, Image.Resampling.BOX: 0.5}  # Pillow's, in source px


class SlideError(Unprocessable):
    """A slide that cannot be used; the message is one line for the user."""

    def __init__(self, message: str, details=None):
        super().__init__("unusable_slide", message, details)


class SlideNotFound(NotFound, SlideError):
    """No slide file at the given path."""

    def __init__(self, message: str):
        DomainError.__init__(self, "slide_not_found", message)


class SlidePathError(InvalidInput):
    """A slide path that is not allowed (absolute, traversal, outside the slide root)."""

    def __init__(self, message: str):
        super().__init__("invalid_slide_path", message)


def resolve_slide_path(root: Path, relative: str) -> Path:
    """``root / relative`` after refusing absolute paths, '..' and symlinks that leave ``root``.

    Raises SlidePathError for a refused path and SlideNotFound when nothing is there.
    """
    if not relative or "\\" in relative or "\x00" in relative:
        raise SlidePathError("slide path must be a non-empty POSIX path relative to the slide root")
    rel = PurePosixPath(relative)
    if rel.is_absolute() or relative.startswith("~"):
        raise SlidePathError(f"slide path {relative!r} is absolute; give it relative to the slide root")
    if ".." in rel.parts:
        raise SlidePathError(f"slide path {relative!r} contains '..'; paths may not leave the slide root")
    root_resolved = Path(root).resolve()
    try:
        resolved = (root_resolved / rel).resolve()
        exists = resolved.exists()
    except OSError as exc:  # e.g. a name longer than the filesystem allows
        raise SlidePathError(f"slide path is not usable: {exc.strerror or exc}") from None
    if not resolved.is_relative_to(root_resolved):
        raise SlidePathError(f"slide path {relative!r} leads outside the slide root (symlink)")
    if not exists:
        raise SlideNotFound(f"slide not found: {relative}")
    return resolved


@dataclass
class Slide:
    """An open slide with trusted level-0 µm/px."""

    path: Path
    handle: openslide.OpenSlide | DicomHandle
    mpp: float  # level-0 µm/px
    mpp_source: str  # "metadata" or "caller"

    @property
    def identifiers(self) -> dict[str, str]:
        """The source's DICOM identifiers (Study/Series UIDs, accession number), empty for other formats."""
        return dict(self.handle.series.identifiers) if isinstance(self.handle, DicomHandle) else {}

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.handle.dimensions

    @property
    def vendor(self) -> str:
        return self.handle.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def analysis_window(self, x: float, y: float, width: float, height: float, mpp: float) -> tuple[int, int, int, int]:
        """(row, col, rows, cols) at ``mpp`` of the level-0 box (x, y, width, height)."""
        return box_window(x, y, width, height, self.mpp / mpp)

    def read_box(self, x: float, y: float, width: float, height: float, mpp: float) -> np.ndarray:
        """RGB uint8 of the level-0 box (x, y, width, height), resampled to ``mpp``."""
        return RegionReader(self, mpp).read(*self.analysis_window(x, y, width, height, mpp))


def box_window(x: float, y: float, width: float, height: float, scale: float) -> tuple[int, int, int, int]:
    """(row, col, rows, cols) of a box scaled by ``scale`` (level-0 µm/px over target µm/px)."""
    return round(y * scale), round(x * scale), max(1, round(height * scale)), max(1, round(width * scale))


def open_slide(path: str | Path, slide_mpp: float | None = None) -> Slide:
    """Open ``path`` with OpenSlide; refuse it (SlideError) if it is missing, unreadable or lacks µm/px."""
    path = Path(path)
    if not path.exists():
        raise SlideNotFound(f"slide not found: {path.name}")
    if not path.is_dir() and not path.is_file():  # a pipe would block the first read forever
        raise SlideError(f"{path.name} is not a regular file (a pipe or a device); give the slide file itself")
    if is_dicom(path):
        return _open_dicom(path, slide_mpp)
    if path.is_dir():
        raise SlideError(f"{path.name} is a directory without DICOM instances; give the slide file itself")
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(
            f"{path.name} is not a slide format OpenSlide reads (SVS, TIFF, NDPI, MRXS, DICOM, ...)"
        ) from None
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideError(f"cannot read slide {path.name}: {exc}") from None
    try:
        return Slide(path, handle, *_level0_mpp(path.name, handle.properties, slide_mpp))
    except SlideError:
        handle.close()
        raise


def _open_dicom(path: Path, slide_mpp: float | None) -> Slide:
    """A DICOM series (its folder, or any of its instances) through wsidicom; the Slide's path is the folder."""
    try:
        series = find_series(path)
        handle = DicomHandle(series)
    except DicomSeriesError as exc:
        raise SlideError(f"{path.name}: {exc}") from None
    try:
        return Slide(series.folder, handle, *_level0_mpp(series.folder.name, handle.properties, slide_mpp))
    except SlideError:
        handle.close()
        raise


def canonical_slide(path: Path) -> Path:
    """The path that names this slide: a DICOM series by its folder, whichever instance was given."""
    if path.is_file() and is_dicom(path):
        try:
            return find_series(path).folder
        except DicomSeriesError as exc:
            raise SlideError(f"{path.name}: {exc}") from None
    return path


def slide_fingerprint(path: Path) -> dict:
    """What makes two submissions the same slide: a DICOM series' SeriesInstanceUID (however it is
    named), otherwise the file's size and modification time."""
    if is_dicom(path):
        try:
            return {"series_instance_uid": find_series(path).uid}
        except DicomSeriesError as exc:
            raise SlideError(f"{path.name}: {exc}") from None
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _level0_mpp(name: str, props, slide_mpp: float | None) -> tuple[float, str]:
    """(level-0 µm/px, where it came from). The slide's own metadata wins: a caller's ``slide_mpp`` is
    for slides without it, and is refused when it contradicts the metadata by more than 10 %."""
    if slide_mpp is not None and not (math.isfinite(slide_mpp) and MPP_RANGE[0] <= slide_mpp <= MPP_RANGE[1]):
        raise SlideError(f"--slide-mpp {slide_mpp} is not a plausible µm/px (0.05..100)")
    try:
        mpp_x = float(props[openslide.PROPERTY_NAME_MPP_X])
        mpp_y = float(props.get(openslide.PROPERTY_NAME_MPP_Y, mpp_x))
    except (KeyError, ValueError):
        if slide_mpp is not None:
            return float(slide_mpp), "caller"
        raise SlideError(
            f"{name} has no µm/px metadata; pass the scanner's level-0 µm/px "
            "(--slide-mpp 0.25 on the command line, options.slide_mpp over HTTP)"
        ) from None
    plausible = math.isfinite(mpp_x) and MPP_RANGE[0] <= mpp_x <= MPP_RANGE[1] and abs(mpp_x - mpp_y) <= 0.02 * mpp_x
    if slide_mpp is not None:
        if plausible and abs(slide_mpp - mpp_x) > 0.1 * mpp_x:
            raise SlideError(
                f"{name} states {mpp_x:g} µm/px in its metadata; slide_mpp ({slide_mpp:g}) is only for slides "
                "without it: leave it out"
            )
        return float(slide_mpp), "caller"
    if not plausible:
        raise SlideError(
            f"{name} has unusable µm/px metadata (x={mpp_x}, y={mpp_y}); pass --slide-mpp (options.slide_mpp over HTTP)"
        )
    return mpp_x, "metadata"


def choose_level(downsamples: list[float] | tuple[float, ...], level0_mpp: float, target_mpp: float) -> int:
    """The coarsest pyramid level that is still at least as fine as ``target_mpp`` (level 0 if none)."""
    best = 0
    for level, ds in enumerate(downsamples):
        if level0_mpp * ds <= target_mpp * 1.001 and ds > downsamples[best]:
            best = level
    return best


def analysis_shape(slide: Slide, mpp: float) -> tuple[int, int]:
    """(height, width) of the slide resampled to ``mpp``."""
    w0, h0 = slide.dimensions
    f = slide.mpp / mpp
    return max(1, round(h0 * f)), max(1, round(w0 * f))


class RegionReader:
    """Reads RGB regions in analysis-pixel coordinates at a target µm/px from the best level."""

    def __init__(self, slide: Slide, mpp: float):
        self.slide, self.mpp = slide, mpp
        downs = slide.handle.level_downsamples
        self.level = choose_level(downs, slide.mpp, mpp)
        self.level_ds = downs[self.level]
        self.to_level0 = mpp / slide.mpp  # analysis px -> level-0 px
        self.to_level = self.to_level0 / self.level_ds  # analysis px -> chosen-level px

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of analysis region [y, y+h) x [x, x+w).

        Parts outside the slide are mirrored from the inside, so a tile at the border does not see an
        artificial white edge.
        """
        full_h, full_w = self.shape
        vh, vw = max(0, min(h, full_h - y)), max(0, min(w, full_w - x))
        if 0 < vh < h or 0 < vw < w:
            inside = self._read(y, x, vh, vw)
            return np.pad(inside, ((0, h - vh), (0, w - vw), (0, 0)), mode="symmetric")
        return self._read(y, x, h, w)

    @property
    def shape(self) -> tuple[int, int]:
        return analysis_shape(self.slide, self.mpp)

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        f = self.to_level
        lx0, ly0 = math.floor(x * f), math.floor(y * f)
        lx1, ly1 = math.ceil((x + w) * f), math.ceil((y + h) * f)
        lw, lh = max(1, lx1 - lx0), max(1, ly1 - ly0)
        if lw * lh > MAX_READ_PIXELS:
            return self._read_chunked(y, x, h, w, lx0, ly0, lw, lh)
        rgb, _rgba = self._level_rgb(lx0, ly0, lw, lh)
        if (lw, lh) != (w, h) or abs(f - 1.0) > 1e-9:
            box = (x * f - lx0, y * f - ly0, (x + w) * f - lx0, (y + h) * f - ly0)
            rgb = rgb.resize((w, h), Image.Resampling.BILINEAR if f >= 1 else Image.Resampling.BOX, box=box)
        return np.asarray(rgb)

    def _level_rgb(self, lx: int, ly: int, lw: int, lh: int) -> tuple[Image.Image, Image.Image]:
        """RGB of the chosen level's pixels [ly, ly+lh) x [lx, lx+lw), transparency composited on glass,
        and the RGBA it came from (the caller holds it until it is done: freeing that buffer before the
        resize makes the resize fault in fresh pages, ~5% of a whole-slide read)."""
        loc = (int(round(lx * self.level_ds)), int(round(ly * self.level_ds)))
        try:
            rgba = self.slide.handle.read_region(loc, self.level, (lw, lh))
        except openslide.OpenSlideError as exc:  # the file changed or broke after it was opened
            raise SlideError(f"cannot read {self.slide.path.name}: {exc}") from None
        rgb = Image.new("RGB", rgba.size, GLASS_RGB)
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb, rgba

    def _read_chunked(self, y: int, x: int, h: int, w: int, lx0: int, ly0: int, lw: int, lh: int) -> np.ndarray:
        """What ``_read`` returns, from level reads of at most about MAX_READ_PIXELS each.

        The output is cut into blocks: bands of whole output rows, split into columns only when one row
        band of the full width is already over the budget. Each block reads the level pixels under its
        output pixels' resampling filter (clipped to the one-shot region, as Pillow clips it there) and is
        resized with the same filter and the one-shot's source box translated into the block. Row bands
        match the one-shot read within ±1 (Pillow's fixed-point rounding of coefficients computed from
        translated positions); column-split blocks round in both passes, rarely ±2. Upsampling (BOX,
        nearest-like) can differ where an output pixel centre falls exactly on a source pixel edge.
        Memory: the output plus one block. A ratio so extreme that one output pixel's filter alone covers
        more than the budget is refused (SlideError) instead of read.
        """
        f = self.to_level
        resize = (lw, lh) != (w, h) or abs(f - 1.0) > 1e-9
        resample = Image.Resampling.BILINEAR if f >= 1 else Image.Resampling.BOX
        # the one-shot resize box, in one-shot region coordinates, and Pillow's scale along each axis
        bx0, by0, bx1, by1 = x * f - lx0, y * f - ly0, (x + w) * f - lx0, (y + h) * f - ly0
        sx, sy = ((bx1 - bx0) / w, (by1 - by0) / h) if resize else (1.0, 1.0)
        # how far (in level px) Pillow's filter reaches from an output pixel centre
        reach = (_FILTER_SUPPORT[resample] * max(sx, sy, 1.0)) if resize else 0.0

        def src_span(n: int, scale: float, full: int) -> int:  # level px under n output px, at most
            return min(full, math.ceil(n * scale + 2 * reach) + 4)

        budget = MAX_READ_PIXELS
        if src_span(1, sx, lw) * src_span(1, sy, lh) > budget:
            raise SlideError(
                f"cannot read {self.slide.path.name} at {self.mpp:g} µm/px: one pixel would cover "
                f"{f:.0f}x{f:.0f} pixels of its nearest level (level {self.level}); the slide has no level "
                "close enough to that resolution"
            )
        if src_span(1, sy, lh) * src_span(w, sx, lw) <= budget:
            cols = w
        else:
            side = math.isqrt(budget)
            cols = max(1, min(w, math.floor((side - 2 * reach - 4) / sx)))
        block_w = src_span(cols, sx, lw)
        rows = max(1, min(h, math.floor((budget / block_w - 2 * reach - 4) / sy)))

        def src_range(a: int, b: int, b0: float, scale: float, full: int) -> tuple[int, int]:
            """Level px (region coordinates) that output px [a, b) read, as Pillow bounds them, +1 slack."""
            if not resize:
                return a, b
            lo = int(b0 + (a + 0.5) * scale - reach + 0.5) - 1
            hi = int(b0 + (b - 0.5) * scale + reach + 0.5) + 1
            return max(0, lo), min(full, hi)

        def edge(i: int, n: int, b0: float, b1: float, scale: float) -> float:
            """Source position of output edge i; the one-shot's own box values at the two ends."""
            return b0 if i == 0 else b1 if i == n else b0 + i * scale

        out = np.empty((h, w, 3), np.uint8)
        for oy0 in range(0, h, rows):
            oy1 = min(h, oy0 + rows)
            ry0, ry1 = src_range(oy0, oy1, by0, sy, lh)
            for ox0 in range(0, w, cols):
                ox1 = min(w, ox0 + cols)
                rx0, rx1 = src_range(ox0, ox1, bx0, sx, lw)
                block, _rgba = self._level_rgb(lx0 + rx0, ly0 + ry0, rx1 - rx0, ry1 - ry0)
                if resize:
                    box = (
                        max(0.0, edge(ox0, w, bx0, bx1, sx) - rx0),
                        max(0.0, edge(oy0, h, by0, by1, sy) - ry0),
                        min(float(rx1 - rx0), edge(ox1, w, bx0, bx1, sx) - rx0),
                        min(float(ry1 - ry0), edge(oy1, h, by0, by1, sy) - ry0),
                    )
                    block = block.resize((ox1 - ox0, oy1 - oy0), resample, box=box)
                out[oy0:oy1, ox0:ox1] = np.asarray(block)
                del block, _rgba  # before the next read, so that only one block is held at a time
        return out
