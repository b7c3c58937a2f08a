import os
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
