"""What the platform reports while a benchmark runs: process memory, GPU memory, clocks, power, and
the host's memory-copy bandwidth. Torch-free; NVML (`pynvml`, the `gpu` extra) and jetson-stats
(`jtop`) are imported only when asked for, and a platform that reports nothing gives a reason, not
an error.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

PROC_STATUS = Path("/proc/self/status")
DEVFREQ = Path("/sys/class/devfreq")


# --- process memory ------------------------------------------------------------------------------

def _status_kib(field_name: str, status_path: Path = PROC_STATUS) -> int | None:
    try:
        text = status_path.read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def rss_bytes() -> int | None:
    """Resident set size now (VmRSS); None where /proc is not readable."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Largest resident set size of the process so far (VmHWM, else getrusage's ru_maxrss)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        try:
            import resource

            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        except (ImportError, OSError):
            return None
    return kib * 1024


def available_memory_bytes(meminfo_path: Path = Path("/proc/meminfo")) -> int | None:
    """Memory the kernel can give a new allocation without swapping (MemAvailable); None where
    /proc is not readable."""
    try:
        text = meminfo_path.read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def peak_line(what: str, seconds: float) -> str:
    """The line `export` and `quantize` end with: how long the work took and the most memory it held,
    the figure a user plans the next real-size run's machine by."""
    peak = peak_rss_bytes()
    held = "unknown" if peak is None else f"{peak / 1e9:.2f} GB"
    return f"{what} took {seconds:.0f} s; peak memory {held} (resident high-water mark)"


# --- host memory bandwidth ----------------------------------------------------------------------

@dataclass(frozen=True)
class CopyBandwidth:
    gbs: float
    buffer_bytes: int
    repeats: int
    definition: str = ("numpy copy of one buffer into another: (bytes read + bytes written) / best wall time, "
                       "decimal GB/s, as STREAM's copy counts it")


