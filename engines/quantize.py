"""Quantized bundles: the precision lives in the ONNX.

A recipe says, per component, how NVIDIA ModelOpt's ONNX tools rewrite its graph:

- fp16: AutoCast with the component's calibration data; graph inputs and outputs stay fp32 (the
  runtime binds fp32 buffers and the fp32 KV cache), nodes whose calibrated values leave fp16's
  safe range stay fp32.
- int8 / fp8: explicit Q/DQ from calibration (activations and weights), the rest fp16 as ModelOpt
  writes it.
- int4-awq: weight-only INT4 with AWQ (clip) on MatMul weights, blocks of 128 along the input
  dimension, the rest fp16.
- int4-rtn / int8-wo: weight-only INT4 (group 128) or INT8 (per output channel) by round to
  nearest, no calibration: the lm_head (`--lm-head`) and the embedding table (`--embedding int4`,
  a blocked DequantizeLinear in front of the Gather). They are a quarter of the bytes a quantized
  decode step reads, and a second copy of the 4B's tied matrix; the accuracy report scores them.
  `--encoder int8` halves the encoder's Linear weights the same way, for a board where the
  context does not fit otherwise (the planner proposes it for the 4B on an Orin Nano 8 GB).

Real-size graphs: weight-only INT4 or fp16 of a graph with more than `STREAM_QUANT_BYTES` of fp32
weights (the 4B and 8B backbones) is written one weight at a time (engines/streamed_rewrite.py, the
same bytes ModelOpt's RTN and fp16 conversion write), without calibration. AWQ and AutoCast cannot
run there (they hold the graph and its calibration activations), so `int4-awq` falls back to RTN
and `fp16` converts without range checks, and the manifest says so (`applied`). Where the fp32
bundle is larger than the memory available, the other components are calibrated on the bundle
with its streamed backbone (under fp16, which ONNX Runtime runs as large as fp32, on an INT4
stand-in of it made for the capture), and the manifest says that too.

A strongly typed TensorRT network takes every type from the graph, so the same files build on
TensorRT 10.3 (JetPack 6) through 11.x, where the precision builder flags are gone. The lm_head (the
heads components) and the embedding table stay fp16 unless asked for, and the vocoder's ISTFT head
stays in higher precision in every recipe.

ModelOpt can fail quietly, so every output is checked before it is accepted:
- calibrating at batch 1 its GEMV detection excludes every MatMul and it writes a model with nothing
  quantized and no error: a quantization method that leaves 0 quantized weights is refused;
- AWQ on Gemm (transB) nodes writes block scales ONNX Runtime rejects at run time: Gemms are
  rewritten as MatMul first, and a blocked DQ feeding a Gemm or with scales that contradict its
  block size is refused;
- graph inputs and outputs must keep their names and types, and the file must load and run in
  ONNX Runtime on a calibration sample with finite outputs of the fp32 shapes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qinyu_edge.bundle import (
    Bundle,
    ComponentSpec,
    file_entries,
    load_bundle,
    write_manifest,
)
from qinyu_edge.bundle_paths import inside
from qinyu_edge.device.targets import PRECISIONS
from qinyu_edge.errors import QinyuError
from qinyu_edge.fileio import replace_dir
from qinyu_edge.side_file import EXTERNAL_DATA_BYTES, INLINE_MAX_BYTES, external_bytes, graph_files, with_data_files
from qinyu_edge.staging import refuse_existing, staged_dir

from .decode_graphs import DECODE, DERIVED, HEADS, derive as derive_decode
from .modelopt_log import quiet_modelopt
from .plan import component_precision

if TYPE_CHECKING:
    import onnx
    from qinyu_edge.device.targets import Target

    from .calibration import CalibrationSet

log = logging.getLogger(__name__)

METHODS = ("fp32", "fp16", "int8", "fp8", "int4-awq", "int4-rtn", "int8-wo")
# The precision name a method stands for, as the target registry spells it.
PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "fp8": "fp8", "int4-awq": "int4", "int4-rtn": "int4",
             "int8-wo": "int8"}
QUANTIZED_METHODS = ("int8", "fp8", "int4-awq", "int4-rtn", "int8-wo")
# Weight-only methods: ModelOpt's INT4 path (INT8 through its 8-bit layer list), activations fp16.
WEIGHT_ONLY_METHODS = ("int4-awq", "int4-rtn", "int8-wo")
# `quantize --lm-head P` / `--embedding P` / `--encoder P`: the method for the components holding
# each matrix.
HEAD_COMPONENTS = ("heads_greedy", "heads_logits")
HEAD_METHODS = {"int8": "int8-wo", "int4": "int4-rtn"}
EMBEDDING_METHODS = {"int4": "int4-rtn"}  # ModelOpt quantizes Gather tables in INT4 only
# Weight-only, so it needs no calibration and keeps activations fp16: it is there to halve the
# encoder's memory on a board where a context does not fit, not for speed (it runs once per turn).
ENCODER_METHODS = {"int8": "int8-wo"}
# ONNX Runtime's CPU QDQ fusion turns ModelOpt's FP8 Q/DQ around Transpose/Slice into nodes with
# FP8 inputs that no kernel takes ("Type 'tensor(float8e4m3fn)' ... is invalid"); the graph itself
# is valid and loads with this fusion off.
FP8_ORT_DISABLED = ("QDQSelectorActionTransformer",)
# Weight-only INT4 or fp16 of a graph with more fp32 weights than this is written one weight at a
# time (engines/streamed_rewrite.py): ModelOpt holds the graph, its weights and their converted
# copies, and AWQ and AutoCast also their calibration activations (the real-size backbones).
STREAM_QUANT_BYTES = 2 << 30


class QuantizationError(QinyuError):
    """A quantization was refused: bad request, or ModelOpt wrote something that must not ship."""


@dataclass(frozen=True)
class ComponentRecipe:
    """How one component's graph is rewritten."""

    method: str = "fp16"
    # Node-name regexes kept in higher precision (fp32 under fp16, unquantized under Q/DQ methods).
    keep: tuple[str, ...] = ()
    block_size: int = 128  # int4: weights quantized in blocks of this many input channels
    calibration_method: str | None = None  # None: ModelOpt's default (entropy; awq_clip for int4)
    # ModelOpt's TensorRT GEMV heuristic leaves a MatMul unquantized when a calibration sample gives
    # it one row. At batch 1 that is every MatMul of a decode-shaped graph, and the bandwidth an
    # int8 weight saves is the point on an edge GPU, so it is off.
    gemv_detection: bool = False
    # int4: rewrite Gemm as MatMul (+ Add) before AWQ, and keep any Gemm it cannot rewrite out of
    # AWQ, whose block scales on Gemm come out transposed. False hands Gemms to AWQ as they are.
    matmul_form: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")


