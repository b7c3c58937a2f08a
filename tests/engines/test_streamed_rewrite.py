"""Weight-only INT4 and fp16 one weight at a time (the real-size path) against ModelOpt's own RTN and
fp16 conversion, and the quantize command on a bundle whose backbone takes that path (thresholds
lowered to the tiny presets)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt (without the [onnx] extra) is not installed")

from qinyu_edge.bundle import load_bundle
from qinyu_edge.cli import main
from qinyu_edge.engines import quantize, streamed_rewrite
from qinyu_edge.engines.calibration import CalibrationSet, run_memory
from qinyu_edge.engines.decode_graphs import DERIVED
from qinyu_edge.engines.streamed_rewrite import StreamQuantError, pack_int4, rewrite_streamed
from qinyu_edge.engines.quantize import (
    ComponentRecipe,
    batched_weight_matmuls,
    quantize_component,
    spec_sample,
)
from qinyu_edge.export.bundle_export import preset_bundle
from qinyu_edge.runtime.session import open_session
from qinyu_edge.side_file import graph_files


def _all_external(src, dst):
    """`src` saved again with every tensor in one side file (as a real-size export writes it)."""
    model = onnx.load(str(src))
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=0)
    return dst


@pytest.mark.parametrize("preset", ["tiny-4b", "tiny-8b"])
def test_streamed_rtn_writes_what_modelopt_writes(preset, tmp_path, monkeypatch):
    b = load_bundle(preset_bundle(preset))
    spec = b.components["backbone"]
    # ModelOpt's whole-graph RTN (no calibration is used by RTN; the samples only check the result).
    calib = CalibrationSet({"backbone": [spec_sample(spec, seed=s) for s in range(2)]})
    reference = quantize_component(b.path("backbone"), tmp_path / "modelopt" / "backbone.onnx", spec,
                                   ComponentRecipe("int4-rtn"), calib)
    assert reference.applied is None and reference.stats.quantized_weights > 0
    # Streamed from a side file, a few rows (one block of 128 input channels) at a time.
    src = _all_external(b.path("backbone"), tmp_path / "src.onnx")
    monkeypatch.setattr(streamed_rewrite, "BLOCK_BYTES", 1)
    exclude = [f"^{n}$" for n in batched_weight_matmuls(onnx.load(str(src), load_external_data=False))]
    (tmp_path / "st").mkdir()
    rewrite_streamed(src, tmp_path / "st" / "backbone.onnx", "int4", 128, exclude)

    theirs = onnx.load(str(tmp_path / "modelopt" / "backbone.onnx"))
    int4 = [t for t in theirs.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == reference.stats.quantized_weights
    _assert_same(tmp_path / "st" / "backbone.onnx", theirs, calib["backbone"])


def _assert_same(path, theirs, samples):
    """The graph at `path` holds `theirs`' tensors, byte for byte, and nodes, and computes the same."""
    ours = onnx.load(str(path))
    a = {t.name: t for t in ours.graph.initializer}
    m = {t.name: t for t in theirs.graph.initializer}
    assert set(a) == set(m)
    for n in m:
        assert a[n].data_type == m[n].data_type and list(a[n].dims) == list(m[n].dims), n
        assert numpy_helper.to_array(a[n]).tobytes() == numpy_helper.to_array(m[n]).tobytes(), n
    assert Counter(n.op_type for n in ours.graph.node) == Counter(n.op_type for n in theirs.graph.node)
    assert [o.version for o in ours.opset_import] == [o.version for o in theirs.opset_import]
    other = path.with_name("theirs.onnx")
    onnx.save(theirs, str(other))
    for s in samples:
        got, want = open_session(path).run(s), open_session(other).run(s)
        assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("component", ["backbone", "heads_greedy", "embedding"])
def test_streamed_fp16_writes_what_modelopt_converts(component, tmp_path, monkeypatch):
    from modelopt.onnx.autocast import convert_to_f16

    b = load_bundle(preset_bundle("tiny-8b"))
    spec = b.components[component]
    src = _all_external(b.path(component), tmp_path / "src.onnx")
    monkeypatch.setattr(streamed_rewrite, "BLOCK_BYTES", 64)
    (tmp_path / "st").mkdir()
    rewrite_streamed(src, tmp_path / "st" / "c.onnx", "fp16")
    theirs = convert_to_f16(onnx.load(str(b.path(component))), keep_io_types=True)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in theirs.graph.initializer)
    _assert_same(tmp_path / "st" / "c.onnx", theirs, [spec_sample(spec, seed=s) for s in range(2)])


