"""Tissue detection at low resolution: a boolean mask over the whole slide."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import filters, morphology

from service.wsi.slide import RegionReader, Slide, analysis_shape

TISSUE_MASK_MPP = 8.0  # µm/px of the low-resolution tissue mask
# Pixels of the mask at most (4096^2, i.e. 33 x 33 mm at 8 µm/px: more than any scanned area). A slide
# claiming larger dimensions gets its mask at a coarser µm/px, so the mask stays small whatever the file says.
MAX_MASK_PIXELS = 1 << 24


@dataclass
class TissueMask:
    """Boolean tissue mask at ``mpp`` (coarse), covering the whole slide."""

    mask: np.ndarray
    mpp: float

    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def crop(self, y: int, x: int, h: int, w: int, mpp: float) -> np.ndarray:
        """Nearest-neighbour tissue mask for analysis region [y, y+h) x [x, x+w) at ``mpp``."""
        f = mpp / self.mpp
        ys = np.minimum(((np.arange(y, y + h) + 0.5) * f).astype(np.int64), self.mask.shape[0] - 1)
        xs = np.minimum(((np.arange(x, x + w) + 0.5) * f).astype(np.int64), self.mask.shape[1] - 1)
        out = self.mask[np.ix_(ys, xs)]
        out[(np.arange(y, y + h) * f) >= self.mask.shape[0]] = False
        out[:, (np.arange(x, x + w) * f) >= self.mask.shape[1]] = False
        return out


def tissue_from_rgb(rgb: np.ndarray, min_saturation: int = 20) -> np.ndarray:
    """Tissue = coloured and not bright glass: Otsu on (max-min) chroma, then clean-up morphology.

    Same result as skimage's threshold_otsu, remove_small_objects and remove_small_holes on the whole
    image, but every whole-image temporary stays at 1-4 bytes per pixel (their int64 copies are made
    band by band), so a 4096² mask costs tens of MiB, not a hundred.
    """
    rgb = np.asarray(rgb)
    chroma = np.ptp(rgb, axis=2)  # uint8: max >= min, so no overflow
    counts = np.zeros(256, np.int64)
    for rows in _row_bands(chroma.shape[0]):
        counts += np.bincount(chroma[rows].ravel(), minlength=256)
    present = np.flatnonzero(counts)
    if present.size == 0 or present[-1] <= min_saturation:
        return np.zeros(chroma.shape, bool)
    otsu = present[0] if present.size == 1 else filters.threshold_otsu(hist=counts)
    mask = chroma > max(min_saturation, float(otsu))
    del chroma
    mask &= rgb.sum(axis=2, dtype=np.uint16) < 3 * 235  # mean < 235, without a float copy
    mask = ndimage.binary_closing(mask, morphology.disk(2))
    _drop_small_components(mask, max_size=8)  # specks
    holes = np.logical_not(mask, out=mask)
    _drop_small_components(holes, max_size=64)  # pin holes
    return np.logical_not(holes, out=holes)


def _row_bands(height: int, band: int = 256) -> Iterator[slice]:
    return (slice(y, y + band) for y in range(0, height, band))


def _drop_small_components(mask: np.ndarray, max_size: int) -> None:
    """Clear, in place, the 4-connected components of ``mask`` with at most ``max_size`` pixels."""
    labels = np.empty(mask.shape, np.int32)
    n = ndimage.label(mask, output=labels)
    if n == 0:
        return
    sizes = np.zeros(n + 1, np.int64)
    for rows in _row_bands(mask.shape[0]):
        sizes += np.bincount(labels[rows].ravel(), minlength=n + 1)
    small = sizes <= max_size
    small[0] = False  # background
    for rows in _row_bands(mask.shape[0]):
        mask[rows][small[labels[rows]]] = False


def tissue_mask(slide: Slide, mpp: float = TISSUE_MASK_MPP) -> TissueMask:
    """Low-resolution tissue mask read through the pyramid, or in bounded blocks where the slide has no
    level near ``mpp`` (RegionReader); at most MAX_MASK_PIXELS, coarser than ``mpp`` if need be."""
    h, w = analysis_shape(slide, mpp)
    if h * w > MAX_MASK_PIXELS:
        mpp *= math.sqrt(h * w / MAX_MASK_PIXELS)
        h, w = analysis_shape(slide, mpp)
        while h * w > MAX_MASK_PIXELS and h * w > 1:  # each side rounds
            mpp *= 1.01
            h, w = analysis_shape(slide, mpp)
    reader = RegionReader(slide, mpp)
    rgb = reader.read(0, 0, h, w)
    return TissueMask(tissue_from_rgb(rgb), mpp)