# The vocoder head: exp() of magnitudes clipped at 100 and the overlap-add envelope leave fp16's range.
XY_HEAD = r"^/enhanced_vocos/head/"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    components: Mapping[str, ComponentRecipe] = field(default_factory=dict)
    default: ComponentRecipe = ComponentRecipe("fp16")

    def for_component(self, name: str) -> ComponentRecipe:
        return self.components.get(name, self.default)


def _recipe(name: str, description: str, **methods: str) -> Recipe:
    """The named components get `methods`; the lm_head (heads), the embedding table and the rest stay fp16."""
    base = {"xy_decoder": ComponentRecipe("fp16", keep=(XY_HEAD,))}
    return Recipe(name, description, {**base, **{c: ComponentRecipe(m) for c, m in methods.items()}})


RECIPES: dict[str, Recipe] = {
    "fp16": _recipe("fp16", "every component fp16 (AutoCast), I/O fp32"),
    "int8": _recipe("int8", "INT8 Q/DQ on the encoder, audio projector and backbone; the rest fp16",
                    encoder="int8", audio_projector="int8", backbone="int8"),
    "fp8": _recipe("fp8", "FP8 Q/DQ on the encoder, audio projector and backbone; the rest fp16 (SM 8.9+)",
                   encoder="fp8", audio_projector="fp8", backbone="fp8"),
    "int4-awq": _recipe("int4-awq", "INT4 weight-only AWQ (group 128) on the backbone's MatMuls; the rest fp16",
                        backbone="int4-awq"),
    "int4-rtn": _recipe("int4-rtn", "INT4 weight-only round-to-nearest (group 128) on the backbone's MatMuls, "
                                    "no calibration; the rest fp16", backbone="int4-rtn"),
}


def get_recipe(name: str, lm_head: str | None = None, embedding: str | None = None,
               encoder: str | None = None) -> Recipe:
    """A recipe by name, with the lm_head, the embedding table and the encoder at other precisions
    if asked (fp16 sets a part back to fp16 where the recipe quantizes it)."""
    try:
        recipe = RECIPES[name]
    except KeyError:
        raise QuantizationError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None
    extra: dict[str, ComponentRecipe] = {}
    labels: list[str] = []
    for flag, value, methods, components in (("--lm-head", lm_head, HEAD_METHODS, HEAD_COMPONENTS),
                                             ("--embedding", embedding, EMBEDDING_METHODS, ("embedding",)),
                                             ("--encoder", encoder, ENCODER_METHODS, ("encoder",))):
        if value is None:
            continue
        if value != "fp16" and value not in methods:
            raise QuantizationError(f"{flag} {value}: choose fp16 or {' or '.join(methods)}")
        method = methods.get(value, "fp16")
        changed = {c: ComponentRecipe(method) for c in components if recipe.for_component(c).method != method}
        if changed:
            extra.update(changed)
            labels.append(f"{flag[2:].replace('-', '_')} {value}" + (" weight-only" if value != "fp16" else ""))
    if not extra:
        return recipe
    label = ", ".join(labels)
    return Recipe(f"{recipe.name} ({label.replace(' weight-only', '')})", f"{recipe.description}; {label}",
                  {**recipe.components, **extra}, recipe.default)


def check_target(plan: Mapping[str, ComponentRecipe], target: Target | None) -> None:
    """Refuse a precision the target's TensorRT cannot build (fp8 needs a target that has it)."""
    needed = {PRECISION[cr.method] for cr in plan.values()}
    if target is None:
        if "fp8" in needed:
            raise QuantizationError("fp8 needs --target: FP8 Q/DQ builds only on SM 8.9+ GPUs "
                                    "(RTX 40xx/50xx, Thor); see `qinyu-edge targets`")
        return
    lacking = sorted(p for p in needed if not target.supports(p))
    if lacking:
        which = ", ".join(f"{c} ({cr.method})" for c, cr in plan.items() if PRECISION[cr.method] in lacking)
        raise QuantizationError(
            f"{target.name} (SM {target.sm}) has no {', '.join(lacking)} in TensorRT (it has "
            f"{', '.join(target.precisions)}); {which} cannot be built there. Pick another recipe or target."
        )


# --- graph inspection ----------------------------------------------------------------------

# op -> the input that holds its weight (a Gather reads its table, input 0)
_WEIGHT_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}


def _precision_of(elem_type: int) -> str | None:
    import onnx

    T = onnx.TensorProto
    return {T.INT8: "int8", T.UINT8: "int8", T.FLOAT8E4M3FN: "fp8", T.INT4: "int4", T.UINT4: "int4"}.get(elem_type)


@dataclass(frozen=True)
class QuantStats:
    """What a quantized graph holds."""

    q_nodes: int
    dq_nodes: int
    # precision -> weight ops (MatMul/Gemm/Conv) whose weight input comes through a DQ of it
    weight_ops: dict[str, int]
    # blocked DQ nodes feeding a Gemm, and blocked DQ nodes whose scales contradict the block size
    gemm_blocked: tuple[str, ...]
    bad_block_scales: tuple[str, ...]
    opset: int
    node_types: dict[str, int]  # op type -> count, for the record
    weight_bytes: dict[str, int]  # element type name (FLOAT, FLOAT16, INT4, ...) -> bytes of initializers

    @property
    def quantized_weights(self) -> int:
        return sum(self.weight_ops.values())


