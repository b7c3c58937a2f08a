"""A graph too large to load, rewritten one weight at a time: weight-only INT4 or fp16 (the
real-size 4B backbone holds 16.7 GB of fp32 weights).

ModelOpt's RTN (`quantize(..., calibration_method="rtn_dq")`) and its fp16 conversion load the graph
and every weight in it, then hold their converted copies, before writing anything. This writes the
same graphs from the source's side file, a block of rows at a time:
- int4: each 2-D MatMul weight in whole blocks of `block_size` input channels, scaled and rounded
  by ModelOpt's own `find_scales` and `rtn` (symmetric INT4, ties to even), packed, behind a
  blocked DequantizeLinear; only its scales (1/block_size of its elements) stay in memory.
- every other large float tensor (and under fp16 all of them): cast to fp16 with ModelOpt's clamps
  into the new side file, behind a Cast back to fp32, so the graph stays typed as it was.
ModelOpt's `convert_to_f16` then makes the activations fp16 on a graph that holds only the small
tensors, and drops those Casts as redundant. The result has the same nodes, tensor names and bytes
as ModelOpt's own (tested).
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


def _external(folder: Path, t: TensorProto) -> tuple[Path, int]:
    """The side file (refused outside `folder`) and offset of tensor `t`."""
    info = {e.key: e.value for e in t.external_data}
    path = inside(folder, info.get("location", ""), f"the side file of tensor {t.name!r}")
    return path, int(info.get("offset", 0))


def _row_blocks(folder: Path, t: TensorProto, unit: int) -> Iterator[np.ndarray]:
    """`t` a block of rows (along its first axis, a multiple of `unit` rows, about BLOCK_BYTES) at
    a time, read from its side file where it has one."""
    dims = tuple(t.dims) or (1,)
    rows, row_shape = dims[0], dims[1:]
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    step = max(1, BLOCK_BYTES // max(1, row_bytes * unit)) * unit
    if t.data_location != TensorProto.EXTERNAL:
        w = numpy_helper.to_array(t).reshape(dims)
        for r in range(0, rows, step):
            yield w[r:r + step]
        return
    path, offset = _external(folder, t)
    with open(path, "rb") as f:
        for r in range(0, rows, step):
            n = min(step, rows - r)
            f.seek(offset + r * row_bytes)
            block = np.fromfile(f, dtype=dtype, count=n * row_bytes // dtype.itemsize)
            if block.nbytes != n * row_bytes:
                raise StreamQuantError(f"{path.name} ends inside tensor {t.name!r} (row {r} of {rows}): the "
                                       "bundle is truncated. Export it again.")
            yield block.reshape(n, *row_shape)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed 4-bit values, two per byte in ONNX's order (element 2i in the low nibble)."""
    flat = q.reshape(-1).astype(np.int8)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    return ((flat[1::2] << 4) | (flat[0::2] & 0x0F)).astype(np.uint8)


def _fp16(w: np.ndarray, name: str, counts: dict[str, int]) -> np.ndarray:
    """`w` as fp16 the way ModelOpt's converter casts an initializer: magnitudes above fp16's
    largest clamped, non-zero ones below its smallest subnormal replaced by that subnormal."""
    info = np.finfo(np.float16)
    over = np.abs(w) > info.max
    if over.any():
        counts[name] = counts.get(name, 0) + int(over.sum())
        w = np.clip(w, -info.max, info.max)
    tiny = (w != 0) & (np.abs(w) < info.smallest_subnormal)
    if tiny.any():
        w = np.where(tiny, info.smallest_subnormal, w)
    return w.astype(np.float16)


