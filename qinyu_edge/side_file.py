"""An ONNX external-data file written one tensor (or one block of a tensor) at a time.

The real-size graphs hold more weights than memory should: the export and the streamed
quantization each compute a tensor, append it here and drop it. Offsets sit on page boundaries so
ONNX Runtime can map tensors instead of copying them; tensors of a few bytes stay in the graph.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

if TYPE_CHECKING:
    from .bundle import ComponentSpec

ALIGN = 4096
INLINE_MAX_BYTES = 1024
# A graph with more weights than this keeps them in `<graph>.onnx.data`. Protobuf caps a file at
# 2 GiB; well below that, the point is sharing: the fused decode graph and the host embedding table
# refer to, or copy a block at a time from, a side file, but would copy a big graph's inline weights
# into their own file (0.7 GB of the 4B's fp16 lm_head, once more on disk).
EXTERNAL_DATA_BYTES = 256 << 20
BLOCK_BYTES = 64 << 20
_PACKED_4BIT = (TensorProto.INT4, TensorProto.UINT4)


def tensor_bytes(data_type: int, shape: tuple[int, ...]) -> int:
    n = int(np.prod(shape, dtype=np.int64))
    if data_type in _PACKED_4BIT:
        return (n + 1) // 2
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize


class SideFile:
    """Appends tensors to one external-data file (`path`, named in each tensor as its file name);
    with `path` None every tensor stays inline."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.file = open(path, "wb") if path else None

    def tensor(self, name: str, value: np.ndarray) -> TensorProto:
        value = np.ascontiguousarray(value)
        return self.blocks(name, value.shape, iter([value]))

    def transposed(self, name: str, weight: np.ndarray) -> TensorProto:
        """`weight.T` (2-D), written a block of rows at a time: the largest folded tensors (a
        vocabulary-sized lm_head) are plain transposes, and a whole second copy would be the peak."""
        rows = max(1, BLOCK_BYTES // max(1, weight.shape[0] * weight.itemsize))
        blocks = (np.ascontiguousarray(weight[:, i:i + rows].T) for i in range(0, weight.shape[1], rows))
        return self.blocks(name, weight.shape[::-1], blocks, helper.np_dtype_to_tensor_dtype(weight.dtype))

    def blocks(self, name: str, shape: tuple[int, ...], blocks: Iterator[np.ndarray],
               data_type: int | None = None) -> TensorProto:
        """A tensor of `shape` from consecutive blocks of its row-major bytes. `data_type` is the
        ONNX element type, by default the blocks' dtype; INT4/UINT4 blocks are packed bytes."""
        first = next(blocks, None)
        rest = [] if first is None else [first]
        if data_type is None:
            data_type = helper.np_dtype_to_tensor_dtype(first.dtype)
        nbytes = tensor_bytes(data_type, tuple(shape))
        chain = (b for part in (rest, blocks) for b in part)
        if self.file is None or nbytes <= INLINE_MAX_BYTES:
            raw = b"".join(np.ascontiguousarray(b).tobytes() for b in chain)
            return helper.make_tensor(name, data_type, list(shape), raw, raw=True)
        self.file.write(b"\0" * (-self.file.tell() % ALIGN))
        offset = self.file.tell()
        for block in chain:
            self.file.write(memoryview(np.ascontiguousarray(block)).cast("B"))  # tobytes() would copy it
        if self.file.tell() - offset != nbytes:
            raise AssertionError(f"{name}: wrote {self.file.tell() - offset} bytes of {nbytes}")
        t = TensorProto(name=name, data_type=data_type, dims=shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(nbytes))):
            t.external_data.add(key=k, value=v)
        return t

    def flush(self) -> None:
        if self.file:
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _external(t: TensorProto) -> dict[str, str] | None:
    if t.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in t.external_data}