def inspect_quantization(model: onnx.ModelProto) -> QuantStats:
    import onnx
    from onnx import helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def dq_precision(dq: onnx.NodeProto) -> str | None:
        src = dq.input[0]
        if src in inits:
            return _precision_of(inits[src].data_type)
        q = producer.get(src)
        if q is not None and q.op_type == "QuantizeLinear":
            if len(q.input) > 2 and q.input[2] in inits:
                return _precision_of(inits[q.input[2]].data_type)
            return "int8"  # a QuantizeLinear without zero point writes uint8
        return None

    weight_ops: Counter[str] = Counter()
    gemm_blocked, bad_scales = [], []
    blocked: set[str] = set()
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if attrs.get("block_size", 0) > 0:
            blocked.add(n.output[0])
            data, scale = inits.get(n.input[0]), inits.get(n.input[1])
            if data is not None and scale is not None:
                axis = attrs.get("axis", 1) % len(data.dims)
                want = -(-data.dims[axis] // attrs["block_size"])
                if len(scale.dims) != len(data.dims) or scale.dims[axis] != want:
                    bad_scales.append(n.name)
    for n in g.node:
        idx = _WEIGHT_OPS.get(n.op_type)
        if idx is None or len(n.input) <= idx:
            continue
        dq = producer.get(n.input[idx])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        p = dq_precision(dq)
        if p is not None:
            weight_ops[p] += 1
        if n.op_type == "Gemm" and dq.output[0] in blocked:
            gemm_blocked.append(n.name)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    types = Counter(n.op_type for n in g.node)
    sizes: Counter[str] = Counter()
    for i in g.initializer:
        sizes[onnx.TensorProto.DataType.Name(i.data_type)] += _nbytes(i)
    return QuantStats(types["QuantizeLinear"], types["DequantizeLinear"], dict(weight_ops), tuple(gemm_blocked),
                      tuple(bad_scales), opset, dict(types), dict(sizes))


def _nbytes(t: onnx.TensorProto) -> int:
    import onnx
    from onnx import helper

    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


# --- graph rewrites ------------------------------------------------------------------------

def gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite Gemm(A, B, C) with a constant B, alpha = beta = 1 and no transA as MatMul(A, B') (+ C).

    B' is B transposed when transB is set, so the weight is [in, out] as AWQ expects of a MatMul.
    Returns the model and how many Gemms were rewritten.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes, n_done = [], 0
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if attrs.get("transB", 0):
            w = w.T
        w_name = f"{n.input[1]}__matmul_{n_done}"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), w_name))
        has_bias = len(n.input) > 2 and n.input[2] != ""
        mm_out = f"{n.output[0]}__matmul" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], w_name], [mm_out], name=f"{n.name}/MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=f"{n.name}/Add"))
        n_done += 1
    if n_done:
        del g.node[:]
        g.node.extend(nodes)
        used = {i for n in g.node for i in n.input}
        keep = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
    return model, n_done


def batched_weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose constant weight is not 2-D (the absorbed MLA projections, one matrix per head).

    AWQ takes only [in, out] weights, ONNX Runtime's CPU int8 fusion rejects per-channel zero points
    on them, and TensorRT 10.3 blocks INT4 only on 2-D constants: they stay in higher precision.
    """
    inits = {i.name: i for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) != 2]


def table_lookups(model: onnx.ModelProto) -> list[str]:
    """Gather nodes reading a float table (embeddings). AutoCast keeps them fp32 because the integer
    ids exceed its data range; the table values are what matters, and they fit fp16."""
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
            and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT]


@dataclass(frozen=True)
class _RoundTrip:
    src: str  # the tensor rounded
    to_low: onnx.NodeProto
    back: onnx.NodeProto


def strip_bf16_round_trips(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[_RoundTrip]]:
    """Remove Cast(->bf16) -> Cast(->fp32) pairs (the official bf16 rounding of the features).

    ONNX Runtime cannot hand a bf16 tensor to numpy, and AutoCast's reference run reads every
    tensor; `restore_bf16_round_trips` puts the rounding back on the same source tensor afterwards.
    """
    import onnx
    from onnx import helper

    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def to(n: onnx.NodeProto) -> int | None:
        return next((helper.get_attribute_value(a) for a in n.attribute if a.name == "to"), None)

    trips, drop, rename = [], set(), {}
    for n in g.node:
        if n.op_type != "Cast" or to(n) != onnx.TensorProto.BFLOAT16:
            continue
        users = consumers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "Cast" or to(users[0]) != onnx.TensorProto.FLOAT:
            continue
        back = users[0]
        if back.output[0] in outputs or n.output[0] in outputs:
            continue
        trips.append(_RoundTrip(n.input[0], n, back))
        drop.update({id(n), id(back)})
        rename[back.output[0]] = n.input[0]
    if trips:
        kept = [n for n in g.node if id(n) not in drop]
        for n in kept:
            for k, name in enumerate(n.input):
                if name in rename:
                    n.input[k] = rename[name]
        del g.node[:]
        g.node.extend(kept)
    return model, trips


def restore_bf16_round_trips(model: onnx.ModelProto, trips: list[_RoundTrip]) -> onnx.ModelProto:
    import onnx
    from onnx import helper

    if not trips:
        return model
    g = model.graph
    types = {i.name: i.type.tensor_type.elem_type for i in g.input}
    if any(t.src not in types for t in trips):
        inferred = onnx.shape_inference.infer_shapes(model)
        types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info})
    nodes = list(g.node)
    for k, t in enumerate(trips):
        low, rounded = f"{t.src}__bf16_{k}", f"{t.src}__bf16_round_{k}"
        for n in nodes:
            for j, name in enumerate(n.input):
                if name == t.src:
                    n.input[j] = rounded
        back_to = types.get(t.src, onnx.TensorProto.FLOAT)
        pair = [helper.make_node("Cast", [t.src], [low], name=t.to_low.name, to=onnx.TensorProto.BFLOAT16),
                helper.make_node("Cast", [low], [rounded], name=t.back.name, to=back_to)]
        at = next((i + 1 for i, n in enumerate(nodes) if t.src in n.output), 0)
        nodes[at:at] = pair
    del g.node[:]
    g.node.extend(nodes)
    return model


# --- running ModelOpt ----------------------------------------------------------------------

def _save(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save with the bundle's naming: weights in `<file>.data` above EXTERNAL_DATA_BYTES. Returns the files
    written."""
    import onnx

    try:
        large = model.ByteSize() > EXTERNAL_DATA_BYTES
    except ValueError:  # past protobuf's 2 GiB
        large = True
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=INLINE_MAX_BYTES)
        return [path, path.with_name(path.name + ".data")]
    onnx.save_model(model, str(path))
    return [path]


