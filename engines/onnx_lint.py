"""ONNX lint for TensorRT: flag what a TensorRT version's ONNX parser (or builder) will refuse, before
the graph reaches the device.

The tables below are data, one row per fact, each with its source. Sources:
- [OPS10.1] onnx-tensorrt docs/operators.md at 10.1-GA: operator list, documented input types,
  restrictions, opset range 9-20.
- [SRC10.1] onnx-tensorrt 10.1-GA importers (onnxOpImporters.cpp, importerUtils.cpp): checks the
  parser really makes (elementwise/unary type asserts, "must be an initializer" asserts).
- [OPS10.15] the same operators.md at 10.15: opset 9-24.
- [OCL] onnx-tensorrt docs/Changelog.md up to 10.15: when operators and relaxations arrived.
- [REL] github.com/NVIDIA/TensorRT releases and CHANGELOG (11.0, 11.2, 11.5).
- [SYM] design/tensorrt-python-api-symbols.json: which `trt.DataType` members each version has.
All are summarised in design/tensorrt-facts.md (section 5). UNVERIFIED marks an inference that was
not read in a source for that exact version.

Severity: "error" = the parser or builder rejects the graph (or the fact says it must not occur);
"warning" = it builds but something is slow, undocumented or needs care at run time.

Torch-free: onnx and numpy only. External weights are not loaded (only the few constants a rule
needs, such as a Q/DQ zero point, are read), so linting a multi-GB backbone is cheap.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, numpy_helper, shape_inference

from qinyu_edge.errors import ConfigError

log = logging.getLogger(__name__)

Version = tuple[int, int]
Severity = Literal["error", "warning"]

# The TensorRT versions our targets run (tensorrt-facts.md section 1): JetPack 6 (10.3), JetPack 7.0
# on Thor (10.13), JetPack 7.2 and the last 10.x wheels (10.16), TensorRT 11.4 (x86, AGX Orin/Thor).
TRT_FAMILIES: tuple[str, ...] = ("10.3", "10.13", "10.16", "11.4")
MIN_VERSION: Version = (10, 0)

# An int64 tensor that carries data (not shapes) and may hold more elements than this is reported.
HOT_INT64_ELEMENTS = 4096
# TopK's K must be below this [OPS10.1].
TOPK_MAX_K = 3840


def parse_trt_version(version: str | Sequence[int]) -> Version:
    """"10.16.2.10", "10.3", (11, 4) -> (major, minor). Patch levels do not change what the parser reads."""
    if isinstance(version, str):
        m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)*\s*", version)
        if not m:
            raise ConfigError(f"TensorRT version {version!r} is not of the form MAJOR.MINOR[.PATCH]; "
                              f"use one of {', '.join(TRT_FAMILIES)}")
        v = (int(m.group(1)), int(m.group(2)))
    else:
        v = (int(version[0]), int(version[1]))
    if v < MIN_VERSION:
        raise ConfigError(f"TensorRT {v[0]}.{v[1]} is older than qinyu-edge supports (10.x or 11.x). On Jetson, "
                          "JetPack 6.0 ships TensorRT 8.6: upgrade to JetPack 6.1 or later (TensorRT 10.3).")
    return v


def known_trt_version(version: str) -> Version:
    """A version `lint` has rules for (the families in TRT_FAMILIES): an unknown one would pass every
    check it has no rule for, so it is refused rather than reported as fine."""
    v = parse_trt_version(version)
    if v not in {parse_trt_version(f) for f in TRT_FAMILIES}:
        raise ConfigError(f"TensorRT {version} is unknown to this qinyu-edge: its parser rules cover "
                          f"{', '.join(TRT_FAMILIES)}. Pass one of those to --trt (the nearest older one for a "
                          "version in between), or upgrade qinyu-edge for newer TensorRT releases.")
    return v


def _v(v: Version) -> str:
    return f"{v[0]}.{v[1]}"


# --- opset range -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OpsetRange:
    since: Version  # first TensorRT version with this range
    min_opset: int
    max_opset: int
    source: str


# Newest first; a version takes the first row it has reached.
OPSET_RANGES: tuple[OpsetRange, ...] = (
    OpsetRange((11, 5), 9, 25, "[REL v11.5]"),
    OpsetRange((10, 15), 9, 24, "[OPS10.15]"),
    # 10.11 moved the parser's ONNX to 1.18, which defines opset 23 [OCL]; the range itself is UNVERIFIED.
    OpsetRange((10, 11), 9, 23, "UNVERIFIED: inferred from ONNX 1.18 in the 10.11 parser [OCL]"),
    # 10.9 "added support for opset 21 GroupNorm" [OCL]; the range itself is UNVERIFIED.
    OpsetRange((10, 9), 9, 21, "UNVERIFIED: inferred from opset-21 GroupNorm in 10.9 [OCL]"),
    OpsetRange((10, 0), 9, 20, "[OPS10.1]"),
)


def opset_range(v: Version) -> OpsetRange:
    return next(r for r in OPSET_RANGES if v >= r.since)


# --- operator table --------------------------------------------------------------------------

# Documented input types [OPS10.1], as ONNX TensorProto type names.
_F = frozenset({"FLOAT", "FLOAT16", "BFLOAT16"})
_F32_16 = frozenset({"FLOAT", "FLOAT16"})
_FI = _F | {"INT32", "INT64"}
_FIB = _FI | {"BOOL"}
_B = frozenset({"BOOL"})
_Q = frozenset({"INT8", "FLOAT8E4M3FN", "INT4"})


@dataclass(frozen=True)
class OpSupport:
    since: Version  # first TensorRT version whose parser imports the op
    types: frozenset[str] | None  # documented types of the checked input; None: any
    source: str
    checked_input: int = 0  # which input the type applies to (-1: output 0)


def _ops(names: str, since: Version, types: frozenset[str] | None, source: str, checked_input: int = 0) -> dict[str, OpSupport]:
    return {n: OpSupport(since, types, source, checked_input=checked_input) for n in names.split()}


_BASE = "[OPS10.1]"
OPERATORS: dict[str, OpSupport] = {
    # The 10.1 table; OCL says 10.2 and 10.3 added no operators, 10.1 added DeformConv.
    **_ops("Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Conv ConvTranspose Cos Cosh "
           "CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool "
           "GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf "
           "LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool "
           "MeanVarianceNormalization ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike "
           "RandomUniform RandomUniformLike Reciprocal Resize RNN Round ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax "
           "Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample", (10, 0), _F, _BASE),
    **_ops("Abs Add ArgMax ArgMin DepthToSpace Div Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min Mod Mul "
           "Neg Pad ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd "
           "ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub Sum TopK",
           (10, 0), _FI, _BASE),
    **_ops("Concat Expand Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape ReverseSequence "
           "Slice Split Squeeze Tile Transpose Trilu Unsqueeze", (10, 0), _FIB, _BASE),
    # Equal: the table omits BOOL but the importer accepts every type [SRC10.1 elementwiseCheck].
    "Equal": OpSupport((10, 0), _FIB, "[OPS10.1; SRC10.1]"),
    # Where: the documented type is that of X and Y, not of the condition.
    "Where": OpSupport((10, 0), _FIB, _BASE, checked_input=1),
    # Clip: the table says float only; the importer also takes INT32/INT64 [SRC10.1 Clip].
    "Clip": OpSupport((10, 0), _FI, "[OPS10.1; SRC10.1]"),
    # Range: the importer asserts INT32, INT64 or FP32 [SRC10.1 Range].
    "Range": OpSupport((10, 0), frozenset({"FLOAT", "INT32", "INT64"}), "[SRC10.1]"),
    "Mean": OpSupport((10, 0), _FI | {"FLOAT8E4M3FN"}, _BASE),
    "Gelu": OpSupport((10, 0), _FI | {"INT8"}, _BASE),
    "Cast": OpSupport((10, 0), _FIB | {"UINT8"}, _BASE),
    "CastLike": OpSupport((10, 0), _FIB | {"UINT8"}, _BASE),
    "Constant": OpSupport((10, 0), _FIB, _BASE, checked_input=-1),
    "ConstantOfShape": OpSupport((10, 0), _FIB, _BASE, checked_input=-1),
    "EyeLike": OpSupport((10, 0), _FIB, _BASE, checked_input=-1),
    "Shape": OpSupport((10, 0), None, _BASE),
    "Size": OpSupport((10, 0), None, _BASE),
    "And": OpSupport((10, 0), _B, _BASE),
    "Or": OpSupport((10, 0), _B, _BASE),
    "Xor": OpSupport((10, 0), _B, _BASE),
    "Not": OpSupport((10, 0), _B, _BASE),
    "DequantizeLinear": OpSupport((10, 0), _Q, _BASE),
    "DeformConv": OpSupport((10, 1), _F32_16, "[OPS10.1; OCL 10.1]"),
    "GridSample": OpSupport((10, 0), _F32_16, _BASE),
    "Mish": OpSupport((10, 0), _F32_16, _BASE),
    "NonMaxSuppression": OpSupport((10, 0), _F32_16, _BASE),
    "NonZero": OpSupport((10, 0), _F32_16, _BASE),
    "RoiAlign": OpSupport((10, 0), _F32_16, _BASE),
    # Added later [OCL; OPS10.15; REL].
    **_ops("BlackmanWindow HammingWindow HannWindow", (10, 4), None, "[OCL 10.4]"),
    "STFT": OpSupport((10, 5), frozenset({"FLOAT"}), "[OCL 10.5; OPS10.15]"),
    "Attention": OpSupport((10, 14), _F, "[OCL 10.14]"),
    **_ops("RMSNormalization RotaryEmbedding TensorScatter", (10, 15), _F, "[OCL 10.15]"),
    "DistCollective": OpSupport((10, 16), None, "[REL 10.16 custom op]"),
    "Swish": OpSupport((11, 0), _F, "[REL v11.0]"),
    **_ops("TRT_Attention TRT_MoE TRT_KVCacheUpdate", (11, 0), None, "[REL v11.0; OCUST]"),
    # DFT through a cuFFT plugin; the accepted types are UNVERIFIED (float assumed).
    "DFT": OpSupport((11, 2), _F, "[REL v11.2]"),
}

# Listed as not supported in [OPS10.15]: no importer, so the parser fails on them.
UNSUPPORTED: frozenset[str] = frozenset(
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress "
    "ConcatFromSequence ConvInteger Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool "
    "MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement "
    "QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase "
    "SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat "
    "StringNormalizer StringSplit TfIdfVectorizer Unique".split())

_UNSUPPORTED_FIX: dict[str, str] = {
    "DFT": "compute the transform as a MatMul with a constant DFT basis (real cos/sin matrices), or target TensorRT 11.2+",
    "Unique": "do the deduplication on the host, or restructure so output sizes do not depend on data",
    "Compress": "use Gather with precomputed indices or Where with a mask",
    "DynamicQuantizeLinear": "quantize statically with explicit Q/DQ (ModelOpt), not ONNX Runtime dynamic quantization",
    "MatMulInteger": "use ModelOpt Q/DQ quantization instead of ONNX Runtime integer ops",
    "ConvInteger": "use ModelOpt Q/DQ quantization instead of ONNX Runtime integer ops",
    "QLinearConv": "use ModelOpt Q/DQ quantization (QuantizeLinear/DequantizeLinear around a float Conv)",
    "QLinearMatMul": "use ModelOpt Q/DQ quantization (QuantizeLinear/DequantizeLinear around a float MatMul)",
    "Multinomial": "sample on the host from the logits",
}


def op_support(op_type: str, v: Version) -> OpSupport | None:
    s = OPERATORS.get(op_type)
    return s if s is not None and v >= s.since else None


# --- tensor types ----------------------------------------------------------------------------

_DT = TensorProto.DataType


def _dtname(code: int) -> str:
    try:
        return _DT.Name(code)
    except ValueError:
        return f"type {code}"


# trt.DataType has no member for these [SYM]: they cannot exist in a network.
_NO_TRT_TYPE = {
    "COMPLEX64": "TensorRT has no complex type: split into real and imaginary float tensors (or a trailing axis of 2)",
    "COMPLEX128": "TensorRT has no complex type: split into real and imaginary float tensors (or a trailing axis of 2)",
    "STRING": "strings cannot enter a TensorRT network: tokenize on the host",
    "INT16": "TensorRT has no INT16: cast to INT32 in the graph (or keep INT16 on the host)",
    "UINT16": "TensorRT has no UINT16: cast to INT32",
    "UINT32": "TensorRT has no UINT32: cast to INT32 or INT64",
    "UINT64": "TensorRT has no UINT64: cast to INT64",
    "UINT4": "TensorRT has only signed INT4: re-quantize symmetrically to INT4",
    "FLOAT8E5M2": "TensorRT's FP8 is E4M3: quantize to FLOAT8E4M3FN",
    "FLOAT8E4M3FNUZ": "TensorRT's FP8 is E4M3FN: quantize to FLOAT8E4M3FN",
    "FLOAT8E5M2FNUZ": "TensorRT's FP8 is E4M3FN: quantize to FLOAT8E4M3FN",
}
# Quantized types live only between Q and DQ [OPS10.15]; FP4 exists from 10.8 [OCL] (trt.DataType.FP4 is
# absent in 10.3 [SYM]); E8M0 (MX scales) from 10.13 in [SYM].
_QUANTIZED_SINCE: dict[str, Version] = {
    "INT8": (10, 0), "FLOAT8E4M3FN": (10, 0), "INT4": (10, 0), "FLOAT4E2M1": (10, 8), "FLOAT8E8M0": (10, 13),
}


# --- findings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    severity: Severity
    node: str  # node name (with its subgraph path), or "<graph input>", "<model>"
    op: str  # op type, or "" for a model-level finding
    message: str
    fix: str
    rule: str  # a stable id, e.g. "unsupported-op", "dtype", "int64-hot"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# --- graph facts -----------------------------------------------------------------------------


@dataclass
class _Graph:
    """What the rules need to know about one model, gathered once."""

    path: Path
    opset: int
    dtype: dict[str, int] = field(default_factory=dict)
    shape: dict[str, tuple[int | str | None, ...]] = field(default_factory=dict)
    initializers: dict[str, TensorProto] = field(default_factory=dict)
    constants: dict[str, TensorProto] = field(default_factory=dict)  # Constant-node outputs
    producer: dict[str, NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[NodeProto]] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)
    value_dependent: set[str] = field(default_factory=set)  # depends on input values, not only shapes
    functions: set[tuple[str, str]] = field(default_factory=set)

    def is_constant(self, name: str) -> bool:
        """An initializer or a Constant node's output: what the parser imports as weights."""
        return name in self.initializers or name in self.constants

    def value(self, name: str) -> np.ndarray | None:
        t = self.initializers.get(name) or self.constants.get(name)
        if t is None:
            return None
        try:
            return numpy_helper.to_array(t, base_dir=str(self.path.parent))
        except (OSError, ValueError) as e:
            log.debug("could not read constant %s: %s", name, e)
            return None

    def type_name(self, name: str) -> str | None:
        code = self.dtype.get(name)
        return None if code is None else _dtname(code)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        s = self.shape.get(name)
        if s is None or any(not isinstance(d, int) for d in s):
            return None
        return tuple(s)  # type: ignore[arg-type]


