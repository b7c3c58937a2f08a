"""The Qwen3 backbone as an ONNX Runtime CPU graph built on its fused contrib ops.

The portable backbone (traced from `models.backbone`) runs on every backend, TensorRT included,
and ONNX Runtime executes its ~43 nodes per layer one by one; at decode size each node costs a few
microseconds of dispatch whatever its arithmetic. This graph writes the same layer with the fused
operators ONNX Runtime ships for decoder LLMs (com.microsoft domain), 15 nodes per layer:

    SkipSimplifiedLayerNormalization (residual add + RMSNorm)
    MatMul (packed q|k|v), Split (q|k, v)
    Reshape, SimplifiedLayerNormalization, Reshape: the per-head q and k norms in one, a weight row per head
      (GroupQueryAttention's own q/k-norm inputs are CUDA-only in ONNX Runtime 1.31)
    Split (q, k), GroupQueryAttention (rotate-half RoPE, GQA, causal softmax, cache write)
    MatMul (o_proj), SkipSimplifiedLayerNormalization
    MatMul (packed gate|up), Split, QuickGelu (alpha 1 = SiLU), Mul, MatMul (down_proj)

Cache: `past_key_{i}` / `past_value_{i}` `[B, kv_heads, capacity, head_dim]` (head-major, positions
0..capacity-1, no null slot), and outputs `present_key_{i}` / `present_value_{i}` of the same shape.
The host binds each present output to the very buffer of its past input; GroupQueryAttention then
writes the S new positions in place at `past_length` and reads the past where it lies (its shared
past/present buffer mode), so nothing of the past is copied, and no window is needed: the op reads
`past_length + S` positions. Positions are those of the portable graph (P..P+S-1), so one graph
serves prefill and decode. Only ONNX Runtime runs it (TensorRT has no parser for these ops); the
bundle keeps it beside the portable graph as the backbone's ONNX Runtime CPU variant.

Weights: the large initializers are the portable graph's bytes (the packed projections are the
same concatenations), so when the portable graph keeps its weights in a side file this graph
points into that file rather than holding a second copy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qinyu_edge.bundle import ComponentSpec, TensorSpec

from .models.backbone import Qwen3Backbone
from .onnx_io import OPSET

MS = "com.microsoft"
ORT_BACKBONE_FILE = "backbone_ort.onnx"
# Tensors at least this large live in the side file when the graph has one (onnx's own default).
SIDE_FILE_MIN_BYTES = 1024


def cache_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


Store = Callable[[str, np.ndarray], onnx.TensorProto]


def _inline(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


class _Graph:
    def __init__(self, store: Store) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.store = store

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(self.store(name, np.asarray(value, order="C")))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs: object
             ) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()


def ort_backbone_model(backbone: Qwen3Backbone, store: Store = _inline) -> onnx.ModelProto:
    """The graph of `backbone` (its weights, its dtype), cos/sin tables up to max_position_embeddings;
    `store` turns each constant into its initializer (inline by default)."""
    cfg = backbone.cfg
    dtype = next(backbone.parameters()).dtype
    np_dtype = _np(torch.zeros(1, dtype=dtype)).dtype
    elem = helper.np_dtype_to_tensor_dtype(np_dtype)
    d, eps = cfg.head_dim, cfg.rms_norm_eps
    g = _Graph(store)

    cos, sin = backbone.rotary(0, cfg.max_position_embeddings)
    g.const("cos_cache", _np(cos[:, : d // 2]).astype(np_dtype))
    g.const("sin_cache", _np(sin[:, : d // 2]).astype(np_dtype))
    # seqlens_k = past_length + S - 1 and total_sequence_length = past_length + S, int32, as the op wants.
    seq = g.node("Shape", ["inputs_embeds"], ["seq"], "seq", start=1, end=2)[0]
    total64 = g.node("Add", ["past_length", seq], ["total64"], "total64")[0]
    total = g.node("Cast", [total64], ["total32"], "total32", to=TensorProto.INT32)[0]
    seqlens = g.node("Sub", [total, g.const("one32", np.array([1], np.int32))], ["seqlens_k"], "seqlens_k")[0]
    total_scalar = g.node("Squeeze", [total], ["total_sequence_length"], "total_sequence_length")[0]

    hq, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    g.const("ffn_split", np.array([cfg.intermediate_size] * 2, np.int64))
    g.const("qk_v_split", np.array([(hq + kvh) * d, kvh * d], np.int64))
    g.const("qk_heads", np.array([0, -1, hq + kvh, d], np.int64))
    g.const("qk_flat", np.array([0, -1, (hq + kvh) * d], np.int64))
    g.const("q_k_split", np.array([hq * d, kvh * d], np.int64))
    x, pending = "inputs_embeds", None  # pending: the last branch output not yet added to x
    for i, layer in enumerate(backbone.layers):
        att, mlp = layer.self_attn, layer.mlp
        p = f"layers.{i}"

        def norm(weight: torch.Tensor, tag: str) -> str:
            nonlocal x, pending
            w = g.const(f"{p}.{tag}.weight", _np(weight))
            if pending is None:
                return g.node("SimplifiedLayerNormalization", [x, w], [f"{p}.{tag}"], f"{p}.{tag}", axis=-1,
                              epsilon=eps, stash_type=1)[0]
            out = g.node("SkipSimplifiedLayerNormalization", [x, pending, w], [f"{p}.{tag}", "", "", f"{p}.{tag}.sum"],
                         f"{p}.{tag}", domain=MS, epsilon=eps)
            x, pending = out[3], None
            return out[0]

        h = norm(layer.input_layernorm.weight, "input_layernorm")
        qkv_w = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).T
        qkv = g.node("MatMul", [h, g.const(f"{p}.qkv.weight", _np(qkv_w))], [f"{p}.qkv"], f"{p}.qkv")[0]
        # The per-head q and k norms as one RMSNorm over the q|k heads, with one weight row per head.
        qk, v = g.node("Split", [qkv, "qk_v_split"], [f"{p}.qk", f"{p}.v"], f"{p}.qk_v", axis=-1)
        heads = g.node("Reshape", [qk, "qk_heads"], [f"{p}.qk_heads"], f"{p}.qk_heads")[0]
        qk_w = torch.cat([att.q_norm.weight.expand(att.num_heads, d), att.k_norm.weight.expand(kvh, d)])
        normed = g.node("SimplifiedLayerNormalization", [heads, g.const(f"{p}.qk_norm.weight", _np(qk_w))],
                        [f"{p}.qk_normed"], f"{p}.qk_norm", axis=-1, epsilon=eps, stash_type=1)[0]
        flat = g.node("Reshape", [normed, "qk_flat"], [f"{p}.qk_flat"], f"{p}.qk_flat")[0]
        q, k = g.node("Split", [flat, "q_k_split"], [f"{p}.q", f"{p}.k"], f"{p}.q_k", axis=-1)
        gqa_in = [q, k, v, f"past_key_{i}", f"past_value_{i}", seqlens, total_scalar, "cos_cache", "sin_cache"]
        a = g.node("GroupQueryAttention", gqa_in, [f"{p}.attn", f"present_key_{i}", f"present_value_{i}"],
                   f"{p}.attn", domain=MS, num_heads=att.num_heads, kv_num_heads=kvh, do_rotary=1,
                   scale=att.scale)[0]
        pending = g.node("MatMul", [a, g.const(f"{p}.o_proj.weight", _np(att.o_proj.weight.T))], [f"{p}.o"],
                         f"{p}.o")[0]
        h = norm(layer.post_attention_layernorm.weight, "post_attention_layernorm")
        gu_w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).T
        gu = g.node("MatMul", [h, g.const(f"{p}.gate_up.weight", _np(gu_w))], [f"{p}.gate_up"], f"{p}.gate_up")[0]
        gate, up = g.node("Split", [gu, "ffn_split"], [f"{p}.gate", f"{p}.up"], f"{p}.split", axis=-1)
        act = g.node("QuickGelu", [gate], [f"{p}.silu"], f"{p}.silu", domain=MS, alpha=1.0)[0]
        prod = g.node("Mul", [act, up], [f"{p}.gated"], f"{p}.gated")[0]
        pending = g.node("MatMul", [prod, g.const(f"{p}.down_proj.weight", _np(mlp.down_proj.weight.T))],
                         [f"{p}.down"], f"{p}.down")[0]
    # The final norm over all S rows (a prefill's extra rows cost little), then the last row.
    normed = g.node("SkipSimplifiedLayerNormalization", [x, pending, g.const("norm.weight", _np(backbone.norm.weight))],
                    ["normed"], "norm", domain=MS, epsilon=eps)[0]
    g.node("Gather", [normed, g.const("last", np.array(-1, np.int64))], ["hidden"], "last", axis=1)

    cache = ["batch", kvh, "capacity", d]
    inputs = [helper.make_tensor_value_info("inputs_embeds", elem, ["batch", "seq", cfg.hidden_size]),
              helper.make_tensor_value_info("past_length", TensorProto.INT64, [1])]
    inputs += [helper.make_tensor_value_info(n, elem, cache) for n in cache_names(cfg.num_layers, "past")]
    outputs = [helper.make_tensor_value_info("hidden", elem, ["batch", cfg.hidden_size])]
    outputs += [helper.make_tensor_value_info(n, elem, cache) for n in cache_names(cfg.num_layers, "present")]
    graph = helper.make_graph(g.nodes, "qwen3_backbone_ort", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    # The IR version of the opset, not the newest onnx knows: ONNX Runtime refuses IRs newer than its own.
    return helper.make_model(graph, opset_imports=opsets, producer_name="qinyu-edge",
                             ir_version=helper.find_min_ir_version_for(opsets, ignore_unknown=True))


class _SideFileStore:
    """Initializers that point into the portable graph's side file where their bytes are there
    (found by length and sha256), or else into a side file of this graph's own; small ones inline."""

    def __init__(self, portable: Path, own: Path):
        self.portable_side = portable.name + ".data"
        self.own = own
        self.file = open(own, "wb")
        model = onnx.load(str(portable), load_external_data=False)
        data = np.memmap(portable.parent / self.portable_side, np.uint8, "r")
        self.index: dict[tuple[int, str], int] = {}
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                off, n = int(info.get("offset", 0)), int(info["length"])
                self.index[(n, _digest(data[off : off + n]))] = off

    def __call__(self, name: str, value: np.ndarray) -> onnx.TensorProto:
        if value.nbytes < SIDE_FILE_MIN_BYTES:
            return _inline(name, value)
        raw = value.tobytes()
        off = self.index.get((len(raw), _digest(raw)))
        location = self.portable_side
        if off is None:
            location, off = self.own.name, self.file.tell()
            self.file.write(raw)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=value.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(off)), ("length", str(len(raw)))):
            t.external_data.add(key=k, value=v)
        return t