def _autocast(src: Path, cr: ComponentRecipe, calib_dir: Path, work: Path) -> onnx.ModelProto:
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    model = onnx.load(str(src))
    model, trips = strip_bf16_round_trips(model)
    path = src
    if trips:
        path = work / f"{src.stem}.nobf16.onnx"
        _save(model, path)
    include = [f"^{re.escape(n)}$" for n in table_lookups(model)]
    with quiet_modelopt():
        out = convert_to_mixed_precision(
            str(path), "fp16", nodes_to_exclude=list(cr.keep), nodes_to_include=include, keep_io_types=True,
            calibration_data=str(calib_dir), providers=["cpu"],
        )
    return restore_bf16_round_trips(out, trips)


def _modelopt_qdq(src: Path, cr: ComponentRecipe, calib: CalibrationSet, component: str,
                  exclude: list[str], work: Path) -> onnx.ModelProto:
    import onnx
    from modelopt.onnx.autocast import convert_to_f16
    from modelopt.onnx.quantization import quantize

    out = work / f"{src.stem}.{cr.method}.onnx"
    mode = "int4" if cr.method in WEIGHT_ONLY_METHODS else cr.method
    kwargs: dict[str, Any] = {}
    if mode == "int4":
        rtn = cr.method != "int4-awq"
        kwargs.update(block_size=cr.block_size,
                      calibration_method=cr.calibration_method or ("rtn_dq" if rtn else "awq_clip"))
        graph = onnx.load(str(src), load_external_data=False)
        if cr.method == "int8-wo":
            kwargs["layers_8bit"] = ",".join(n.name for n in graph.graph.node
                                             if n.op_type == "MatMul" and not any(re.search(p, n.name) for p in exclude))
        if cr.method == "int4-rtn" and table_lookups(graph):
            # Tables read by Gather (the embedding) take INT4 blocks along the hidden axis. Only
            # where there is one: ModelOpt 0.47 fails on a graph without a Gather given these.
            kwargs.update(gather_quantize_axis=1, gather_block_size=cr.block_size)
    elif cr.calibration_method:
        kwargs["calibration_method"] = cr.calibration_method
    with quiet_modelopt():
        quantize(
            str(src), quantize_mode=mode, calibration_data_reader=calib.reader(component), calibration_eps=["cpu"],
            nodes_to_exclude=list(exclude), output_path=str(out), log_level="ERROR", high_precision_dtype="fp16",
            enable_gemv_detection_for_trt=cr.gemv_detection,
            use_external_data_format=len(graph_files(src.parent, src.name)) > 1,
            **kwargs,
        )
        if not out.is_file():
            raise QuantizationError(f"ModelOpt wrote no {mode} model for {component} (see the debug log, -v)")
        model = onnx.load(str(out))
        if mode == "int4":
            # ModelOpt leaves the int4 model's activations fp32; TensorRT would run them so.
            model = convert_to_f16(model, keep_io_types=True)
    return model


# --- checks ------------------------------------------------------------------------------

def check_quantized(model: onnx.ModelProto, spec: ComponentSpec, method: str, path: Path,
                    sample: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int | None]],
                    disabled_optimizers: Sequence[str]) -> QuantStats:
    """Refuse a rewritten component that must not ship; returns what it holds."""
    stats = inspect_quantization(model)
    name = spec.name
    if method == "fp16" and not stats.weight_bytes.get("FLOAT16"):
        raise QuantizationError(f"{name}: AutoCast kept every weight in fp32, so the graph is not fp16; "
                                "its calibrated values leave fp16's range. Keep this component fp32.")
    if method in QUANTIZED_METHODS:
        want = PRECISION[method]
        if stats.weight_ops.get(want, 0) == 0:
            raise QuantizationError(
                f"{name}: ModelOpt's {method} output holds {stats.q_nodes} Q and {stats.dq_nodes} DQ nodes and "
                f"no {want} weights: nothing was quantized, and ModelOpt said nothing. This is its batch-1 trap "
                "(its GEMV detection excludes MatMuls fed one row): calibrate with more than one row per sample "
                "or keep gemv_detection off. The output was not written."
            )
    if stats.gemm_blocked:
        raise QuantizationError(
            f"{name}: blocked INT4 weights feed Gemm nodes ({', '.join(stats.gemm_blocked[:3])}); AWQ on Gemm "
            "writes block scales ONNX Runtime rejects. Export the linears as MatMul (matmul_form=True)."
        )
    if stats.bad_block_scales:
        raise QuantizationError(
            f"{name}: DequantizeLinear nodes {', '.join(stats.bad_block_scales[:3])} have scales that do not match "
            "their block size (ceil(dim / block) on the quantized axis); ONNX Runtime and TensorRT reject them."
        )
    _check_io(model, spec)
    _check_runs(path, spec, sample, shapes, disabled_optimizers)
    return stats


def _check_io(model: onnx.ModelProto, spec: ComponentSpec) -> None:
    from onnx import helper

    def io(values: Any) -> list[tuple[str, str]]:
        return [(v.name, np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name) for v in values]

    got = (io(model.graph.input), io(model.graph.output))
    want = ([(t.name, t.dtype) for t in spec.inputs], [(t.name, t.dtype) for t in spec.outputs])
    if got != want:
        raise QuantizationError(f"{spec.name}: the rewritten graph's inputs/outputs {got} differ from the bundle's "
                                f"{want}; the runtime binds those names and types.")


