"""Hand the C heap's free pages back to the system after a large load.

Loading parses each graph's protobuf on the heap (a real-width encoder or XY decoder is about a GB
inline) and frees it once ONNX Runtime holds the weights; glibc's malloc keeps much of that freed
memory mapped (0-0.7 GB after loading the real-width 4B, run to run), which a Jetson's shared
memory cannot spare. `malloc_trim(0)` returns it.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def trim_heap() -> bool:
    """Return the heap's free pages to the system; False where the C library has no malloc_trim (not glibc)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True
