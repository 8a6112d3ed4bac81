"""A DICOM Segmentation (highdicom) of a job's tumour mask, referencing the source DICOM series.

The SEG is drawn on one level of the source pyramid: the finest whose µm/px is at least the job's
and whose pixel matrix has at most MAX_SEG_PIXELS (a binary SEG holds its whole matrix in memory
while it is built), so its geometry is that level's and any viewer overlays it on the slide.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import Unprocessable
from service.wsi.dicom import DicomSeries
from service.wsi.slide import RegionReader, open_slide

MAX_SEG_PIXELS = 64 * 2**20
SERIES_NUMBER = 900


class SegUnavailable(Unprocessable):
    def __init__(self, message: str):
        super().__init__("dicom_seg_unavailable", message)


@dataclass(frozen=True)
class SourceLevel:
    dataset: object  # pydicom Dataset (header only)
    rows: int
    cols: int
    mpp: float


def source_levels(series: DicomSeries) -> list[SourceLevel]:
    """The series' pyramid levels (one header per level, finest first)."""
    import pydicom

    levels: dict[tuple[int, int], SourceLevel] = {}
    for path in series.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "VOLUME" not in (ds.get("ImageType") or []) or "TotalPixelMatrixColumns" not in ds:
            continue  # labels, overviews, thumbnails: not pyramid levels
        try:
            spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        except (AttributeError, IndexError):
            continue
        key = (int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns))
        levels.setdefault(key, SourceLevel(ds, key[0], key[1], float(spacing[1]) * 1000.0))
    return sorted(levels.values(), key=lambda level: level.mpp)


def choose_seg_level(levels: list[SourceLevel], job_mpp: float) -> SourceLevel:
    usable = [lv for lv in levels if lv.rows * lv.cols <= MAX_SEG_PIXELS]
    if not usable:
        raise SegUnavailable(f"every level of the source is over {MAX_SEG_PIXELS} pixels; no SEG written")
    at_least = [lv for lv in usable if lv.mpp >= job_mpp * 0.999]
    return at_least[0] if at_least else usable[-1]


def tumour_segmentation(series: DicomSeries, mask_tif: Path, job_mpp: float, model_version: str, job_id: str):
    """The SEG dataset of the job's mask (mask.tif, 0/255 at ``job_mpp``) on the chosen source level."""
    import highdicom as hd
    from highdicom.seg import SegmentAlgorithmTypeValues, Segmentation, SegmentationTypeValues, SegmentDescription

    levels = source_levels(series)
    if not levels:
        raise SegUnavailable("the source series has no pyramid level with pixel spacing; no SEG written")
    level = choose_seg_level(levels, job_mpp)
    if "FrameOfReferenceUID" not in level.dataset:
        raise SegUnavailable("the source series has no FrameOfReferenceUID; a tiled SEG needs one")
    with open_slide(mask_tif) as mask_slide:  # level 0 of mask.tif is at the job's µm/px
        mask = RegionReader(mask_slide, level.mpp).read(0, 0, level.rows, level.cols)[..., 0] > 127
    description = SegmentDescription(
        segment_number=1,
        segment_label="tumour",
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure"),
        segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="UGA Serve ensemble",
            version=model_version,
            family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"),
        ),
    )
    seg = Segmentation(
        source_images=[level.dataset],
        pixel_array=mask[None],
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="UGA Serve",
        manufacturer_model_name="uga-serve",
        software_versions=model_version,
        device_serial_number=job_id[:16],
        series_description=f"Tumour segmentation, model {model_version}",
        tile_pixel_array=True,
        omit_empty_frames=True,
    )
    seg.PatientOrientation = ""  # Type 2C in General Image: present, empty, for a slide-based image
    return seg


def seg_mask(path: Path) -> np.ndarray:
    """The tumour mask a SEG file holds, as its total pixel matrix (for checks and tests)."""
    import highdicom as hd

    return hd.seg.segread(path).get_total_pixel_matrix(combine_segments=True) > 0
