"""Quantization recipes through NVIDIA ModelOpt's ONNX tools, the traps they are checked for, and
the accuracy report; on the tiny presets with calibration from real espeak-ng speech.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt (without the [onnx] extra) is not installed")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng renders the calibration speech", allow_module_level=True)

from qinyu_edge.bundle import ComponentSpec, TensorSpec, load_bundle
from qinyu_edge.cli import main
from qinyu_edge.device.targets import get_target
from qinyu_edge.engines.accuracy import PARITY_CASES, cosine
from qinyu_edge.engines.calibration import (
    CALIBRATION_CASES,
    CalibrationSet,
    CaptureOptions,
    backbone_windows,
    capture,
)
from qinyu_edge.engines.decode_graphs import DERIVED
from qinyu_edge.engines.quantize import (
    ComponentRecipe,
    QuantizationError,
    Recipe,
    batched_weight_matmuls,
    check_target,
    get_recipe,
    inspect_quantization,
    plan_components,
    quantize_bundle,
    quantize_component,
)
from qinyu_edge.export.bundle_export import preset_bundle
from qinyu_edge.side_file import ALIGN
from qinyu_edge.runtime.session import open_session

OPTIONS = CaptureOptions(max_new_tokens=16, windows_per_turn=4)


@pytest.fixture(scope="module")
def tiny4b():
    return load_bundle(preset_bundle("tiny-4b"))


@pytest.fixture(scope="module")
def calib(tiny4b, tmp_path_factory):
    cs = capture(tiny4b.root, CALIBRATION_CASES[:3], OPTIONS)
    cs.save(tmp_path_factory.mktemp("calib") / "set")
    return cs


def _run(path, spec, feeds, extra=()):
    s = open_session(path, disabled_optimizers=tuple(spec.ort_disabled_optimizers) + tuple(extra))
    return s.run(feeds)


def _types(values):
    return [v.type.tensor_type.elem_type for v in values]


def test_calibration_comes_from_real_speech_and_round_trips(tiny4b, calib, tmp_path):
    for name in set(tiny4b.components) - set(DERIVED):  # the fused graph is derived, not quantized
        assert calib[name], name
    feats = calib["encoder"][0]["features"]
    assert feats.shape[0] == 1 and feats.shape[2] == 560 and np.isfinite(feats).all() and feats.std() > 0
    # Backbone windows share one length (AWQ concatenates them) and carry M > 1 rows.
    lengths = {s["inputs_embeds"].shape[1] for s in calib["backbone"]}
    assert lengths == {OPTIONS.window}
    path = tmp_path / "set"
    calib.save(path)
    back = CalibrationSet.load(path)
    assert back.samples.keys() == calib.samples.keys()
    for a, b in zip(back["backbone"], calib["backbone"], strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # Each component folder is AutoCast's multi-batch layout: one npz per sample keyed by input names.
    with np.load(path / "encoder" / "0000.npz") as z:
        assert z.files == ["features"]
    held_out = {t.speech or t.text for c in PARITY_CASES for t in c.turns}
    assert held_out.isdisjoint(calib.sources)


def test_backbone_windows_reproduce_the_prefill(tiny4b):
    """A window with the cache of the positions before it gives the hidden state a prefill gives."""
    spec = tiny4b.components["backbone"]
    sess = open_session(tiny4b.path("backbone"), disabled_optimizers=spec.ort_disabled_optimizers)
    h = tiny4b.config.backbone.hidden_size
    seq = np.random.default_rng(0).normal(0, 0.5, (1, 40, h)).astype(np.float32)
    windows = backbone_windows(sess, spec, seq, window=8, count=3)
    assert [w["inputs_embeds"].shape[1] for w in windows] == [8, 8, 8]
    starts = [0, 16, 32]
    for p, w in zip(starts, windows, strict=True):
        past = {k: v for k, v in w.items() if k.startswith("past_")}
        assert past["past_length"].tolist() == [p]
        assert all(v.shape[0] >= 1 + p for k, v in past.items() if k != "past_length")  # null row, p positions, window
        got = sess.run({"inputs_embeds": w["inputs_embeds"], **past})["hidden"]
        one_shot = backbone_windows(sess, spec, seq[:, : p + 8], window=p + 8, count=1)[0]
        want = sess.run(one_shot)["hidden"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_fp16_keeps_io_fp32_and_runs(tiny4b, calib, tmp_path):
    for name in ("audio_projector", "encoder"):
        spec = tiny4b.components[name]
        res = quantize_component(tiny4b.path(name), tmp_path / spec.file, spec, ComponentRecipe("fp16"), calib)
        m = onnx.load(str(tmp_path / spec.file))
        assert _types(m.graph.input) == _types(onnx.load(str(tiny4b.path(name))).graph.input)
        assert set(_types(m.graph.input) + _types(m.graph.output)) == {TensorProto.FLOAT}
        weights = [i for i in m.graph.initializer if len(i.dims) == 2]
        assert weights and all(i.data_type == TensorProto.FLOAT16 for i in weights)
        assert res.precision == "fp16"
        feeds = calib[name][-1]
        got, ref = _run(tmp_path / spec.file, spec, feeds), _run(tiny4b.path(name), spec, feeds)
        out = spec.outputs[0].name
        assert got[out].dtype == np.float32
        assert cosine(got[out], ref[out]) > 0.999
    # The official bf16 rounding of the features survives the conversion.
    assert _bf16_casts(m) == _bf16_casts(onnx.load(str(tiny4b.path("encoder")))) == 1


def _bf16_casts(model):
    return sum(n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.BFLOAT16 for a in n.attribute)
               for n in model.graph.node)


def test_int8_writes_qdq_and_runs(tiny4b, calib, tmp_path):
    spec = tiny4b.components["audio_projector"]
    res = quantize_component(tiny4b.path("audio_projector"), tmp_path / spec.file, spec, ComponentRecipe("int8"), calib)
    m = onnx.load(str(tmp_path / spec.file))
    stats = inspect_quantization(m)
    n_matmul = sum(n.op_type == "MatMul" for n in m.graph.node)
    assert stats.q_nodes > 0 and stats.dq_nodes > 0
    assert stats.weight_ops == {"int8": n_matmul} == res.stats.weight_ops
    feeds = calib["audio_projector"][0]
    got, ref = _run(tmp_path / spec.file, spec, feeds), _run(tiny4b.path("audio_projector"), spec, feeds)
    assert 0.99 < cosine(got["audio_embeds"], ref["audio_embeds"]) < 1.0


def test_batch1_trap_is_refused(tiny4b, calib, tmp_path):
    """The heads run at batch 1: with ModelOpt's GEMV detection on, it quantizes nothing and says nothing."""
    spec = tiny4b.components["heads_logits"]
    dst = tmp_path / spec.file
    with pytest.raises(QuantizationError, match="nothing was quantized"):
        quantize_component(tiny4b.path("heads_logits"), dst, spec, ComponentRecipe("int8", gemv_detection=True), calib)
    assert not dst.exists()
    res = quantize_component(tiny4b.path("heads_logits"), dst, spec, ComponentRecipe("int8"), calib)
    assert res.stats.weight_ops == {"int8": 1}


