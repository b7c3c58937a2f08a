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


def test_bundle_designs_at_start_token_identical(tmp_path, caplog):
    """`voice export` puts the graphs in a bundle; the voice they design at chat start drives role-play
    generation to the same tokens as the PyTorch design through the PyTorch reference loop."""
    import logging
    import shutil

    from qinyu_edge.cli import main
    from qinyu_edge.export.bundle_export import preset_bundle
    from qinyu_edge.export.qinyu_checkpoint import load_preset
    from qinyu_edge.export.reference import ReferenceTurn, reference_conversation
    from qinyu_edge.runtime.conversation import Conversation
    from qinyu_edge.runtime.engine import Engine
    from qinyu_edge.runtime.voice_designer import bundle_has_designer, design_for_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(preset_bundle("tiny-4b"), bundle)
    assert design_for_bundle(Engine(bundle).bundle, ROLE) is None  # no graphs: the default voice serves
    assert main(["voice", "export", "--bundle", str(bundle)]) == 0
    engine = Engine(bundle)  # every file, the new graphs included, matches its hash
    assert bundle_has_designer(engine.bundle)
    with caplog.at_level(logging.INFO):
        voice = design_for_bundle(engine.bundle, ROLE)
    assert "designed the agent's voice from the role description" in caplog.text
    turn = ReferenceTurn(text="Who are you?")
    ours = Conversation(engine, mode="roleplay", voice=voice, role_description=ROLE, max_new_tokens=32).ask(
        None, turn.text)
    ref, = reference_conversation(load_preset("tiny-4b"), [turn], mode="roleplay",
                                  voice=tiny_voice_designer().design(ROLE, 0), role_description=ROLE,
                                  max_new_tokens=32, max_context=engine.cache.capacity)
    assert ours.tokens == ref.tokens and ours.stop == ref.stop
