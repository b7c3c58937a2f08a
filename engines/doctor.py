"""`qinyu-edge doctor`: what this machine has, what will not work here, and the fix for each.

Two steps, so the judgement is testable without the hardware: `probe()` reads the machine (GPU,
TensorRT, cuda-python, ONNX Runtime, PortAudio devices) into an `Environment` and never raises;
`diagnose()` turns an Environment plus the optional bundle and engine sets into `Check` lines.

Exit code (`DoctorReport.exit_code`): 0 when nothing the user asked for is broken, 1 otherwise.
What counts as asked for:
- always: ONNX Runtime, which every bundle runs on;
- `--bundle B`: the bundle loads and its files match their sha256;
- `--engines DIR`: every plan there matches this machine's TensorRT build and GPU, intact;
- `--require gpu|tensorrt|audio`: that item is present and usable.
Anything else missing (no GPU on a CPU box, no sound devices on a server) is a warning: it says
what will not work and how to fix it, but does not fail the command.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import mmap
import os
import platform
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qinyu_edge import __version__
from qinyu_edge.bundle_paths import inside
from qinyu_edge.device.detect import DetectedGPU

log = logging.getLogger(__name__)

Status = Literal["ok", "info", "warning", "error"]
REQUIREMENTS = ("gpu", "tensorrt", "audio")
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class Check:
    area: str  # system, gpu, tensorrt, cuda-python, onnxruntime, audio, bundle, engines
    item: str
    status: Status
    found: str
    fix: str = ""


@dataclass(frozen=True)
class AudioProbe:
    error: str | None  # why PortAudio could not be asked (package or library missing)
    missing: Literal["package", "library"] | None
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Environment:
    """What this machine has; `probe()` fills it in, tests build it directly."""

    python: str
    system: str
    machine: str
    gpu: DetectedGPU | None
    nvml_installed: bool
    trt_version: str | None
    trt_error: str | None
    cuda_python: str | None  # cuda-bindings (or cuda-python) distribution version
    ort_version: str | None
    ort_providers: tuple[str, ...]
    ort_error: str | None
    audio: AudioProbe
    in_audio_group: bool | None  # None where the OS has no such group

    @property
    def jetson(self) -> bool:
        return self.gpu is not None and self.gpu.source == "jetson"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- probing ---------------------------------------------------------------------------------


def _dist_version(*names: str) -> str | None:
    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _probe_tensorrt() -> tuple[str | None, str | None]:
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError when libnvinfer is missing or mismatched
        return None, f"{type(e).__name__}: {e}"
    return str(getattr(trt, "__version__", "unknown")), None


def _probe_onnxruntime() -> tuple[str | None, tuple[str, ...], str | None]:
    try:
        import onnxruntime as ort
    except Exception as e:
        return None, (), f"{type(e).__name__}: {e}"
    return ort.__version__, tuple(ort.get_available_providers()), None


def _probe_audio() -> AudioProbe:
    try:
        import sounddevice  # noqa: F401  (imported to tell a missing package from a missing library)
    except ImportError:
        return AudioProbe("the sounddevice package is not installed", "package")
    except OSError as e:  # the package is there, libportaudio is not
        return AudioProbe(f"PortAudio library not found ({e})", "library")
    from qinyu_edge.runtime.audio_devices import AudioDeviceError, list_devices

    try:
        devices = list_devices("sounddevice")
    except AudioDeviceError as e:
        return AudioProbe(str(e), "library")
    except Exception as e:  # PortAudioError when no host API answers: PortAudio sees nothing
        log.debug("PortAudio query failed: %s", e)
        devices = []
    return AudioProbe(None, None, tuple(d.name for d in devices if d.max_input_channels > 0),
                      tuple(d.name for d in devices if d.max_output_channels > 0))


def _in_audio_group() -> bool | None:
    try:
        import grp

        gid = grp.getgrnam("audio").gr_gid
    except (ImportError, KeyError):
        return None
    return os.geteuid() == 0 or gid in os.getgroups()


def probe() -> Environment:
    """Read this machine. Never raises: what cannot be read is recorded as missing, with the reason."""
    from qinyu_edge.device.detect import detect

    try:
        gpu = detect()
    except Exception as e:  # detection is best effort by contract; a surprise must not stop the doctor
        log.warning("GPU detection failed: %s", e)
        gpu = None
    trt_version, trt_error = _probe_tensorrt()
    ort_version, providers, ort_error = _probe_onnxruntime()
    return Environment(
        python=platform.python_version(), system=f"{platform.system()} {platform.release()}",
        machine=platform.machine(), gpu=gpu, nvml_installed=_dist_version("nvidia-ml-py", "pynvml") is not None,
        trt_version=trt_version, trt_error=trt_error, cuda_python=_dist_version("cuda-bindings", "cuda-python"),
        ort_version=ort_version, ort_providers=providers, ort_error=ort_error, audio=_probe_audio(),
        in_audio_group=_in_audio_group())


# --- report ----------------------------------------------------------------------------------


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    environment: Environment | None = None

    def add(self, area: str, item: str, status: Status, found: str, fix: str = "") -> None:
        self.checks.append(Check(area, item, status, found, fix))

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if c.status == "error"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warning"]

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def to_dict(self) -> dict[str, Any]:
        return {"ok": not self.errors, "exit_code": self.exit_code,
                "checks": [dataclasses.asdict(c) for c in self.checks],
                "environment": None if self.environment is None else self.environment.to_dict()}


def _need(required: bool) -> Status:
    return "error" if required else "warning"


def _gpu_checks(env: Environment, r: DoctorReport, require: set[str]) -> None:
    from qinyu_edge.device.targets import TARGETS, precisions_for

    gpu = env.gpu
    if gpu is None:
        if env.nvml_installed:
            fix = ("desktop GPU: install the NVIDIA driver (`nvidia-smi` must list the card); Jetson: flash JetPack 6.1 "
                   "or later (the board is read from /proc/device-tree/model)")
        else:
            fix = ("desktop GPU: install the NVIDIA driver and `pip install 'qinyu-edge[gpu]'` (nvidia-ml-py, used to "
                   "read the GPU); Jetson: flash JetPack 6.1 or later (the board is read from /proc/device-tree/model)")
        r.add("gpu", "NVIDIA GPU", _need("gpu" in require),
              "none found (no Jetson model file, no NVML device): TensorRT engines and the CUDA provider will not "
              "work; bundles run on ONNX Runtime CPU (`qinyu-edge run --provider cpu`)", fix)
        return
    cc = gpu.compute_capability
    mem = "?" if gpu.memory_bytes is None else f"{gpu.memory_bytes / 1e9:.1f} GB " + ("shared" if gpu.unified_memory else "VRAM")
    r.add("gpu", "NVIDIA GPU", "ok", f"{gpu.name} ({gpu.source}), compute capability "
          f"{'?' if cc is None else f'{cc[0]}.{cc[1]}'}, {mem}" + (f", {gpu.software}" if gpu.software else ""))
    if gpu.target_id is not None:
        t = TARGETS[gpu.target_id]
        r.add("gpu", "target", "ok", f"{t.id} ({t.name}); TensorRT precisions: {' '.join(t.precisions)}")
    else:
        precisions = " ".join(precisions_for(cc)) if cc else "unknown"
        r.add("gpu", "target", "warning", f"not a registry target: `--target local` uses a generic entry from what the "
              f"GPU reports (no peak rates); precisions: {precisions}",
              f"plan with the closest registry target instead (`qinyu-edge targets` lists {', '.join(TARGETS)})")
    if cc is not None and cc < (7, 5):
        r.add("gpu", "compute capability", _need("gpu" in require), f"{cc[0]}.{cc[1]} is older than Turing (7.5): "
              "TensorRT 10 has no tensor-core INT8 here and qinyu-edge does not plan for it",
              "use a GPU of compute capability 7.5 or newer (Orin is 8.7)")


def _expected_trt(env: Environment) -> str | None:
    """The TensorRT this Jetson's JetPack ships, from the L4T release (e.g. "10.3")."""
    sw = env.gpu.software if env.gpu is not None else None
    if not sw or "TensorRT " not in sw:
        return None
    return sw.split("TensorRT ", 1)[1].split()[0].rstrip(")")


