"""service/heap.py: freed heap pages really go back to the system (what the peak-RSS figures rely on)."""

from __future__ import annotations

import os
import sys

import pytest

from service.heap import release_free_heap


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_below_a_live_block_is_returned():
    blocks = [bytearray(b"x" * (100 << 10)) for _ in range(400)]  # 40 MiB from the heap (below the mmap threshold)
    keep = blocks[-1]  # pins the top of the heap: glibc cannot give the rest back by itself
    del blocks
    before = _resident_mib()
    assert release_free_heap()
    after = _resident_mib()
    assert before - after > 25, (before, after)
    assert len(keep) == 100 << 10
