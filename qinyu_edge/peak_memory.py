"""The line `export` and `quantize` end with: how long the work took and the most memory it held,
so a user learns what a real-size run needs of a machine before planning the next one."""

from __future__ import annotations

import resource
import sys

GB = 1e9


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (what `/usr/bin/time -v` calls maximum resident set size)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB, macOS bytes


def peak_line(what: str, seconds: float) -> str:
    return f"{what} took {seconds:.0f} s; peak memory {peak_rss_bytes() / GB:.2f} GB (resident high-water mark)"
