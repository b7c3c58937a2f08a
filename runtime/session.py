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
from typing import Any, Mapping, Protocol

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


# Outputs up to this size are copied out of a buffer bound once instead of being bound in place.
COPY_OUTPUT_BYTES = 64 * 1024


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


def check_inputs(session: "Session", inputs: Mapping[str, np.ndarray]) -> None:
    missing = [n for n in session.input_names if n not in inputs]
    if missing:
        raise BackendError(f"{session.name}: inputs {missing} not given (it takes {list(session.input_names)})")


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
                 disabled_optimizers: tuple[str, ...] = (), spin_us: int = 0):
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
        # ONNX Runtime keeps a memory pattern for every input shape it has seen, and ours never stop
        # changing (prompt and chunk lengths, the cache window): a 300-turn conversation on the 4B's
        # portable graph grew RSS by 22 MiB of them (+5.3%); without them +1.8%, steps no slower.
        opts.enable_mem_pattern = False
        # By default idle intra-op workers block instead of spinning: a runtime has several sessions
        # (and audio threads) taking turns on few cores, and a spinning pool of one session steals
        # them from the next; on a shared 2-core machine a decode step ran 2-3x faster this way.
        # `spin_us` > 0 lets workers spin that long between parallel sections: a few percent faster
        # on an otherwise idle machine, slower as soon as anything else wants the cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_us > 0 else "0")
        if spin_us > 0:
            opts.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
        providers = [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])
        self._sess = ort.InferenceSession(str(path), opts, providers=providers,
                                          disabled_optimizers=list(disabled_optimizers))
        self.input_names = tuple(i.name for i in self._sess.get_inputs())
        self.output_names = tuple(o.name for o in self._sess.get_outputs())
        self._device = "cuda" if provider in ("cuda", "tensorrt") else "cpu"
        self._io = self._sess.io_binding()
        self._wrap = ort.OrtValue.ortvalue_from_numpy
        self._bound: dict[str, np.ndarray] = {}
        self._scratch: dict[str, np.ndarray] = {}
        self._last_into: dict[str, np.ndarray] = {}  # each output's `into` array of the last call
        self.stats = CopyStats()

    def run(self, inputs: Mapping[str, np.ndarray], into: Mapping[str, np.ndarray] | None = None
            ) -> dict[str, np.ndarray]:
        check_inputs(self, inputs)
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
        # One binding object for the session's life: rebinding a name replaces its old binding, and
        # numpy inputs bind by reference (bind_cpu_input), the cheapest call per tensor.
        # An array bound last call is skipped: the binding holds it, and a numpy array's memory and
        # shape never change under it (decode steps pass the same state buffers every time).
        io, bound = self._io, self._bound
        for n in self.input_names:
            a = inputs[n]
            if bound.get(n) is a:
                continue
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
                self.stats.bytes_in += a.nbytes
            io.bind_cpu_input(n, a)
            bound[n] = a
        copies: list[tuple[np.ndarray, np.ndarray]] = []
        inputs_by_id: set[int] | None = None  # built only when a small output needs the alias check
        for n in self.output_names:
            dst = into.get(n)
            if dst is None:
                io.bind_output(n, "cpu")
                bound.pop(n, None)
                continue
            if bound.get(n) is dst:  # bound in place last call, and still the same array
                continue
            target = dst
            # A small output given as a new array each call (a decode step's new cache rows, a new
            # view every step) lands in a buffer bound once and is copied out: a copy of a few KB is
            # a microsecond, binding a new OrtValue several. One given twice in a row (the step's
            # hidden state and ids) is the caller's lasting buffer and is bound in place, as is an
            # output that is one of the inputs (a cache the graph updates in place).
            lasting = self._last_into.get(n) is dst and dst.flags.c_contiguous
            self._last_into[n] = dst
            via_copy = dst.nbytes <= COPY_OUTPUT_BYTES and not lasting
            if via_copy and inputs_by_id is None:
                inputs_by_id = {id(a) for a in inputs.values()}
            if via_copy and id(dst) not in inputs_by_id:
                target = self._scratch.get(n)
                if target is None or target.shape != dst.shape or target.dtype != dst.dtype:
                    target = self._scratch[n] = np.empty(dst.shape, dst.dtype)
                copies.append((dst, target))
            elif not dst.flags.c_contiguous:
                raise BackendError(f"{self.name}: the buffer for output {n} must be C-contiguous")
            if bound.get(n) is not target:
                # An OrtValue over the array (no copy) binds in half the time of a pointer binding.
                io.bind_ortvalue_output(n, self._wrap(target))
                bound[n] = target
        t0 = time.perf_counter()
        self._sess.run_with_iobinding(io)
        self.stats.busy_ms += (time.perf_counter() - t0) * 1e3
        for dst, target in copies:
            dst[...] = target
            self.stats.bytes_out += target.nbytes
        if all(n in into for n in self.output_names):
            return {n: into[n] for n in self.output_names}
        result = {}
        for n, val in zip(self.output_names, io.get_outputs()):
            if n in into:
                result[n] = into[n]
            else:
                arr = val.numpy()
                self.stats.bytes_out += arr.nbytes
                result[n] = arr
        return result


def open_session(path: str | os.PathLike, backend: str = "ort", provider: str = "cpu",
                 threads: int | None = None, disabled_optimizers: tuple[str, ...] = (), spin_us: int = 0,
                 onnx_sha256: str | None = None, scratch: Any = None, weights_sha256: str | None = None) -> Session:
    if backend == "ort":
        return OrtSession(path, provider, threads, disabled_optimizers, spin_us)
    if backend == "trt":  # `path` is a .plan of an engine set; its manifest (and `onnx_sha256`) is checked first
        from .trt_session import TrtSession

        return TrtSession(path, onnx_sha256, scratch=scratch, weights_sha256=weights_sha256)  # scratch: a SharedScratch
    raise BackendError(f"unknown backend {backend!r}: choose 'ort' (ONNX files) or 'trt' (plans from `qinyu-edge build`).")
