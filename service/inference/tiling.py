"""The tile grid over an analysis image, and which tiles hold tissue."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from service.wsi.tissue import TissueMask


@dataclass(frozen=True)
class TileGrid:
    """Overlapping square tiles (stride = tile - overlap) covering an analysis image of (height, width)."""

    height: int
    width: int
    tile: int
    overlap: int

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def rows(self) -> int:
        return max(1, math.ceil(self.height / self.stride))

    @property
    def cols(self) -> int:
        return max(1, math.ceil(self.width / self.stride))

    def origin(self, r: int, c: int) -> tuple[int, int]:
        return r * self.stride, c * self.stride

    def occupied(self, tissue: TissueMask, mpp: float) -> np.ndarray:
        """(rows, cols) bool: tiles whose core (the stride x stride part no other tile's core covers) has tissue.

        Every pixel lies in exactly one core, and the tile of that core covers it, so skipping tiles whose
        core is glass never leaves tissue unpredicted.
        """
        f = mpp / tissue.mpp
        mh, mw = tissue.mask.shape
        out = np.zeros((self.rows, self.cols), bool)
        for r in range(self.rows):
            y0 = r * self.stride
            my0, my1 = int(y0 * f), min(mh, math.ceil((y0 + self.stride) * f))
            if my0 >= mh:
                continue
            band = tissue.mask[my0:my1]
            for c in range(self.cols):
                x0 = c * self.stride
                mx0, mx1 = int(x0 * f), min(mw, math.ceil((x0 + self.stride) * f))
                out[r, c] = mx0 < mw and bool(band[:, mx0:mx1].any())
        return out
