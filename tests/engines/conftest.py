import pytest
from engine_fixtures import write_bundle


@pytest.fixture
def mini_bundle(tmp_path):
    """A bundle with the export's signatures and placeholder graphs (see engine_fixtures)."""
    return write_bundle(tmp_path / "bundle")
