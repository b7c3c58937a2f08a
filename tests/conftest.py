import os
import re
import tempfile

import pytest

# Presets and bundles are cached per test session, never in the user's home.
os.environ.setdefault("QINYU_EDGE_CACHE", tempfile.mkdtemp(prefix="qinyu-edge-test-cache-"))


@pytest.fixture(scope="session", params=["tiny-8b", "tiny-4b"])
def preset_bundle(request):
    """(preset name, bundle folder) for both tiny presets, exported once per test run (xdist-safe)."""
    from qinyu_edge.export.bundle_export import preset_bundle as ensure

    return request.param, ensure(request.param)


@pytest.fixture
def flip_byte():
    """Damage a file in place: invert the byte at `offset` (a copy gone bad on disk or in transit)."""

    def flip(path, offset: int = 100) -> None:
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))

    return flip


@pytest.fixture
def assert_peak_line():
    """`export` and `quantize` end with their time and peak memory: at least what this process holds now."""

    def check(printed: str, what: str) -> None:
        m = re.search(rf"{what} took \d+ s; peak memory ([0-9.]+) GB", " ".join(printed.split()))
        assert m, printed[-500:]
        from qinyu_edge.device.telemetry import rss_bytes

        assert (float(m.group(1)) + 0.005) * 1e9 >= rss_bytes()  # printed to 0.01 GB

    return check
