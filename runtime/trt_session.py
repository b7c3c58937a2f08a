"""Native TensorRT sessions behind the same interface as `OrtSession`: inputs and outputs by name,
outputs optionally written into caller-owned arrays.

Before a plan is deserialized its manifest entry is checked (plan sha256, the TensorRT version in
the plan header and the one installed here, GPU and compute capability, ONNX sha256 when given):
a mismatch is refused with the reason and the command that rebuilds the plan.

Device memory comes from cuda-python (`cuda.bindings.runtime`). Every I/O tensor gets one device
buffer sized for the largest shape its profiles allow, so tensor addresses are set once. Host
arrays are copied in and out per call, except a cache: an output written `into` the same host
buffer right behind an input (the time-major KV cache: the slot after the past) is also copied
device-to-device behind that input, so later calls upload nothing of the past. Contract: the host
changes such a buffer only through this session's outputs (the KV cache only advances, rewinds or
resets, so it holds).

Engines that never run at the same time (the encoder, CAM++, the projectors, the XY decoder) can
share one block of execution-context memory (`SharedScratch`): their contexts are created without
memory of their own (USER_MANAGED) and all point at one buffer sized for the largest of them, so
a board pays for one engine's activations instead of the sum. A lock keeps two of them from ever
running at once, whatever the caller's threads do.

tensorrt and cuda-python are imported lazily: this module imports on any machine.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

import numpy as np

from qinyu_edge.engine_manifest import (
    EngineError,
    EngineSet,
    OptimizationProfile,
    check_machine,
    check_plan_file,
    open_plan,
)

from .session import BackendError, CopyStats, check_inputs

log = logging.getLogger(__name__)

JETSON_RELEASE_FILE = Path("/etc/nv_tegra_release")


class TensorRTMissing(EngineError):
    """tensorrt (or cuda-python) is not importable here; the message says how to install it."""


def tensorrt_install_hint(jetson: bool | None = None) -> str:
    if jetson is None:
        jetson = JETSON_RELEASE_FILE.is_file()
    if jetson:
        return ("On Jetson, TensorRT comes with JetPack: `sudo apt install nvidia-jetpack` (or just "
                "`python3-libnvinfer`) and run qinyu-edge with the system Python 3 (a virtualenv needs "
                "--system-site-packages). cuda-python: `pip install 'cuda-python==12.6.*'` on JetPack 6, "
                "`'cuda-python==13.*'` on JetPack 7.")
    return ("On x86, `pip install tensorrt-cu12 cuda-python` for a CUDA 12 driver, or `pip install "
            "tensorrt-cu13 'cuda-python>=13'` for CUDA 13 (NVIDIA's wheels download their libraries "
            "from pypi.nvidia.com).")


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTMissing(f"TensorRT's Python package is not installed here ({e}). {tensorrt_install_hint()}") from e
    return tensorrt


def installed_trt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def import_cudart() -> ModuleType:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:  # cuda-python before 12.6 (gone in 13.x)
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError as e:
            raise TensorRTMissing(f"cuda-python is not installed here ({e}); the TensorRT session needs it for "
                                  f"device memory. {tensorrt_install_hint()}") from e
    return cudart


def cuda_check(cudart: ModuleType, result: Any, what: str) -> Any:
    """cuda-python returns (error, value...); raise on an error, return the value(s)."""
    err, rest = result[0], result[1:]
    if int(err) != 0:
        name = cudart.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        hint = " (no usable NVIDIA driver on this machine)" if name == "cudaErrorInsufficientDriver" else ""
        raise BackendError(f"CUDA {what} failed: {name}{hint}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int
    integrated: bool  # shares memory with the CPU (Jetson)


def cuda_device(index: int = 0) -> CudaDevice:
    cudart = import_cudart()
    prop = cuda_check(cudart, cudart.cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
    name = prop.name
    name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
    return CudaDevice(index, name, (int(prop.major), int(prop.minor)), int(prop.totalGlobalMem), bool(prop.integrated))


@dataclass
class HostMirror:
    """How many leading bytes of an input's device buffer equal the host range it was last fed
    from, and may be trusted to stay equal. Pure bookkeeping: the session does the copies.

    Bytes are trusted once an output of the same call is written into the same host buffer right
    behind (or over) the input: that is a cache (the KV cache's past and its next slot), whose
    contents the host changes only through this session's outputs. Inputs nothing continues (a
    history array rewritten in place each step) are uploaded in full every call."""

    host_base: int | None = None
    trusted: int = 0  # bytes from host_base
    extent: int = 0  # bytes of this call's input, all on the device once uploaded

    def upload(self, ptr: int, nbytes: int) -> tuple[int, int]:
        """(offset, count): the bytes of input host range [ptr, ptr+nbytes) to copy to the device."""
        if ptr != self.host_base:
            self.host_base, self.trusted = ptr, 0
        self.extent = nbytes
        start = min(self.trusted, nbytes)
        return start, nbytes - start

    def absorb(self, ptr: int, nbytes: int, capacity: int) -> int | None:
        """An output of this call, in the same host buffer as the input, was copied to host
        [ptr, ptr+nbytes). Returns the offset in the input's device buffer to copy it to as well
        (None when it would leave a gap or overrun the buffer; then what it overwrote is no
        longer trusted)."""
        if self.host_base is None or nbytes == 0:
            return None
        k = ptr - self.host_base
        reach = max(self.trusted, self.extent)
        if 0 <= k <= reach and k + nbytes <= capacity:
            self.trusted = max(reach, k + nbytes)
            return k
        if k < reach and k + nbytes > 0:
            self.trusted = max(0, min(self.trusted, k))
            self.extent = max(0, min(self.extent, k))
        return None

    def reset(self) -> None:
        self.host_base, self.trusted, self.extent = None, 0, 0


def _root(a: np.ndarray) -> np.ndarray:
    """The array that owns a view's memory."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


