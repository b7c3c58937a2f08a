"""Weight-only INT4 by round to nearest, one weight at a time: how a graph too large to load is
quantized (the real-size 4B backbone holds 16.7 GB of fp32 weights).

ModelOpt's RTN (`quantize(..., calibration_method="rtn_dq")`) loads the graph and every weight in
it, then holds their scales and quantized copies, before writing anything. This writes the same
graph from the source's side file: each 2-D MatMul weight is read a block of rows at a time
(whole blocks of `block_size` input channels), scaled and rounded by ModelOpt's own `find_scales`
and `rtn` (symmetric INT4, ties to even), packed, and appended to the new side file. Only the
scales (1/block_size of the weights' elements) and the graph's small tensors stay in memory, for
ModelOpt's `convert_to_f16`, which makes the activations fp16 as it does after its own RTN. The
result has the same DequantizeLinear nodes, tensor names, INT4 bytes and scales as ModelOpt's.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qinyu_edge.bundle_paths import inside
from qinyu_edge.errors import QinyuError
from qinyu_edge.side_file import BLOCK_BYTES, INLINE_MAX_BYTES, SideFile, tensor_bytes

from .modelopt_log import quiet_modelopt

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)


class StreamQuantError(QinyuError):
    """The source graph cannot be read as it says (a side file cut short, a name outside the folder)."""


def int4_targets(graph: onnx.GraphProto, exclude: Sequence[str]) -> list[str]:
    """The initializers ModelOpt's INT4 quantizes: 2-D float weights (input 1) of MatMul nodes not
    matched by an `exclude` regex, each once, in node order."""
    inits = {t.name: t for t in graph.initializer}
    names: dict[str, None] = {}
    for n in graph.node:
        if n.op_type != "MatMul" or any(re.search(p, n.name) for p in exclude):
            continue
        w = inits.get(n.input[1])
        if w is not None and len(w.dims) == 2 and w.data_type in _FLOATS:
            names[w.name] = None
    return list(names)


def _external(folder: Path, t: TensorProto) -> tuple[Path, int, int]:
    info = {e.key: e.value for e in t.external_data}
    path = inside(folder, info.get("location", ""), f"the side file of tensor {t.name!r}")
    return path, int(info.get("offset", 0)), tensor_bytes(t.data_type, tuple(t.dims))


def _row_blocks(folder: Path, t: TensorProto, rows_per_block: int) -> Iterator[np.ndarray]:
    """`t` ([rows, cols]) a block of rows at a time, read from its side file where it has one."""
    rows, cols = t.dims
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    if t.data_location != TensorProto.EXTERNAL:
        w = numpy_helper.to_array(t)
        for r in range(0, rows, rows_per_block):
            yield w[r:r + rows_per_block]
        return
    path, offset, _ = _external(folder, t)
    with open(path, "rb") as f:
        for r in range(0, rows, rows_per_block):
            n = min(rows_per_block, rows - r) * cols
            f.seek(offset + r * cols * dtype.itemsize)
            block = np.fromfile(f, dtype=dtype, count=n)
            if block.size != n:
                raise StreamQuantError(f"{path.name} ends inside tensor {t.name!r} (row {r} of {rows}): the "
                                       "bundle is truncated. Export it again.")
            yield block.reshape(-1, cols)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed 4-bit values, two per byte in ONNX's order (element 2i in the low nibble)."""
    flat = q.reshape(-1).astype(np.int8)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    return ((flat[1::2] << 4) | (flat[0::2] & 0x0F)).astype(np.uint8)


def quantize_int4_streamed(src: Path, dst: Path, block_size: int = 128, exclude: Sequence[str] = (),
                           progress: Callable[[int, int], None] | None = None) -> onnx.ModelProto:
    """Write `src` with its MatMul weights in INT4 blocks to `dst` and `<dst>.data`, activations
    fp16 and inputs/outputs as they were. Returns the graph written (side data not loaded)."""
    import onnx
    from modelopt.onnx.autocast import convert_to_f16
    from modelopt.onnx.quantization.quant_utils import find_scales, rtn

    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    targets = set(int4_targets(g, exclude))
    side = SideFile(dst.with_name(dst.name + ".data"))
    kept: list[TensorProto] = []
    dq_nodes, renamed = [], {}
    try:
        done = 0
        for t in g.initializer:
            if t.name not in targets:
                if t.data_location == TensorProto.EXTERNAL:
                    onnx.external_data_helper.load_external_data_for_tensor(t, str(_external(src.parent, t)[0].parent))
                    del t.external_data[:]
                    t.data_location = TensorProto.DEFAULT
                kept.append(t)
                continue
            rows, cols = t.dims
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            step = max(1, BLOCK_BYTES // (cols * itemsize * block_size)) * block_size
            scales: list[np.ndarray] = []

            def quantized(t: TensorProto = t, step: int = step, scales: list = scales) -> Iterator[np.ndarray]:
                for w in _row_blocks(src.parent, t, step):
                    s, _ = find_scales(w, block_size)
                    scales.append(s.astype(w.dtype))
                    yield pack_int4(rtn(w, s, block_size))

            kept.append(side.blocks(f"{t.name}_i4", (rows, cols), quantized(), TensorProto.INT4))
            kept.append(numpy_helper.from_array(np.concatenate(scales), f"{t.name}_scale"))
            renamed[t.name] = f"{t.name}_DequantizeLinear_Output"
            dq_nodes.append(helper.make_node("DequantizeLinear", [f"{t.name}_i4", f"{t.name}_scale"],
                                             [renamed[t.name]], name=f"{t.name}_DequantizeLinear",
                                             axis=0, block_size=block_size))
            done += 1
            if progress:
                progress(done, len(targets))
        for n in g.node:
            for k, name in enumerate(n.input):
                if name in renamed:
                    n.input[k] = renamed[name]
        nodes = [*dq_nodes, *g.node]
        del g.node[:]
        g.node.extend(nodes)
        del g.initializer[:]
        g.initializer.extend(kept)
        side.flush()
        # ModelOpt reads each DequantizeLinear's weight to learn its type (INT4 needs opset 21),
        # resolving side files from the working directory.
        with contextlib.chdir(dst.parent), quiet_modelopt():
            model = convert_to_f16(model, keep_io_types=True)
        # The small tensors (norm gains, scales, tables) were converted in memory; the large ones join the side file.
        model.ir_version = max(model.ir_version, 10)  # INT4 tensors are IR 10, as ModelOpt writes them
        g = model.graph
        for k, t in enumerate(g.initializer):
            if t.data_location != TensorProto.EXTERNAL and tensor_bytes(t.data_type, tuple(t.dims)) > INLINE_MAX_BYTES:
                g.initializer[k].CopyFrom(side.tensor(t.name, numpy_helper.to_array(t)))
    finally:
        side.close()
    onnx.save_model(model, str(dst))
    log.info("%s: %d weights INT4 (blocks of %d), streamed", src.name, len(targets), block_size)
    return model
