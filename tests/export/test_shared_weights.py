"""A bundle stores each matrix of the heads once: `heads_logits` (sampling) keeps its tensors in
`heads_greedy`'s side file. On the tiny presets every graph keeps its weights inline, so these
tests export with every weight in a side file, as the real sizes do."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from qinyu_edge.bundle import DECODE, load_bundle
from qinyu_edge.device.targets import get_target
from qinyu_edge.engines.builder import current_weights_sha256
from qinyu_edge.engines.plan import make_build_plans
from qinyu_edge.cli import main
from qinyu_edge.export import onnx_io, weight_stream
from qinyu_edge.export.bundle_export import export_bundle
from qinyu_edge.export.qinyu_checkpoint import load_preset
from qinyu_edge.runtime.conversation import Conversation
from qinyu_edge.runtime.engine import Engine, EngineOptions
from qinyu_edge.runtime.sampling import SamplingConfig
from qinyu_edge.runtime.session import open_session
from qinyu_edge.side_file import external_bytes, graph_files, share_tensors


@pytest.fixture(scope="module")
def external_bundle(tmp_path_factory):
    """tiny-4b exported with every graph's weights in its side file."""
    out = tmp_path_factory.mktemp("ext") / "b"
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 0)
        mp.setattr(weight_stream, "EXTERNAL_DATA_BYTES", 0)
        export_bundle(load_preset("tiny-4b"), out)
    finally:
        mp.undo()
    return out


def test_the_heads_matrices_are_stored_once(external_bundle):
    b = load_bundle(external_bundle)  # every file's sha256 checked
    assert (external_bundle / "heads_greedy.onnx.data").is_file()
    assert not (external_bundle / "heads_logits.onnx.data").exists()
    assert graph_files(external_bundle, "heads_logits.onnx") == ["heads_logits.onnx", "heads_greedy.onnx.data"]
    # every weight of heads_logits, the vocabulary matrix included, lives in the greedy heads' file
    assert external_bytes(external_bundle / "heads_logits.onnx") >= b.config.backbone.vocab_size * \
        b.config.backbone.hidden_size * 4
    # the graphs still agree with each other: the greedy choice is an argmax over these logits
    hidden = np.random.default_rng(0).standard_normal((1, b.config.backbone.hidden_size)).astype(np.float32)
    logits = open_session(b.path("heads_logits")).run({"hidden": hidden})["logits"]
    ids = open_session(b.path("heads_greedy")).run({"hidden": hidden, "history": np.full((1, 5), -1, np.int64)})["ids"]
    assert np.isfinite(logits).all() and ids.shape[-1] == 8


def test_the_weights_digest_covers_every_file_a_graph_reads(external_bundle, tmp_path):
    """The fused decode graph has no side file of its own: its engine must still notice new weights."""
    b = load_bundle(external_bundle)
    assert b.components["heads_logits"].data_files == ("heads_greedy.onnx.data",)
    assert set(b.components[DECODE].data_files) == {"backbone.onnx.data", "heads_greedy.onnx.data"}
    plans = {p.component: p for p in make_build_plans(b, get_target("orin-nano-8"))}
    # a graph with its own file keeps that file's sha256 (engine sets built before stay current)
    assert plans["backbone"].onnx_data_sha256 == b.files["backbone.onnx.data"].sha256
    digest = plans[DECODE].onnx_data_sha256
    assert digest not in (None, b.files["backbone.onnx.data"].sha256, b.files["heads_greedy.onnx.data"].sha256)
    assert current_weights_sha256(external_bundle, "decode.onnx") == digest
    copy = tmp_path / "b"
    shutil.copytree(external_bundle, copy)
    with open(copy / "heads_greedy.onnx.data", "r+b") as f:  # new weights, same graphs
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert current_weights_sha256(copy, "decode.onnx") != digest and current_weights_sha256(copy, "heads_logits.onnx") != \
        plans["heads_logits"].onnx_data_sha256
    assert current_weights_sha256(copy, "backbone.onnx") == plans["backbone"].onnx_data_sha256


def test_sampling_runs_on_the_shared_heads(external_bundle):
    eng = Engine(external_bundle, EngineOptions())
    reply = Conversation(eng, max_new_tokens=6, sampling=SamplingConfig(top_k=50, seed=1)).ask(None, "Hello?")
    assert len(reply.tokens) == 6 and "heads_logits" in eng.sessions


