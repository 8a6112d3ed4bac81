"""Seamless overlap blending of tiles processed in raster order, with memory O(overlap x width).

Tiles of side T overlap by O (stride S = T - O). Each tile's values are weighted by a window that
ramps linearly across the overlaps; the blended value is sum(w * v) / sum(w). Only the strips that
still wait for a neighbour are kept: the bottom O rows of the current tile row (``bottom``) and the
right O columns of the previous tile (``left``). Everything else is handed to ``sink`` as soon as
it is final.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Sink = Callable[[int, int, np.ndarray], None]  # (y, x, values (C, h, w) float32)


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """(T, T) weights: 1 inside, linear ramps over the ``overlap`` margins (never zero)."""
    ramp = np.ones(tile, np.float32)
    if overlap > 0:
        edge = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        ramp[:overlap] = edge
        ramp[tile - overlap :] = edge[::-1]
    return np.outer(ramp, ramp)


class Stitcher:
    """Feed every grid position in raster order with ``add(r, c, values | None)``, then ``finish()``."""

    def __init__(self, height: int, width: int, tile: int, overlap: int, channels: int, sink: Sink):
        if not 0 <= overlap < tile // 2 + 1:
            raise ValueError("overlap must be in [0, tile/2]")
        self.h, self.w, self.t, self.o, self.c = height, width, tile, overlap, channels
        self.s = tile - overlap
        self.sink = sink
        self.window = blend_window(tile, overlap)
        cols = -(-width // self.s)
        self.padded_w = cols * self.s + overlap
        # channel C holds the weight sum
        self.top = np.zeros((channels + 1, overlap, self.padded_w), np.float32)
        self.bottom = np.zeros_like(self.top)
        self.left = np.zeros((channels + 1, self.s, overlap), np.float32)
        self.row, self.col = 0, -1

    def _weighted(self, values: np.ndarray | None) -> np.ndarray | None:
        if values is None:
            return None
        out = np.empty((self.c + 1, self.t, self.t), np.float32)
        np.multiply(values, self.window, out=out[: self.c])
        out[self.c] = self.window
        return out

    def _emit(self, y: int, x: int, acc: np.ndarray) -> None:
        h, w = min(acc.shape[1], self.h - y), min(acc.shape[2], self.w - x)
        if h <= 0 or w <= 0:
            return
        acc = acc[:, :h, :w]
        weight = acc[self.c]
        if not weight.any():
            return  # nothing computed here: the sink's default (zeros) stands
        vals = np.divide(acc[: self.c], weight, out=np.zeros_like(acc[: self.c]), where=weight > 0)
        self.sink(y, x, vals)

    def add(self, r: int, c: int, values: np.ndarray | None) -> None:
        """Tile (r, c) with values (C, T, T) float32, or None for a tile that was not computed."""
        if c == 0 and r > 0:
            self._end_row()
        self.row, self.col = r, c
        s, o, t = self.s, self.o, self.t
        x0 = c * s
        wv = self._weighted(values)
        if wv is not None:
            self.bottom[:, :, x0 : x0 + t] += wv[:, s:t, :]
            region = wv[:, :s, :].copy()
        else:
            region = np.zeros((self.c + 1, s, t), np.float32)
        region[:, :o, :s] += self.top[:, :, x0 : x0 + s]
        region[:, :, :o] += self.left
        self._emit(r * s, x0, region[:, :, :s])
        self.left = region[:, :, s:t].copy()

    def _end_row(self) -> None:
        """Finish the right-most strip of the current row and roll the bottom carry to the top."""
        s, o = self.s, self.o
        x_last = (self.col + 1) * s
        tail = self.left.copy()
        tail[:, :o, :] += self.top[:, :, x_last : x_last + o]
        self._emit(self.row * s, x_last, tail)
        self.top, self.bottom = self.bottom, self.top  # reuse the buffers: two strips, never three
        self.bottom.fill(0)
        self.left.fill(0)

    def finish(self) -> None:
        self._end_row()
        # the last row's bottom carry (now in ``top``) lies at rows [(row+1)*s, +o)
        self._emit((self.row + 1) * self.s, 0, self.top)