def _digest(data: bytes | np.ndarray) -> str:
    return hashlib.sha256(data).hexdigest()


def write_ort_backbone(backbone: Qwen3Backbone, path: Path, portable: Path) -> list[Path]:
    """Write the graph of `backbone` at `path` and return the files written: inline when the portable
    graph at `portable` is, else with its large weights in side files (see `_SideFileStore`), built
    tensor by tensor so no second copy of the weights is ever held in memory."""
    if not (portable.parent / (portable.name + ".data")).is_file():
        onnx.save_model(ort_backbone_model(backbone), str(path))
        return [path]
    own = path.parent / (path.name + ".data")
    store = _SideFileStore(portable, own)
    try:
        model = ort_backbone_model(backbone, store)
    finally:
        store.file.close()
    onnx.save_model(model, str(path))
    if own.stat().st_size == 0:
        own.unlink()
        return [path]
    return [path, own]


def variant_spec(backbone: Qwen3Backbone, file: str, seq_range: tuple[int, int, int], max_context: int
                 ) -> ComponentSpec:
    """The bundle's description of the graph (`KVCache.for_backbone` reads its cache layout from it)."""
    cfg = backbone.cfg
    cache = (1, cfg.num_key_value_heads, "capacity", cfg.head_dim)
    inputs = (TensorSpec("inputs_embeds", "float32", (1, "seq", cfg.hidden_size)),
              TensorSpec("past_length", "int64", (1,)),
              *(TensorSpec(n, "float32", cache) for n in cache_names(cfg.num_layers, "past")))
    outputs = (TensorSpec("hidden", "float32", (1, cfg.hidden_size)),
               *(TensorSpec(n, "float32", cache) for n in cache_names(cfg.num_layers, "present")))
    return ComponentSpec(
        "backbone", file, inputs, outputs, {"seq": seq_range, "capacity": (1, min(512, max_context), max_context)},
        "the backbone on ONNX Runtime's fused CPU operators (GroupQueryAttention, SkipSimplifiedLayerNormalization):"
        " head-major caches [1, kv_heads, capacity, head_dim] updated in place (bind each present_* output to its"
        " past_* input's buffer)",
    )


