"""Tissue detection at low resolution: a boolean mask over the whole slide."""

from __future__ import annotations

import math
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
    """Tissue = coloured and not bright glass: Otsu on (max-min) chroma, then clean-up morphology."""
    rgb = np.asarray(rgb)
    chroma = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2).astype(np.int16)
    if chroma.max() <= min_saturation:
        return np.zeros(chroma.shape, bool)
    thr = max(min_saturation, float(filters.threshold_otsu(chroma)))
    mask = (chroma > thr) & (rgb.sum(axis=2, dtype=np.uint16) < 3 * 235)  # mean < 235, without a float copy
    mask = ndimage.binary_closing(mask, morphology.disk(2))
    mask = morphology.remove_small_objects(mask, max_size=8)
    return morphology.remove_small_holes(mask, max_size=64)


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
