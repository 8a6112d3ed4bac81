"""Patch banks (images + binary masks) stored as compressed npz, written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_bank(path: Path, images: np.ndarray, masks: np.ndarray) -> None:
    """Write a compressed patch bank atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez_compressed(tmp, images=images, masks=masks)
    tmp.replace(path)


def load_bank(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, 3), masks uint8 (N, H, W))."""
    with np.load(path) as z:
        return z["images"], z["masks"]
