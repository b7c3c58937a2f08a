"""Export a module's graph without holding its weights twice, then stream the weights into the file.

`torch.onnx.export` keeps every parameter in its own protobuf while tracing and folding, so a
real-size backbone needs its fp32 weights two or three times over in memory. Here the graph is
traced with the parameters as graph *inputs* (stand-ins that are never written, so never resident
when the module is hollow), and then each weight, or each tensor computed from weights only (a
transpose, a concatenation of q|k|v, a norm gain times a scale), is computed one at a time from
its source, written to the side file and dropped. The peak is the largest of those tensors, not
the model. The result is the graph the ordinary export gives: the same nodes over the same folded
constants.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from qinyu_edge.side_file import EXTERNAL_DATA_BYTES, SideFile

from .onnx_io import OPSET

log = logging.getLogger(__name__)

# A weight by its module name (`layers.0.mlp.up_proj.weight`), as float32.
WeightSource = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class _Slot:
    module: torch.nn.Module
    attr: str
    name: str
    param: torch.nn.Parameter


def _slots(module: torch.nn.Module) -> list[_Slot]:
    return [_Slot(mod, attr, f"{prefix}.{attr}" if prefix else attr, p)
            for prefix, mod in module.named_modules() for attr, p in mod._parameters.items() if p is not None]


class _WeightsAsInputs(torch.nn.Module):
    """`module` with its parameters replaced by extra forward arguments while it is traced."""

    def __init__(self, module: torch.nn.Module, slots: list[_Slot], n_args: int) -> None:
        super().__init__()
        self.inner = module
        self.slots = slots
        self.n_args = n_args

    def forward(self, *args: torch.Tensor) -> object:
        for slot, value in zip(self.slots, args[self.n_args:]):
            setattr(slot.module, slot.attr, value)
        return self.inner(*args[: self.n_args])


def trace_without_weights(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                          input_names: Sequence[str], output_names: Sequence[str],
                          dynamic_axes: Mapping[str, Mapping[int, str]]) -> onnx.ModelProto:
    """The graph of `module(*args)` whose parameters are inputs named by their module names.

    A hollow module (parameters on the meta device) traces on uninitialised stand-ins: address
    space only, since the trace reads them but never writes them. Buffers stay constants.
    """
    slots = _slots(module)
    stand_ins = tuple(torch.empty(s.param.shape, dtype=s.param.dtype) if s.param.is_meta else s.param.detach()
                      for s in slots)
    for s in slots:
        del s.module._parameters[s.attr]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about python scalars are expected
            torch.onnx.export(
                _WeightsAsInputs(module.eval(), slots, len(args)), args + stand_ins, str(path),
                input_names=[*input_names, *(s.name for s in slots)], output_names=list(output_names),
                dynamic_axes=dict(dynamic_axes), opset_version=OPSET, dynamo=False, do_constant_folding=True,
            )
    finally:
        for s in slots:
            s.module.__dict__.pop(s.attr, None)
            s.module._parameters[s.attr] = s.param
    return onnx.load(str(path))


def _folded(graph: onnx.GraphProto, weights: set[str]) -> tuple[list[onnx.NodeProto], list[str]]:
    """The nodes that compute from weights and constants only (removed from the graph), and the
    tensors among their results and the weights that the rest of the graph reads (which become
    initializers)."""
    constant = {i.name for i in graph.initializer} | weights
    derived = set(weights)
    folded = []
    for node in graph.node:
        ins = [i for i in node.input if i]
        if all(i in constant for i in ins):
            constant.update(node.output)
            if any(i in derived for i in ins):
                derived.update(node.output)
                folded.append(node)
    folded_ids = {id(n) for n in folded}
    read = {i for n in graph.node if id(n) not in folded_ids for i in n.input} | {o.name for o in graph.output}
    boundary = [t for t in dict.fromkeys([*(i.name for i in graph.input), *(o for n in folded for o in n.output)])
                if t in derived and t in read]
    return folded, boundary


def _transpose_of(producer: Mapping[str, onnx.NodeProto], target: str, weights: set[str]) -> str | None:
    """The weight `target` is the 2-D transpose of, if that is all it is."""
    node = producer.get(target)
    if node is None or node.op_type != "Transpose" or node.input[0] not in weights:
        return None
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return node.input[0] if perm == [1, 0] else None


@dataclass(frozen=True)
class _GraphIndex:
    """What every fold looks up in the traced graph, built once per graph."""

    model: onnx.ModelProto
    producer: Mapping[str, onnx.NodeProto]
    position: Mapping[int, int]  # id(node) -> its place in the graph's (topological) order
    initializers: Mapping[str, TensorProto]
    types: Mapping[str, int]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "_GraphIndex":
        g = model.graph
        inferred = onnx.shape_inference.infer_shapes(model).graph
        return cls(model, {o: n for n in g.node for o in n.output}, {id(n): k for k, n in enumerate(g.node)},
                   {i.name: i for i in g.initializer},
                   {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]})

    def ancestors(self, target: str) -> list[onnx.NodeProto]:
        need, seen, order = [target], set(), []
        while need:
            node = self.producer.get(need.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            order.append(node)
            need.extend(i for i in node.input if i)
        return sorted(order, key=lambda n: self.position[id(n)])


def _compute(index: _GraphIndex, target: str, weights: WeightSource) -> np.ndarray:
    """`target` (a tensor computed from weights only) by running its part of the graph, with only
    the weights it reads in memory."""
    import onnxruntime as ort

    nodes = index.ancestors(target)
    made = {o for n in nodes for o in n.output}
    inits = index.initializers
    feeds_names = [i for n in nodes for i in n.input if i and i not in made and i not in inits]
    feeds = {n: weights(n) for n in dict.fromkeys(feeds_names)}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, v.shape) for n, v in feeds.items()]
    used = {i: inits[i] for n in nodes for i in n.input if i in inits}
    sub = helper.make_model(
        helper.make_graph(nodes, "fold", inputs, [helper.make_tensor_value_info(target, index.types[target], None)],
                          list(used.values())),
        opset_imports=index.model.opset_import, ir_version=index.model.ir_version)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([target], feeds)[0]


def fold_weights(model: onnx.ModelProto, weight_names: set[str], weights: WeightSource, side_file: Path | None,
                 progress: Callable[[int, int], None] | None = None) -> onnx.ModelProto:
    """Replace the weight inputs of a `trace_without_weights` graph, and everything computed from
    them alone, by initializers: each computed from `weights`, written to `side_file` (or inline
    when None), and released before the next."""
    g = model.graph
    folded, boundary = _folded(g, weight_names)
    index = _GraphIndex.of(model)
    side = SideFile(side_file)
    initializers = []
    try:
        for k, name in enumerate(boundary):
            source = _transpose_of(index.producer, name, weight_names)
            if source is not None:
                initializers.append(side.transposed(name, weights(source)))
            else:
                value = weights(name) if name in weight_names else _compute(index, name, weights)
                initializers.append(side.tensor(name, value))
                del value
            if progress:
                progress(k + 1, len(boundary))
    finally:
        side.close()
    folded_ids = {id(n) for n in folded}
    kept = _live([n for n in g.node if id(n) not in folded_ids], {o.name for o in g.output})
    del g.node[:]
    g.node.extend(kept)
    inputs = [i for i in g.input if i.name not in weight_names]
    del g.input[:]
    g.input.extend(inputs)
    g.initializer.extend(initializers)
    return model


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` without those whose results nothing reads any more (constants only the folded
    nodes used), in order."""
    live = list(nodes)
    while True:
        read = outputs | {i for n in live for i in n.input}
        kept = [n for n in live if any(o in read for o in n.output)]
        if len(kept) == len(live):
            return kept
        live = kept


