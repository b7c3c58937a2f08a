"""Parity of a real-size backbone graph against PyTorch, one layer in memory at a time.

A whole real-size backbone does not fit twice in a workstation's memory (once in ONNX Runtime,
once in PyTorch). The exported graph is therefore run in pieces: the part before the first layer
(positions, mask), each decoder layer, then the final norm, every piece a sub-graph of the
bundle's own file reading its own weights from the bundle's side file. Beside it, each PyTorch
`DecoderLayer` is built with the same weights from the checkpoint and run on its own previous
output. Both chains go through every layer, so the last hidden state is an end-to-end check of
the file, and each layer's output and cache rows are compared on the way.
"""

from __future__ import annotations

import copy
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import torch
from onnx import helper

from .models.backbone import Backbone
from .models.layers import attention_mask
from .onnx_io import compare
from .weight_stream import WeightSource

_LAYER = re.compile(r"/layers\.(\d+)/")


@dataclass
class _Piece:
    label: str
    nodes: list[onnx.NodeProto]


def _pieces(graph: onnx.GraphProto, n_layers: int) -> list[_Piece]:
    """Nodes before the layers, each layer's, and after, in an order each piece can run in."""
    producer_piece: dict[str, int] = {}  # tensor -> piece index (0 = pre, 1 + i = layer i, n + 1 = post)
    pieces: list[list[onnx.NodeProto]] = [[] for _ in range(n_layers + 2)]
    for node in graph.node:
        m = _LAYER.search(node.name)
        if m:
            k = 1 + int(m.group(1))
        else:
            after = [producer_piece[i] for i in node.input if i in producer_piece]
            k = n_layers + 1 if any(a > 0 for a in after) else 0
        if any(producer_piece.get(i, 0) > k for i in node.input):
            raise ValueError(f"node {node.name} reads a later layer's result: the graph cannot run layer by layer")
        pieces[k].append(node)
        producer_piece.update({o: k for o in node.output})
    labels = ["positions and mask", *(f"layer {i}" for i in range(n_layers)), "final norm"]
    return [_Piece(label, nodes) for label, nodes in zip(labels, pieces)]


