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