def test_share_tensors_points_at_the_owner_and_removes_the_copy(tmp_path, external_bundle):
    for f in ("heads_greedy.onnx", "heads_greedy.onnx.data", "heads_logits.onnx"):
        shutil.copy2(external_bundle / f, tmp_path / f)
    # make heads_logits own its weights again, then share them
    model = onnx.load(str(tmp_path / "heads_logits.onnx"))
    onnx.save_model(model, str(tmp_path / "heads_logits.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="heads_logits.onnx.data", size_threshold=0)
    hidden = np.ones((1, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value), np.float32)
    before = open_session(tmp_path / "heads_logits.onnx").run({"hidden": hidden})["logits"]
    own = (tmp_path / "heads_logits.onnx.data").stat().st_size
    shared = share_tensors(tmp_path, "heads_greedy.onnx", "heads_logits.onnx")
    assert 0 < shared <= own and not (tmp_path / "heads_logits.onnx.data").exists()
    after = open_session(tmp_path / "heads_logits.onnx").run({"hidden": hidden})["logits"]
    np.testing.assert_array_equal(after, before)
    assert share_tensors(tmp_path, "heads_greedy.onnx", "heads_logits.onnx") == 0  # nothing left to share
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads_greedy.onnx", "heads_greedy.onnx.data",
                                                           "heads_logits.onnx"]


def _two_matmuls(path, a, b):
    """y = x @ A @ B, both weights in the graph's side file."""
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, a.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, b.shape[1]])],
        [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")])
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data",
                    size_threshold=0)


def test_only_identical_tensors_are_shared(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32)
    other_b = b.copy()
    other_b[0, 0] += 1.0  # one value apart: its own tensor
    _two_matmuls(tmp_path / "owner.onnx", a, b)
    _two_matmuls(tmp_path / "other.onnx", a, other_b)
    x = rng.standard_normal((1, 16)).astype(np.float32)
    before = open_session(tmp_path / "other.onnx").run({"x": x})["y"]
    assert share_tensors(tmp_path, "owner.onnx", "other.onnx") == a.nbytes
    kept = onnx.load(str(tmp_path / "other.onnx"), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data}["location"] for t in kept.graph.initializer}
    assert where == {"A": "owner.onnx.data", "B": "other.onnx.data"}
    assert (tmp_path / "other.onnx.data").stat().st_size == other_b.nbytes  # A is gone from it
    np.testing.assert_array_equal(open_session(tmp_path / "other.onnx").run({"x": x})["y"], before)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_quantizing_one_of_two_graphs_that_share_a_file_is_refused(external_bundle, tmp_path, capsys):
    rc = main(["quantize", "--bundle", str(external_bundle), "--out", str(tmp_path / "q"), "--recipe", "fp16",
               "--components", "heads_greedy", "--no-accuracy"])
    err = capsys.readouterr().err
    assert rc == 2 and "heads_logits keeps its weights in heads_greedy.onnx.data" in err
    assert "heads_greedy heads_logits" in err and not (tmp_path / "q").exists()


def test_quantized_heads_share_again(external_bundle, tmp_path, monkeypatch):
    """Quantizing both heads writes each its own graph; the bundle then shares the identical result."""
    from qinyu_edge.engines import quantize

    monkeypatch.setattr(quantize, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "q"
    rc = main(["quantize", "--bundle", str(external_bundle), "--out", str(out), "--recipe", "fp16", "--components",
               "heads_greedy", "heads_logits", "--no-accuracy"])
    assert rc == 0
    q = load_bundle(out)
    assert q.origin["precision"]["heads_logits"] == q.origin["precision"]["heads_greedy"] == "fp16"
    assert graph_files(out, "heads_logits.onnx") == ["heads_logits.onnx", "heads_greedy.onnx.data"]
    assert not (out / "heads_logits.onnx.data").exists()
    eng = Engine(out)
    reply = Conversation(eng, max_new_tokens=6, sampling=SamplingConfig(top_k=50, seed=1)).ask(None, "Hello?")
    assert len(reply.tokens) == 6