def _check_runs(path: Path, spec: ComponentSpec, sample: Mapping[str, np.ndarray],
                shapes: Mapping[str, Sequence[int | None]], disabled: Sequence[str]) -> None:
    """`shapes`: each output's expected shape (None: a dimension not checked)."""
    try:
        outs = _run(path, sample, disabled)
    except Exception as e:  # ORT raises its own exception types; any of them means the file is unusable
        raise QuantizationError(f"{spec.name}: ONNX Runtime rejects the rewritten graph: {str(e)[:400]}") from e
    for n, want in shapes.items():
        got = outs[n]
        if len(got.shape) != len(want) or any(w is not None and g != w for g, w in zip(got.shape, want)):
            raise QuantizationError(f"{spec.name}: output {n} has shape {got.shape}, fp32 gives {tuple(want)}")
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            raise QuantizationError(f"{spec.name}: output {n} is not finite on a calibration sample (fp16 overflow?)")


# --- one component, one bundle ---------------------------------------------------------------

@dataclass(frozen=True)
class ComponentResult:
    component: str
    method: str
    precision: str
    files: tuple[str, ...]
    stats: QuantStats
    excluded: tuple[str, ...]
    gemms_rewritten: int
    ort_disabled_optimizers: tuple[str, ...]
    seconds: float
    # How the method was applied where not as named: the streamed RTN that stands in for AWQ at real size.
    applied: str | None = None


def weight_bytes(src: Path) -> int:
    """Bytes of a graph's weights: its tensors kept outside it (in its side file or another graph's),
    or the graph file itself."""
    return external_bytes(src)


def streams(src: Path, cr: ComponentRecipe) -> bool:
    """Whether `cr` on the graph at `src` runs one weight at a time: a graph too large for
    ModelOpt's whole-model passes, in weight-only INT4 (without tables, which take ModelOpt's Gather
    path) or fp16 (without nodes kept fp32, which AutoCast picks by name)."""
    import onnx

    if cr.method not in ("int4-rtn", "int4-awq", "fp16") or weight_bytes(src) <= STREAM_QUANT_BYTES:
        return False
    if cr.method == "fp16":
        return not cr.keep
    return not table_lookups(onnx.load(str(src), load_external_data=False))


