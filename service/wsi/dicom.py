"""DICOM whole-slide images: a series is one slide, read with wsidicom behind OpenSlide's interface.

wsidicom reads what the DICOM standard allows and OpenSlide refuses (concatenated instances, sparse
tiling). ``DicomHandle`` offers the subset of ``openslide.OpenSlide`` the slide code uses
(dimensions, level_dimensions, level_downsamples, properties, read_region in level-0 coordinates,
get_best_level_for_downsample, close), so µm/px level choice, bounded reads and deep-zoom tiles
(openslide.deepzoom) are the same code for every format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import openslide
from PIL import Image

DICM_MAGIC_OFFSET = 128
MAX_SERIES_FILES = 10_000  # a folder with more files than this is not one slide's series
IDENTIFIERS = ("StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber", "StudyID", "ContainerIdentifier")


class DicomSeriesError(ValueError):
    """The path is DICOM but not one usable whole-slide series (the caller turns it into a SlideError)."""


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM Part 10 file (the 'DICM' preamble)."""
    try:
        with open(path, "rb") as f:
            f.seek(DICM_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom(path: Path) -> bool:
    """A DICOM file, or a folder holding DICOM files (checked on its first file)."""
    if path.is_dir():
        return any(is_dicom_file(p) for p in sorted(path.iterdir())[:20] if p.is_file())
    return is_dicom_file(path)


@dataclass(frozen=True)
class DicomSeries:
    """The instances of one series, the folder holding them, and the identifiers outputs carry."""

    uid: str
    folder: Path
    files: tuple[Path, ...]
    identifiers: dict[str, str] = field(default_factory=dict)


def find_series(path: Path) -> DicomSeries:
    """The one series at ``path`` (a folder of it, or any of its instances). A folder must hold one series."""
    import pydicom

    folder = path if path.is_dir() else path.parent
    candidates = sorted(p for p in folder.iterdir() if p.is_file())
    if len(candidates) > MAX_SERIES_FILES:
        raise DicomSeriesError(
            f"{folder.name} holds {len(candidates)} files; a slide's series is at most {MAX_SERIES_FILES}"
        )
    by_series: dict[str, list[tuple[Path, object]]] = {}
    for candidate in candidates:
        if not is_dicom_file(candidate):
            continue
        try:
            header = pydicom.dcmread(candidate, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a damaged header
            raise DicomSeriesError(f"{candidate.name} is not readable DICOM: {exc}") from None
        by_series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((candidate, header))
    if not by_series:
        raise DicomSeriesError(f"no DICOM instances in {folder.name}")
    if len(by_series) > 1:
        raise DicomSeriesError(
            f"{folder.name} holds {len(by_series)} DICOM series; put each slide's series in a folder of its own"
        )
    [(uid, members)] = by_series.items()
    if not uid:
        raise DicomSeriesError(f"the DICOM instances in {folder.name} have no SeriesInstanceUID")
    header = members[0][1]
    identifiers = {k: str(header.get(k)) for k in IDENTIFIERS if header.get(k) not in (None, "")}
    return DicomSeries(uid, folder, tuple(p for p, _ in members), identifiers)


class DicomHandle:
    """What the slide code needs of ``openslide.OpenSlide``, over a wsidicom series."""

    def __init__(self, series: DicomSeries):
        from wsidicom import WsiDicom

        try:
            self.wsi = WsiDicom.open(list(series.files))
        except Exception as exc:  # noqa: BLE001 - wsidicom's own errors, pydicom's, OSError
            raise DicomSeriesError(f"not a readable DICOM whole-slide series: {exc}") from None
        self.series = series
        base = self.wsi.levels[0]
        self.dimensions = (base.size.width, base.size.height)
        self.level_downsamples = tuple(base.size.width / level.size.width for level in self.wsi.levels)
        self.level_dimensions = tuple((level.size.width, level.size.height) for level in self.wsi.levels)
        self.level_count = len(self.level_dimensions)
        mpp = base.mpp
        self.properties = {
            openslide.PROPERTY_NAME_VENDOR: "dicom",
            openslide.PROPERTY_NAME_MPP_X: str(mpp.width) if mpp else "",
            openslide.PROPERTY_NAME_MPP_Y: str(mpp.height) if mpp else "",
            **{f"dicom.{k}": v for k, v in series.identifiers.items()},
        }

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The level with the largest downsample not above ``downsample`` (as OpenSlide chooses)."""
        fitting = [i for i, ds in enumerate(self.level_downsamples) if ds <= downsample * 1.0001]
        return max(fitting, key=lambda i: self.level_downsamples[i]) if fitting else 0

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA of ``size`` at level ``level`` whose top-left is ``location`` in level-0 pixels (as OpenSlide)."""
        ds = self.level_downsamples[level]
        chosen = self.wsi.levels[level]  # wsidicom names levels by log2 downsample, not by index
        lw, lh = chosen.size.width, chosen.size.height
        x, y = round(location[0] / ds), round(location[1] / ds)
        w, h = size
        out = Image.new("RGBA", (w, h), (0, 0, 0, 0))  # outside the image: transparent, as OpenSlide
        x0, y0, x1, y1 = max(0, x), max(0, y), min(lw, x + w), min(lh, y + h)
        if x1 > x0 and y1 > y0:
            try:
                region = self.wsi.read_region((x0, y0), chosen.level, (x1 - x0, y1 - y0))
            except Exception as exc:  # noqa: BLE001 - a damaged frame: the caller reports the slide
                raise openslide.OpenSlideError(f"DICOM frame read failed: {exc}") from None
            out.paste(region.convert("RGBA"), (x0 - x, y0 - y))
        return out

    def close(self) -> None:
        self.wsi.close()