# (new positions, past length) of each call in the parity check: a prefill, a decode step, and a
# second prompt over a past (a later conversation turn).
PARITY_CALLS = ((7, 0), (1, 7), (4, 8))


def variant_parity(backbone: Qwen3Backbone, spec: ComponentSpec, path: Path, seed: int = 0) -> list[dict[str, object]]:
    """The graph through the runtime's session and cache against the PyTorch backbone over the same
    positions: the last hidden state of every call, then every cache position written."""
    from qinyu_edge.runtime.kv_cache import KVCache
    from qinyu_edge.runtime.session import OrtSession

    from .onnx_io import compare

    total = sum(s for s, _ in PARITY_CALLS)
    x = torch.randn(1, total, backbone.cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = backbone.forward_full(x).numpy()
        ref_cache = backbone(x, torch.tensor([0]), *backbone.empty_cache())[1:]
    session = OrtSession(path, threads=1)
    cache = KVCache.for_backbone(spec, total + 3)
    hidden = np.zeros((1, backbone.cfg.hidden_size), np.float32)
    rows: list[dict[str, object]] = []

    def row(label: str, err: object) -> None:
        rows.append({"component": "backbone (ort cpu)", "inputs": label, "output": err.name, "max_abs": err.max_abs,
                     "rel": err.rel})

    for s, p in PARITY_CALLS:
        session.run({"inputs_embeds": x[:, p : p + s].numpy(), **cache.past()}, into={**cache.slot(s), "hidden": hidden})
        cache.advance(s)
        (err,) = compare({"hidden": hidden}, {"hidden": full[:, p + s - 1]})
        row(f"seq={s} past={p}", err)
    got = {n: v[:total, None] for n, v in zip(cache.names_in, cache.positions)}
    for err in compare(got, dict(zip(cache.names_in, (c.numpy() for c in ref_cache)))):
        row(f"cache rows 0..{total - 1}", err)
    return rows
