"""The torch-free designer on the tiny VoiceDesign preset's ONNX graphs: each graph within 1e-4 of
PyTorch, and the whole design (20 guided Euler steps) the PyTorch design's vector."""

import numpy as np
import pytest

from qinyu_edge.export.voice_design import tiny_voice_designer
from qinyu_edge.export.voice_design_onnx import export_voice_design
from qinyu_edge.role_text import RoleTextError
from qinyu_edge.runtime.voice_designer import OnnxVoiceDesigner

ROLE = "该角色是一个「青」年「女」性， 性格「活泼、爱笑」"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    designer = tiny_voice_designer()
    return designer, export_voice_design(designer, tmp_path_factory.mktemp("voice_graphs"))


def test_graph_parity(exported):
    _, graphs = exported
    assert set(graphs.parity) == {"voice_condition.onnx", "voice_estimator.onnx"}
    assert all(rel <= 1e-4 for rel in graphs.parity.values()), graphs.parity


@pytest.mark.parametrize("role, seed", [(ROLE, 0), ("a gentle snack-shop owner with a warm, low voice", 11)])
def test_onnx_design_matches_pytorch(exported, role, seed):
    designer, graphs = exported
    onnx = OnnxVoiceDesigner(graphs.condition.parent)
    ours, ref = onnx.design(role, seed), designer.design(role, seed)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.array_equal(ours, onnx.design(role, seed))
    assert onnx.timings.estimator_calls == 20
    with pytest.raises(RoleTextError):
        onnx.design("", seed)
    onnx.close()
    with pytest.raises(RuntimeError, match="closed"):
        onnx.design(role, seed)