def _constant_tensor(node: NodeProto) -> TensorProto | None:
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
            v = onnx.helper.get_attribute_value(a)
            dt = np.float32 if "float" in a.name else np.int64
            return numpy_helper.from_array(np.array(v, dtype=dt))
    return None


def _record_value_info(g: _Graph, vi: onnx.ValueInfoProto) -> None:
    tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if tt is None:
        return
    if tt.elem_type:
        g.dtype[vi.name] = tt.elem_type
    if tt.HasField("shape"):
        g.shape[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)


def _subgraphs(node: NodeProto) -> Iterator[tuple[str, GraphProto]]:
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == AttributeProto.GRAPHS:
            for i, sg in enumerate(a.graphs):
                yield f"{a.name}[{i}]", sg


def _walk(graph: GraphProto, prefix: str = "") -> Iterator[tuple[str, NodeProto]]:
    for i, node in enumerate(graph.node):
        name = prefix + (node.name or f"<{node.op_type}#{i}>")
        yield name, node
        for attr, sg in _subgraphs(node):
            yield from _walk(sg, f"{name}/{attr}/")


def _collect(graph: GraphProto, g: _Graph) -> None:
    for t in graph.initializer:
        g.initializers[t.name] = t
        g.dtype.setdefault(t.name, t.data_type)
        g.shape.setdefault(t.name, tuple(t.dims))
    for vi in (*graph.input, *graph.output, *graph.value_info):
        _record_value_info(g, vi)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            t = _constant_tensor(node)
            if t is not None:
                g.constants[node.output[0]] = t
                g.dtype.setdefault(node.output[0], t.data_type)
                g.shape.setdefault(node.output[0], tuple(t.dims))
        for o in node.output:
            if o:
                g.producer[o] = node
        for i in node.input:
            if i:
                g.consumers.setdefault(i, []).append(node)
        for _, sg in _subgraphs(node):
            # Names a subgraph reads from the outer scope count as inputs of the outer node.
            inner = {o for n in sg.node for o in n.output} | {i.name for i in sg.input} | {t.name for t in sg.initializer}
            for n in sg.node:
                for i in n.input:
                    if i and i not in inner:
                        g.consumers.setdefault(i, []).append(node)
            _collect(sg, g)