def export_streamed(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: str | os.PathLike,
                    input_names: Sequence[str], output_names: Sequence[str],
                    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None, weights: WeightSource | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Export `module(*args)` to `path` with its weights taken from `weights` one tensor at a time
    (default: the module's own parameters; a hollow module needs a source), check it and return
    the path. Weights over `EXTERNAL_DATA_BYTES` in all go to `<path>.data`. Written beside the
    target and renamed, so a failed export leaves nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    slots = _slots(module)
    if weights is None:
        params = {s.name: s.param for s in slots}
        weights = lambda name: params[name].detach().float().numpy()  # noqa: E731
    n_bytes = sum(s.param.numel() * 4 for s in slots)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp:
        raw = Path(tmp) / path.name
        model = trace_without_weights(module, args, raw, input_names, output_names, dynamic_axes or {})
        names = {s.name for s in slots} & {i.name for i in model.graph.input}
        side = Path(tmp) / (path.name + ".data") if n_bytes > EXTERNAL_DATA_BYTES else None
        model = fold_weights(model, names, weights, side, progress)
        onnx.save_model(model, str(raw))
        onnx.checker.check_model(str(raw), full_check=True)
        if side is not None:
            os.replace(side, path.parent / side.name)
        os.replace(raw, path)
    log.info("exported %s", path)
    return path