def test_int4_awq_backbone(tiny4b, calib, tmp_path):
    spec = tiny4b.components["backbone"]
    src = onnx.load(str(tiny4b.path("backbone")))
    res = quantize_component(tiny4b.path("backbone"), tmp_path / spec.file, spec, ComponentRecipe("int4-awq"), calib)
    m = onnx.load(str(tmp_path / spec.file))
    inits = {i.name: i for i in m.graph.initializer}
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    consumers = {i: n.op_type for n in m.graph.node for i in n.input}
    assert dqs and all(inits[n.input[0]].data_type == TensorProto.INT4 for n in dqs)
    assert {consumers[n.output[0]] for n in dqs} == {"MatMul"}
    assert {helper.get_attribute_value(a) for n in dqs for a in n.attribute if a.name == "block_size"} == {128}
    batched = batched_weight_matmuls(src)
    src_inits = {i.name for i in src.graph.initializer}
    two_d = [n for n in src.graph.node if n.op_type == "MatMul" and n.input[1] in src_inits and n.name not in batched]
    assert batched, "the MLA backbone has absorbed per-head weights"
    assert res.stats.weight_ops == {"int4": len(two_d)}
    assert set(res.excluded) == set(batched)
    # Weight-only: activations stay unquantized, in fp16 inside, fp32 at the graph's edges.
    assert res.stats.q_nodes == 0 and res.stats.opset >= 21
    assert _types(m.graph.input) == _types(src.graph.input)  # float, and the int64 past_length
    assert set(_types(m.graph.output)) == {TensorProto.FLOAT}
    feeds = calib["backbone"][-1]
    got, ref = _run(tmp_path / spec.file, spec, feeds), _run(tiny4b.path("backbone"), spec, feeds)
    assert 0.9 < cosine(got["hidden"], ref["hidden"]) < 1.0
    # The lm_head (heads) and the embedding table stay in higher precision by default.
    recipe = get_recipe("int4-awq")
    assert {n: cr.method for n, cr in plan_components(tiny4b, recipe).items() if cr.method != "fp16"} == \
        {"backbone": "int4-awq"}