class DeviceBuffer:
    # cudaMalloc aligns to at least 256 bytes, what TensorRT wants of tensor addresses.
    MIN_BYTES = 256

    def __init__(self, cudart: ModuleType, nbytes: int):
        self._cudart = cudart
        self.nbytes = max(int(nbytes), self.MIN_BYTES)
        self.ptr = int(cuda_check(cudart, cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            cuda_check(self._cudart, self._cudart.cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class SharedScratch:
    """One device buffer that several execution contexts use as their memory, one at a time.

    Each context attaches with the bytes it needs (its engine's `device_memory_size_v2`: the
    largest over its profiles). The buffer grows to the largest need; when it grows, every context
    already attached is pointed at the new buffer before the old one is freed. `lock` is held for
    the whole of a run, so contexts sharing the buffer never run concurrently."""

    def __init__(self, allocate: Callable[[int], DeviceBuffer]):
        self._allocate = allocate
        self._buffer: DeviceBuffer | None = None
        self._needs: dict[int, tuple[Any, int]] = {}  # id(context) -> (context, bytes it needs)
        self.lock = threading.Lock()

    @classmethod
    def on_device(cls) -> SharedScratch:
        cudart = import_cudart()
        return cls(lambda nbytes: DeviceBuffer(cudart, nbytes))

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.nbytes

    @property
    def separate_bytes(self) -> int:
        """What the attached contexts would take with memory of their own."""
        return sum(need for _, need in self._needs.values())

    def attach(self, ctx: Any, need: int) -> None:
        with self.lock:
            self._needs[id(ctx)] = (ctx, int(need))
            if self._buffer is None or need > self._buffer.nbytes:
                old, self._buffer = self._buffer, self._allocate(int(need))
                log.debug("shared scratch: %d bytes for %d context(s)", self._buffer.nbytes, len(self._needs))
                for other, _ in self._needs.values():
                    self._point(other)
                if old is not None:
                    old.free()
            else:
                self._point(ctx)

    def _point(self, ctx: Any) -> None:
        assert self._buffer is not None
        ctx.set_device_memory(self._buffer.ptr, self._buffer.nbytes)

    def detach(self, ctx: Any) -> None:
        with self.lock:
            self._needs.pop(id(ctx), None)
            if not self._needs and self._buffer is not None:
                self._buffer.free()
                self._buffer = None


def _volume(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class TrtSession:
    """One TensorRT plan of an engine set, run with host numpy arrays in and out."""

    def __init__(self, plan_path: str | os.PathLike, onnx_sha256: str | None = None, device: int = 0,
                 scratch: SharedScratch | None = None, weights_sha256: str | None = None):
        plan_path = Path(plan_path)
        self.name = plan_path.stem
        if plan_path.suffix == ".onnx":
            raise EngineError(f"{plan_path} is an ONNX file; the trt backend runs TensorRT plans. Build them with "
                              f"`qinyu-edge build --bundle {plan_path.parent}` and open the .plan of the engine set.")
        eset = EngineSet.load(plan_path.parent)
        entry = eset.entry_for_plan(plan_path.name)
        with open_plan(plan_path) as data:
            # The file checks need neither TensorRT nor a GPU: a tampered plan is named as such anywhere.
            problem = check_plan_file(entry, data, onnx_sha256, weights_sha256)
            if problem is not None:
                raise EngineError(str(problem))
            trt = import_tensorrt()
            cudart = import_cudart()
            self._trt, self._cudart = trt, cudart
            cuda_check(cudart, cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
            gpu = cuda_device(device)
            problem = check_machine(entry, str(trt.__version__), gpu.name, gpu.compute_capability)
            if problem is not None:
                raise EngineError(str(problem))
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            if entry.builder.version_compatible:
                # A version-compatible plan carries its lean runtime as host code (UNVERIFIED that it is needed).
                self._runtime.engine_host_code_allowed = True
            engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineError(f"{plan_path}: TensorRT refused the plan although its manifest matches this machine "
                              f"(the reason is in the TensorRT log above). Rebuild it: {entry.rebuild}")
        self._engine = engine
        self._scratch = scratch
        if scratch is None:
            self._ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.STATIC)
        else:
            self._ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self._ctx is None:
            raise BackendError(f"{self.name}: TensorRT could not create an execution context (out of device memory?)")
        if scratch is not None:
            scratch.attach(self._ctx, engine.device_memory_size_v2)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self._dtypes = {n: self._np_dtype(n, engine.get_tensor_dtype(n)) for n in names}
        static = {n: tuple(engine.get_tensor_shape(n)) for n in self.input_names}
        self._static = {n: s for n, s in static.items() if all(d >= 0 for d in s)}
        self._dynamic = tuple(n for n in self.input_names if n not in self._static)
        self._profiles = [
            OptimizationProfile(str(p), {n: tuple(tuple(d) for d in engine.get_tensor_profile_shape(n, p))
                                         for n in self._dynamic})
            for p in range(engine.num_optimization_profiles)
        ] if self._dynamic else []
        self._stream = cuda_check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._active: int | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._shapes_changed = True
        self._buffers: dict[str, DeviceBuffer] = {}
        self._mirrors = {n: HostMirror() for n in self.input_names}
        self.stats = CopyStats()
        self._allocate()
        log.info("%s: TensorRT %s plan on %s, inputs %s, outputs %s, %d profile(s)", self.name, entry.trt_version,
                 gpu.name, list(self.input_names), list(self.output_names), max(1, len(self._profiles)))

    # --- setup ---------------------------------------------------------------------------

    def _np_dtype(self, name: str, dt: Any) -> np.dtype:
        try:
            return np.dtype(self._trt.nptype(dt))
        except TypeError:
            raise BackendError(f"{self.name}: tensor {name} is {dt}, which has no numpy type (BF16, FP8 and INT4 "
                               "I/O are not supported by this session; keep I/O fp32/fp16/int64 in the ONNX)") from None

    def _set_profile(self, index: int) -> None:
        if not self._ctx.set_optimization_profile_async(index, int(self._stream)):
            raise BackendError(f"{self.name}: TensorRT refused optimization profile {index}")
        self._active = index
        self._shapes.clear()  # switching clears the input shapes
        self._shapes_changed = True
        for n, buf in self._buffers.items():  # and the addresses are set again for it
            self._bind(n, buf)

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if self._shapes.get(name) != shape:
            if not self._ctx.set_input_shape(name, shape):
                raise BackendError(f"{self.name}: TensorRT refused shape {list(shape)} for input {name}")
            self._shapes[name] = shape
            self._shapes_changed = True

    def _output_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes_changed:
            unset = self._ctx.infer_shapes()
            if unset:
                raise BackendError(f"{self.name}: TensorRT still needs the shapes of {list(unset)}")
            self._shapes_changed = False
        return {n: tuple(self._ctx.get_tensor_shape(n)) for n in self.output_names}

    def _bind(self, name: str, buf: DeviceBuffer) -> None:
        if not self._ctx.set_tensor_address(name, buf.ptr):
            raise BackendError(f"{self.name}: TensorRT refused the device address of {name}")

    def _ensure(self, name: str, nbytes: int) -> DeviceBuffer:
        buf = self._buffers.get(name)
        if buf is not None and buf.nbytes >= nbytes:
            return buf
        if buf is not None:
            log.debug("%s: growing %s from %d to %d bytes", self.name, name, buf.nbytes, nbytes)
            buf.free()
        buf = self._buffers[name] = DeviceBuffer(self._cudart, nbytes)
        if name in self._mirrors:
            self._mirrors[name].reset()
        self._bind(name, buf)
        return buf

    def _allocate(self) -> None:
        """Buffers for the largest shapes every profile allows, so addresses are set once."""
        sizes = {n: _volume(s) * self._dtypes[n].itemsize for n, s in self._static.items()}
        for n in self._dynamic:
            sizes[n] = max(_volume(p.shapes[n][2]) * self._dtypes[n].itemsize for p in self._profiles)
        for index in range(max(1, len(self._profiles))):
            if self._profiles:
                self._set_profile(index)
                for n in self._dynamic:
                    self._set_shape(n, self._profiles[index].shapes[n][2])
            for n, shape in self._output_shapes().items():
                if all(d >= 0 for d in shape):
                    sizes[n] = max(sizes.get(n, 0), _volume(shape) * self._dtypes[n].itemsize)
        for n, size in sizes.items():
            self._ensure(n, size)

    def _pick_profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        if self._active is not None and self._profiles[self._active].contains(shapes):
            return self._active
        for i, p in enumerate(self._profiles):
            if p.contains(shapes):
                return i
        ranges = "; ".join(f"profile {i}: " + ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in p.shapes.items())
                           for i, p in enumerate(self._profiles))
        given = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise BackendError(f"{self.name}: no optimization profile takes {given} ({ranges}); rebuild with wider "
                           "shape ranges or shorten the input")

    # --- running -------------------------------------------------------------------------

    def _copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        rt = self._cudart
        cuda_check(rt, rt.cudaMemcpyAsync(dst, src, nbytes, getattr(rt.cudaMemcpyKind, kind), self._stream),
                   f"cudaMemcpyAsync {kind}")

    def run(self, inputs: Mapping[str, np.ndarray], into: Mapping[str, np.ndarray] | None = None
            ) -> dict[str, np.ndarray]:
        check_inputs(self, inputs)
        into = into or {}
        self.stats.calls += 1
        t0 = time.perf_counter()
        arrays: dict[str, np.ndarray] = {}
        for n in self.input_names:
            a = inputs[n]
            if a.dtype != self._dtypes[n]:
                raise BackendError(f"{self.name}: input {n} is {a.dtype}, the engine takes {self._dtypes[n]}")
            static = self._static.get(n)
            if static is not None and tuple(a.shape) != static:
                raise BackendError(f"{self.name}: input {n} has shape {list(a.shape)}, the engine takes {list(static)}")
            arrays[n] = np.ascontiguousarray(a)
        if self._profiles:
            profile = self._pick_profile({n: tuple(arrays[n].shape) for n in self._dynamic})
            if profile != self._active:
                self._set_profile(profile)
            for n in self._dynamic:
                self._set_shape(n, tuple(arrays[n].shape))
        for n, a in arrays.items():
            buf = self._ensure(n, a.nbytes)
            start, count = self._mirrors[n].upload(a.ctypes.data, a.nbytes)
            if count:
                self._copy(buf.ptr + start, a.ctypes.data + start, count, "cudaMemcpyHostToDevice")
                self.stats.bytes_in += count
        shapes = self._output_shapes()
        for n, s in shapes.items():
            if any(d < 0 for d in s):
                raise BackendError(f"{self.name}: output {n} has a data-dependent shape {list(s)}; this session "
                                   "does not support those")
            self._ensure(n, _volume(s) * self._dtypes[n].itemsize)
        with self._scratch.lock if self._scratch is not None else nullcontext():
            results = self._execute(arrays, shapes, into)
        self.stats.busy_ms += (time.perf_counter() - t0) * 1e3
        return results

    def _execute(self, arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
                 into: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Enqueue, copy the outputs out, and wait: the span in which the context's memory is in use."""
        if not self._ctx.execute_async_v3(int(self._stream)):
            raise BackendError(f"{self.name}: TensorRT failed to enqueue the inference (see the TensorRT log)")
        results: dict[str, np.ndarray] = {}
        for n in self.output_names:
            dst = into.get(n)
            if dst is None:
                dst = np.empty(shapes[n], self._dtypes[n])
            elif tuple(dst.shape) != shapes[n] or dst.dtype != self._dtypes[n] or not dst.flags.c_contiguous:
                raise BackendError(f"{self.name}: the buffer for output {n} must be a C-contiguous {self._dtypes[n]} "
                                   f"array of shape {list(shapes[n])}, got {dst.dtype} {list(dst.shape)}")
            src = self._buffers[n]
            self._copy(dst.ctypes.data, src.ptr, dst.nbytes, "cudaMemcpyDeviceToHost")
            self.stats.bytes_out += dst.nbytes
            if n in into:
                owner = _root(dst)
                for name in (m for m, a in arrays.items() if _root(a) is owner):
                    target = self._buffers[name]
                    offset = self._mirrors[name].absorb(dst.ctypes.data, dst.nbytes, target.nbytes)
                    if offset is not None:
                        self._copy(target.ptr + offset, src.ptr, dst.nbytes, "cudaMemcpyDeviceToDevice")
            results[n] = dst
        cuda_check(self._cudart, self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return results

    def close(self) -> None:
        """Free device memory now instead of at garbage collection."""
        if getattr(self, "_scratch", None) is not None:
            self._scratch.detach(self._ctx)
            self._scratch = None
        buffers = getattr(self, "_buffers", {})  # absent when __init__ refused the plan
        for buf in buffers.values():
            buf.free()
        buffers.clear()
        if getattr(self, "_stream", None) is not None:
            cuda_check(self._cudart, self._cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception as e:  # interpreter shutdown may have unloaded CUDA already
            log.debug("%s: close at exit: %s", getattr(self, "name", "?"), e)


__all__ = [
    "TensorRTMissing", "tensorrt_install_hint", "import_tensorrt", "installed_trt_version", "import_cudart",
    "cuda_check", "CudaDevice", "cuda_device", "HostMirror", "DeviceBuffer", "SharedScratch", "TrtSession",
]