def _value_dependence(graph: GraphProto, g: _Graph, seeds: set[str]) -> None:
    """Mark tensors whose values depend on graph-input values; Shape and Size cut the dependence."""
    dep = g.value_dependent
    dep |= seeds
    for node in graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        reads = [i for i in node.input if i]
        for _, sg in _subgraphs(node):
            reads += [i for n in sg.node for i in n.input if i]
        if any(i in dep for i in reads):
            dep.update(o for o in node.output if o)
            for _, sg in _subgraphs(node):
                _value_dependence(sg, g, {i.name for i in sg.input})


def _load(path: Path) -> tuple[ModelProto, list[Finding]]:
    model = onnx.load(str(path), load_external_data=False)
    notes: list[Finding] = []
    try:
        # Without weights the proto is small, so this works for multi-GB models too.
        model = shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # onnx raises several types here (InferenceError, ValidationError, RuntimeError)
        notes.append(Finding("warning", "<model>", "", f"ONNX shape inference failed ({e}); type checks see only "
                             "the declared tensors", "run onnx.checker.check_model(path, full_check=True) and fix what it reports",
                             "shape-inference"))
    return model, notes


def _facts(model: ModelProto, path: Path) -> _Graph:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    g = _Graph(path=path, opset=opset)
    _collect(model.graph, g)
    g.graph_inputs = {i.name for i in model.graph.input} - set(g.initializers)
    g.graph_outputs = {o.name for o in model.graph.output}
    _value_dependence(model.graph, g, set(g.graph_inputs))
    g.functions = {(f.domain, f.name) for f in model.functions}
    return g


# --- rules -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
    g: _Graph
    v: Version
    nodes: list[tuple[str, NodeProto]]  # every node, subgraphs and local functions included
    dim_max: Mapping[str, int]  # named dynamic axis -> its profile maximum


def _f(sev: Severity, name: str, node: NodeProto, rule: str, message: str, fix: str) -> Finding:
    return Finding(sev, name, node.op_type, message, fix, rule)


