"""Give freed heap memory back to the operating system between the phases of a job."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``); True where it could.

    glibc raises its mmap threshold after large arrays are freed, so later ones of up to 32 MiB come
    from the heap, and after a phase their freed pages stay resident: a job's peak becomes the sum of
    its phases' leftovers rather than its largest phase. A trim takes milliseconds.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
