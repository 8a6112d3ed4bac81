"""Training patches (image + ground-truth mask) sampled from composite slides. No torch here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.wsi.slide import RegionReader, analysis_shape, open_slide
from service.wsi.tissue import tissue_mask


def sample_patches(
    slide_path: Path,
    mask_path: Path,
    n: int,
    *,
    size: int = 256,
    mpp: float = 1.0,
    tumour_share: float = 0.5,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """n patches (n, size, size, 3) uint8 and masks (n, size, size) uint8 {0,1} from tissue.

    About ``tumour_share`` of them are centred on tumour pixels, the rest anywhere on tissue.
    """
    with open_slide(slide_path) as slide, open_slide(mask_path) as mask_slide:
        tissue = tissue_mask(slide)
        truth_low = RegionReader(mask_slide, tissue.mpp).read(0, 0, *tissue.mask.shape)[..., 0] > 127
        h, w = analysis_shape(slide, mpp)
        f = tissue.mpp / mpp
        pools = [np.argwhere(truth_low & tissue.mask), np.argwhere(tissue.mask)]
        images = np.empty((n, size, size, 3), np.uint8)
        masks = np.empty((n, size, size), np.uint8)
        reader, mreader = RegionReader(slide, mpp), RegionReader(mask_slide, mpp)
        for i in range(n):
            pool = pools[0] if (rng.random() < tumour_share and len(pools[0])) else pools[1]
            cy, cx = pool[rng.integers(len(pool))]
            y = int(np.clip((cy + rng.random()) * f - size / 2, 0, max(0, h - size)))
            x = int(np.clip((cx + rng.random()) * f - size / 2, 0, max(0, w - size)))
            images[i] = reader.read(y, x, size, size)
            masks[i] = mreader.read(y, x, size, size)[..., 0] > 127
        return images, masks
