"""The heap trim the engine runs after its load really hands freed heap pages back."""

import ctypes.util

import numpy as np
import pytest

from qinyu_edge.device.telemetry import rss_bytes as rss
from qinyu_edge.runtime.heap import trim_heap


def test_freed_heap_is_handed_back():
    if not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim"):
        pytest.skip("not glibc: no malloc_trim")
    # 125 MiB in 64 KiB blocks (below malloc's mmap threshold, so on the heap), then a block above
    # them keeps the heap from shrinking by itself when they are freed, as a loaded session does.
    blocks = [np.ones(64 * 1024 // 8) for _ in range(2000)]
    pin = np.ones(8 * 1024)
    del blocks
    held = rss()
    assert trim_heap()
    assert held - rss() > 100 * 2**20
    assert pin.sum() == 8 * 1024
