"""Hostile request bodies, shared by the abuse suite (tests/test_abuse.py) and bench/bench_abuse.py."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_header_bomb(side: int = 100_000) -> bytes:
    """A PNG whose header claims ``side`` x ``side`` px (1-bit: a small body of zlib)."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def square_ring(x0: float, y0: float, side: float, vertices: int) -> list:
    """A closed ring of ``vertices`` points around a square (many points on each edge)."""
    t = np.linspace(0, 4, vertices, endpoint=False)
    edge, frac = np.floor(t).astype(int), t - np.floor(t)
    xs = np.choose(edge, [frac, np.ones_like(t), 1 - frac, np.zeros_like(t)]) * side + x0
    ys = np.choose(edge, [np.zeros_like(t), frac, np.ones_like(t), 1 - frac]) * side + y0
    ring = np.stack([xs, ys], 1).round(2).tolist()
    return ring + [ring[0]]


def polygon(ring: list) -> bytes:
    return json.dumps({"type": "Polygon", "coordinates": [ring]}).encode()


def deep(depth: int) -> bytes:
    """GeoJSON nested ``depth`` levels deep."""
    return b'{"type": "Polygon", "coordinates": ' + b"[" * depth + b"]" * depth + b"}"