def host_copy_bandwidth(buffer_bytes: int = 128 * 2**20, repeats: int = 5) -> CopyBandwidth:
    """The host's sustained copy bandwidth, the roofline's memory figure where no GPU target applies."""
    src = np.ones(buffer_bytes // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault every page in before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return CopyBandwidth(2 * src.nbytes / best / 1e9, int(src.nbytes), repeats)


# --- GPU monitors ---------------------------------------------------------------------------------

class GpuMonitor(Protocol):
    source: str  # "nvml" or "jtop"

    def memory(self) -> dict[str, Any]: ...

    def power_w(self) -> float | None: ...

    def energy_j(self) -> float | None: ...

    def clocks(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


class NvmlMonitor:
    """The first NVML device: memory (device and this process), power, energy counter, clocks."""

    source = "nvml"

    def __init__(self, index: int = 0):
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() <= index:
            pynvml.nvmlShutdown()
            raise RuntimeError("NVML sees no GPU")
        self._h = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.name = _text(pynvml.nvmlDeviceGetName(self._h))

    def _try(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(self._h, *args)
        except self._nvml.NVMLError as e:  # a query this GPU or driver does not support
            log.debug("NVML %s: %s", getattr(fn, "__name__", fn), e)
            return None

    def memory(self) -> dict[str, Any]:
        info = self._try(self._nvml.nvmlDeviceGetMemoryInfo)
        out: dict[str, Any] = {"source": "nvml"}
        if info is not None:
            out.update(device_used_bytes=int(info.used), device_total_bytes=int(info.total))
        procs = self._try(self._nvml.nvmlDeviceGetComputeRunningProcesses) or []
        mine = [p for p in procs if p.pid == os.getpid()]
        # usedGpuMemory is None where the driver hides per-process figures (some containers, WDDM).
        used = [p.usedGpuMemory for p in mine if p.usedGpuMemory is not None]
        out["process_bytes"] = int(sum(used)) if used else (0 if not mine else None)
        if out["process_bytes"] is None:
            out["process_note"] = "the driver does not report this process's GPU memory"
        return out

    def power_w(self) -> float | None:
        mw = self._try(self._nvml.nvmlDeviceGetPowerUsage)
        return None if mw is None else mw / 1e3

    def energy_j(self) -> float | None:
        """Energy since the driver loaded (Volta and newer); differences give joules exactly."""
        mj = self._try(self._nvml.nvmlDeviceGetTotalEnergyConsumption)
        return None if mj is None else mj / 1e3

    def clocks(self) -> dict[str, Any]:
        n = self._nvml
        out: dict[str, Any] = {}
        for label, clock in (("graphics", n.NVML_CLOCK_GRAPHICS), ("sm", n.NVML_CLOCK_SM), ("memory", n.NVML_CLOCK_MEM)):
            out[f"{label}_mhz"] = self._try(n.nvmlDeviceGetClockInfo, clock)
            out[f"{label}_max_mhz"] = self._try(n.nvmlDeviceGetMaxClockInfo, clock)
        limit = self._try(n.nvmlDeviceGetEnforcedPowerLimit)
        out["power_limit_w"] = None if limit is None else limit / 1e3
        pstate = self._try(n.nvmlDeviceGetPerformanceState)
        out["performance_state"] = None if pstate is None else f"P{pstate}"
        return out

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as e:
            log.debug("nvmlShutdown: %s", e)


class JtopMonitor:
    """A Jetson through jetson-stats (its jtop service must be running): board power, the RAM the
    GPU holds (Jetson memory is shared), nvpmodel and jetson_clocks."""

    source = "jtop"

    def __init__(self, interval: float = 0.1):
        from jtop import jtop

        self._jetson = jtop(interval=interval)
        self._jetson.start()
        if not self._jetson.ok():
            self._jetson.close()
            raise RuntimeError("jtop started but reports no data (is the jtop service running?)")
        self.name = "Jetson (jtop)"

    def memory(self) -> dict[str, Any]:
        ram = dict(self._jetson.memory.get("RAM", {}))
        out: dict[str, Any] = {"source": "jtop"}
        if "used" in ram:
            out["device_used_bytes"] = int(ram["used"]) * 1024
        if "tot" in ram:
            out["device_total_bytes"] = int(ram["tot"]) * 1024
        # jtop's "shared" is the RAM the GPU holds, for all processes together.
        out["process_bytes"] = None
        out["gpu_shared_bytes"] = int(ram["shared"]) * 1024 if "shared" in ram else None
        out["process_note"] = "Jetson memory is shared; gpu_shared_bytes is the GPU's share for all processes"
        return out

    def power_w(self) -> float | None:
        tot = self._jetson.power.get("tot", {})
        mw = tot.get("power")
        return None if mw is None else float(mw) / 1e3

    def energy_j(self) -> float | None:
        return None  # jtop reports power only; joules come from integrating samples

    def clocks(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        nvp = self._jetson.nvpmodel
        out["nvpmodel"] = None if nvp is None else str(nvp)
        jc = self._jetson.jetson_clocks
        out["jetson_clocks"] = None if jc is None else bool(jc)
        return out

    def close(self) -> None:
        self._jetson.close()


def open_gpu_monitor(use_nvml: bool = True, use_jtop: bool = True) -> tuple[GpuMonitor | None, str]:
    """(monitor, how it was found) or (None, why there is none). jtop first on a Jetson (Orin has
    no NVML), NVML otherwise."""
    reasons = []
    if use_jtop and Path("/etc/nv_tegra_release").is_file():
        try:
            return JtopMonitor(), "jetson-stats (jtop)"
        except ImportError:
            reasons.append("jetson-stats is not installed (pip install jetson-stats)")
        except Exception as e:  # the jtop service is down or refuses us
            reasons.append(f"jtop: {e}")
    if use_nvml:
        try:
            mon = NvmlMonitor()
            return mon, f"NVML ({mon.name})"
        except ImportError:
            reasons.append("nvidia-ml-py is not installed (the `gpu` extra)")
        except Exception as e:  # NVMLError_LibraryNotFound, driver not loaded, no device
            reasons.append(f"NVML: {e}")
    return None, "; ".join(reasons) or "no GPU monitor asked for"


# --- power over an interval ---------------------------------------------------------------------

@dataclass
class PowerReading:
    seconds: float
    joules: float | None
    watts: float | None  # mean over the interval
    samples: int
    method: str


class PowerMeter:
    """Joules and mean watts over a `with` block: NVML's energy counter where the GPU has one,
    otherwise power sampled in a thread and integrated (trapezoids)."""

    def __init__(self, monitor: GpuMonitor, interval_s: float = 0.02):
        self.monitor = monitor
        self.interval_s = interval_s
        self.reading: PowerReading | None = None
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._e0: float | None = None
        self._t0 = 0.0

    def _sample(self) -> None:
        while not self._stop.is_set():
            w = self.monitor.power_w()
            if w is not None:
                self._samples.append((time.perf_counter(), w))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PowerMeter:
        self._samples.clear()
        self._stop.clear()
        self._e0 = self.monitor.energy_j()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, name="power-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self._t0
        e1 = self.monitor.energy_j()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._e0 is not None and e1 is not None and seconds > 0:
            joules = e1 - self._e0
            self.reading = PowerReading(seconds, joules, joules / seconds, len(self._samples), "NVML energy counter")
        elif len(self._samples) >= 2:
            t = np.array([s[0] for s in self._samples])
            w = np.array([s[1] for s in self._samples])
            joules = float(np.sum((w[1:] + w[:-1]) / 2 * np.diff(t)))
            # Samples cover [first, last]; scale to the whole interval with the mean power.
            mean_w = joules / float(t[-1] - t[0]) if t[-1] > t[0] else float(w.mean())
            self.reading = PowerReading(seconds, mean_w * seconds, mean_w, len(w),
                                        f"{self.monitor.source} power sampled every {self.interval_s * 1e3:.0f} ms")
        elif self._samples:
            w0 = self._samples[0][1]
            self.reading = PowerReading(seconds, w0 * seconds, w0, 1, f"{self.monitor.source} power, one sample")
        else:
            self.reading = PowerReading(seconds, None, None, 0, "no power sample was reported")


# --- the platform ---------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def devfreq_clocks(root: Path = DEVFREQ) -> dict[str, dict[str, int]]:
    """Current and maximum frequency (Hz) of every devfreq device (on a Jetson: the GPU, EMC)."""
    out: dict[str, dict[str, int]] = {}
    if not root.is_dir():
        return out
    for dev in sorted(root.iterdir()):
        vals = {}
        for key in ("cur_freq", "max_freq"):
            try:
                vals[key] = int((dev / key).read_text().strip())
            except (OSError, ValueError):
                pass
        if vals:
            out[dev.name] = vals
    return out


def nvpmodel_query() -> str | None:
    """`nvpmodel -q` on a Jetson (the power mode); None where the tool is absent or fails."""
    exe = shutil.which("nvpmodel")
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, "-q"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.debug("nvpmodel -q: %s", e)
        return None
    text = (res.stdout or res.stderr).strip()
    return text or None


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


__all__ = [
    "CopyBandwidth",
    "GpuMonitor",
    "JtopMonitor",
    "NvmlMonitor",
    "PowerMeter",
    "PowerReading",
    "cpu_name",
    "devfreq_clocks",
    "host_copy_bandwidth",
    "nvpmodel_query",
    "open_gpu_monitor",
    "package_version",
    "peak_rss_bytes",
    "rss_bytes",
]
