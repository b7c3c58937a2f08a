"""One small interface over inference backends: inputs and outputs by name, outputs optionally
written straight into caller-owned buffers.

Generation code never asks which backend it has. `run(inputs, into=...)` binds every array in
`into` as the destination of that output, so a decode step can write its new cache position
directly into the preallocated cache and read the past as a zero-copy view of it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from qinyu_edge.errors import QinyuError

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class BackendError(QinyuError):
    pass


@dataclass
class CopyStats:
    """Bytes the host moved into and out of sessions (copies, not zero-copy bindings)."""

    bytes_in: int = 0
    bytes_out: int = 0
    calls: int = 0
    busy_ms: float = 0.0  # wall time inside the backend

    def reset(self) -> None:
        self.bytes_in = self.bytes_out = self.calls = 0
        self.busy_ms = 0.0


class Session(Protocol):
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    stats: CopyStats

    def run(self, inputs: Mapping[str, np.ndarray], into: Mapping[str, np.ndarray] | None = None
            ) -> dict[str, np.ndarray]: ...


class OrtSession:
    """ONNX Runtime with IO binding: inputs and `into` outputs are bound by pointer, not copied."""

    def __init__(self, path: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                 disabled_optimizers: tuple[str, ...] = ()):
        import onnxruntime as ort

        self.name = Path(path).stem
        if provider not in PROVIDERS:
            raise BackendError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        wanted = PROVIDERS[provider]
        available = ort.get_available_providers()
        if wanted not in available:
            raise BackendError(
                f"ONNX Runtime here has no {wanted} (it has {', '.join(available)}). "
                + ("Install onnxruntime-gpu (or JetPack's onnxruntime build) for GPU providers."
                   if provider != "cpu" else "")
            )
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])
        self._sess = ort.InferenceSession(str(path), opts, providers=providers,
                                          disabled_optimizers=list(disabled_optimizers))
        self.input_names = tuple(i.name for i in self._sess.get_inputs())
        self.output_names = tuple(o.name for o in self._sess.get_outputs())
        self._device = "cuda" if provider in ("cuda", "tensorrt") else "cpu"
        self.stats = CopyStats()

    def run(self, inputs: Mapping[str, np.ndarray], into: Mapping[str, np.ndarray] | None = None
            ) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise BackendError(f"{self.name}: inputs {missing} not given (it takes {list(self.input_names)})")
        into = into or {}
        self.stats.calls += 1
        if self._device == "cpu":
            return self._run_bound(inputs, into)
        feeds = {n: np.ascontiguousarray(inputs[n]) for n in self.input_names}
        self.stats.bytes_in += sum(a.nbytes for a in feeds.values())
        t0 = time.perf_counter()
        outs = dict(zip(self.output_names, self._sess.run(list(self.output_names), feeds)))
        self.stats.busy_ms += (time.perf_counter() - t0) * 1e3
        for n, dst in into.items():
            dst[...] = outs[n]
        self.stats.bytes_out += sum(a.nbytes for a in outs.values())
        return outs

    def _run_bound(self, inputs: Mapping[str, np.ndarray], into: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        io = self._sess.io_binding()
        for n in self.input_names:
            a = inputs[n]
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
                self.stats.bytes_in += a.nbytes
            io.bind_input(n, "cpu", 0, a.dtype.type, a.shape, a.ctypes.data)
        for n in self.output_names:
            dst = into.get(n)
            if dst is None:
                io.bind_output(n, "cpu")
            else:
                if not dst.flags.c_contiguous:
                    raise BackendError(f"{self.name}: the buffer for output {n} must be C-contiguous")
                io.bind_output(n, "cpu", 0, dst.dtype.type, dst.shape, dst.ctypes.data)
        t0 = time.perf_counter()
        self._sess.run_with_iobinding(io)
        self.stats.busy_ms += (time.perf_counter() - t0) * 1e3
        outs = io.get_outputs()
        result = {}
        for n, val in zip(self.output_names, outs):
            if n in into:
                result[n] = into[n]
            else:
                arr = val.numpy()
                self.stats.bytes_out += arr.nbytes
                result[n] = arr
        return result


def open_session(path: str | os.PathLike, backend: str = "ort", provider: str = "cpu",
                 threads: int | None = None, disabled_optimizers: tuple[str, ...] = ()) -> Session:
    if backend == "ort":
        return OrtSession(path, provider, threads, disabled_optimizers)
    raise BackendError(f"unknown backend {backend!r}: this build runs 'ort' (TensorRT engines come with `qinyu-edge build`).")
