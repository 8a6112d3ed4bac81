"""Patch banks (images + binary masks, optionally the slide each patch came from) stored as compressed
npz, written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_bank(path: Path, images: np.ndarray, masks: np.ndarray, slides: np.ndarray | None = None) -> None:
    """Write a compressed patch bank atomically (``slides``: an int per patch, for fold splits)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part.npz")
    extra = {"slides": np.asarray(slides, np.int32)} if slides is not None else {}
    np.savez_compressed(tmp, images=images, masks=masks, **extra)
    tmp.replace(path)


def load_bank(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, 3), masks uint8 (N, H, W))."""
    with np.load(path) as z:
        return z["images"], z["masks"]


def load_bank_slides(path: Path) -> np.ndarray | None:
    """The slide index of every patch, or None for a bank saved without it."""
    with np.load(path) as z:
        return z["slides"] if "slides" in z.files else None