def _attr(node: NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _in(node: NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _needs_initializer(ctx: _Ctx, name: str, node: NodeProto, idx: int, what: str, src: str,
                       severity: Severity = "error") -> Iterator[Finding]:
    t = _in(node, idx)
    if t and not ctx.g.is_constant(t):
        yield _f(severity, name, node, "constant-input",
                 f"{what} ({t!r}) is computed at run time; TensorRT {_v(ctx.v)} needs it as an initializer {src}",
                 f"make {what} a constant in the export (a Python int/list, not a tensor expression), "
                 "or fold it with onnxsim / onnx-graphsurgeon fold_constants")


_REDUCE = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare"}
_BOOL_ONLY = {"And", "Or", "Xor"}
_NO_BOOL_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Greater", "Less", "GreaterOrEqual", "LessOrEqual",
                        "Sum", "Mean"}
# Ops the parser maps to IUnaryLayer; by default it refuses BOOL, INT32, INT64 and UINT8 [SRC10.1 unaryHelper].
_FLOAT_UNARY = {"Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Ceil", "Cos", "Cosh", "Erf", "Exp", "Floor", "Log",
                "Reciprocal", "Round", "Sin", "Sinh", "Sqrt", "Tan"}
_NO_BOOL_UNARY = {"Abs", "Sign", "Neg"}
_INTS = {"INT32", "INT64"}
# Types an importer refuses outright (notInvalidType in [SRC10.1]), per input index. UINT8 refusals are
# left out: UINT8 inside the network is already an error of its own.
REFUSED_TYPES: dict[str, dict[int, frozenset[str]]] = {
    "MatMul": {0: frozenset(_INTS)},
    "Gemm": {0: frozenset(_INTS)},
    "PRelu": {0: frozenset(_INTS), 1: frozenset(_INTS)},
    "Hardmax": {0: frozenset({"INT64", "INT32", "INT8", "BOOL"})},
    "Resize": {0: frozenset({"BOOL"})},
    "Upsample": {0: frozenset({"BOOL"})},
    "GridSample": {0: frozenset({"BOOL"}), 1: frozenset({"BOOL"})},
    "SpaceToDepth": {0: frozenset({"BOOL"})},
}


def _rule_types(ctx: _Ctx, name: str, node: NodeProto) -> Iterator[Finding]:
    """Type asserts the importer really makes [SRC10.1], then the documented type list [OPS10.1]."""
    g, op = ctx.g, node.op_type
    types = [g.type_name(i) if i else None for i in node.input]
    if op in _BOOL_ONLY and any(t not in (None, "BOOL") for t in types):
        yield _f("error", name, node, "op-type", f"{op} on {'/'.join(t for t in types if t)}: TensorRT takes BOOL only [SRC10.1]",
                 "cast the operands to BOOL first (or use Mul/Add on 0/1 floats)")
        return
    if op in _NO_BOOL_ELEMENTWISE and "BOOL" in types:
        yield _f("error", name, node, "op-type", f"{op} on BOOL: TensorRT's elementwise layer refuses BOOL for this "
                 "operation [SRC10.1]", "use And/Or/Xor/Not for logic, or Cast the BOOL operand to INT32/FLOAT first")
        return
    if op == "Pow":
        base, expo = (types + [None, None])[:2]
        bad = [("base", base, (10, 12)), ("exponent", expo, (10, 8))]
        for what, t, since in bad:
            if t == "BOOL" or (t in _INTS and ctx.v < since):
                yield _f("error", name, node, "op-type", f"Pow with an {t} {what}: TensorRT {_v(ctx.v)} takes integer "
                         f"{what}s only from {_v(since)} [SRC10.1; OCL]",
                         f"Cast the {what} to FLOAT (or write x*x for a square)")
                return
        return
    if op in _FLOAT_UNARY and types and types[0] in {"BOOL", "INT32", "INT64", "UINT8"}:
        yield _f("error", name, node, "op-type", f"{op} on {types[0]}: TensorRT's unary layer refuses BOOL, INT32, "
                 "INT64 and UINT8 for it [SRC10.1]", f"Cast the input to FLOAT before {op}")
        return
    if op in _NO_BOOL_UNARY and types and types[0] in {"BOOL", "UINT8"}:
        yield _f("error", name, node, "op-type", f"{op} on {types[0]} is refused by TensorRT [SRC10.1]",
                 f"Cast the input to INT32 or FLOAT before {op}")
        return
    for idx, refused in REFUSED_TYPES.get(op, {}).items():
        t = types[idx] if idx < len(types) else None
        if t in refused:
            yield _f("error", name, node, "op-type", f"{op} input {idx} is {t}: the TensorRT importer refuses it [SRC10.1]",
                     f"Cast input {idx} to FLOAT (or FLOAT16) before {op}")
            return
    s = op_support(op, ctx.v)
    if s is None or s.types is None:
        return
    if s.checked_input == -1:
        t = g.type_name(node.output[0]) if node.output else None
    else:
        i = _in(node, s.checked_input)
        t = g.type_name(i) if i else None
    if t is None or t in s.types or (t == "DOUBLE" and "FLOAT" in s.types):
        return
    sev: Severity = "error" if op in ("Range", "Clip", "Cast", "CastLike") else "warning"
    yield _f(sev, name, node, "op-type", f"{op} on {t}: not among the types TensorRT documents for it "
             f"({', '.join(sorted(s.types))}) {s.source}",
             f"Cast to {'FLOAT' if _F & s.types else min(s.types)} around this node, or check on the device "
             "that the builder accepts it")


def _rule_axes(ctx: _Ctx, name: str, node: NodeProto) -> Iterator[Finding]:
    op, v, g = node.op_type, ctx.v, ctx.g
    if op in _REDUCE and _in(node, 1):
        yield from _needs_initializer(ctx, name, node, 1, "the `axes` input", "[OPS10.1]")
    elif op == "Slice" and v < (10, 3) and _in(node, 3):
        yield from _needs_initializer(ctx, name, node, 3, "the `axes` input", "(tensor axes from 10.3) [OCL]")
    elif op == "Pad" and v < (10, 4) and _in(node, 3):
        yield from _needs_initializer(ctx, name, node, 3, "the `axes` input", "(tensor axes from 10.4) [OCL]")
    elif op in ("Squeeze", "Unsqueeze"):
        if _in(node, 1):
            # 10.7 claims dynamic axes [OCL]; the facts keep "must resolve to a constant" (UNVERIFIED either way).
            sev: Severity = "error" if v < (10, 7) else "warning"
            yield from _needs_initializer(ctx, name, node, 1, "the `axes` input", "[OPS10.1; 10.7+ UNVERIFIED]", sev)
        elif op == "Squeeze" and _attr(node, "axes") is None and v < (11, 5) and g.static_shape(node.input[0]) is None:
            yield _f("error", name, node, "squeeze-no-axes", "Squeeze without axes on a tensor with dynamic dimensions: "
                     f"TensorRT {_v(v)} cannot tell which axes are 1 (allowed from 11.5) [SRC10.1; REL v11.5]",
                     "give Squeeze explicit axes (squeeze(dim) in PyTorch, not squeeze())")
    elif op == "CumSum":
        sev = "error" if v < (10, 8) else "warning"
        yield from _needs_initializer(ctx, name, node, 1, "the `axis` input", "(a build-time constant from 10.8) [OCL]", sev)


def _rule_restrictions(ctx: _Ctx, name: str, node: NodeProto) -> Iterator[Finding]:
    op, v, g = node.op_type, ctx.v, ctx.g
    if op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            yield _f("error", name, node, "topk", "TopK with sorted=0: TensorRT needs sorted=1 [OPS10.1]",
                     "export with sorted=True")
        k = g.value(_in(node, 1)) if _in(node, 1) else None
        if k is not None and int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
            yield _f("error", name, node, "topk", f"TopK with K={int(np.asarray(k).reshape(-1)[0])}: TensorRT needs "
                     f"K < {TOPK_MAX_K} [OPS10.1]", "sample on the host (full-vocabulary top-p does not fit TopK)")
        elif k is None:
            yield _f("warning", name, node, "topk", f"TopK's K is computed at run time; TensorRT fails at run time "
                     f"when K >= {TOPK_MAX_K} [OPS10.1]", f"keep K below {TOPK_MAX_K} or sample on the host")
    elif op == "ScatterND":
        red = _attr(node, "reduction", b"none")
        if (red.decode() if isinstance(red, bytes) else red) != "none":
            yield _f("error", name, node, "scatternd-reduction", f"ScatterND with reduction={red!r}: TensorRT supports "
                     "only reduction='none' [OPS10.1]", "use ScatterElements (reduction supported from 10.0) or "
                     "write the update with a one-hot MatMul/Add")
        elif g.opset >= 18 and v < (10, 9):
            yield _f("warning", name, node, "scatternd-opset18", f"ScatterND at opset {g.opset} is imported correctly "
                     "only from TensorRT 10.9 [OCL]", "export with opset 17 for this TensorRT")
    elif op == "Einsum" and v < (10, 12):
        eq = _attr(node, "equation", b"")
        eq = eq.decode() if isinstance(eq, bytes) else eq
        lhs = eq.split("->")[0].replace(" ", "")
        if "..." in lhs or any(len(set(term)) != len(term) for term in lhs.split(",")):
            yield _f("error", name, node, "einsum", f"Einsum {eq!r} uses an ellipsis or a diagonal: TensorRT "
                     f"{_v(v)} supports them from 10.12 [OCL]", "rewrite as MatMul/Transpose/ReduceSum")
    elif op == "LayerNormalization" and sum(1 for o in node.output[1:] if o) > 0:
        yield _f("error", name, node, "layernorm-outputs", "LayerNormalization with Mean/InvStdDev outputs: TensorRT "
                 "produces only Y [OPS10.1]", "export for inference (training outputs off)")
    elif op == "MaxPool" and len([o for o in node.output if o]) > 1:
        yield _f("error", name, node, "maxpool-indices", "MaxPool's Indices output is unsupported [OPS10.1]",
                 "drop return_indices; compute indices with ArgMax if needed")
    elif op in ("AveragePool", "MaxPool", "LpPool"):
        d = _attr(node, "dilations")
        if d and any(x != 1 for x in d):
            yield _f("error", name, node, "pool-dilations", f"{op} with dilations {list(d)}: TensorRT needs none or "
                     "all ones [OPS10.1]", "use undilated pooling")
    elif op in ("LSTM", "GRU", "RNN"):
        if op == "LSTM" and (_attr(node, "input_forget", 0) != 0 or _attr(node, "layout", 0) != 0):
            yield _f("error", name, node, "rnn", "LSTM with input_forget or layout != 0 [OPS10.1]",
                     "export with batch_first=False and no input-forget coupling")
        acts = _attr(node, "activations")
        if _attr(node, "direction", b"forward") in (b"bidirectional", "bidirectional") and acts:
            half = len(acts) // 2
            if list(acts[:half]) != list(acts[half:]):
                yield _f("error", name, node, "rnn", f"bidirectional {op} with different activations per direction "
                         "[OPS10.1]", "use the same activations in both directions")
    elif op == "Resize":
        yield from _rule_resize(ctx, name, node)
    elif op == "Constant":
        if any(a.name in ("sparse_value", "value_string", "value_strings") for a in node.attribute):
            yield _f("error", name, node, "constant", "Constant with a sparse or string value [OPS10.1]",
                     "store a dense numeric tensor")
    elif op == "Dropout" and _in(node, 2):
        val = g.value(node.input[2])
        if val is None or bool(np.asarray(val).reshape(-1)[0]):
            yield _f("error", name, node, "dropout", "Dropout's training_mode must be a constant False [OPS10.1]",
                     "export in eval mode (model.eval())")
    elif op in ("OneHot", "Hardmax", "EyeLike"):
        if op == "OneHot" and not g.is_constant(_in(node, 1)):
            yield _f("warning", name, node, "build-time-constant", "OneHot's depth must be a build-time constant "
                     "[OPS10.1]", "pass depth as a Python int in the export")
        if op == "EyeLike" and g.static_shape(node.input[0]) is None:
            yield _f("error", name, node, "build-time-constant", "EyeLike needs an input of static shape [OPS10.1]",
                     "build the identity from a constant")
        if op == "Hardmax":
            shape = g.shape.get(node.input[0])
            axis = _attr(node, "axis", -1)
            if shape is not None and -len(shape) <= axis < len(shape) and not isinstance(shape[axis], int):
                yield _f("error", name, node, "build-time-constant", "Hardmax's axis dimension must be a build-time "
                         "constant [OPS10.1]", "fix that dimension in the export")
    elif op in ("NonZero", "NonMaxSuppression"):
        yield _f("warning", name, node, "data-dependent-shape", f"{op} has a data-dependent output shape: the runtime "
                 "needs an IOutputAllocator and CUDA graphs cannot capture it [tensorrt-facts 3]",
                 "use a fixed-size formulation (mask + Where) if this is on the per-step path")
    elif op in ("QuantizeLinear", "DequantizeLinear"):
        yield from _rule_qdq(ctx, name, node)
    elif op == "GridSample" and v < (11, 2):
        shape = g.shape.get(node.input[0])
        if shape is not None and len(shape) == 5:
            yield _f("error", name, node, "gridsample-5d", f"5-D GridSample needs TensorRT 11.2+ (this is {_v(v)}) [REL v11.2]",
                     "use 4-D inputs")
    elif op == "STFT":
        yield from _rule_stft(ctx, name, node)
    elif op == "Attention":
        yield from _rule_attention(ctx, name, node)
    elif op == "RotaryEmbedding" and _in(node, 3) and g.type_name(node.input[3]) not in (None, "INT64"):
        yield _f("error", name, node, "rotary", "RotaryEmbedding's position_ids must be INT64 [OPS10.15]",
                 "Cast position_ids to INT64")
    elif op == "TensorScatter":
        if _attr(node, "axis", -2) != -2:
            yield _f("error", name, node, "tensorscatter", "TensorScatter needs axis=-2 [OPS10.15]", "scatter along the sequence axis (-2)")
        shape = g.shape.get(node.input[0])
        if shape is not None and len(shape) != 4:
            yield _f("error", name, node, "tensorscatter", f"TensorScatter needs 4-D tensors (got {len(shape)}-D) [OPS10.15]",
                     "lay the cache out as [B, H, S, D]")
    elif op in ("If", "Loop"):
        yield from _rule_control_flow(ctx, name, node)


def _rule_resize(ctx: _Ctx, name: str, node: NodeProto) -> Iterator[Finding]:
    def s(attr: str, default: str) -> str:
        val = _attr(node, attr, default)
        return val.decode() if isinstance(val, bytes) else val

    problems = []
    if s("coordinate_transformation_mode", "half_pixel") not in (
            "half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"):
        problems.append(f"coordinate_transformation_mode={s('coordinate_transformation_mode', '')}")
    if s("mode", "nearest") not in ("nearest", "linear"):
        problems.append(f"mode={s('mode', '')}")
    if s("nearest_mode", "round_prefer_floor") not in ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"):
        problems.append(f"nearest_mode={s('nearest_mode', '')}")
    if s("keep_aspect_ratio_policy", "stretch") != "stretch":
        problems.append(f"keep_aspect_ratio_policy={s('keep_aspect_ratio_policy', '')}")
    if _attr(node, "antialias", 0):
        problems.append("antialias=1")
    if problems:
        yield _f("error", name, node, "resize", f"Resize with {', '.join(problems)}: unsupported by TensorRT [OPS10.1]",
                 "use nearest or linear with half_pixel/asymmetric/align_corners and no antialiasing")


def _rule_qdq(ctx: _Ctx, name: str, node: NodeProto) -> Iterator[Finding]:
    g = ctx.g
    zp = _in(node, 2)
    if zp:
        val = g.value(zp)
        if val is None and not g.is_constant(zp):
            yield _f("error", name, node, "qdq-zero-point", "the zero point is computed at run time; TensorRT needs a "
                     "constant zero [OPS10.1]", "quantize symmetrically (ModelOpt does by default)")
        elif val is not None and np.any(np.asarray(val) != 0):
            yield _f("error", name, node, "qdq-zero-point", "non-zero zero point: TensorRT supports symmetric "
                     "quantization only [OPS10.1]", "re-quantize symmetrically (ModelOpt; use_zero_point=False for INT4)")
    block = _attr(node, "block_size", 0)
    if block and ctx.v < (10, 4) and node.op_type == "DequantizeLinear":
        shape = g.shape.get(node.input[0])
        if g.type_name(node.input[0]) != "INT4" or shape is None or len(shape) != 2 or not g.is_constant(node.input[0]):
            yield _f("error", name, node, "qdq-blocked", f"blocked DequantizeLinear on TensorRT {_v(ctx.v)} works only on "
                     "2-D INT4 constants [tensorrt-facts 6; the version that relaxes it is UNVERIFIED, taken as 10.4]", "block-quantize only 2-D INT4 MatMul weights for this version")


def _rule_stft(ctx: _Ctx, name: str, node: NodeProto) -> Iterator[Finding]:
    g = ctx.g
    if g.type_name(node.input[0]) not in (None, "FLOAT"):
        yield _f("error", name, node, "stft", "STFT takes FP32 only [OPS10.15]", "Cast the signal to FLOAT")
    shape = g.shape.get(node.input[0])
    if shape is not None and shape and shape[-1] == 2:
        yield _f("error", name, node, "stft", "STFT on a complex signal: TensorRT takes real input only [OPS10.15]",
                 "pass the real signal ([..., 1])")
    for idx, what in ((1, "frame_step"), (2, "window")):
        if _in(node, idx):
            yield from _needs_initializer(ctx, name, node, idx, f"STFT's `{what}`", "[OPS10.15]")


def _rule_attention(ctx: _Ctx, name: str, node: NodeProto) -> Iterator[Finding]:
    g = ctx.g
    for idx, what in ((0, "Q"), (1, "K"), (2, "V"), (3, "mask")):
        shape = g.shape.get(_in(node, idx)) if _in(node, idx) else None
        if shape is not None and len(shape) != 4:
            yield _f("error", name, node, "attention", f"Attention's {what} is {len(shape)}-D; TensorRT needs 4-D [OPS10.15]",
                     "reshape to [B, heads, S, head_dim] before Attention")
    extra_in = [what for idx, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")) if _in(node, idx)]
    extra_out = [what for idx, what in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output"))
                 if len(node.output) > idx and node.output[idx]]
    if extra_in or extra_out or _attr(node, "softcap", 0.0):
        what = ", ".join(extra_in + extra_out + (["softcap"] if _attr(node, "softcap", 0.0) else []))
        yield _f("error", name, node, "attention", f"Attention with {what}: unsupported by TensorRT [OPS10.15]",
                 "keep the KV cache outside the Attention node (Concat past and new K/V) and drop softcap")


def _rule_control_flow(ctx: _Ctx, name: str, node: NodeProto) -> Iterator[Finding]:
    g = ctx.g
    if node.op_type == "If":
        then_g = _attr(node, "then_branch")
        else_g = _attr(node, "else_branch")
        if then_g is None or else_g is None:
            return
        for i, (a, b) in enumerate(zip(then_g.output, else_g.output)):
            if a.name == b.name:
                yield _f("error", name, node, "if-branches", f"If output {i}: both branches name it {a.name!r}; "
                         "TensorRT needs distinct names [OPS10.1]", "add an Identity in one branch")
            sa, sb = g.shape.get(a.name), g.shape.get(b.name)
            if sa is not None and sb is not None:
                if len(sa) != len(sb):
                    yield _f("error", name, node, "if-branches", f"If output {i}: rank {len(sa)} in then, {len(sb)} "
                             "in else; TensorRT needs the same rank [OPS10.1]", "make both branches return the same rank")
                elif any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(sa, sb)):
                    yield _f("warning", name, node, "data-dependent-shape", f"If output {i} has shape {list(sa)} or "
                             f"{list(sb)} depending on the condition: a data-dependent shape", "compute both and select with Where")
        return
    # Loop
    body = _attr(node, "body")
    if body is None:
        return
    n_carried = len(node.input) - 2
    n_scan = len(body.output) - 1 - n_carried
    if n_scan > 0 and not (_in(node, 0) and g.is_constant(node.input[0])):
        yield _f("error", name, node, "loop-scan-output", "Loop with scan outputs and a trip count computed at run time: "
                 "TensorRT needs a static scan-output length [OPS10.1]",
                 "make the trip count a constant, or carry a fixed-size buffer instead of scan outputs")
    for i in range(n_carried):
        sin, sout = g.shape.get(body.input[2 + i].name), g.shape.get(body.output[1 + i].name)
        if sin is not None and sout is not None and (len(sin) != len(sout) or any(
                isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(sin, sout))):
            yield _f("error", name, node, "loop-carried-shape", f"loop-carried value {i} changes shape "
                     f"({list(sin)} -> {list(sout)}): TensorRT needs the same shape every iteration [OPS10.1]",
                     "preallocate the carried tensor at its final size")


def _rule_op_supported(ctx: _Ctx, name: str, node: NodeProto) -> Iterator[Finding]:
    op, v = node.op_type, ctx.v
    if (node.domain, op) in ctx.g.functions:
        return  # a local function: the parser expands it (9.0+) and its body is linted instead
    if node.domain not in ("", "ai.onnx", "trt", "trt.plugins"):
        yield _f("error", name, node, "unsupported-op", f"{node.domain}::{op} is not an ONNX operator; TensorRT imports "
                 "it only through a registered plugin of that name", "export without runtime-specific contrib ops "
                 "(e.g. no ONNX Runtime transformer fusions) or provide a TensorRT plugin")
        return
    s = OPERATORS.get(op)
    if s is not None and v >= s.since:
        return
    if s is not None:
        fix = _UNSUPPORTED_FIX.get(op, f"target TensorRT {_v(s.since)} or later, or decompose {op} into supported ops")
        yield _f("error", name, node, "unsupported-op", f"{op} is parsed from TensorRT {_v(s.since)} on; TensorRT {_v(v)} "
                 f"fails on it {s.source}", fix)
    elif op in UNSUPPORTED:
        yield _f("error", name, node, "unsupported-op", f"{op} is not supported by the TensorRT ONNX parser "
                 "[OPS10.15]", _UNSUPPORTED_FIX.get(op, f"decompose {op} into supported ops before export"))
    else:
        yield _f("error", name, node, "unsupported-op", f"{op} is not in TensorRT's ONNX operator table; the parser will "
                 "look for a plugin of that name and fail", f"decompose {op} into supported ops, or provide a plugin")


def _type_findings(ctx: _Ctx) -> Iterator[Finding]:
    """Tensor types TensorRT has no place for: complex, string, unsigned, quantized outside Q/DQ."""
    g, v = ctx.g, ctx.v
    for tensor, code in g.dtype.items():
        t = _dtname(code)
        node = g.producer.get(tensor)
        if node is not None:
            where, op = node.name or f"<{node.op_type}>", node.op_type
        else:
            where = ("<initializer>" if tensor in g.initializers else
                     "<graph input>" if tensor in g.graph_inputs else "<subgraph input>")
            op = ""
        if t in _NO_TRT_TYPE:
            yield Finding("error", where, op, f"tensor {tensor!r} is {t}: TensorRT has no such type [SYM]",
                          _NO_TRT_TYPE[t], "dtype")
        elif t == "DOUBLE":
            yield Finding("warning", where, op, f"tensor {tensor!r} is DOUBLE: TensorRT casts it to FLOAT, clamping "
                          "to +-FLT_MAX [OPS10.1]", "keep the graph in float32: no float64 tensors in the export (TorchScript also "
                          "casts to DOUBLE in front of IsInf, i.e. torch.isinf/isfinite)", "dtype")
        elif t == "UINT8":
            io = tensor in g.graph_inputs or tensor in g.graph_outputs
            qdq_const = g.is_constant(tensor) and all(c.op_type in ("QuantizeLinear", "DequantizeLinear")
                                                      for c in g.consumers.get(tensor, []))
            if not io and not (qdq_const and v >= (10, 10)):
                yield Finding("error", where, op, f"tensor {tensor!r} is UINT8 inside the network: TensorRT allows UINT8 "
                              "only as network input or output [OPS10.1]", "keep UINT8 at the graph boundary and Cast "
                              "right after the input (or before the output)", "dtype")
        elif t in _QUANTIZED_SINCE:
            if v < _QUANTIZED_SINCE[t]:
                yield Finding("error", where, op, f"tensor {tensor!r} is {t}, which TensorRT {_v(v)} lacks (from "
                              f"{_v(_QUANTIZED_SINCE[t])}) [SYM; OCL]", "quantize to INT8 or FP8 for this version", "dtype")
                continue
            # Q/DQ, plus TensorRT's own quantize ops (e.g. the MXFP8 ones from 10.12) [OCL].
            ok_producer = node is None or "quantize" in node.op_type.lower()
            ok_consumers = all("quantize" in c.op_type.lower() for c in g.consumers.get(tensor, []))
            if not (ok_producer and ok_consumers):
                yield Finding("error", where, op, f"tensor {tensor!r} is {t} outside a Q/DQ pair: TensorRT reaches "
                              "quantized types only through QuantizeLinear/DequantizeLinear [OPS10.15]",
                              "dequantize right after the quantized value (ModelOpt-style explicit Q/DQ)", "dtype")
        elif t == "BFLOAT16" or t in ("FLOAT", "FLOAT16", "INT32", "INT64", "BOOL", "UNDEFINED"):
            continue
        else:
            yield Finding("error", where, op, f"tensor {tensor!r} is {t}: no TensorRT type [SYM]",
                          "cast to a float or INT32/INT64 type", "dtype")
    for name, node in ctx.nodes:
        if node.op_type in ("Cast", "CastLike"):
            to = _attr(node, "to")
            if to is not None and _dtname(to) in _NO_TRT_TYPE:
                yield _f("error", name, node, "dtype", f"Cast to {_dtname(to)}: TensorRT has no such type [SYM]",
                         _NO_TRT_TYPE[_dtname(to)])


def _max_elements(shape: tuple[int | str | None, ...] | None, dim_max: Mapping[str, int]) -> int | None:
    """Element count at the profile maximum; None when some dimension has no known bound."""
    if shape is None:
        return None
    size = 1
    for d in shape:
        bound = d if isinstance(d, int) else dim_max.get(d) if isinstance(d, str) else None
        if bound is None:
            return None
        size *= bound
    return size


def _int64_findings(ctx: _Ctx) -> Iterator[Finding]:
    """INT64 is native in TensorRT 10 [OCL 9.0], but carrying data (not shapes) in it costs twice the bytes
    of INT32 and narrows the kernels TensorRT can pick; report it where the tensor can be large."""
    g = ctx.g
    for name, node in ctx.nodes:
        for o in node.output:
            if not o or g.type_name(o) != "INT64" or o not in g.value_dependent:
                continue
            shape = g.shape.get(o)
            size = _max_elements(shape, ctx.dim_max)
            if size is not None and size <= HOT_INT64_ELEMENTS:
                continue
            dims = "unknown shape" if shape is None else f"shape {[d for d in shape]}"
            yield _f("warning", name, node, "int64-hot", f"INT64 tensor {o!r} ({dims}) carries data computed from the "
                     "inputs: TensorRT runs it natively, but at twice the memory traffic of INT32",
                     "cast to INT32 early (ids and positions fit) or keep the computation on the host")


# --- entry points ----------------------------------------------------------------------------


def _lint(model: ModelProto, path: Path, v: Version, notes: list[Finding], dim_max: Mapping[str, int]) -> list[Finding]:
    g = _facts(model, path)
    findings = list(notes)
    r = opset_range(v)
    if g.opset == 0:
        findings.append(Finding("error", "<model>", "", "the model imports no ai.onnx opset", "re-export the model", "opset"))
    elif g.opset < r.min_opset:
        findings.append(Finding("error", "<model>", "", f"opset {g.opset} is below {r.min_opset}, the oldest TensorRT "
                                f"{_v(v)} supports {r.source}", "re-export with opset 17 (qinyu-edge's default)", "opset"))
    elif g.opset > r.max_opset:
        # The parser does not refuse newer opsets (ModelOpt's opset-21 INT4 graphs build on 10.3); it imports
        # each node with its newest importer, so an op whose schema changed later can be misread.
        findings.append(Finding("warning", "<model>", "", f"opset {g.opset} is above {r.max_opset}, the newest TensorRT "
                                f"{_v(v)} documents {r.source}; ops whose schema changed after opset {r.max_opset} "
                                "may be imported wrongly", f"export with opset {min(17, r.max_opset)} unless an op needs "
                                "the newer opset (blocked Q/DQ needs 21)", "opset"))
    nodes = list(_walk(model.graph))
    for f in model.functions:
        nodes += [(f"{f.name}/{n.name or f'<{n.op_type}#{i}>'}", n) for i, n in enumerate(f.node)]
    ctx = _Ctx(g, v, nodes, dim_max)
    for name, node in nodes:
        findings += _rule_op_supported(ctx, name, node)
        if node.domain not in ("", "ai.onnx"):
            continue
        findings += _rule_types(ctx, name, node)
        findings += _rule_axes(ctx, name, node)
        findings += _rule_restrictions(ctx, name, node)
    findings += _type_findings(ctx)
    findings += _int64_findings(ctx)
    return findings


def _sorted(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (f.severity != "error", f.rule, f.node))


def lint_model(path: str | Path, trt_version: str | Sequence[int], dim_max: Mapping[str, int] | None = None) -> list[Finding]:
    """Everything in one ONNX file that TensorRT `trt_version` would refuse (errors) or handle poorly
    (warnings), errors first. `dim_max` bounds named dynamic axes (a bundle's shape ranges) for the
    size-based warnings; unbounded axes count as large."""
    v = parse_trt_version(trt_version)
    path = Path(path)
    model, notes = _load(path)
    return _sorted(_lint(model, path, v, notes, dim_max or {}))


@dataclass(frozen=True)
class BundleLint:
    bundle: Path
    # TensorRT version -> component -> findings
    results: dict[str, dict[str, list[Finding]]]

    def findings(self, severity: Severity | None = None) -> Iterator[tuple[str, str, Finding]]:
        for v, comps in self.results.items():
            for comp, fs in comps.items():
                for f in fs:
                    if severity is None or f.severity == severity:
                        yield v, comp, f

    @property
    def errors(self) -> int:
        return sum(1 for _ in self.findings("error"))

    @property
    def warnings(self) -> int:
        return sum(1 for _ in self.findings("warning"))

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle), "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
                "results": {v: {c: [f.to_dict() for f in fs] for c, fs in comps.items()}
                            for v, comps in self.results.items()}}