def _trt_checks(env: Environment, r: DoctorReport, require: set[str], engines_requested: bool) -> None:
    needed = "tensorrt" in require or engines_requested
    if env.trt_version is None:
        if env.gpu is None:
            fix = "TensorRT needs an NVIDIA GPU; on this machine use ONNX Runtime (`--provider cpu`)"
        elif env.jetson:
            fix = ("JetPack ships it: `sudo apt install nvidia-tensorrt` (python3-libnvinfer); in a virtualenv create it "
                   "with --system-site-packages so `import tensorrt` finds it")
        else:
            fix = ("`pip install 'qinyu-edge[trt]'` (tensorrt-cu12 for a CUDA 12 driver, tensorrt-cu13 for CUDA 13; "
                   "its -libs wheels come from NVIDIA's package index)")
        r.add("tensorrt", "TensorRT", _need(needed), f"not importable ({env.trt_error}): `qinyu-edge build` and the "
              "TensorRT session will not work", fix)
    else:
        major_minor = tuple(int(x) for x in env.trt_version.split(".")[:2] if x.isdigit())
        if len(major_minor) == 2 and major_minor < (10, 0):
            r.add("tensorrt", "TensorRT", _need(needed), f"{env.trt_version}: older than 10.x, which qinyu-edge needs",
                  "upgrade to JetPack 6.1+ (TensorRT 10.3) or install TensorRT 10/11")
        else:
            r.add("tensorrt", "TensorRT", "ok", env.trt_version)
        expected = _expected_trt(env)
        if expected and "UNVERIFIED" not in (env.gpu.software or "") and not env.trt_version.startswith(expected):
            r.add("tensorrt", "JetPack match", "warning", f"JetPack's TensorRT is {expected}, but Python imports "
                  f"{env.trt_version}", "use JetPack's own TensorRT (python3-libnvinfer) rather than a pip wheel")
    if env.cuda_python is None:
        if env.trt_version is not None:
            r.add("cuda-python", "cuda-python", _need(needed), "not installed: the TensorRT session cannot allocate "
                  "device buffers", "`pip install 'cuda-python==12.*'` for CUDA 12 (JetPack 6), `'cuda-python==13.*'` "
                  "for CUDA 13 (JetPack 7, TensorRT 11)")
        else:
            r.add("cuda-python", "cuda-python", "info", "not installed (needed only with TensorRT)")
    else:
        r.add("cuda-python", "cuda-python", "ok", env.cuda_python)


