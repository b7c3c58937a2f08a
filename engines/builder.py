"""Hand a BuildPlan to TensorRT: parse the ONNX, build the serialized network while TensorRT's
progress monitor drives a rich progress display, and write the plan atomically; the engine set's
manifest gets the entry only after the plan is complete on disk.

Follows the TensorRT Python API as tensorrt-facts.md documents it for 10.3 through 11.4. Enum flags
are looked up by NAME (`getattr(trt.BuilderFlag, name)`, network flags as `1 << int(...)`) because
their integer values differ between versions. Precision builder flags are never set: networks are
strongly typed (a flag on 10.x, always on 11.x, where the precision flags no longer exist), so the
precision is whatever the ONNX holds.

tensorrt is imported lazily; everything but `build_engine` runs without it.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from qinyu_edge.bundle import load_bundle, weight_files, weights_sha256
from qinyu_edge.bundle_paths import inside
from qinyu_edge.engine_manifest import (
    EngineError, EngineManifest, EngineSet, check_engine, format_version, open_plan, parse_trt_version,
    read_plan_header, same_trt_build,
)
from qinyu_edge.fileio import atomic_path, atomic_write_bytes, sha256_file
from qinyu_edge.runtime.trt_session import CudaDevice, cuda_device, import_tensorrt

from .plan import BuildPlan, trt_has

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20


class BuildError(EngineError):
    """TensorRT could not parse or build a component; the message carries TensorRT's reasons."""


# --- files ----------------------------------------------------------------------------------