def rewrite_streamed(src: Path, dst: Path, method: str, block_size: int = 128, exclude: Sequence[str] = (),
                     progress: Callable[[int, int], None] | None = None) -> onnx.ModelProto:
    """Write `src` to `dst` and `<dst>.data` with its weights in `method` ("int4": MatMul weights in
    INT4 blocks, the rest fp16; "fp16"), activations fp16, inputs and outputs as they were.
    Returns the graph written (side data not loaded)."""
    import onnx
    from modelopt.onnx.autocast import convert_to_f16
    from modelopt.onnx.quantization.quant_utils import find_scales, rtn

    if method not in ("int4", "fp16"):
        raise ValueError(f"method {method!r}: int4 or fp16")
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    targets = set(int4_targets(g, exclude)) if method == "int4" else set()
    large = {t.name for t in g.initializer if t.name not in targets and t.data_type == TensorProto.FLOAT
             and tensor_bytes(t.data_type, tuple(t.dims)) > INLINE_MAX_BYTES}
    side = SideFile(dst.with_name(dst.name + ".data"))
    kept: list[TensorProto] = []
    added, renamed = [], {}
    overflow: dict[str, int] = {}
    try:
        for done, t in enumerate(g.initializer):
            if t.name in targets:
                rows, cols = t.dims
                scales: list[np.ndarray] = []

                def quantized(t: TensorProto = t, scales: list = scales) -> Iterator[np.ndarray]:
                    for w in _row_blocks(src.parent, t, block_size):
                        s, _ = find_scales(w, block_size)
                        scales.append(s.astype(w.dtype))
                        yield pack_int4(rtn(w, s, block_size))

                kept.append(side.blocks(f"{t.name}_i4", (rows, cols), quantized(), TensorProto.INT4))
                kept.append(numpy_helper.from_array(np.concatenate(scales), f"{t.name}_scale"))
                renamed[t.name] = f"{t.name}_DequantizeLinear_Output"
                added.append(helper.make_node("DequantizeLinear", [f"{t.name}_i4", f"{t.name}_scale"],
                                              [renamed[t.name]], name=f"{t.name}_DequantizeLinear",
                                              axis=0, block_size=block_size))
            elif t.name in large:
                halves = (_fp16(w, t.name, overflow) for w in _row_blocks(src.parent, t, 1))
                kept.append(side.blocks(t.name, tuple(t.dims), halves, TensorProto.FLOAT16))
                renamed[t.name] = f"{t.name}__fp32"
                added.append(helper.make_node("Cast", [t.name], [renamed[t.name]], name=f"{t.name}__to_fp32",
                                              to=TensorProto.FLOAT))
            else:
                if t.data_location == TensorProto.EXTERNAL:
                    _external(src.parent, t)
                    onnx.external_data_helper.load_external_data_for_tensor(t, str(src.parent))
                    del t.external_data[:]
                    t.data_location = TensorProto.DEFAULT
                kept.append(t)
            if progress and (t.name in targets or t.name in large):
                progress(done + 1, len(g.initializer))
        for n in g.node:
            for k, name in enumerate(n.input):
                if name in renamed:
                    n.input[k] = renamed[name]
        nodes = [*added, *g.node]
        del g.node[:]
        g.node.extend(nodes)
        del g.initializer[:]
        g.initializer.extend(kept)
        side.flush()
        # ModelOpt reads each DequantizeLinear's weight to learn its type (INT4 needs opset 21),
        # resolving side files from the working directory.
        with contextlib.chdir(dst.parent), quiet_modelopt():
            model = convert_to_f16(model, keep_io_types=True)
        if targets:
            model.ir_version = max(model.ir_version, 10)  # INT4 tensors are IR 10, as ModelOpt writes them
        # The small tensors (norm gains, scales) were converted in memory; the large ones join the side file.
        g = model.graph
        for k, t in enumerate(g.initializer):
            if t.data_location != TensorProto.EXTERNAL and tensor_bytes(t.data_type, tuple(t.dims)) > INLINE_MAX_BYTES:
                g.initializer[k].CopyFrom(side.tensor(t.name, numpy_helper.to_array(t)))
    finally:
        side.close()
    onnx.save_model(model, str(dst))
    for name, n in overflow.items():
        log.warning("%s: %d values of %s exceed fp16's range and were clamped to +-65504", src.name, n, name)
    log.info("%s: %d weights INT4 (blocks of %d), %d tensors fp16, streamed", src.name, len(targets), block_size,
             len(large))
    return model