def lint_bundle(bundle_dir: str | Path, trt_versions: Iterable[str] = TRT_FAMILIES,
                components: Iterable[str] | None = None) -> BundleLint:
    """Lint every ONNX component of a bundle for each TensorRT version. Each file is read and shape-inferred
    once; the rules then run per version."""
    from qinyu_edge.bundle import load_bundle

    versions = [(s, parse_trt_version(s)) for s in trt_versions]
    bundle = load_bundle(bundle_dir, verify=False)
    names = list(components) if components is not None else list(bundle.components)
    results: dict[str, dict[str, list[Finding]]] = {s: {} for s, _ in versions}
    for name in names:
        path = bundle.path(name)
        model, notes = _load(path)
        dim_max = {axis: int(r[2]) for axis, r in bundle.components[name].shape_ranges.items()}
        for s, v in versions:
            results[s][name] = _sorted(_lint(model, path, v, notes, dim_max))
    return BundleLint(Path(bundle_dir), results)


__all__ = [
    "HOT_INT64_ELEMENTS",
    "OPERATORS",
    "OPSET_RANGES",
    "REFUSED_TYPES",
    "TOPK_MAX_K",
    "TRT_FAMILIES",
    "UNSUPPORTED",
    "BundleLint",
    "Finding",
    "lint_bundle",
    "lint_model",
    "known_trt_version",
    "op_support",
    "opset_range",
    "parse_trt_version",
]
