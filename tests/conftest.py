import os
import tempfile

# Presets and bundles are cached per test session, never in the user's home.
os.environ.setdefault("QINYU_EDGE_CACHE", tempfile.mkdtemp(prefix="qinyu-edge-test-cache-"))