def graph_files(folder: Path, onnx_file: str) -> list[str]:
    """The ONNX file and every side file its tensors live in (its own `<file>.data`, or another
    graph's, when they share a matrix), in the order the tensors name them."""
    model = onnx.load(str(folder / onnx_file), load_external_data=False)
    names = [onnx_file]
    for t in model.graph.initializer:
        info = _external(t)
        if info is not None and info["location"] not in names:
            names.append(info["location"])
    return names


def with_data_files(folder: Path, specs: dict[str, ComponentSpec]) -> dict[str, ComponentSpec]:
    """`specs` with each graph's side files recorded (`ComponentSpec.data_files`), read from the graphs in
    `folder`, so what a graph's weights are can be checked without parsing ONNX (engine manifests)."""
    return {k: dataclasses.replace(v, data_files=tuple(graph_files(folder, v.file)[1:])) for k, v in specs.items()}


def external_bytes(path: Path) -> int:
    """Bytes of a graph's tensors kept outside it, wherever they are; the file's size without any."""
    model = onnx.load(str(path), load_external_data=False)
    lengths = [int(info["length"]) for t in model.graph.initializer if (info := _external(t)) is not None]
    return sum(lengths) if lengths else path.stat().st_size


def external_blocks(folder: Path, info: dict[str, str]) -> Iterator[bytes]:
    """An external tensor's bytes (`info`: its location, offset and length), a block at a time."""
    left = int(info["length"])
    with open(folder / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        while left:
            block = f.read(min(left, BLOCK_BYTES))
            if not block:
                raise ValueError(f"{info['location']} ends inside a tensor: the bundle is truncated. "
                                 "Export it again.")
            yield block
            left -= len(block)


def _digest(folder: Path, info: dict[str, str]) -> str:
    h = hashlib.sha256()
    for block in external_blocks(folder, info):
        h.update(block)
    return h.hexdigest()


def share_tensors(folder: Path, owner: str, other: str) -> int:
    """Point `other`'s external tensors at identical ones (same type, shape and bytes) in `owner`'s
    side file, and rewrite `other`'s side file without them (removed when nothing is left in it).
    Both graphs are in `folder`. Returns the bytes no longer stored twice."""
    def load(name: str) -> onnx.ModelProto:
        return onnx.load(str(folder / name), load_external_data=False)

    theirs: dict[tuple[int, tuple[int, ...], str], dict[str, str]] = {}
    for t in load(owner).graph.initializer:
        info = _external(t)
        if info is not None:
            theirs[(t.data_type, tuple(t.dims), _digest(folder, info))] = info
    model = load(other)
    own_side = f"{other}.data"
    shared, kept = 0, []
    for t in model.graph.initializer:
        info = _external(t)
        if info is None or info["location"] != own_side:
            continue
        match = theirs.get((t.data_type, tuple(t.dims), _digest(folder, info)))
        if match is None:
            kept.append(t)
            continue
        shared += int(info["length"])
        del t.external_data[:]
        for k in ("location", "offset", "length"):
            t.external_data.add(key=k, value=match[k])
    if not shared:
        return 0
    tmp_side, tmp_graph = folder / f".{own_side}.tmp", folder / f".{other}.tmp"
    try:
        if kept:  # what is not shared moves to a new side file, a block at a time
            with open(tmp_side, "wb") as out:
                for t in kept:
                    info = _external(t)
                    out.write(b"\0" * (-out.tell() % ALIGN))
                    offset = out.tell()
                    for block in external_blocks(folder, info):
                        out.write(block)
                    del t.external_data[:]
                    for k, v in (("location", own_side), ("offset", str(offset)), ("length", info["length"])):
                        t.external_data.add(key=k, value=v)
        onnx.save(model, str(tmp_graph))
        if kept:
            os.replace(tmp_side, folder / own_side)
        else:
            (folder / own_side).unlink()
        os.replace(tmp_graph, folder / other)
    finally:
        tmp_side.unlink(missing_ok=True)
        tmp_graph.unlink(missing_ok=True)
    return shared