def spec_sample(spec: ComponentSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the smallest shapes the spec allows (small normal floats, zero integers): what
    checks a component that was quantized without calibration data."""
    rng = np.random.default_rng(seed)
    sample = {}
    for t in spec.inputs:
        shape = tuple(d if isinstance(d, int) else spec.shape_ranges.get(d, (1,))[0] for d in t.shape)
        if np.dtype(t.dtype).kind == "f":
            sample[t.name] = (0.02 * rng.standard_normal(shape)).astype(t.dtype)
        else:
            sample[t.name] = np.zeros(shape, t.dtype)
    return sample


def spec_shapes(spec: ComponentSpec, sample: Mapping[str, np.ndarray]) -> dict[str, tuple[int | None, ...]]:
    """Each output's shape as the spec gives it for `sample`: named dimensions bound by the inputs,
    the others (computed ones) unchecked."""
    bound: dict[str, int] = {}
    for t in spec.inputs:
        for d, n in zip(t.shape, sample[t.name].shape, strict=True):
            if isinstance(d, str):
                bound[d] = n
    return {t.name: tuple(d if isinstance(d, int) else bound.get(d) for d in t.shape) for t in spec.outputs}


def quantize_component(src: str | os.PathLike, dst: str | os.PathLike, spec: ComponentSpec, cr: ComponentRecipe,
                       calib: CalibrationSet | None, progress: Callable[[int, int], None] | None = None
                       ) -> ComponentResult:
    """Rewrite one component's ONNX at `src` into `dst` (written only if every check passes).
    `calib` may be None, or lack the component, only where the component is quantized streamed;
    `progress(k, K)` follows a streamed component weight by weight."""
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    disabled = tuple(spec.ort_disabled_optimizers) + (FP8_ORT_DISABLED if cr.method == "fp8" else ())
    streamed = streams(src, cr)
    applied = None
    if (streamed or cr.method == "fp16") and (calib is None or not calib.samples.get(spec.name)):
        samples = [spec_sample(spec)]
        if not streamed:
            from .calibration import CalibrationSet

            calib = CalibrationSet({spec.name: samples})
            applied = ("fp16, AutoCast calibrated on one synthetic input (small normal floats, zero ids): no "
                       "calibration case reached this component")
    else:
        samples = calib[spec.name]  # refuses, naming the gap, where a method needs real samples
    check_calibration(spec, samples)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Beside the destination: a streamed output is GBs, and the move is then a rename.
    with tempfile.TemporaryDirectory(prefix=f".quant-{spec.name}-", dir=dst.parent) as tmp:
        work = Path(tmp)
        (work / "out").mkdir()
        out = work / "out" / dst.name
        try:
            if streamed:
                model_out, excluded, n_gemm = _rewrite_streamed(src, out, cr, progress)
                files = [out, out.with_name(out.name + ".data")]
                gb = weight_bytes(src) / 1e9
                if cr.method == "int4-awq":
                    applied = (f"int4-rtn, streamed: AWQ holds the whole graph ({gb:.1f} GB of fp32 weights) and every "
                               "MatMul's calibration activations in memory")
                elif cr.method == "fp16":
                    applied = (f"fp16, streamed without calibration: AutoCast holds the whole graph ({gb:.1f} GB of fp32 "
                               "weights); no node is kept fp32 for its activations' range, and the check run must "
                               "give finite outputs")
            else:
                model_out, excluded, n_gemm = _rewrite(src, spec, cr, calib, work)
                files = _save(model_out, out)
        except QinyuError:  # ours, already saying what is wrong
            raise
        except Exception as e:  # ModelOpt, AutoCast and ORT's quantizer raise many types; all mean "no output"
            log.debug("%s: %s failed", spec.name, cr.method, exc_info=True)
            raise QuantizationError(f"{spec.name}: {cr.method} failed in ModelOpt: {type(e).__name__}: "
                                    f"{str(e)[:400]} (run with -v for the traceback)") from e
        if applied:
            log.warning("%s: %s", spec.name, applied)
        if streamed:  # the fp32 graph is what does not fit: the spec says what comes out
            shapes = spec_shapes(spec, samples[0])
        else:
            shapes = {n: a.shape for n, a in _run(src, samples[0], spec.ort_disabled_optimizers).items()}
        stats = check_quantized(model_out, spec, cr.method, files[0], samples[0], shapes, disabled)
        for f in files:
            shutil.move(f, dst.parent / f.name)
    dt = time.perf_counter() - t0
    log.info("%s: %s in %.1f s (%s quantized weights, %d Q / %d DQ)", spec.name, applied or cr.method, dt,
             stats.quantized_weights, stats.q_nodes, stats.dq_nodes)
    return ComponentResult(spec.name, cr.method, PRECISION[cr.method], tuple(f.name for f in files), stats,
                           tuple(excluded), n_gemm, disabled, dt, applied)


def _excluded(model: onnx.ModelProto, cr: ComponentRecipe) -> list[str]:
    """Nodes kept out of quantization: batched weights, the recipe's keep patterns, and under the
    weight-only methods every Gemm the MatMul rewrite could not take (transA, alpha, a computed weight)."""
    excluded = sorted(set(batched_weight_matmuls(model))
                      | {n.name for n in model.graph.node if any(re.search(p, n.name) for p in cr.keep)})
    if cr.method in WEIGHT_ONLY_METHODS and cr.matmul_form:
        excluded += [n.name for n in model.graph.node if n.op_type == "Gemm"]
    return excluded


def _rewrite_streamed(src: Path, out: Path, cr: ComponentRecipe, progress: Callable[[int, int], None] | None
                      ) -> tuple[onnx.ModelProto, list[str], int]:
    import onnx

    from .streamed_rewrite import rewrite_streamed

    if cr.method == "fp16":
        return rewrite_streamed(src, out, "fp16", progress=progress), [], 0
    excluded = _excluded(onnx.load(str(src), load_external_data=False), cr)
    model = rewrite_streamed(src, out, "int4", cr.block_size, [f"^{re.escape(n)}$" for n in excluded], progress)
    return model, excluded, 0


def _rewrite(src: Path, spec: ComponentSpec, cr: ComponentRecipe, calib: CalibrationSet, work: Path
             ) -> tuple[onnx.ModelProto, list[str], int]:
    """The rewritten model, the nodes kept out of quantization, and how many Gemms became MatMuls."""
    import onnx

    model = onnx.load(str(src))
    if cr.method == "fp32":
        return model, [], 0
    n_gemm = 0
    if cr.method in WEIGHT_ONLY_METHODS and cr.matmul_form:
        model, n_gemm = gemm_to_matmul(model)
    # ModelOpt writes intermediate files beside its input: give it a private copy.
    local = work / src.name
    _save(model, local)
    if cr.method == "fp16":
        return _autocast(local, cr, calib.component_folder(spec.name, work / "calib"), work), [], n_gemm
    excluded = _excluded(model, cr)
    out = _modelopt_qdq(local, cr, calib, spec.name, [f"^{re.escape(n)}$" for n in excluded], work)
    return out, excluded, n_gemm


def check_calibration(spec: ComponentSpec, samples: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Every sample feeds exactly the component's inputs, with its dtypes and fixed dimensions."""
    for i, sample in enumerate(samples):
        if set(sample) != {t.name for t in spec.inputs}:
            raise QuantizationError(f"calibration sample {i} for {spec.name} has inputs {sorted(sample)}, the graph "
                                    f"takes {[t.name for t in spec.inputs]}; capture it from this bundle")
        for t in spec.inputs:
            a = sample[t.name]
            fixed = a.ndim == len(t.shape) and all(
                isinstance(d, str) or d == n for d, n in zip(t.shape, a.shape, strict=True))
            if a.dtype.name != t.dtype or not fixed:
                raise QuantizationError(
                    f"calibration sample {i} for {spec.name}: {t.name} is {a.dtype.name}{list(a.shape)}, the graph "
                    f"takes {t.dtype}{list(t.shape)}; the calibration set comes from another bundle. Capture it again."
                )


def _run(path: Path, feeds: Mapping[str, np.ndarray], disabled: Sequence[str]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))


def plan_components(bundle: Bundle, recipe: Recipe, components: Sequence[str] | None = None
                    ) -> dict[str, ComponentRecipe]:
    """The recipe per component of `bundle`; components not selected stay fp32."""
    unknown = sorted(set(components or ()) - set(bundle.components))
    if unknown:
        raise QuantizationError(f"the bundle has no component {', '.join(unknown)} "
                                f"(it has {', '.join(bundle.components)})")
    chosen = set(components) if components else set(bundle.components)
    # Derived graphs (the fused decode graph) are written again from the quantized ones.
    return {name: recipe.for_component(name) if name in chosen else ComponentRecipe("fp32")
            for name in bundle.components if name not in DERIVED}


# (component, components done, components, what within the component: "" or "weight k/K")
ProgressFn = Callable[[str, int, int, str], None]


