"""What a decode step runs, derived from a bundle's graphs: one fused graph and a host table.

A step of the official greedy loop is: embed the chosen ids, run the backbone one position, run
the eight heads and the greedy choice. As separate graphs that is three session calls from Python
per step. This module derives, from the bundle's own files, what makes it one:

- `decode`: the backbone (or its ONNX Runtime CPU variant) and `heads_greedy` joined into one
  graph through `onnx.compose` (the backbone's `hidden` feeds the heads): inputs are the
  backbone's plus the penalty `history`; outputs the 8 ids, the last hidden state (sampling reads
  it) and the new cache rows. Prefill runs through it too: the backbone returns the last position's
  hidden state only, so the heads see one row. Tensors stored outside the graph stay where they
  are (the merged graph points at the same side files), so no matrix gains a copy on disk.
- the embedding table as a `.npy` the runtime memory-maps: a text row, or the mean of the eight
  codebook rows, gathered on the host. Only the rows a conversation touches become resident,
  which on a Jetson (memory shared with the GPU) is what the memory budget sees; the embedding
  graph is not loaded at all, so the 4B's tied matrix is held once, by the heads. The .npy is the
  embedding graph's own side file, so the bundle stores the table once too.

`heads_logits` (sampling's heads) holds the same matrices as `heads_greedy`: its tensors point into
the greedy heads' side file, so the lm_head is stored once for both.

All are derived again whenever the graphs they come from change (quantization), and skipped
where the source does not have the expected form (a quantized table): the runtime then uses
the separate graphs, which stay in the bundle for that and for calibration.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from pathlib import Path

import numpy as np

from qinyu_edge.bundle import DECODE, ComponentSpec
from qinyu_edge.side_file import ALIGN, external_blocks, share_tensors

log = logging.getLogger(__name__)

DECODE_FILE = "decode.onnx"
DECODE_ORT_FILE = "decode_ort.onnx"
# Bundles from before the host table became the embedding graph's side file kept a copy here.
HOST_EMBEDDING_FILE = "embedding_table.npy"
HEADS = "heads_greedy"
LOGITS = "heads_logits"  # the same eight heads without the greedy choice: it shares their weights
# Components whose graphs this module writes: quantization derives them again instead of
# rewriting them.
DERIVED = (DECODE,)
_HEADS_PREFIX = "heads/"


def fuse_decode(backbone_path: Path, heads_path: Path, out: Path) -> None:
    """Write backbone -> heads_greedy as one graph at `out` (in the same folder as both inputs, so
    the side files both graphs reference resolve from it)."""
    import onnx
    from onnx import compose, helper

    backbone = onnx.load(str(backbone_path), load_external_data=False)
    heads = onnx.load(str(heads_path), load_external_data=False)
    # Node and tensor names of the two exports may coincide; the graph inputs and outputs keep theirs.
    heads = compose.add_prefix(heads, _HEADS_PREFIX, rename_inputs=False, rename_outputs=False)
    _same_onnx_opset(backbone, heads, backbone_path.name)
    outputs = [*[o.name for o in backbone.graph.output], "ids"]
    # merge_graphs, not merge_models: the latter runs onnx's checker, which does not know ONNX
    # Runtime's contrib operators in the CPU variant.
    graph = compose.merge_graphs(backbone.graph, heads.graph, io_map=[("hidden", "hidden")], outputs=outputs,
                                 name="decode", doc_string="backbone and heads_greedy, one call per decode step")
    opsets: dict[str, int] = {}
    for m in (backbone, heads):
        for o in m.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    fused = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              ir_version=max(backbone.ir_version, heads.ir_version),
                              producer_name=backbone.producer_name)
    onnx.save(fused, str(out))


def _opset_of(model: "onnx.ModelProto") -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _same_onnx_opset(a: "onnx.ModelProto", b: "onnx.ModelProto", what: str) -> None:
    """Raise the graph on the older ONNX opset to the newer one (a quantized graph is opset 21+,
    and operators such as ReduceMean changed their signature on the way), in place."""
    from onnx import version_converter

    target = max(_opset_of(a), _opset_of(b))
    for m in (a, b):
        if _opset_of(m) < target:
            try:
                converted = version_converter.convert_version(m, target)
            except Exception as e:  # the converter raises bare RuntimeErrors/ValidationErrors
                raise FuseError(f"{what}: cannot raise opset {_opset_of(m)} to {target}: {str(e).splitlines()[0]}") from e
            m.CopyFrom(converted)


class FuseError(Exception):
    """The two graphs cannot be joined; the runtime keeps running them separately."""


def decode_spec(backbone: ComponentSpec, heads: ComponentSpec, file: str) -> ComponentSpec:
    history = next(t for t in heads.inputs if t.name == "history")
    ids = next(t for t in heads.outputs if t.name == "ids")
    return ComponentSpec(
        DECODE, file, (*backbone.inputs, history), (*backbone.outputs, ids), dict(backbone.shape_ranges),
        "one decode step (or prefill chunk): the backbone, the eight heads and the official greedy choice with the "
        "codebook-0 penalty; `hidden` is returned for sampling",
        tuple(sorted(set(backbone.ort_disabled_optimizers) | set(heads.ort_disabled_optimizers))),
    )


def write_host_embedding(embedding_path: Path) -> str | None:
    """Make the embedding graph's side file (`<graph>.data`) a memory-mappable .npy holding its table,
    if the graph is the plain form (Gather on a float table and the mean over the ids of a step,
    with a Cast before or after), and point the graph at the table there. Returns the side file's
    name, or None when the graph is not plain (a quantized table): nothing is changed.

    One file serves both, so the bundle holds the table once: a .npy header padded to a page, then
    the table at a page-aligned offset, so ONNX Runtime and the host both map it. A table in the
    graph, or elsewhere in a side file, is moved there a block at a time, never loaded: on a
    real-size model it is GBs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(embedding_path), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    inits = {i.name: i for i in model.graph.initializer}
    ops = [n.op_type for n in nodes]
    # A Cast before the mean widens a narrower table; after it, AutoCast's fp16 graph widens its
    # fp16 mean for the fp32 output (the host averages in fp32 either way).
    plain = (["Gather", "ReduceMean"], ["Gather", "Cast", "ReduceMean"], ["Gather", "ReduceMean", "Cast"])
    if ops not in plain or nodes[0].input[0] not in inits:
        log.info("%s is not a plain table lookup (%s): no host table", embedding_path.name, ", ".join(ops))
        return None
    table = inits[nodes[0].input[0]]
    dtype, shape = np.dtype(helper.tensor_dtype_to_np_dtype(table.data_type)), tuple(table.dims)
    if dtype not in (np.float32, np.float16) or len(shape) != 2:
        return None
    side = embedding_path.with_name(embedding_path.name + ".data")
    nbytes = int(np.prod(shape)) * dtype.itemsize
    header = _npy_header(dtype, shape)
    info = {e.key: e.value for e in table.external_data} if table.data_location == TensorProto.EXTERNAL else {}
    if info.get("location") == side.name and int(info.get("offset", 0)) == len(header) and side.is_file():
        with open(side, "rb") as f:
            if f.read(len(header)) == header:
                return side.name  # already the host table (a graph copied from a bundle that has one)
    others = [t for t in model.graph.initializer if t is not table and t.data_location == TensorProto.EXTERNAL]
    if others:  # the plain form's only large tensor is the table; anything else stays where it was
        log.info("%s keeps other tensors in its side file: no host table", embedding_path.name)
        return None
    tmp = side.with_name(f".{side.name}.tmp")
    graph_tmp = embedding_path.with_name(f".{embedding_path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            if not info:
                f.write(np.ascontiguousarray(numpy_helper.to_array(table)).tobytes())
            else:
                for block in external_blocks(embedding_path.parent, {**info, "length": str(nbytes)}):
                    f.write(block)
        table.ClearField("raw_data")
        table.data_location = TensorProto.EXTERNAL
        del table.external_data[:]
        for k, v in (("location", side.name), ("offset", str(len(header))), ("length", str(nbytes))):
            table.external_data.add(key=k, value=v)
        onnx.save(model, str(graph_tmp))
        os.replace(tmp, side)
        os.replace(graph_tmp, embedding_path)
    finally:
        tmp.unlink(missing_ok=True)
        graph_tmp.unlink(missing_ok=True)
    return side.name


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header padded with spaces to one page (the format allows any padding)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    text = buf.getvalue()
    pad = ALIGN - len(text)
    # magic (6) + version (2) + little-endian header length (2), then the dict, padded, then "\n"
    body = text[10:-1] + b" " * pad + b"\n"
    return text[:8] + len(body).to_bytes(2, "little") + body


def derive(folder: Path, components: dict[str, ComponentSpec], variants: dict[str, ComponentSpec]
           ) -> tuple[dict[str, ComponentSpec], dict[str, ComponentSpec], str | None]:
    """Write the fused decode graphs and the host table into `folder` from the graphs there.
    Returns the components and variants with `decode` (where the backbone and heads exist) and the
    host table's file name (or None)."""
    components = {k: v for k, v in components.items() if k not in DERIVED}
    variants = {k: v for k, v in variants.items() if k not in DERIVED}
    for stale in (DECODE_FILE, DECODE_ORT_FILE, HOST_EMBEDDING_FILE):
        (folder / stale).unlink(missing_ok=True)
    if HEADS in components and LOGITS in components:
        shared = share_tensors(folder, components[HEADS].file, components[LOGITS].file)
        if shared:
            log.info("%s keeps %.2f GB of its weights in %s's side file", LOGITS, shared / 1e9, HEADS)
    if "backbone" in components and HEADS in components:
        heads = components[HEADS]
        try:
            fuse_decode(folder / components["backbone"].file, folder / heads.file, folder / DECODE_FILE)
        except FuseError as e:
            log.warning("no fused decode graph (decode steps run the separate graphs): %s", e)
            return components, variants, _host_table(folder, components)
        components[DECODE] = decode_spec(components["backbone"], heads, DECODE_FILE)
        variant = variants.get("backbone")
        if variant is not None:
            try:
                fuse_decode(folder / variant.file, folder / heads.file, folder / DECODE_ORT_FILE)
            except FuseError as e:
                # ONNX's converter does not know ONNX Runtime's contrib operators; the engine then
                # keeps the faster CPU variant with separate heads.
                log.info("no fused ONNX Runtime CPU variant: %s", e)
            else:
                variants[DECODE] = dataclasses.replace(decode_spec(variant, heads, DECODE_ORT_FILE),
                                                       description=variant.description + "; with the heads")
    return components, variants, _host_table(folder, components)


def _host_table(folder: Path, components: dict[str, ComponentSpec]) -> str | None:
    return write_host_embedding(folder / components["embedding"].file) if "embedding" in components else None


def check_decode(folder: Path, components: dict[str, ComponentSpec], seed: int = 0) -> list[dict[str, object]]:
    """The fused graph against backbone + heads_greedy run separately in ONNX Runtime, on a prompt
    and a decode step: ids equal, hidden and cache rows within float rounding. Parity rows."""
    from qinyu_edge.runtime.kv_cache import KVCache
    from qinyu_edge.runtime.session import OrtSession

    spec = components[DECODE]
    fused = OrtSession(folder / spec.file, disabled_optimizers=spec.ort_disabled_optimizers)
    backbone = OrtSession(folder / components["backbone"].file,
                          disabled_optimizers=components["backbone"].ort_disabled_optimizers)
    heads = OrtSession(folder / components[HEADS].file)
    hidden = next(t for t in spec.inputs if t.name == "inputs_embeds").shape[-1]
    caches = {k: KVCache.for_backbone(components["backbone"], 32) for k in ("fused", "split")}
    rng = np.random.default_rng(seed)
    history = np.full((1, 5), -1, np.int64)
    rows = []
    for n in (6, 1):
        embeds = rng.standard_normal((1, n, int(hidden))).astype(np.float32)
        got = fused.run({"inputs_embeds": embeds, **caches["fused"].past(), "history": history},
                        into=caches["fused"].slot(n))
        caches["fused"].advance(n)
        ref = backbone.run({"inputs_embeds": embeds, **caches["split"].past()}, into=caches["split"].slot(n))
        caches["split"].advance(n)
        ids = heads.run({"hidden": ref["hidden"], "history": history})["ids"]
        rel = float(np.max(np.abs(got["hidden"] - ref["hidden"])) / max(float(np.max(np.abs(ref["hidden"]))), 1e-30))
        cache_rel = max(float(np.max(np.abs(a - b))) for a, b in zip(caches["fused"].buffers, caches["split"].buffers))
        same = bool(np.array_equal(got["ids"], ids))
        rows.append({"component": DECODE, "inputs": f"seq={n}", "output": "ids, hidden, cache",
                     "max_abs": cache_rel, "rel": rel if same else float("inf"), "ok": same and rel <= 1e-5})
    return rows


__all__ = ["DECODE", "HEADS", "DECODE_FILE", "DECODE_ORT_FILE", "HOST_EMBEDDING_FILE", "DERIVED", "fuse_decode",
           "decode_spec", "write_host_embedding", "derive", "check_decode"]
