"""ONNX lint for TensorRT: our bundles pass for every target TensorRT version; graphs TensorRT
refuses are flagged with the reason and a fix."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qinyu_edge.bundle import load_bundle
from qinyu_edge.engines.onnx_lint import (
    OPERATORS, TRT_FAMILIES, UNSUPPORTED, lint_bundle, lint_model, op_support, opset_range, parse_trt_version,
)
from qinyu_edge.errors import ConfigError

F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _save(tmp_path, nodes, inputs, outputs, initializers=(), opset=17, name="m.onnx", value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _errors(findings, rule=None):
    return [f for f in findings if f.severity == "error" and (rule is None or f.rule == rule)]


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


# --- our graphs ------------------------------------------------------------------------------


def test_preset_bundles_have_no_errors_for_any_target_version(preset_bundle):
    name, path = preset_bundle
    report = lint_bundle(path, TRT_FAMILIES)
    assert set(report.results) == set(TRT_FAMILIES)
    n = len(load_bundle(path).components)
    assert n == 10 and all(len(comps) == n for comps in report.results.values())  # the fused decode graph too
    errors = [f"{v} {c} {f.node} ({f.op}): {f.message}" for v, c, f in report.findings("error")]
    assert errors == [], f"{name}: TensorRT would refuse:\n" + "\n".join(errors)
    assert report.ok and report.to_dict()["errors"] == 0


def test_profile_bounds_silence_small_int64_tensors(preset_bundle):
    """The XY decoder's per-codebook code rows are INT64 [1, frames]; frames <= 375 in the bundle's
    profile, so they are small. Without the bound they count as unbounded and are reported."""
    _, path = preset_bundle
    bounded = lint_bundle(path, ["10.3"], ["xy_decoder"]).results["10.3"]["xy_decoder"]
    unbounded = lint_model(path / "xy_decoder.onnx", "10.3")
    quantizer = [f for f in unbounded if f.rule == "int64-hot" and f.node.startswith("/quantizer/")]
    assert quantizer, "the code rows are INT64 computed from the input codes"
    assert not [f for f in bounded if f.rule == "int64-hot" and f.node.startswith("/quantizer/")]


# --- versions and tables ---------------------------------------------------------------------


def test_version_parsing():
    assert parse_trt_version("10.16.2.10") == (10, 16)
    assert parse_trt_version("11.4") == (11, 4)
    assert parse_trt_version((10, 3, 0)) == (10, 3)
    with pytest.raises(ConfigError, match="JetPack 6.1"):
        parse_trt_version("8.6.2")
    with pytest.raises(ConfigError, match="MAJOR.MINOR"):
        parse_trt_version("ten")


def test_opset_ranges_per_family():
    assert (opset_range((10, 3)).min_opset, opset_range((10, 3)).max_opset) == (9, 20)
    assert opset_range((10, 16)).max_opset == 24
    assert opset_range((11, 4)).max_opset == 24
    assert opset_range((11, 5)).max_opset == 25
    assert "UNVERIFIED" in opset_range((10, 13)).source


def test_operator_table_names_real_onnx_ops_with_sources():
    # TRT_* and DistCollective are TensorRT's own ops; the rest must be ONNX operators (a typo would
    # silently turn a supported op into "unsupported").
    custom = {"TRT_Attention", "TRT_MoE", "TRT_KVCacheUpdate", "DistCollective",
              # Dropped from ONNX's registry after opset 9/10 but still imported by TensorRT.
              "ImageScaler", "ScaledTanh", "ParametricSoftplus", "Scatter", "Upsample"}
    schemas = {s.name for s in onnx.defs.get_all_schemas_with_history()}
    missing = sorted(op for op in set(OPERATORS) | UNSUPPORTED if op not in schemas and op not in custom
                     and not op.startswith("Sequence") and not op.startswith("Optional") and not op.startswith("String"))
    assert missing == []
    assert not set(OPERATORS) & (UNSUPPORTED - {"DFT"})
    assert all(s.source for s in OPERATORS.values())
    assert op_support("DFT", (10, 16)) is None and op_support("DFT", (11, 2)) is not None
    assert op_support("Attention", (10, 13)) is None and op_support("Attention", (10, 14)) is not None


# --- synthetic graphs TensorRT refuses -------------------------------------------------------


def _dft_model(tmp_path):
    return _save(tmp_path, [helper.make_node("DFT", ["x"], ["y"], name="spectrum", axis=1, onesided=1)],
                 [_vi("x", F, [1, 16, 1])], [_vi("y", F, [1, 9, 2])])


@pytest.mark.parametrize("version", ["10.3", "10.13", "10.16"])
def test_dft_before_11_2_is_an_error(tmp_path, version):
    errs = _errors(lint_model(_dft_model(tmp_path), version), "unsupported-op")
    assert [(e.node, e.op) for e in errs] == [("spectrum", "DFT")]
    assert "11.2" in errs[0].message and "MatMul" in errs[0].fix


def test_dft_is_allowed_on_11_4(tmp_path):
    assert _errors(lint_model(_dft_model(tmp_path), "11.4")) == []


def test_complex_tensor_is_an_error(tmp_path):
    path = _save(tmp_path, [helper.make_node("Identity", ["z"], ["w"], name="copy")],
                 [_vi("z", TensorProto.COMPLEX64, [4])], [_vi("w", TensorProto.COMPLEX64, [4])])
    for v in TRT_FAMILIES:
        errs = _errors(lint_model(path, v), "dtype")
        assert {e.node for e in errs} == {"<graph input>", "copy"}
        assert all("COMPLEX64" in e.message and "real and imaginary" in e.fix for e in errs)


def test_unsupported_and_unknown_ops(tmp_path):
    path = _save(tmp_path, [
        helper.make_node("Unique", ["x"], ["u"], name="dedup"),
        helper.make_node("FusedMatMul", ["x", "x"], ["m"], name="contrib", domain="com.microsoft"),
        helper.make_node("NoSuchOp", ["x"], ["n"], name="typo"),
    ], [_vi("x", F, [4, 4])], [_vi("u", F, None), _vi("m", F, None), _vi("n", F, None)])
    model = onnx.load(path)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, path)
    errs = {e.node: e for e in _errors(lint_model(path, "11.4"), "unsupported-op")}
    assert set(errs) == {"dedup", "contrib", "typo"}
    assert "not supported" in errs["dedup"].message
    assert "com.microsoft::FusedMatMul" in errs["contrib"].message
    assert "plugin" in errs["typo"].message


@pytest.mark.parametrize("opset,version,severity", [(8, "11.4", "error"), (21, "10.3", "warning"),
                                                    (21, "10.16", None), (17, "10.3", None)])
def test_opset_outside_the_documented_range(tmp_path, opset, version, severity):
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [_vi("x", F, [2])], [_vi("y", F, [2])], opset=opset)
    found = [f for f in lint_model(path, version) if f.rule == "opset"]
    assert [f.severity for f in found] == ([severity] if severity else [])
    if severity:
        assert f"opset {opset}" in found[0].message and "opset 17" in found[0].fix


def test_blocked_dequantize_on_10_3(tmp_path):
    """ModelOpt INT4 weight-only: opset 21, DequantizeLinear with block_size on a 2-D INT4 constant."""
    w = helper.make_tensor("w", TensorProto.INT4, [4, 8], np.zeros(32, np.int8).tolist())
    s = numpy_helper.from_array(np.ones((4, 1), np.float32), "s")
    ok = _save(tmp_path, [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], name="dq", axis=1, block_size=8),
                          helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm")],
               [_vi("x", F, [1, 4])], [_vi("y", F, [1, 8])], [w, s], opset=21, name="ok.onnx")
    assert _errors(lint_model(ok, "10.3")) == []
    w3 = helper.make_tensor("w", TensorProto.INT4, [1, 4, 8], np.zeros(32, np.int8).tolist())
    s3 = numpy_helper.from_array(np.ones((1, 4, 1), np.float32), "s")
    bad = _save(tmp_path, [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], name="dq", axis=2, block_size=8),
                           helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm")],
                [_vi("x", F, [1, 4])], [_vi("y", F, [1, 8])], [w3, s3], opset=21, name="bad.onnx")
    assert [e.node for e in _errors(lint_model(bad, "10.3"), "qdq-blocked")] == ["dq"]
    assert _errors(lint_model(bad, "10.16"), "qdq-blocked") == []


def test_ops_added_after_a_version(tmp_path):
    path = _save(tmp_path, [helper.make_node("RMSNormalization", ["x", "s"], ["y"], name="norm")],
                 [_vi("x", F, [1, 4, 8])], [_vi("y", F, [1, 4, 8])],
                 [numpy_helper.from_array(np.ones(8, np.float32), "s")], opset=23)
    assert [e.node for e in _errors(lint_model(path, "10.13"), "unsupported-op")] == ["norm"]
    assert _errors(lint_model(path, "10.16"), "unsupported-op") == []


def test_scatternd_reduction(tmp_path):
    path = _save(tmp_path, [helper.make_node("ScatterND", ["d", "i", "u"], ["y"], name="acc", reduction="add")],
                 [_vi("d", F, [4]), _vi("i", I64, [1, 1]), _vi("u", F, [1])], [_vi("y", F, [4])], opset=16)
    errs = _errors(lint_model(path, "11.4"))
    assert [(e.node, e.rule) for e in errs] == [("acc", "scatternd-reduction")]


def test_reduce_axes_must_be_initializers(tmp_path):
    computed = _save(tmp_path, [helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")],
                     [_vi("x", F, [2, 3]), _vi("axes", I64, [1])], [_vi("y", F, None)], name="computed.onnx")
    constant = _save(tmp_path, [helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1], np.int64))),
                                helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")],
                     [_vi("x", F, [2, 3])], [_vi("y", F, None)], name="constant.onnx")
    assert [e.node for e in _errors(lint_model(computed, "10.3"), "constant-input")] == ["sum"]
    assert _errors(lint_model(constant, "10.3")) == []


def test_integer_pow_depends_on_version(tmp_path):
    path = _save(tmp_path, [helper.make_node("Pow", ["x", "e"], ["y"], name="pow")],
                 [_vi("x", F, [3]), _vi("e", I64, [3])], [_vi("y", F, [3])], opset=15)
    assert [e.node for e in _errors(lint_model(path, "10.3"), "op-type")] == ["pow"]
    assert _errors(lint_model(path, "10.13"), "op-type") == []  # integer exponents from 10.8


def test_uint8_inside_the_network(tmp_path):
    path = _save(tmp_path, [helper.make_node("Cast", ["x"], ["q"], name="to_u8", to=TensorProto.UINT8),
                            helper.make_node("Cast", ["q"], ["y"], name="back", to=F)],
                 [_vi("x", F, [4])], [_vi("y", F, [4])])
    errs = _errors(lint_model(path, "10.16"), "dtype")
    assert [e.node for e in errs] == ["to_u8"] and "UINT8" in errs[0].message


def test_uint8_at_the_boundary_is_fine(tmp_path):
    path = _save(tmp_path, [helper.make_node("Cast", ["x"], ["y"], name="from_u8", to=F)],
                 [_vi("x", TensorProto.UINT8, [4])], [_vi("y", F, [4])])
    assert _errors(lint_model(path, "10.3")) == []


def test_qdq_with_nonzero_zero_point(tmp_path):
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.int8), "zp")]
    path = _save(tmp_path, [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
                            helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq")],
                 [_vi("x", F, [4])], [_vi("y", F, [4])], inits)
    errs = _errors(lint_model(path, "10.3"))
    assert {(e.node, e.rule) for e in errs} == {("q", "qdq-zero-point"), ("dq", "qdq-zero-point")}


def test_int8_outside_qdq(tmp_path):
    path = _save(tmp_path, [helper.make_node("Cast", ["x"], ["i8"], name="to_i8", to=TensorProto.INT8),
                            helper.make_node("Cast", ["i8"], ["y"], name="back", to=F)],
                 [_vi("x", F, [4])], [_vi("y", F, [4])])
    errs = _errors(lint_model(path, "11.4"), "dtype")
    assert [e.node for e in errs] == ["to_i8"] and "Q/DQ" in errs[0].message


def test_topk_limits(tmp_path):
    k = numpy_helper.from_array(np.array([5000], np.int64), "k")
    path = _save(tmp_path, [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="top", sorted=0)],
                 [_vi("x", F, [1, 8000])], [_vi("v", F, None), _vi("i", I64, None)], [k])
    msgs = [e.message for e in _errors(lint_model(path, "10.16"), "topk")]
    assert len(msgs) == 2 and any("sorted=0" in m for m in msgs) and any("K=5000" in m for m in msgs)


def test_if_branches_of_different_rank(tmp_path):
    then_g = helper.make_graph([helper.make_node("Identity", ["a"], ["t_out"])], "then", [], [_vi("t_out", F, [2])])
    else_g = helper.make_graph([helper.make_node("Identity", ["b"], ["e_out"])], "else", [], [_vi("e_out", F, [2, 2])])
    path = _save(tmp_path, [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)],
                 [_vi("c", B, []), _vi("a", F, [2]), _vi("b", F, [2, 2])], [_vi("y", F, None)])
    errs = _errors(lint_model(path, "11.4"), "if-branches")
    assert [e.node for e in errs] == ["branch"] and "rank 1" in errs[0].message


def test_loop_scan_output_with_runtime_trip_count(tmp_path):
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["x"], ["scan"])],
        "body", [_vi("i", I64, []), _vi("cond_in", B, [])], [_vi("cond_out", B, []), _vi("scan", F, [2])])
    path = _save(tmp_path, [helper.make_node("Loop", ["n", ""], ["ys"], name="loop", body=body)],
                 [_vi("n", I64, []), _vi("x", F, [2])], [_vi("ys", F, None)])
    errs = _errors(lint_model(path, "10.16"), "loop-scan-output")
    assert [e.node for e in errs] == ["loop"]
    # Inside the body only Identity nodes: the subgraph was walked and found fine.
    assert _errors(lint_model(path, "10.16"), "unsupported-op") == []


def test_unsupported_op_inside_a_subgraph_is_found(tmp_path):
    then_g = helper.make_graph([helper.make_node("Unique", ["a"], ["t_out"], name="inner")], "then", [], [_vi("t_out", F, None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["a"], ["e_out"])], "else", [], [_vi("e_out", F, None)])
    path = _save(tmp_path, [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)],
                 [_vi("c", B, []), _vi("a", F, [3])], [_vi("y", F, None)])
    assert [e.node for e in _errors(lint_model(path, "11.4"), "unsupported-op")] == ["branch/then_branch/inner"]


def test_squeeze_without_axes_on_dynamic_shape(tmp_path):
    path = _save(tmp_path, [helper.make_node("Squeeze", ["x"], ["y"], name="sq")],
                 [_vi("x", F, ["n", 1])], [_vi("y", F, None)])
    assert [e.node for e in _errors(lint_model(path, "11.4"), "squeeze-no-axes")] == ["sq"]
    assert _errors(lint_model(path, "11.5"), "squeeze-no-axes") == []


def test_int64_on_a_data_path_is_a_warning(tmp_path):
    path = _save(tmp_path, [helper.make_node("Add", ["ids", "ids"], ["twice"], name="add"),
                            helper.make_node("Shape", ["ids"], ["shape"], name="shape"),
                            helper.make_node("Add", ["shape", "shape"], ["shape2"], name="shape_add")],
                 [_vi("ids", I64, [1, "seq"])], [_vi("twice", I64, [1, "seq"]), _vi("shape2", I64, [2])])
    unbounded = lint_model(path, "10.3")
    assert _errors(unbounded) == []
    hot = [f for f in unbounded if f.rule == "int64-hot"]
    assert [f.node for f in hot] == ["add"]  # shape arithmetic is not data
    assert [f for f in lint_model(path, "10.3", {"seq": 64}) if f.rule == "int64-hot"] == []
    assert [f.node for f in lint_model(path, "10.3", {"seq": 8192}) if f.rule == "int64-hot"] == ["add"]


def test_integer_matmul_is_refused(tmp_path):
    path = _save(tmp_path, [helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                 [_vi("a", TensorProto.INT32, [2, 2]), _vi("b", TensorProto.INT32, [2, 2])], [_vi("y", TensorProto.INT32, [2, 2])])
    errs = _errors(lint_model(path, "11.4"), "op-type")
    assert [e.node for e in errs] == ["mm"] and "INT32" in errs[0].message and "Cast" in errs[0].fix


def test_undocumented_type_is_a_warning(tmp_path):
    # Softmax is documented for float types only; on INT32 the builder may refuse it.
    path = _save(tmp_path, [helper.make_node("Softmax", ["x"], ["y"], name="sm")],
                 [_vi("x", TensorProto.INT32, [2, 3])], [_vi("y", TensorProto.INT32, [2, 3])])
    found = [f for f in lint_model(path, "10.3") if f.rule == "op-type"]
    assert [(f.severity, f.node) for f in found] == [("warning", "sm")]
