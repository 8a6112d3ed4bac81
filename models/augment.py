"""Generic photometric augmentation for H&E patches (bench/PROTOCOL.md, baseline recipe): HED stain
jitter, gaussian blur, down-and-up sampling, sensor noise, brightness / contrast / gamma and JPEG.

Each transform is drawn independently per image with its probability; two strengths make ensemble
members differ. uint8 RGB in and out; numpy, scipy and Pillow only (no torch), so the same code
augments training, fine-tuning and the replay.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from models.stain import stain_shift


@dataclass(frozen=True)
class Strength:
    """How hard each transform may push (ranges are symmetric around no change unless noted)."""

    name: str
    hed_scale: float  # HED channels scaled by U(1 - x, 1 + x)
    hed_offset: float  # plus U(-x, x) weighted by stain density
    p_blur: float
    blur_sigma: float  # px at the training µm/px, U(0.3, x)
    p_lowres: float
    lowres: float  # down-and-up factor U(1.25, x)
    p_noise: float
    noise_std: float  # 0-255 units, U(0, x)
    brightness: float  # added U(-x, x) * 255
    contrast: float  # about the mean, x U(1 - x, 1 + x)
    gamma: float  # exponent U(1 - x, 1 + x)
    p_jpeg: float
    jpeg_min: int  # quality U(jpeg_min, 95)


STRENGTHS: dict[str, Strength] = {
    s.name: s
    for s in (
        Strength("light", 0.2, 0.01, 0.25, 1.0, 0.15, 1.8, 0.25, 4.0, 0.04, 0.12, 0.12, 0.25, 50),
        Strength("strong", 0.4, 0.03, 0.5, 2.0, 0.35, 3.0, 0.5, 10.0, 0.1, 0.3, 0.35, 0.5, 20),
    )
}


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _lowres(img: np.ndarray, factor: float) -> np.ndarray:
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))


def augment_image(img: np.ndarray, rng: np.random.Generator, s: Strength) -> np.ndarray:
    """One photometric augmentation of a uint8 RGB image (the geometry is left as it is)."""
    x = img.astype(np.float32)
    scale = tuple(rng.uniform(1 - s.hed_scale, 1 + s.hed_scale, 3))
    x = stain_shift(x, scale, tuple(rng.uniform(-1, 1, 3) * s.hed_offset))
    if rng.random() < s.p_blur:
        sigma = rng.uniform(0.3, s.blur_sigma)
        x = ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="reflect")
    x01 = np.clip(x / 255.0, 0, 1)
    x01 = x01 ** rng.uniform(1 - s.gamma, 1 + s.gamma)
    mean = x01.mean()
    x01 = (x01 - mean) * rng.uniform(1 - s.contrast, 1 + s.contrast) + mean + rng.uniform(-1, 1) * s.brightness
    out = np.clip(x01 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < s.p_lowres:
        out = _lowres(out, rng.uniform(1.25, s.lowres))
    if rng.random() < s.p_noise:
        noisy = out + rng.standard_normal(out.shape, dtype=np.float32) * rng.uniform(0, s.noise_std)
        out = np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < s.p_jpeg:
        out = _jpeg(out, int(rng.integers(s.jpeg_min, 96)))
    return out


def augment_batch(images: np.ndarray, rng: np.random.Generator, strength: Strength) -> np.ndarray:
    """Every image of a (N, H, W, 3) uint8 batch augmented independently."""
    return np.stack([augment_image(img, rng, strength) for img in images])
