"""Deep-zoom tiles of a slide (OpenSlide's DeepZoomGenerator), with a bounded cache of encoded tiles.

A slide is opened through ``service.wsi.slide.open_slide`` (OpenSlide, or wsidicom for a DICOM series),
so every format the jobs read can be viewed. Open generators are kept (at most ``max_open``, least
recently used closed first) and keyed by the file's identity, so a replaced file is reopened, never
served stale. Encoded tiles are kept in a byte-bounded LRU cache shared by all slides of the process.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from openslide.deepzoom import DeepZoomGenerator

from service.errors import NotFound, Unprocessable
from service.wsi.dicom import DicomHandle
from service.wsi.slide import MAX_READ_PIXELS, Slide, SlideError, open_slide

TILE_SIZE = 254  # + 1 px overlap each side: 256-px tiles, OpenSlide's recommended deep-zoom layout
OVERLAP = 1
FORMAT = "jpeg"
JPEG_QUALITY = 85


class TileCache:
    """Thread-safe LRU of encoded tiles, bounded by the bytes it holds."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple, data: bytes) -> None:
        """Keep ``data`` unless it alone is over the budget; evict the least recently used to fit it."""
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= len(old)
            self._items[key] = data
            self.used += len(data)
            while self.used > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.used -= len(evicted)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class _Open:
    slide: Slide
    generator: DeepZoomGenerator
    lock: threading.Lock | None  # wsidicom reads are serialised; OpenSlide's are thread-safe
    closed: bool = False

    def close(self) -> None:
        """A DICOM handle is closed under its lock (its files); OpenSlide's closes when unreferenced."""
        if self.lock is not None:
            with self.lock:
                self.closed = True
                self.slide.close()


@dataclass(frozen=True)
class Descriptor:
    """What a viewer needs to lay out a slide's tiles (the DZI descriptor's content, plus µm/px)."""

    width: int
    height: int
    mpp: float
    levels: int
    tile_size: int = TILE_SIZE
    overlap: int = OVERLAP
    format: str = FORMAT

    def dzi(self) -> str:
        """The Deep Zoom Image XML descriptor."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{self.format}" '
            f'Overlap="{self.overlap}" TileSize="{self.tile_size}"><Size Width="{self.width}" '
            f'Height="{self.height}"/></Image>\n'
        )


def file_identity(path: Path) -> tuple:
    """Cheap identity of a slide's files (size and mtime; a folder's: each file's): a changed file is a new key."""
    if path.is_dir():
        with os.scandir(path) as entries:
            stats = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file())
        return tuple(stats)
    stat = path.stat()
    return (stat.st_size, stat.st_mtime_ns)


class DeepZoomSlides:
    """Deep-zoom descriptors and JPEG tiles of slides, for one serving process."""

    def __init__(self, cache_bytes: int, max_open: int, opener: Callable[..., Slide] = open_slide):
        self.cache = TileCache(cache_bytes)
        self.max_open = max_open
        self._opener = opener
        self._open: OrderedDict[tuple, _Open] = OrderedDict()
        self._lock = threading.Lock()

    def _get(self, path: Path, slide_mpp: float | None) -> tuple[tuple, _Open]:
        """The open generator of ``path`` (opened on first use; the least recently used beyond
        ``max_open`` are dropped: their handles close once no read holds them)."""
        key = (str(path), file_identity(path), slide_mpp)
        with self._lock:
            found = self._open.get(key)
            if found is not None:
                self._open.move_to_end(key)
                return key, found
        slide = self._opener(path, slide_mpp)
        generator = DeepZoomGenerator(slide.handle, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False)
        mine = _Open(slide, generator, threading.Lock() if isinstance(slide.handle, DicomHandle) else None)
        with self._lock:
            entry = self._open.setdefault(key, mine)
            self._open.move_to_end(key)
            evicted = [self._open.popitem(last=False)[1] for _ in range(len(self._open) - self.max_open)]
        for old in evicted + ([mine] if entry is not mine else []):  # and ours, if another thread opened it first
            old.close()
        return key, entry

    def descriptor(self, path: Path, slide_mpp: float | None = None) -> Descriptor:
        _, entry = self._get(path, slide_mpp)
        width, height = entry.slide.dimensions
        return Descriptor(width, height, entry.slide.mpp, entry.generator.level_count)

    def tile(self, path: Path, level: int, col: int, row: int, slide_mpp: float | None = None) -> bytes:
        """JPEG bytes of tile (col, row) of deep-zoom ``level``; NotFound outside the pyramid, and a
        tile whose read would exceed MAX_READ_PIXELS (a slide without a level near that zoom) refused."""
        key, entry = self._get(path, slide_mpp)
        generator = entry.generator
        if not 0 <= level < generator.level_count:
            raise NotFound("tile_not_found", f"deep-zoom level {level} does not exist (0..{generator.level_count - 1})")
        cols, rows = generator.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise NotFound("tile_not_found", f"level {level} has {cols}x{rows} tiles; no tile {col}_{row}")
        cached = self.cache.get((key, level, col, row))
        if cached is not None:
            return cached
        _location, _slide_level, (read_w, read_h) = generator.get_tile_coordinates(level, (col, row))
        if read_w * read_h > MAX_READ_PIXELS:
            raise Unprocessable(
                "tile_too_costly",
                f"this zoom level would read {read_w}x{read_h} pixels for one tile: the slide has no pyramid "
                "level near it; zoom in",
                {"level": level, "read": [read_w, read_h], "limit_pixels": MAX_READ_PIXELS},
            )
        try:
            if entry.lock is None:
                image = generator.get_tile(level, (col, row))
            else:
                with entry.lock:
                    if entry.closed:  # evicted meanwhile: read through a fresh handle
                        return self.tile(path, level, col, row, slide_mpp)
                    image = generator.get_tile(level, (col, row))
        except Exception as exc:  # noqa: BLE001 - OpenSlide / wsidicom errors on a file that broke
            raise SlideError(f"cannot read {path.name}: {exc}") from None
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
        data = buf.getvalue()
        self.cache.put((key, level, col, row), data)
        return data