def _ort_checks(env: Environment, r: DoctorReport) -> None:
    if env.ort_version is None:
        r.add("onnxruntime", "ONNX Runtime", "error", f"not importable ({env.ort_error}): no bundle can run",
              "`pip install onnxruntime` (CPU), or onnxruntime-gpu on a CUDA machine (never both: same import name)")
        return
    r.add("onnxruntime", "ONNX Runtime", "ok", f"{env.ort_version}; providers: {', '.join(env.ort_providers)}")
    gpu_eps = [p for p in GPU_PROVIDERS if p in env.ort_providers]
    if env.gpu is not None and not gpu_eps:
        r.add("onnxruntime", "GPU providers", "warning", "CPU-only build: `qinyu-edge run --provider cuda|tensorrt` "
              "will not work", "`pip uninstall onnxruntime && pip install onnxruntime-gpu` (on Jetson, NVIDIA's "
              "onnxruntime-gpu wheel for your JetPack)")
    elif env.gpu is None and gpu_eps:
        r.add("onnxruntime", "GPU providers", "warning", f"{', '.join(gpu_eps)} listed but no GPU found: sessions "
              "fall back to CPU", "run with `--provider cpu`, or fix the GPU line above")
    elif env.gpu is None:
        r.add("onnxruntime", "GPU providers", "info", "CPU provider only, as expected without a GPU")


def _audio_checks(env: Environment, r: DoctorReport, require: set[str]) -> None:
    a = env.audio
    status = _need("audio" in require)
    lost = "live voice (microphone in, speaker out) will not work; WAV files (`qinyu-edge run --input`) still do"
    if a.missing == "package":
        r.add("audio", "PortAudio", status, f"{a.error}: {lost}",
              "`pip install 'qinyu-edge[audio]'` (sounddevice) and `sudo apt install libportaudio2`")
        return
    if a.missing == "library":
        r.add("audio", "PortAudio", status, f"{a.error}: {lost}", "`sudo apt install libportaudio2`")
        return
    group = ""
    if env.in_audio_group is False:
        group = "; you are NOT in the `audio` group: `sudo usermod -aG audio $USER`, then log in again"
    elif env.in_audio_group is None:
        group = "; check that your user may open the sound devices"
    for kind, names in (("input", a.inputs), ("output", a.outputs)):
        if names:
            shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
            r.add("audio", f"{kind} devices", "ok", f"{len(names)}: {shown}")
        else:
            what = "microphone" if kind == "input" else "speaker"
            r.add("audio", f"{kind} devices", status, f"PortAudio sees no {kind} devices: {lost}",
                  f"connect a {what} or start a sound server (`sudo apt install pulseaudio` or pipewire-pulse); "
                  f"`{'arecord' if kind == 'input' else 'aplay'} -l` must list the card{group}")


