"""HED stain math in float32 (numpy + skimage's stain matrices): slide "centres" and stain augmentation."""

from __future__ import annotations

import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """``skimage.color.rgb2hed`` in float32 for (..., 3) RGB in [0, 1]."""
    log_adjust = np.float32(np.log(1e-6))
    rgb = np.maximum(rgb, np.float32(1e-6))
    stains = (np.log(rgb) / log_adjust) @ hed_from_rgb.astype(np.float32)
    return np.maximum(stains, 0, out=stains)


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """``skimage.color.hed2rgb`` in float32: (..., 3) HED -> RGB in [0, 1]."""
    log_adjust = np.float32(-np.log(1e-6))
    log_rgb = -(hed * log_adjust) @ rgb_from_hed.astype(np.float32)
    return np.clip(np.exp(log_rgb), 0, 1)


def stain_shift(rgb: np.ndarray, scale: tuple[float, float, float], offset: tuple[float, float, float]) -> np.ndarray:
    """HED shift of float32 RGB in 0..255 (..., 3): ``scale*x + w*offset``, w = stain density in [0, 1].

    The offset is weighted by stain density (w = clip(sum(HED) / 0.05, 0, 1)) so that glass, whose
    HED is ~0, keeps its near-white colour, as the scanner's white balance would. The identity
    shift returns ``rgb`` itself.
    """
    if scale == (1.0, 1.0, 1.0) and offset == (0.0, 0.0, 0.0):
        return rgb
    hed = rgb_to_hed(rgb / np.float32(255))
    w = np.clip(hed.sum(-1, keepdims=True) / np.float32(0.05), 0, 1)
    hed = hed * np.asarray(scale, np.float32) + w * np.asarray(offset, np.float32)
    np.maximum(hed, 0, out=hed)
    return hed_to_rgb(hed) * np.float32(255)