class _PieceRunner:
    """Runs one piece of the graph at `path` as its own ONNX Runtime session (weights read from the
    same side file), written as a hidden file beside it for the length of the call."""

    def __init__(self, model: onnx.ModelProto, path: Path) -> None:
        self.model = model
        self.path = path
        self.inits = {t.name: t for t in model.graph.initializer}
        self.outputs = {o.name for o in model.graph.output}
        inferred = onnx.shape_inference.infer_shapes(model)
        self.types = {v.name: v.type.tensor_type.elem_type
                      for v in [*inferred.graph.value_info, *inferred.graph.output]}

    def run(self, piece: _Piece, later: set[str], envs: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        import onnxruntime as ort

        made = {o for n in piece.nodes for o in n.output}
        needed = [i for n in piece.nodes for i in n.input if i and i not in made and i not in self.inits]
        needed = list(dict.fromkeys(needed))
        results = [o for o in dict.fromkeys(o for n in piece.nodes for o in n.output) if o in later or o in self.outputs]
        env0 = envs[0]
        inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(env0[n].dtype), None) for n in needed]
        outputs = [helper.make_tensor_value_info(n, self.types[n], None) for n in results]
        used = {i: self.inits[i] for n in piece.nodes for i in n.input if i in self.inits}
        sub = helper.make_model(helper.make_graph(piece.nodes, piece.label, inputs, outputs, list(used.values())),
                                opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        with tempfile.NamedTemporaryFile(dir=self.path.parent, prefix=f".{self.path.stem}.piece.", suffix=".onnx") as f:
            f.write(sub.SerializeToString())
            f.flush()
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 2
            opts.add_session_config_entry("session.disable_prepacking", "1")  # as run_onnx
            sess = ort.InferenceSession(f.name, opts, providers=["CPUExecutionProvider"])
        return [dict(zip(results, sess.run(results, {n: env[n] for n in needed}))) for env in envs]


def _later_reads(pieces: list[_Piece], graph_outputs: set[str]) -> list[set[str]]:
    """For each piece, the tensors read by the pieces after it (or returned by the graph)."""
    out, acc = [], set(graph_outputs)
    for piece in reversed(pieces):
        out.append(set(acc))
        acc |= {i for n in piece.nodes for i in n.input}
    return out[::-1]


def _torch_layer(hollow: Backbone, i: int, weights: WeightSource) -> torch.nn.Module:
    layer = copy.deepcopy(hollow.layers[i]).to_empty(device="cpu")
    with torch.no_grad():
        for name, t in layer.state_dict().items():
            t.copy_(torch.from_numpy(weights(f"layers.{i}.{name}")))
    return layer.eval()


def layer_parity(path: Path, hollow: Backbone, weights: WeightSource, cases: list[Mapping[str, torch.Tensor]],
                 tolerance: float, progress=None) -> list[dict[str, object]]:
    """Parity rows of the backbone graph at `path` against PyTorch on each of `cases` (the graph's
    feeds: inputs_embeds, past_length, caches), run layer by layer (see the module docstring)."""
    cfg = hollow.cfg
    model = onnx.load(str(path), load_external_data=False)
    pieces = _pieces(model.graph, cfg.num_layers)
    later = _later_reads(pieces, {o.name for o in model.graph.output})
    runner = _PieceRunner(model, path)
    envs = [{k: v.numpy() for k, v in feeds.items()} for feeds in cases]
    k = len(hollow.cache_kinds)
    names = hollow.signature().output_names[1:]
    xs = [feeds["inputs_embeds"] for feeds in cases]
    worst = [{"hidden": (0.0, 0.0, -1), "cache": (0.0, 0.0, -1)} for _ in cases]
    for p, piece in enumerate(pieces):
        outs = runner.run(piece, later[p], envs)
        for env, out in zip(envs, outs):
            env.update(out)
        if not piece.label.startswith("layer "):
            if progress:
                progress(p + 1, len(pieces))
            continue
        i = p - 1
        layer = _torch_layer(hollow, i, weights)
        for c, feeds in enumerate(cases):
            past_length = feeds["past_length"]
            caches = tuple(feeds[f"past_{n}"] for n in hollow.cache_names[i * k:(i + 1) * k])
            seq = xs[c].shape[1]
            with torch.no_grad():
                rope = hollow.rope(past_length, seq)
                mask = attention_mask(caches[0].shape[0], seq, past_length)
                xs[c], new = layer(xs[c], rope, caches, mask)
            hidden = [v for n, v in outs[c].items() if n not in names and v.shape == tuple(xs[c].shape)
                      and v.dtype == np.float32]
            if len(hidden) != 1:
                raise ValueError(f"{piece.label}: cannot tell its hidden-state output among {sorted(outs[c])}")
            (err,) = compare({"h": hidden[0]}, {"h": xs[c].numpy()})
            if err.rel >= worst[c]["hidden"][1]:
                worst[c]["hidden"] = (err.max_abs, err.rel, i)
            ref = {f"new_{n}": t.numpy() for n, t in zip(hollow.cache_names[i * k:(i + 1) * k], new)}
            for e in compare({n: envs[c][n] for n in ref}, ref):
                if e.rel >= worst[c]["cache"][1]:
                    worst[c]["cache"] = (e.max_abs, e.rel, i)
        del layer
        if progress:
            progress(p + 1, len(pieces))
    norm = copy.deepcopy(hollow.norm).to_empty(device="cpu")
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(weights("norm.weight")))
    rows = []
    for c, feeds in enumerate(cases):
        label = (f"seq={feeds['inputs_embeds'].shape[1]} past={int(feeds['past_length'][0])}, "
                 f"layer by layer ({cfg.num_layers})")
        for what, (max_abs, rel, i) in worst[c].items():
            rows.append({"component": "backbone", "inputs": label, "output": f"{what} of each layer (worst: {i})",
                         "max_abs": max_abs, "rel": rel, "ok": rel <= tolerance})
        with torch.no_grad():
            ref = norm(xs[c][:, -1]).numpy()
        (err,) = compare({"hidden": envs[c]["hidden"]}, {"hidden": ref})
        rows.append({"component": "backbone", "inputs": label, "output": "hidden (end to end)",
                     "max_abs": err.max_abs, "rel": err.rel, "ok": err.rel <= tolerance})
    return rows