def _bundle_checks(env: Environment, r: DoctorReport, bundle_dir: Path) -> Any:
    from qinyu_edge.bundle import load_bundle
    from qinyu_edge.errors import QinyuError

    try:
        bundle = load_bundle(bundle_dir, verify=True)
    except QinyuError as e:
        r.add("bundle", str(bundle_dir), "error", str(e), "export the bundle again (`qinyu-edge export ...`) or copy it whole")
        return None
    r.add("bundle", str(bundle_dir), "ok", f"{bundle.config.name}: {len(bundle.components)} components, "
          f"{len(bundle.files)} files match their sha256")
    if env.trt_version is None:
        r.add("bundle", "TensorRT lint", "info", "skipped: no TensorRT here", "`qinyu-edge lint --bundle "
              f"{bundle_dir}` checks the graphs against every TensorRT version our targets run")
        return bundle
    try:
        from .onnx_lint import lint_bundle
    except ImportError as e:  # onnx is a workstation extra; the device may not have it
        r.add("bundle", "TensorRT lint", "info", f"skipped: {e}", "`pip install onnx` to lint here")
        return bundle
    report = lint_bundle(bundle_dir, [env.trt_version])
    errors = [(c, f) for _, c, f in report.findings("error")]
    if errors:
        comp, first = errors[0]
        r.add("bundle", f"TensorRT {env.trt_version} lint", "error", f"{len(errors)} node(s) TensorRT will refuse, "
              f"first: {comp} {first.node} ({first.op}): {first.message}",
              f"{first.fix}; all of them: `qinyu-edge lint --bundle {bundle_dir} --trt {env.trt_version}`")
    else:
        r.add("bundle", f"TensorRT {env.trt_version} lint", "ok", f"no errors ({report.warnings} warnings)")
    return bundle


def _engine_sets(root: Path) -> list[Path]:
    from qinyu_edge.engine_manifest import MANIFEST

    if (root / MANIFEST).is_file():
        return [root]
    return sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))