def _gemm_model(path):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (256, 256)).astype(np.float32)  # [out, in], read with transB
    b = rng.normal(0, 0.05, 256).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="/proj/Gemm", transB=1)
    g = helper.make_graph([node], "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 256])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    spec = ComponentSpec("linear", path.name, (TensorSpec("x", "float32", ("n", 256)),),
                         (TensorSpec("y", "float32", ("n", 256)),))
    calib = CalibrationSet({"linear": [{"x": rng.normal(0, 1, (8, 256)).astype(np.float32)} for _ in range(4)]})
    return spec, calib


def test_gemm_is_rewritten_as_matmul_and_the_trap_refused(tmp_path):
    src = tmp_path / "src" / "linear.onnx"
    src.parent.mkdir()
    spec, calib = _gemm_model(src)
    res = quantize_component(src, tmp_path / "ok" / "linear.onnx", spec, ComponentRecipe("int4-awq"), calib)
    m = onnx.load(str(tmp_path / "ok" / "linear.onnx"))
    assert res.gemms_rewritten == 1 and res.stats.weight_ops == {"int4": 1}
    assert "Gemm" not in {n.op_type for n in m.graph.node}
    x = calib["linear"][0]
    assert cosine(_run(tmp_path / "ok" / "linear.onnx", spec, x)["y"], _run(src, spec, x)["y"]) > 0.99
    # AWQ straight on the Gemm: ModelOpt writes transposed block scales; refused, nothing written.
    bad = tmp_path / "bad" / "linear.onnx"
    with pytest.raises(QuantizationError, match=r"Gemm|block size|rejects"):
        quantize_component(src, bad, spec, ComponentRecipe("int4-awq", matmul_form=False), calib)
    assert not bad.exists()


def test_fp8_needs_a_target_that_has_it(tiny4b, calib, tmp_path):
    plan = plan_components(tiny4b, get_recipe("fp8"))
    with pytest.raises(QuantizationError, match="fp8 needs --target"):
        check_target(plan, None)
    with pytest.raises(QuantizationError, match="no fp8"):
        check_target(plan, get_target("agx-orin-64"))
    check_target(plan, get_target("rtx-4090"))
    check_target(plan_components(tiny4b, get_recipe("int4-awq")), get_target("orin-nano-8"))
    out = tmp_path / "q"
    with pytest.raises(QuantizationError, match="no fp8"):
        quantize_bundle(tiny4b.root, out, "fp8", target=get_target("orin-nx-16"), calibration=calib)
    assert not out.exists()
    # fp8 Q/DQ runs in ONNX Runtime only with its CPU QDQ fusion off, which the spec records.
    spec = tiny4b.components["audio_projector"]
    res = quantize_component(tiny4b.path("audio_projector"), tmp_path / spec.file, spec, ComponentRecipe("fp8"), calib)
    assert res.stats.weight_ops == {"fp8": 2}
    assert "QDQSelectorActionTransformer" in res.ort_disabled_optimizers


def test_bad_requests(tiny4b, calib, tmp_path):
    with pytest.raises(QuantizationError, match="unknown recipe 'int3'"):
        get_recipe("int3")
    with pytest.raises(QuantizationError, match="no component vocoder"):
        plan_components(tiny4b, get_recipe("int8"), ["vocoder"])
    assert main(["quantize", "--bundle", str(tiny4b.root), "--out", str(tmp_path / "q"), "--recipe", "int3"]) == 2
    with pytest.raises(QuantizationError, match="must differ"):
        quantize_bundle(tiny4b.root, tiny4b.root, "fp16", calibration=calib, force=True)
    spec = tiny4b.components["audio_projector"]
    foreign = CalibrationSet({"audio_projector": [{"encoder_out": np.zeros((1, 20, 32), np.float32)}]})
    with pytest.raises(QuantizationError, match="comes from another bundle"):
        quantize_component(tiny4b.path("audio_projector"), tmp_path / "x.onnx", spec, ComponentRecipe("int8"), foreign)
    with pytest.raises(QuantizationError, match="unknown quantization method 'int2'"):
        ComponentRecipe("int2")


