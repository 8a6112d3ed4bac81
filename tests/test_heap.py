"""service/heap.py: freed heap pages really go back to the system (what the peak-RSS figures rely on)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service import heap

# In a fresh interpreter, so the heap's layout does not depend on the tests before it.
PROBE = """
import json, os
from service.heap import release_free_heap

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

blocks = [bytearray(b"x" * (100 << 10)) for _ in range(400)]  # 40 MiB from the heap (below the mmap threshold)
keep = blocks[-1]  # pins the top of the heap: glibc cannot give the rest back by itself
del blocks
before = resident_mib()
trimmed = release_free_heap()
print(json.dumps({"before": before, "after": resident_mib(), "trimmed": trimmed, "kept": len(keep)}))
"""


@pytest.mark.skipif(heap._malloc_trim() is None, reason="no glibc malloc_trim here (musl, macOS)")
def test_freed_heap_below_a_live_block_is_returned():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=root, check=True)
    got = json.loads(out.stdout)
    assert got["trimmed"] and got["kept"] == 100 << 10
    assert got["before"] - got["after"] > 25, got