def _plan_bytes(path: Path) -> mmap.mmap | bytes | None:
    if not path.is_file():
        return None
    if path.stat().st_size == 0:
        return b""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _engine_checks(env: Environment, r: DoctorReport, root: Path, bundle: Any) -> None:
    from qinyu_edge.bundle import bundle_weights_sha256, load_bundle
    from qinyu_edge.engine_manifest import EngineError, EngineSet, check_engine

    sets = _engine_sets(root)
    if not sets:
        r.add("engines", str(root), "error", "no engine set here (no manifest.json in it or its subfolders)",
              "`qinyu-edge build --bundle BUNDLE --target TARGET --out DIR`")
        return
    gpu = env.gpu
    cc = gpu.compute_capability if gpu is not None else None
    # The manifest records the CUDA device name; NVML reports the same string, the Jetson model file does not.
    gpu_name = gpu.name if gpu is not None and gpu.source == "nvml" else None
    for set_dir in sets:
        try:
            es = EngineSet.load(set_dir)
        except EngineError as e:
            r.add("engines", str(set_dir), "error", str(e), "rebuild it with `qinyu-edge build`")
            continue
        src = bundle
        if src is None and Path(es.bundle).is_dir():
            try:
                src = load_bundle(es.bundle, verify=False)
            except Exception as e:  # a moved or damaged bundle only costs the ONNX-hash comparison
                log.debug("engine set bundle %s unreadable: %s", es.bundle, e)
        bad = 0
        for entry in es.engines.values():
            known = src is not None and entry.onnx_file in src.files
            onnx_sha = src.files[entry.onnx_file].sha256 if known else None
            weights_sha = bundle_weights_sha256(src, entry.onnx_file) if known else None
            plan = _plan_bytes(inside(set_dir, entry.plan_file, "a plan file"))
            try:
                mismatch = check_engine(entry, env.trt_version, gpu_name, cc, onnx_sha, plan, weights_sha)
            finally:
                if isinstance(plan, mmap.mmap):
                    plan.close()
            if mismatch is not None:
                bad += 1
                r.add("engines", f"{set_dir.name}/{entry.component}", "error", mismatch.reason,
                      f"rebuild: {mismatch.command}")
        built = sorted({f"TensorRT {e.trt_version}, {e.gpu_name} (CC {e.compute_capability})" for e in es.engines.values()})
        if env.trt_version is None or gpu is None:
            missing = " and ".join(x for x, gone in (("no TensorRT", env.trt_version is None), ("no GPU", gpu is None)) if gone)
            r.add("engines", set_dir.name, "error", f"{len(es.engines)} plans for {es.target} ({'; '.join(built)}) "
                  f"cannot run here: {missing}", "run them on the machine they were built for (see the gpu/tensorrt "
                  "lines for what this one lacks)")
        elif bad == 0:
            r.add("engines", set_dir.name, "ok", f"{len(es.engines)} plans for {es.target} match this machine "
                  f"({'; '.join(built)})")
        if gpu is not None and gpu.target_id is not None and es.target not in (gpu.target_id, "local"):
            r.add("engines", set_dir.name, "warning", f"built for target {es.target}, this machine is {gpu.target_id}",
                  f"build a set for this machine: `qinyu-edge build --bundle {es.bundle} --target {gpu.target_id}`")


def diagnose(env: Environment, bundle: str | Path | None = None, engines: str | Path | None = None,
             require: Iterable[str] = ()) -> DoctorReport:
    """The doctor's lines for this environment; see the module docstring for the exit code."""
    require = set(require)
    unknown = require - set(REQUIREMENTS)
    if unknown:
        from qinyu_edge.errors import ConfigError

        raise ConfigError(f"unknown requirement(s) {', '.join(sorted(unknown))}; choose from {', '.join(REQUIREMENTS)}")
    r = DoctorReport(environment=env)
    r.add("system", "qinyu-edge", "info", f"{__version__} on Python {env.python}, {env.system} {env.machine}")
    _guarded(r, "gpu", _gpu_checks, env, r, require)
    _guarded(r, "tensorrt", _trt_checks, env, r, require, engines is not None)
    _guarded(r, "onnxruntime", _ort_checks, env, r)
    _guarded(r, "audio", _audio_checks, env, r, require)
    loaded = _guarded(r, "bundle", _bundle_checks, env, r, Path(bundle)) if bundle is not None else None
    if engines is not None:
        _guarded(r, "engines", _engine_checks, env, r, Path(engines), loaded)
    return r


def _guarded(r: DoctorReport, area: str, fn: Callable[..., Any], *args: Any) -> Any:
    """A check that breaks on something unforeseen becomes one error line; the others still run."""
    try:
        return fn(*args)
    except Exception as e:
        log.debug("doctor check %s failed", area, exc_info=True)
        r.add(area, "check", "error", f"the check itself failed: {type(e).__name__}: {e}",
              "run `qinyu-edge -v doctor` and report it as a qinyu-edge bug")
        return None


def engine_set_errors(bundle: str | Path, engines: str | Path, env: Environment | None = None) -> list[Check]:
    """What `doctor --engines` finds wrong with an engine set for this bundle on this machine. The bundle's
    recorded hashes are compared, not re-hashed: the runtime hashes its files when it loads them."""
    from qinyu_edge.bundle import load_bundle

    env = probe() if env is None else env
    r = DoctorReport(environment=env)
    _engine_checks(env, r, Path(engines), load_bundle(bundle, verify=False))
    return r.errors


def run_doctor(bundle: str | Path | None = None, engines: str | Path | None = None,
               require: Sequence[str] = ()) -> DoctorReport:
    return diagnose(probe(), bundle, engines, require)


__all__ = ["REQUIREMENTS", "AudioProbe", "Check", "DoctorReport", "Environment", "diagnose", "engine_set_errors", "probe",
           "run_doctor"]