def test_fp16_overflow_is_clamped_and_named(tmp_path, caplog):
    w = np.ones((4, 300), np.float32)
    w[1, 7], w[2, 9] = 1e6, -7e4
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 300])],
        [numpy_helper.from_array(w, "w")])
    src = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(src))
    (tmp_path / "out").mkdir()
    out = rewrite_streamed(src, tmp_path / "out" / "m.onnx", "fp16")
    assert "2 values of w exceed fp16's range" in caplog.text
    y = open_session(tmp_path / "out" / "m.onnx").run({"x": np.eye(1, 4, 1, dtype=np.float32)})["y"]
    assert y[0, 7] == 65504.0 and np.isfinite(y).all()
    assert {t.data_type for t in out.graph.initializer} == {onnx.TensorProto.FLOAT16}


def test_pack_int4_is_onnx_order():
    q = np.array([[-8, 7, 1], [0, -1, 3]], np.int8)
    t = onnx.helper.make_tensor("q", onnx.TensorProto.INT4, q.shape, pack_int4(q).tobytes(), raw=True)
    assert np.array_equal(numpy_helper.to_array(t).astype(np.int8), q)


def test_a_truncated_side_file_is_named_and_nothing_is_written(tmp_path, monkeypatch):
    b = load_bundle(preset_bundle("tiny-4b"))
    src = _all_external(b.path("backbone"), tmp_path / "src.onnx")
    side = tmp_path / "src.onnx.data"
    with open(side, "r+b") as f:
        f.truncate(side.stat().st_size // 2)
    monkeypatch.setattr(quantize, "STREAM_QUANT_BYTES", 0)
    spec = b.components["backbone"]
    with pytest.raises(StreamQuantError, match="src.onnx.data ends inside tensor"):
        quantize_component(src, tmp_path / "out" / "backbone.onnx", spec, ComponentRecipe("int4-rtn"), None)
    assert list((tmp_path / "out").iterdir()) == []


def test_quantize_streams_the_backbone_without_calibration(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quantize, "STREAM_QUANT_BYTES", 0)
    src = preset_bundle("tiny-4b")
    out = tmp_path / "q"
    rc = main(["quantize", "--bundle", str(src), "--out", str(out), "--recipe", "int4-awq", "--components",
               "backbone", "--steps", "4"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "no calibration was needed" in printed
    q = load_bundle(out)
    record = q.origin["quantization"]["components"]["backbone"]
    assert q.origin["precision"]["backbone"] == "int4" and record["quantized_weights"]["int4"] > 0
    # AWQ cannot run at this size: the streamed RTN that stood in for it is on record.
    assert record["method"] == "int4-awq" and record["applied"].startswith("int4-rtn, streamed")
    assert q.origin["quantization"]["calibration"] is None
    assert "decode" in q.components  # the fused decode graph is derived from the INT4 backbone
    # The accuracy report ran on both bundles (the fp32 one fits in memory here).
    assert q.origin["quantization"]["accuracy"]["cases"]


def test_a_bundle_too_large_for_memory_is_not_run_for_calibration(tmp_path, monkeypatch, capsys):
    # The memory reading is this machine's; here it says less than the tiny bundle's weights.
    monkeypatch.setattr("qinyu_edge.device.telemetry.available_memory_bytes", lambda: 1000)
    src = preset_bundle("tiny-4b")
    rc = main(["quantize", "--bundle", str(src), "--out", str(tmp_path / "q"), "--recipe", "int4-awq"])
    err = capsys.readouterr().err
    assert rc != 0 and "GB available" in err and "--components backbone" in err
    assert not (tmp_path / "q").exists()
    # The streamed backbone needs no calibration: it quantizes, and only the accuracy report is skipped.
    monkeypatch.setattr(quantize, "STREAM_QUANT_BYTES", 0)
    rc = main(["quantize", "--bundle", str(src), "--out", str(tmp_path / "q"), "--recipe", "int4-rtn",
               "--components", "backbone"])
    skipped = capsys.readouterr().out.split("accuracy report skipped")
    assert rc == 0 and len(skipped) == 2
    # It says what the report needs and how to skip it, not the calibration's ways out.
    assert "the accuracy report runs the bundle" in skipped[1] and "--no-accuracy" in skipped[1]
    assert "--calibration" not in skipped[1]
    assert load_bundle(tmp_path / "q").origin["precision"]["backbone"] == "int4"


def _fp32_bundle_one_byte_too_large(monkeypatch):
    """tiny-4b with its backbone streamed (the one graph above the threshold, as on the real
    models) on a machine one byte short of running its fp32 graphs."""
    src = load_bundle(preset_bundle("tiny-4b"))
    monkeypatch.setattr(quantize, "STREAM_QUANT_BYTES", quantize.weight_bytes(src.path("backbone")) - 1)
    fp32 = sum(src.files[f].bytes for name, spec in src.components.items() if name not in DERIVED
               for f in graph_files(src.root, spec.file) if f in src.files)
    monkeypatch.setattr("qinyu_edge.device.telemetry.available_memory_bytes", lambda: run_memory(fp32) - 1)
    return src


def test_calibration_runs_on_the_int4_backbone_when_the_fp32_bundle_does_not_fit(tmp_path, monkeypatch, capsys):
    src = _fp32_bundle_one_byte_too_large(monkeypatch)  # the INT4 backbone leaves room
    out = tmp_path / "q"
    rc = main(["quantize", "--bundle", str(src.root), "--out", str(out), "--recipe", "int4-awq", "--components",
               "backbone", "audio_projector", "speaker_projector", "--save-calibration", str(tmp_path / "cal")])
    printed = capsys.readouterr().out
    assert rc == 0 and "accuracy report skipped" in printed
    q = load_bundle(out)
    record = q.origin["quantization"]
    assert "backbone already quantized" in record["calibration"]["captured_on"] and "captured on" in printed
    assert q.origin["precision"]["backbone"] == "int4" and q.origin["precision"]["audio_projector"] == "fp16"
    assert "applied" not in record["components"]["audio_projector"]  # AutoCast, with calibration
    # The projector was calibrated on encoder outputs of real speech; the set was saved as asked.
    saved = CalibrationSet.load(tmp_path / "cal")
    assert all(np.asarray(v).std() > 0 for v in saved["audio_projector"][0].values())
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_fp16_calibrates_on_an_int4_stand_in_when_the_fp32_bundle_does_not_fit(tmp_path, monkeypatch, capsys):
    """ONNX Runtime holds fp16 weights widened to fp32 on the CPU, so a streamed fp16 backbone runs as
    large as the fp32 one and makes no room for the capture. An INT4 stand-in of the backbone, made
    for the capture and deleted after it, does: the rest is AutoCast on real speech."""
    src = _fp32_bundle_one_byte_too_large(monkeypatch)
    out = tmp_path / "q"
    rc = main(["quantize", "--bundle", str(src.root), "--out", str(out), "--recipe", "fp16"])
    printed = capsys.readouterr().out
    assert rc == 0 and "accuracy report skipped" in printed
    q = load_bundle(out)
    record = q.origin["quantization"]
    assert "INT4 stand-ins of backbone" in record["calibration"]["captured_on"]
    assert set(q.origin["precision"].values()) == {"fp16"}
    assert record["components"]["backbone"]["applied"].startswith("fp16, streamed")
    # calibrated on real speech through the stand-in, not on the synthetic input
    assert all("applied" not in record["components"][n] for n in ("audio_projector", "speaker_projector", "campplus"))
    assert record["calibration"]["samples"]["encoder"] > 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
    # Where even the stand-in leaves too little, it is refused before any output is kept.
    monkeypatch.setattr("qinyu_edge.device.telemetry.available_memory_bytes", lambda: 1000)
    rc = main(["quantize", "--bundle", str(src.root), "--out", str(tmp_path / "r"), "--recipe", "fp16"])
    err = capsys.readouterr().err
    assert rc != 0 and "GB available" in err and not (tmp_path / "r").exists()


def test_a_component_no_calibration_case_reached_is_autocast_on_a_synthetic_input(tmp_path):
    src = preset_bundle("tiny-4b")
    q = quantize.quantize_bundle(src, tmp_path / "q", "fp16", components=["xy_decoder"], calibration=CalibrationSet({}))
    record = q.origin["quantization"]["components"]["xy_decoder"]
    assert q.origin["precision"]["xy_decoder"] == "fp16" and "synthetic input" in record["applied"]
    # A method that needs real samples is refused before anything is written.
    with pytest.raises(quantize.QuantizationError, match="never reached audio_projector"):
        quantize.quantize_bundle(src, tmp_path / "q8", "int8", components=["audio_projector"],
                                 calibration=CalibrationSet({}))
    assert not (tmp_path / "q8").exists()