def write_plan(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> tuple[str, int]:
    """Stream a plan to `path` atomically; returns (sha256, bytes). If anything fails or is
    interrupted while writing, the temporary file is removed and `path` keeps what it had."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    n = 0
    with atomic_path(path, suffix=".partial") as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            h.update(chunk)
            n += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest(), n


def buffer_chunks(buffer: Any, size: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """Slices of a buffer (IHostMemory, bytes) without copying it: a multi-GB plan is not
    duplicated in memory on an 8 GB board."""
    with memoryview(buffer) as raw, raw.cast("B") as view:
        for i in range(0, view.nbytes, size):
            yield view[i : i + size]


# --- TensorRT ---------------------------------------------------------------------------------

def flag_mask(enum: Any, names: Iterable[str]) -> int:
    """Bit mask of enum members given by name: `1 << int(member)` for each."""
    mask = 0
    for name in names:
        mask |= 1 << int(getattr(enum, name))
    return mask


def _progress_monitor(trt: ModuleType, progress: Progress, cancel: threading.Event) -> Any:
    class RichProgressMonitor(trt.IProgressMonitor):  # type: ignore[name-defined,misc]
        """TensorRT calls this from its build threads: keep it locked and quick. Exceptions in it are
        printed by TensorRT, not raised, so Ctrl-C becomes a cancelled build (step_complete False)."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._tasks: dict[str, tuple[Any, int]] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                with self._lock:
                    depth = self._tasks[parent_phase][1] + 1 if parent_phase in self._tasks else 0
                    task = progress.add_task("  " * depth + phase_name, total=max(int(num_steps), 1))
                    self._tasks[phase_name] = (task, depth)
            except KeyboardInterrupt:
                cancel.set()

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                with self._lock:
                    if phase_name in self._tasks:
                        progress.update(self._tasks[phase_name][0], completed=int(step) + 1)
            except KeyboardInterrupt:
                cancel.set()
            return not cancel.is_set()

        def phase_finish(self, phase_name: str) -> None:
            try:
                with self._lock:
                    task = self._tasks.pop(phase_name, None)
                    if task is not None:
                        progress.remove_task(task[0])
            except KeyboardInterrupt:
                cancel.set()

    return RichProgressMonitor()


def _parse_errors(parser: Any) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        where = error.node_name() or f"node {error.node()}"
        out.append(f"{where} ({error.node_operator()}): {error.desc()} [{error.code()}]")
    return out


def _serialize(trt: ModuleType, onnx_path: Path, plan: BuildPlan, timing_cache_path: Path | None,
               progress: Progress) -> Any:
    """The IHostMemory of the built plan; raises BuildError with TensorRT's reasons."""
    settings = plan.settings
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(flag_mask(trt.NetworkDefinitionCreationFlag, settings.network_flags))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise BuildError(f"TensorRT {trt.__version__} could not parse {onnx_path.name}:\n  "
                         + "\n  ".join(_parse_errors(parser) or ["(no parser errors reported; see the log above)"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    for name in settings.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    level = settings.hardware_compatibility_level
    if level != "NONE":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    for spec in plan.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise BuildError(f"TensorRT rejected the {spec.name} optimization profile of {plan.component}: "
                             f"{spec.to_dict()['shapes']}")
    blob = timing_cache_path.read_bytes() if timing_cache_path is not None and timing_cache_path.is_file() else b""
    try:
        timing_cache = config.create_timing_cache(blob) if blob else None
    except RuntimeError as e:  # a damaged file must not block every later build
        log.warning("the timing cache %s is unreadable (%s); starting a fresh one", timing_cache_path, e)
        timing_cache = None
    if timing_cache is None or not config.set_timing_cache(timing_cache, False):
        if timing_cache is not None:
            log.warning("the timing cache %s is from another TensorRT or GPU; starting a fresh one", timing_cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    cancel = threading.Event()
    config.progress_monitor = _progress_monitor(trt, progress, cancel)
    serialized = builder.build_serialized_network(network, config)
    if cancel.is_set():
        raise KeyboardInterrupt(f"the {plan.component} build was cancelled")
    if serialized is None:
        raise BuildError(f"TensorRT {trt.__version__} could not build {plan.component} from {onnx_path.name} "
                         "(the reason is in the TensorRT log above)")
    if timing_cache_path is not None:
        timing_cache = config.get_timing_cache()
        atomic_write_bytes(timing_cache_path, bytes(timing_cache.serialize()))
    return serialized


def _check_machine(trt: ModuleType, plan: BuildPlan, gpu: CudaDevice) -> str:
    installed = str(trt.__version__)
    version = parse_trt_version(installed)
    if not same_trt_build(version, plan.trt):
        raise BuildError(f"the plan for {plan.component} was made for TensorRT {plan.trt_version} but {installed} is "
                         "installed here; make the plan again (`qinyu-edge build` does)")
    level = plan.settings.hardware_compatibility_level
    if level != "NONE" and not trt_has(f"HardwareCompatibilityLevel.{level}", version):
        raise BuildError(f"TensorRT {installed} has no {level} hardware compatibility level")
    want = tuple(int(x) for x in plan.compute_capability.split("."))
    if level == "AMPERE_PLUS":
        if gpu.compute_capability < (8, 0):
            raise BuildError(f"an AMPERE_PLUS plan needs an Ampere or newer GPU to build on; {gpu.name} is SM "
                             f"{format_version(gpu.compute_capability)}")
    elif gpu.compute_capability != want:
        raise BuildError(f"the plan targets {plan.target_name} (SM {plan.compute_capability}) but this machine's GPU is "
                         f"{gpu.name} (SM {format_version(gpu.compute_capability)}). TensorRT plans are built on the "
                         "GPU they run on: build on the target, or plan for this GPU (omit --target).")
    return installed


def build_engine(plan: BuildPlan, engine_dir: str | os.PathLike, rebuild: str,
                 progress: Progress | None = None, device: int = 0) -> EngineManifest:
    """Build one component's plan into `engine_dir`; returns its manifest entry (not yet written to
    manifest.json: `build_all` does that). Falls back to `plan.fallback` when TensorRT rejects the
    primary ONNX."""
    trt = import_tensorrt()
    gpu = cuda_device(device)
    installed = _check_machine(trt, plan, gpu)
    engine_dir = Path(engine_dir)
    cache = engine_dir / plan.settings.timing_cache if plan.settings.timing_cache else None
    own_progress = progress is None
    progress = progress or Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                    TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    attempts = [(Path(plan.bundle), plan.onnx_file, plan.onnx_sha256, plan.onnx_data_sha256, plan.precision, None)]
    if plan.fallback is not None:
        fb = plan.fallback
        attempts.append((Path(fb.bundle), fb.onnx_file, fb.onnx_sha256, fb.onnx_data_sha256, fb.precision, fb.reason))
    notes = list(plan.notes)
    try:
        if own_progress:
            progress.start()
        for i, (bundle, onnx_file, onnx_sha, data_sha, precision, _) in enumerate(attempts):
            onnx_path = bundle / onnx_file
            graph_changed = onnx_sha is not None and (not onnx_path.is_file() or sha256_file(onnx_path) != onnx_sha)
            if graph_changed or (data_sha is not None and current_weights_sha256(bundle, onnx_file) != data_sha):
                raise BuildError(f"{onnx_path} or its weights are missing or changed since the plan was made; make "
                                 f"the plan again (`{rebuild}`)")
            try:
                serialized = _serialize(trt, onnx_path, plan, cache, progress)
                break
            except BuildError as e:
                if i + 1 == len(attempts):
                    raise
                log.warning("%s; building the %s fallback instead (%s)", e, attempts[i + 1][4], attempts[i + 1][5])
                notes.append(f"the {precision} build failed, built the {attempts[i + 1][4]} fallback: {e}")
        with memoryview(serialized) as raw, raw.cast("B") as view:
            header = read_plan_header(view)
        if header.trt_version is None or not same_trt_build(header.trt_version, parse_trt_version(installed)):
            # The session checks this header before deserializing; a plan it would refuse is not written.
            raise BuildError(f"{plan.component}: the new plan's header gives "
                             f"{format_version(header.trt_version) if header.trt_version else header.problem}, but the "
                             f"builder is TensorRT {installed}. The header layout read here comes from NVIDIA's trtexec "
                             "sample and does not match this TensorRT: please report it.")
        sha, size = write_plan(inside(engine_dir, plan.plan_file, "a plan file"), buffer_chunks(serialized))
        del serialized
        return EngineManifest(
            component=plan.component, onnx_file=onnx_file, onnx_sha256=onnx_sha, plan_file=plan.plan_file,
            plan_sha256=sha, plan_bytes=size, trt_version=installed, gpu_name=gpu.name,
            compute_capability=format_version(gpu.compute_capability), precision=precision,
            profiles=plan.profiles, builder=plan.settings, target=plan.target, bundle=str(bundle),
            rebuild=rebuild, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            build_plan=plan.to_dict(), notes=tuple(notes), onnx_data_sha256=data_sha,
        )
    finally:
        if own_progress:
            progress.stop()


def current_weights_sha256(bundle: Path, onnx_file: str) -> str | None:
    """The digest of the graph's side files as they are on disk (the plan recorded the manifest's)."""
    files = weight_files(load_bundle(bundle, verify=False), onnx_file)
    try:
        return weights_sha256([(f, sha256_file(inside(bundle, f, "a weights file"))) for f in files])
    except OSError:
        return None


# --- staleness and whole sets ---------------------------------------------------------------

def stale_reason(plan: BuildPlan, entry: EngineManifest | None, engine_dir: str | os.PathLike,
                 trt_version: str | None, gpu: CudaDevice | None) -> str | None:
    """Why the component must be (re)built, or None when its plan is current for this machine."""
    if entry is None:
        return "not built yet"
    now = plan.to_dict()
    changed = [k for k in now if entry.build_plan.get(k) != now[k]]
    if "onnx_sha256" in changed or "onnx_data_sha256" in changed:
        return f"{plan.onnx_file} changed since the plan was built"
    if "trt_version" in changed:
        return f"TensorRT changed from {entry.build_plan.get('trt_version')} to {plan.trt_version}"
    if changed:
        return f"the build plan changed ({', '.join(changed)})"
    name, cc = (gpu.name, gpu.compute_capability) if gpu is not None else (None, None)
    with open_plan(inside(engine_dir, entry.plan_file, "a plan file")) as data:
        problem = check_engine(entry, trt_version, name, cc, None, data)
    return None if problem is None else problem.reason


@dataclass(frozen=True)
class BuildResult:
    component: str
    action: str  # built, rebuilt, up to date
    reason: str
    seconds: float
    entry: EngineManifest | None


def build_all(plans: list[BuildPlan], engine_dir: str | os.PathLike, bundle: str, rebuild: str, force: bool = False,
              console: Console | None = None, device: int = 0) -> list[BuildResult]:
    """Build every stale component of `bundle` one at a time (8 GB boards cannot hold two builds),
    writing manifest.json after each so an interrupted run keeps what it finished."""
    trt = import_tensorrt()
    gpu = cuda_device(device)
    engine_dir = Path(engine_dir)
    target = plans[0].target if plans else ""
    try:
        eset = EngineSet.load(engine_dir)
        eset.target, eset.bundle = target, bundle
    except EngineError as e:
        if (engine_dir / "manifest.json").exists():
            log.warning("%s; rebuilding every component", e)
        eset = EngineSet(engine_dir, target, bundle)
    results = []
    console = console or Console(stderr=True)
    for plan in plans:
        reason = stale_reason(plan, eset.engines.get(plan.component), engine_dir, str(trt.__version__), gpu)
        if reason is None and not force:
            results.append(BuildResult(plan.component, "up to date", "", 0.0, eset.engines[plan.component]))
            continue
        existed = plan.component in eset.engines
        console.print(f"building [bold]{plan.component}[/bold] ({plan.precision}): {reason or 'forced'}")
        t0 = time.perf_counter()
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            entry = build_engine(plan, engine_dir, rebuild, progress, device)
        eset.engines[plan.component] = entry
        eset.write()
        results.append(BuildResult(plan.component, "rebuilt" if existed else "built", reason or "forced",
                                   time.perf_counter() - t0, entry))
    return results


__all__ = [
    "BuildError", "write_plan", "buffer_chunks", "flag_mask", "build_engine", "stale_reason", "BuildResult",
    "build_all",
]