def quantize_bundle(bundle_dir: str | os.PathLike, out: str | os.PathLike, recipe: Recipe | str,
                    components: Sequence[str] | None = None, target: Target | None = None,
                    calibration: CalibrationSet | None = None, force: bool = False,
                    progress: ProgressFn | None = None, save_calibration: str | os.PathLike | None = None,
                    threads: int | None = None) -> Bundle:
    """Copy the fp32 bundle at `bundle_dir` to `out` with its components rewritten by `recipe`.

    The new bundle is built in a temporary folder beside `out` and renamed into place, so an
    interrupted or refused run leaves nothing behind.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    src = load_bundle(bundle_dir)
    if src.origin.get("precision"):
        raise QuantizationError(f"{src.root} is already quantized ({src.origin['quantization']['recipe']}); "
                                "quantize the fp32 bundle it came from")
    out = Path(out)
    refuse_existing(out, force)
    if out.resolve() == src.root.resolve():
        raise QuantizationError("--out must differ from --bundle: the fp32 bundle is the reference")
    plan = plan_components(src, recipe, components)
    check_target(plan, target)
    _check_shared(src, plan)
    streamed = [name for name, cr in plan.items() if streams(src.path(name), cr)]
    if calibration is not None:
        _check_coverage(calibration, {n: cr for n, cr in plan.items() if n not in streamed})
    # Every component but the fp32 and the streamed ones is quantized from calibration data.
    calibrated = any(cr.method != "fp32" and name not in streamed for name, cr in plan.items())
    wants_capture = calibration is None and (calibrated or save_calibration is not None)
    # Capture falls back to the bundle with the streamed components quantized; at fp16 that runs as
    # large as the fp32 bundle (ONNX Runtime widens fp16 weights on the CPU). There the capture runs
    # on an INT4 stand-in of the streamed backbone instead, made for it and then deleted: AutoCast
    # needs the activations' ranges, which INT4 rounding barely moves.
    stand_ins: list[str] = []
    if wants_capture and all(PRECISION[plan[n].method] == "fp16" for n in streamed):
        from .calibration import BundleTooLargeError, check_runs_here

        try:
            check_runs_here(src.root, "capturing calibration inputs")  # before hours of work, not after
        except BundleTooLargeError:
            stand_ins = [n for n in streamed if RECIPES["int4-rtn"].for_component(n).method == "int4-rtn"]
            if not stand_ins:
                raise
    # At most the fp32 bundle's size: every quantized component is smaller than its fp32 file.
    with staged_dir(out, force, need_bytes=sum(e.bytes for e in src.files.values())) as tmp:
        results: dict[str, ComponentResult] = {}
        todo = {name: cr for name, cr in plan.items() if cr.method != "fp32"}
        # A quantized component loses its fp32 ONNX Runtime variant (which may point into the fp32
        # side file): the runtime then runs the quantized portable graph.
        variants = {k: v for k, v in src.ort_variants.items() if k not in todo}
        dropped = [src.ort_variants[k] for k in src.ort_variants if k in todo]
        replaced = {f for spec in [*(src.components[name] for name in todo), *dropped]
                    for f in (spec.file, spec.file + ".data")}
        for name in src.files:
            if name not in replaced:
                shutil.copy2(src.file(name), inside(tmp, name, "a bundle file"))
        specs = dict(src.components)
        order = sorted(todo, key=lambda n: n not in streamed)
        captured_on = None
        if stand_ins:
            calibration, captured_on = _capture_on_stand_ins(src, tmp, stand_ins, threads, progress, len(todo))
        for i, name in enumerate(order):
            cr = todo[name]
            if wants_capture and calibration is None and name not in streamed:
                done = {n: r.precision for n, r in results.items()}
                calibration, captured_on = _capture(src, tmp, specs, done, threads, progress, (i, len(todo)))
                _check_coverage(calibration, {n: todo[n] for n in order[i:]})
            if progress is not None:
                progress(name, i, len(todo), "")

            def weights(k: int, total: int, name: str = name, i: int = i) -> None:
                if progress is not None:
                    progress(name, i, len(todo), f"weight {k}/{total}")

            spec = src.components[name]
            res = quantize_component(src.path(name), inside(tmp, spec.file, "a component file"), spec, cr, calibration,
                                     progress=weights)
            results[name] = res
            specs[name] = dataclasses.replace(spec, ort_disabled_optimizers=res.ort_disabled_optimizers)
        if wants_capture and calibration is None:  # wanted only to be saved
            done = {n: r.precision for n, r in results.items()}
            calibration, captured_on = _capture(src, tmp, specs, done, threads, progress, (len(todo), len(todo)))
        if save_calibration is not None and calibration is not None:
            calibration.save(save_calibration)
        if progress is not None:
            progress("manifest", len(todo), len(todo), "")
        specs, variants, host_embedding = derive_decode(tmp, specs, variants)
        files = [p.name for p in tmp.iterdir() if p.is_file() and not p.name.startswith(".")]
        origin = dict(src.origin)
        origin["precision"] = {name: PRECISION[cr.method] for name, cr in plan.items()}
        if DECODE in specs:  # the fused graph holds both graphs' weights: the narrower precision names it
            origin["precision"][DECODE] = max((origin["precision"][n] for n in ("backbone", HEADS)),
                                              key=PRECISIONS.index)
        origin["quantization"] = _record(src, recipe, plan, results, target, calibration)
        if captured_on:
            origin["quantization"]["calibration"]["captured_on"] = captured_on
        opsets = [r.stats.opset for r in results.values()]
        bundle = dataclasses.replace(src, root=tmp, components=with_data_files(tmp, specs), files=file_entries(tmp, files),
                                     origin=origin, opset=max([src.opset, *opsets]),
                                     ort_variants=with_data_files(tmp, variants),
                                     host_embedding=host_embedding)
        write_manifest(bundle)
        replace_dir(tmp, out)
        return dataclasses.replace(bundle, root=out)


def _check_shared(src: Bundle, plan: Mapping[str, ComponentRecipe]) -> None:
    """Refuse to quantize a graph whose side file another graph that stays as it is reads too
    (`heads_logits` keeps its weights in `heads_greedy`'s): the new side file would replace them."""
    todo = {src.components[n].file + ".data": n for n, cr in plan.items() if cr.method != "fp32" and n not in DERIVED}
    for name, spec in src.components.items():
        if name in DERIVED or plan[name].method != "fp32":
            continue
        for f in graph_files(src.root, spec.file)[1:]:
            if f in todo:
                raise QuantizationError(
                    f"{name} keeps its weights in {f}, the side file of {todo[f]}: quantize the two together "
                    f"(--components ... {todo[f]} {name}); nothing was written")


def _check_coverage(calibration: CalibrationSet, todo: Mapping[str, ComponentRecipe]) -> None:
    """Refuse, before any of them is started, components whose method needs calibration samples the
    capture did not produce (fp16 makes do with a synthetic input, and says so)."""
    missing = [n for n, cr in todo.items() if cr.method not in ("fp16", "fp32") and not calibration.samples.get(n)]
    if missing:
        raise QuantizationError(
            f"the calibration cases never reached {', '.join(missing)} ({', '.join(todo[n].method for n in missing)} "
            "needs real samples of its inputs); nothing was written. Quantize it fp16, or capture a set whose cases "
            "reach it (`--save-calibration`, then `--calibration`)")


def _capture_on_stand_ins(src: Bundle, tmp: Path, names: Sequence[str], threads: int | None,
                          progress: ProgressFn | None, n_todo: int) -> tuple[CalibrationSet, str | None]:
    """Calibration inputs captured on the bundle with INT4 (round to nearest, streamed) stand-ins
    of `names`, written under `tmp` for the capture alone and deleted after it."""
    folder = tmp / ".stand-ins"
    folder.mkdir()
    try:
        specs = dict(src.components)
        for name in names:
            def weights(k: int, total: int, name: str = name) -> None:
                if progress is not None:
                    progress("calibration", 0, n_todo, f"INT4 stand-in of {name} for the capture, weight {k}/{total}")

            spec = src.components[name]
            res = quantize_component(src.path(name), folder / spec.file, spec, ComponentRecipe("int4-rtn"), None,
                                     progress=weights)
            specs[name] = dataclasses.replace(spec, ort_disabled_optimizers=res.ort_disabled_optimizers)
        return _capture(src, folder, specs, {n: "int4" for n in names}, threads, progress, (0, n_todo),
                        stand_in=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _capture(src: Bundle, staged: Path, specs: Mapping[str, ComponentSpec], done: Mapping[str, str],
             threads: int | None, progress: ProgressFn | None, step: tuple[int, int], stand_in: bool = False
             ) -> tuple[CalibrationSet, str | None]:
    """Calibration inputs from the fp32 bundle; where it does not fit in memory, from a view of the
    bundle with the components in `done` (the streamed ones, by precision; or their INT4 stand-ins)
    already quantized, given a manifest of its own for the run. Returns the set and, in the second
    case, what it was captured on."""
    from .calibration import BundleTooLargeError, capture

    if progress is not None:
        progress("calibration", *step, "espeak-ng prompts through the bundle")
    try:
        return capture(src.root, threads=threads), None
    except BundleTooLargeError as e:
        if not done:
            raise
        # The fp32 backbone is what does not fit: the rest is calibrated on the bundle with the
        # streamed backbone, whose activations differ from fp32 by its rounding.
        log.info("%s; calibrating on the bundle with %s already quantized", e, ", ".join(sorted(done)))
    names = ", ".join(sorted(done))
    on = (f"this bundle with INT4 stand-ins of {names}, made for the capture alone" if stand_in
          else f"this bundle with {names} already quantized") + ": the fp32 bundle exceeds the memory available"
    parts = {n: s for n, s in specs.items() if n not in DERIVED}
    where = {f: staged if n in done else src.root for n, s in parts.items()
             for f in graph_files(staged if n in done else src.root, s.file)}
    where.update({n: src.root for n in src.files if not n.endswith((".onnx", ".data"))})
    files = sorted(f for f, root in where.items() if (root / f).is_file())
    view = staged / ".calibration-view"
    view.mkdir()
    try:
        for f in files:
            try:  # the files themselves, under a manifest of the view's own
                os.link(where[f] / f, view / f)
            except OSError:  # another file system
                shutil.copy2(where[f] / f, view / f)
        # The precisions let the memory check count what ONNX Runtime makes of them.
        write_manifest(dataclasses.replace(src, root=view, components=parts, files=file_entries(view, files),
                                           ort_variants={}, host_embedding=None,
                                           origin={**src.origin, "precision": dict(done)}))
        return capture(view, threads=threads), on
    finally:
        shutil.rmtree(view, ignore_errors=True)


def _record(src: Bundle, recipe: Recipe, plan: Mapping[str, ComponentRecipe], results: Mapping[str, ComponentResult],
            target: Target | None, calibration: CalibrationSet | None) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        modelopt_version = version("nvidia-modelopt")
    except PackageNotFoundError:
        modelopt_version = None
    return {
        "recipe": recipe.name,
        "source": {"bundle": str(src.root), "preset": src.origin.get("preset"),
                   "files": {n: dataclasses.asdict(e) for n, e in src.files.items() if n.endswith(".onnx")}},
        "target": target.id if target is not None else None,
        "modelopt": modelopt_version,
        "calibration": None if calibration is None else {
            "prompts": calibration.sources, "samples": {n: len(s) for n, s in calibration.samples.items()}},
        "components": {name: _component_record(cr, results.get(name)) for name, cr in plan.items()},
    }


def _component_record(cr: ComponentRecipe, r: ComponentResult | None) -> dict[str, Any]:
    if r is None:
        return {"method": cr.method}
    return {"method": cr.method, **({"applied": r.applied} if r.applied else {}), "quantized_weights": r.stats.weight_ops, "q_nodes": r.stats.q_nodes,
            "dq_nodes": r.stats.dq_nodes, "opset": r.stats.opset, "weight_bytes": r.stats.weight_bytes,
            "excluded": list(r.excluded),
            "kept_high_precision": list(cr.keep), "gemms_rewritten": r.gemms_rewritten, "seconds": round(r.seconds, 2)}


__all__ = [
    "METHODS", "WEIGHT_ONLY_METHODS", "HEAD_METHODS", "EMBEDDING_METHODS", "ENCODER_METHODS",
    "PRECISION",
    "RECIPES",
    "ComponentRecipe",
    "ComponentResult",
    "QuantStats",
    "QuantizationError",
    "Recipe",
    "batched_weight_matmuls",
    "check_calibration",
    "check_quantized",
    "check_target",
    "component_precision",
    "gemm_to_matmul",
    "get_recipe",
    "inspect_quantization",
    "plan_components",
    "quantize_bundle",
    "quantize_component",
]