def test_refused_component_leaves_no_bundle(tiny4b, calib, tmp_path):
    trap = Recipe("trap", "int8 heads at batch 1 with GEMV detection on",
                  {"heads_logits": ComponentRecipe("int8", gemv_detection=True)})
    out = tmp_path / "q"
    with pytest.raises(QuantizationError, match="nothing was quantized"):
        quantize_bundle(tiny4b.root, out, trap, components=["audio_projector", "heads_logits"], calibration=calib)
    assert list(tmp_path.iterdir()) == []


def test_cli_quantizes_and_reports_accuracy(tiny4b, calib, tmp_path, capsys, assert_peak_line):
    cal = tmp_path / "calib"
    calib.save(cal)
    out = tmp_path / "q"
    rc = main(["quantize", "--bundle", str(tiny4b.root), "--out", str(out), "--recipe", "int8",
               "--components", "audio_projector", "speaker_projector", "--calibration", str(cal), "--steps", "8"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "greedy tokens vs fp32" in printed and "audio_projector" in printed
    assert_peak_line(printed, "quantize")
    b = load_bundle(out)  # every file matches its sha256
    assert b.origin["precision"]["audio_projector"] == "int8"
    assert b.origin["precision"]["speaker_projector"] == "fp16"  # the int8 recipe keeps it fp16
    assert b.origin["precision"]["backbone"] == "fp32"
    src = load_bundle(tiny4b.root)
    assert b.files["backbone.onnx"] == src.files["backbone.onnx"]
    assert b.files["audio_projector.onnx"] != src.files["audio_projector.onnx"]
    acc = b.origin["quantization"]["accuracy"]
    assert {o["component"] for o in acc["outputs"]} == {"audio_projector", "speaker_projector"}
    for o in acc["outputs"]:
        assert np.isfinite(o["mean"]) and 0.9 < o["min"] <= o["mean"] <= 1.0 + 1e-9
    assert [c["case"] for c in acc["cases"]] == [c.name for c in PARITY_CASES]
    for c in acc["cases"]:
        assert 0 <= c["prefix"] <= c["reference_tokens"] and 0.0 <= c["overall"] <= 1.0
        assert c["reference_tokens"] >= 8
    assert 0.0 <= acc["greedy_prefix_fraction"] <= 1.0 and np.isfinite(acc["greedy_overall"])
    json.dumps(acc)


@pytest.mark.slow
@pytest.mark.parametrize("recipe,target", [("fp16", None), ("int8", None), ("int4-awq", "orin-nano-8"),
                                           ("fp8", "rtx-4090")])
def test_whole_bundle_recipes_with_accuracy(preset_bundle, recipe, target, tmp_path):
    from qinyu_edge.engines.accuracy import LOGITS_END_TO_END, accuracy_report
    from qinyu_edge.runtime.conversation import Conversation
    from qinyu_edge.runtime.engine import Engine

    _, path = preset_bundle
    b = quantize_bundle(path, tmp_path / "q", recipe, target=get_target(target) if target else None)
    assert set(b.origin["precision"].values()) <= {"fp16", "int8", "fp8", "int4"}
    reply = Conversation(Engine(b.root), max_new_tokens=8).ask(None, "Hello?")
    assert len(reply.tokens) == 8
    report = accuracy_report(path, b.root)
    rows = {(o.component, o.output): o for o in report.outputs}
    assert ("backbone+heads", LOGITS_END_TO_END) in rows
    for o in report.outputs:
        assert np.isfinite(o.mean) and -1.0 <= o.min <= o.mean <= 1.0 + 1e-9
    assert len(report.cases) == 5 and 0.0 <= report.overall <= 1.0


def test_quantized_component_drops_its_ort_variant(tmp_path):
    """The fp32 ONNX Runtime variant of a quantized backbone would run the old weights: it is dropped
    (file and manifest entry), and kept when the backbone stays fp32."""
    from qinyu_edge.runtime.engine import Engine, EngineOptions

    src = load_bundle(preset_bundle("tiny-8b"))
    assert set(src.ort_variants) == {"backbone", "decode"}
    calib8b = capture(src.root, CALIBRATION_CASES[:1], OPTIONS)
    quantized = quantize_bundle(src.root, tmp_path / "q", "fp16", components=["backbone"], calibration=calib8b)
    assert quantized.ort_variants == {} and not (quantized.root / src.ort_variants["backbone"].file).exists()
    assert load_bundle(quantized.root).ort_variants == {}
    assert not Engine(quantized.root).cache.in_place
    # the fused decode graph is made again from the quantized backbone, and decodes as the split graphs do
    assert quantized.files["decode.onnx"] != src.files["decode.onnx"]
    assert quantized.origin["precision"]["decode"] == "fp16"
    fused, split = Engine(quantized.root), Engine(quantized.root, EngineOptions(fused=False))
    ids = np.array(fused.tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n").ids)
    runs = [e.generator.generate(e.prompt_embeds(ids, [], [], [], []), 16).tokens for e in (fused, split)]
    assert fused.generator.fused is not None and runs[0] == runs[1]
    kept = quantize_bundle(src.root, tmp_path / "k", "fp16", components=["audio_projector"], calibration=calib8b)
    assert set(load_bundle(kept.root).ort_variants) == {"backbone", "decode"}
    assert Engine(kept.root).cache.in_place


def test_fused_decode_graph_refers_to_the_side_files_instead_of_copying(tiny4b, calib, tmp_path, monkeypatch):
    """A quantized graph above EXTERNAL_DATA_BYTES keeps its weights in its side file, so the fused
    decode graph points there (at real size the 4B's fp16 lm_head, 0.7 GB, was copied into it)."""
    from qinyu_edge.engines import quantize as quantize_module
    from qinyu_edge.runtime.engine import Engine, EngineOptions

    monkeypatch.setattr(quantize_module, "EXTERNAL_DATA_BYTES", 0)  # the tiny graphs stand for real-size ones
    q = quantize_bundle(tiny4b.root, tmp_path / "q", "fp16", components=["backbone", "heads_greedy"],
                        calibration=calib)
    fused = onnx.load(str(q.path("decode")), load_external_data=False)
    big = [t for t in fused.graph.initializer if t.ByteSize() > 4096 or t.data_location == TensorProto.EXTERNAL]
    assert big and all(t.data_location == TensorProto.EXTERNAL for t in big)
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {
        "backbone.onnx.data", "heads_greedy.onnx.data"}
    # The fused file is the two graphs' structure (names gain a prefix), no weight bytes.
    graphs = q.files["backbone.onnx"].bytes + q.files["heads_greedy.onnx"].bytes
    assert graphs < q.files["decode.onnx"].bytes < 1.1 * graphs < q.files["heads_greedy.onnx.data"].bytes
    fused_engine, split = Engine(q.root), Engine(q.root, EngineOptions(fused=False))
    ids = np.array(split.tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n").ids)
    runs = [e.generator.generate(e.prompt_embeds(ids, [], [], [], []), 16).tokens for e in (fused_engine, split)]
    assert fused_engine.generator.fused is not None and runs[0] == runs[1]


@pytest.mark.parametrize("lm_head, embedding", [("int4", "int4"), ("int8", "fp16")])
def test_lm_head_and_embedding_precision_options(tiny4b, calib, tmp_path, capsys, lm_head, embedding):
    """`--lm-head` / `--embedding`: weight-only RTN on the matrices the other recipes keep fp16, counted
    in the manifest, scored by the accuracy report, and run by the runtime."""
    from qinyu_edge.runtime.conversation import Conversation
    from qinyu_edge.runtime.engine import Engine

    cal = tmp_path / "calib"
    calib.save(cal)
    out = tmp_path / "q"
    rc = main(["quantize", "--bundle", str(tiny4b.root), "--out", str(out), "--recipe", "fp16", "--lm-head", lm_head,
               "--embedding", embedding, "--components", "heads_greedy", "heads_logits", "embedding",
               "--calibration", str(cal), "--steps", "8"])
    assert rc == 0
    printed = capsys.readouterr().out
    b = load_bundle(out)
    assert b.origin["precision"]["heads_greedy"] == b.origin["precision"]["heads_logits"] == lm_head
    assert b.origin["precision"]["embedding"] == embedding
    assert f"lm_head {lm_head}" in b.origin["quantization"]["recipe"]
    for name, want in (("heads_greedy", lm_head), ("heads_logits", lm_head), ("embedding", embedding)):
        stats = inspect_quantization(onnx.load(str(b.path(name))))
        if want == "fp16":
            assert not stats.weight_ops and stats.weight_bytes.get("FLOAT16")
        else:
            assert stats.weight_ops.get(want, 0) == 1, (name, stats)
        size, fp32 = (sum(x.files[n].bytes for n in (x.components[name].file, x.components[name].file + ".data")
                          if n in x.files) for x in (b, tiny4b))
        assert size < fp32 * {"int4": 0.2, "int8": 0.3, "fp16": 0.55}[want], (name, size, fp32)
    acc = {o["component"] for o in b.origin["quantization"]["accuracy"]["outputs"]}
    assert {"heads_greedy", "heads_logits", "embedding"} <= acc and "heads_greedy" in printed
    # An fp16 table is mapped by the host straight from the embedding graph's side file (stored
    # once); an int4 one is not a plain lookup, so the runtime runs the graph.
    assert not (out / "embedding_table.npy").exists()
    if embedding == "fp16":
        assert b.host_embedding == "embedding.onnx.data"
        table = np.load(out / b.host_embedding, mmap_mode="r")
        assert table.dtype == np.float16 and table.offset == ALIGN
    else:
        assert b.host_embedding is None
    reply = Conversation(Engine(b.root), max_new_tokens=8).ask(None, "Hello?")
    assert len(reply.tokens) == 8


def test_encoder_int8_is_weight_only_on_its_linear_layers(tiny4b, calib, tmp_path, capsys):
    """`--encoder int8` (the planner's way to fit the 4B on an Orin Nano): every Linear weight of the
    encoder behind a per-channel INT8 DequantizeLinear, the rest fp16, scored against fp32, and a
    spoken question still answered."""
    from importlib import resources

    from qinyu_edge.runtime.audio_io import load_16k_mono
    from qinyu_edge.runtime.conversation import Conversation
    from qinyu_edge.runtime.engine import Engine

    cal = tmp_path / "calib"
    calib.save(cal)
    out = tmp_path / "q"
    rc = main(["quantize", "--bundle", str(tiny4b.root), "--out", str(out), "--recipe", "fp16", "--encoder", "int8",
               "--components", "encoder", "--calibration", str(cal), "--steps", "8"])
    assert rc == 0
    printed = capsys.readouterr().out
    b = load_bundle(out)
    assert b.origin["precision"]["encoder"] == "int8" and "encoder int8" in b.origin["quantization"]["recipe"]
    stats = inspect_quantization(onnx.load(str(b.path("encoder"))))
    sv = tiny4b.config.sensevoice
    linear = 4 * (sv.num_blocks + sv.tp_blocks)  # qkv, out and two feed-forward matrices per layer
    assert stats.weight_ops == {"int8": linear} and stats.q_nodes == 0  # weights only, no activation Q
    assert stats.weight_bytes["INT8"] == sv.matrix_param_count()
    enc = next(o for o in b.origin["quantization"]["accuracy"]["outputs"] if o["component"] == "encoder")
    assert enc["mean"] > 0.999, enc
    assert "encoder_out" in printed
    wav = load_16k_mono(resources.files("qinyu_edge") / "data" / "demo_question.wav")
    reply = Conversation(Engine(b.root), max_new_tokens=8).ask(wav)
    assert len(reply.tokens) == 8


def test_lm_head_and_embedding_options_refuse_what_has_no_method():
    with pytest.raises(QuantizationError, match="--embedding int8: choose fp16 or int4"):
        get_recipe("int4-awq", embedding="int8")
    with pytest.raises(QuantizationError, match="--lm-head fp8: choose fp16 or int8 or int4"):
        get_recipe("int4-awq", lm_head="fp8")
    assert get_recipe("int4-awq", lm_head="fp16") is get_recipe("int4-awq")
    r = get_recipe("int4-awq", lm_head="int4")
    assert r.for_component("heads_greedy").method == "int4-rtn" and r.for_component("backbone").method == "int4-awq"
    assert r.for_component("embedding").method == "fp16"
    with pytest.raises(QuantizationError, match="--encoder int4: choose fp16 or int8"):
        get_recipe("int4-awq", encoder="int4")
    # int8 and fp8 calibrate Q/DQ into the encoder; --encoder sets it apart either way
    assert get_recipe("int8", encoder="fp16").for_component("encoder").method == "fp16"
    assert get_recipe("int8", encoder="int8").for_component("encoder").method == "int8-wo"
    assert get_recipe("int4-awq", encoder="fp16") is get_recipe("int4-awq")
