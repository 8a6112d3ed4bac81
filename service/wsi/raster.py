"""Disk-backed uint8 rasters: write blocks with pwrite, read row bands, no mmap (bounded RSS)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class RasterFile:
    """A raw row-major uint8 raster of shape (height, width, channels) stored in one file.

    Blocks are written with ``os.pwrite`` and read back with ``os.pread`` so that a raster
    much larger than memory never becomes resident in this process.
    """

    def __init__(self, path: Path, height: int, width: int, channels: int = 1, *, create: bool = False):
        self.path = Path(path)
        self.height, self.width, self.channels = int(height), int(width), int(channels)
        self.row_bytes = self.width * self.channels
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        self._fd = os.open(self.path, flags, 0o644)
        if create:
            os.ftruncate(self._fd, self.row_bytes * self.height)  # sparse: reads as zeros

    @property
    def shape(self) -> tuple[int, ...]:
        if self.channels == 1:
            return (self.height, self.width)
        return (self.height, self.width, self.channels)

    def write_block(self, y: int, x: int, block: np.ndarray) -> None:
        """Write ``block`` (h, w[, c], uint8) with its top-left corner at (y, x)."""
        block = np.ascontiguousarray(block, dtype=np.uint8)
        h, w = block.shape[:2]
        if y < 0 or x < 0 or y + h > self.height or x + w > self.width:
            raise ValueError(f"block {h}x{w} at ({y},{x}) outside raster {self.height}x{self.width}")
        rows = block.reshape(h, w * self.channels)
        if x == 0 and w == self.width:
            os.pwrite(self._fd, rows.tobytes(), y * self.row_bytes)
            return
        for i in range(h):
            os.pwrite(self._fd, rows[i].tobytes(), (y + i) * self.row_bytes + x * self.channels)

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) as an array of shape (y1-y0, width[, channels])."""
        y0, y1 = max(0, y0), min(self.height, y1)
        n = (y1 - y0) * self.row_bytes
        buf = bytearray(n)
        view = memoryview(buf)
        done = 0
        while done < n:
            got = os.preadv(self._fd, [view[done:]], y0 * self.row_bytes + done)
            if got <= 0:
                raise OSError(f"short read from {self.path}")
            done += got
        arr = np.frombuffer(buf, dtype=np.uint8)
        return arr.reshape((y1 - y0, self.width) + ((self.channels,) if self.channels > 1 else ()))

    def iter_bands(self, band: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (y0, rows) for consecutive bands of ``band`` rows."""
        for y0 in range(0, self.height, band):
            yield y0, self.read_rows(y0, y0 + band)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RasterFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - safety net
        with contextlib.suppress(Exception):
            self.close()


class UpsampledRaster:
    """A read-only view of a coarse single-channel ``RasterFile`` at ``factor`` times its resolution
    (each coarse pixel repeated factor x factor), cropped to (height, width): a per-cell map read
    exactly like a per-pixel one, while only the cells are stored."""

    channels = 1

    def __init__(self, coarse: RasterFile, factor: int, height: int, width: int):
        if coarse.channels != 1 or coarse.height * factor < height or coarse.width * factor < width:
            raise ValueError("the coarse raster must be single-channel and cover (height, width) at factor")
        self.coarse, self.factor, self.height, self.width = coarse, int(factor), int(height), int(width)
        self.path = coarse.path

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) at full resolution, shape (y1-y0, width)."""
        y0, y1 = max(0, y0), min(self.height, y1)
        f = self.factor
        c0 = y0 // f
        cells = self.coarse.read_rows(c0, -(-y1 // f))
        rows = np.repeat(cells, f, axis=0)[y0 - c0 * f : y1 - c0 * f]
        return np.repeat(rows, f, axis=1)[:, : self.width]

    iter_bands = RasterFile.iter_bands  # the same bands of ``read_rows``

    def close(self) -> None:
        self.coarse.close()
