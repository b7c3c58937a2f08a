"""Find the GPU of this machine: a Jetson from its device-tree model string, otherwise the first
NVML device. Never raises for a missing GPU, driver or library: it returns None.

Jetson first, because Orin exposes no NVML; the files read are parameters so tests can point them
at fixtures.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .targets import GiB, TARGETS, jetpack_for_l4t

log = logging.getLogger(__name__)

MODEL_PATH = Path("/proc/device-tree/model")
TEGRA_RELEASE_PATH = Path("/etc/nv_tegra_release")
MEMINFO_PATH = Path("/proc/meminfo")


@dataclass(frozen=True)
class DetectedGPU:
    name: str
    source: Literal["jetson", "nvml"]
    memory_bytes: int | None  # what the OS or driver reports (carve-outs excluded on a Jetson)
    unified_memory: bool
    compute_capability: tuple[int, int] | None
    bandwidth_gbs: float | None
    target_id: str | None  # the registry entry this GPU is, when it is one
    software: str | None = None  # L4T/JetPack or driver version


def detect(model_path: Path = MODEL_PATH, tegra_release_path: Path = TEGRA_RELEASE_PATH,
           meminfo_path: Path = MEMINFO_PATH, use_nvml: bool = True) -> DetectedGPU | None:
    found = detect_jetson(model_path, tegra_release_path, meminfo_path)
    if found is None and use_nvml:
        found = detect_nvml()
    return found


# --- Jetson ----------------------------------------------------------------------------------

# Module sizes sold per family, smallest first. MemTotal is below the DRAM size by the carve-outs,
# so the module is the smallest size that holds MemTotal.
_SIZES_GIB = {"orin-nano": (4, 8), "orin-nx": (8, 16), "agx-orin": (32, 64), "agx-thor": (128,)}


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def parse_meminfo_total(text: str) -> int | None:
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def parse_tegra_release(text: str) -> str | None:
    """`# R36 (release), REVISION: 4.3, ...` -> "36.4.3"."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def jetson_family(model: str) -> str | None:
    m = model.lower()
    if "jetson" not in m and "orin" not in m and "thor" not in m:
        return None
    if "thor" in m:
        return "agx-thor"
    if "orin" not in m:
        return None  # Xavier, TX2, Nano (Maxwell): not supported by this package
    if "agx" in m:
        return "agx-orin"
    if "nano" in m:
        return "orin-nano"
    if " nx" in m:
        return "orin-nx"
    return None


def jetson_target_id(model: str, mem_total_bytes: int | None) -> str | None:
    """Registry id for a Jetson model string, sized by MemTotal; None for boards not in the registry."""
    family = jetson_family(model)
    if family is None:
        return None
    sizes = _SIZES_GIB[family]
    if mem_total_bytes is None:
        size = sizes[0]
        log.warning("could not read MemTotal; assuming the smaller %s module (%d GB)", family, size)
    else:
        size = next((s for s in sizes if mem_total_bytes <= s * GiB), sizes[-1])
    if family == "agx-thor":
        # T5000 (128 GB) is the registry entry; a smaller Thor module is another board.
        return "agx-thor" if mem_total_bytes is None or mem_total_bytes > 64 * GiB else None
    if family == "orin-nano":
        if size != 8:
            return None  # Orin Nano 4GB is not a target: too small for either variant
        # JetPack 6.2+ names the Super device tree in the model string.
        return "orin-nano-8-super" if "super" in model.lower() else "orin-nano-8"
    return f"{family}-{size}"


def detect_jetson(model_path: Path = MODEL_PATH, tegra_release_path: Path = TEGRA_RELEASE_PATH,
                  meminfo_path: Path = MEMINFO_PATH) -> DetectedGPU | None:
    model = _read_text(model_path)
    if not model:
        return None
    if jetson_family(model) is None:
        if "jetson" in model.lower():
            log.info("%r is a Jetson this package does not support (Orin or Thor needed)", model)
        return None
    meminfo = _read_text(meminfo_path)
    mem = parse_meminfo_total(meminfo) if meminfo else None
    release = _read_text(tegra_release_path)
    l4t = parse_tegra_release(release) if release else None
    software = None
    if l4t:
        stack = jetpack_for_l4t(l4t)
        software = f"L4T {l4t}" + (f" (JetPack {stack[0]}, CUDA {stack[1]}, TensorRT {stack[2]})" if stack else "")
    target_id = jetson_target_id(model, mem)
    cc = (11, 0) if jetson_family(model) == "agx-thor" else (8, 7)
    bandwidth = TARGETS[target_id].bandwidth_gbs if target_id else None
    return DetectedGPU(model, "jetson", mem, True, cc, bandwidth, target_id, software)


# --- NVML ------------------------------------------------------------------------------------

_RTX = re.compile(r"RTX (3090|4090|5090)$")


def nvml_target_id(name: str) -> str | None:
    """Exact card names only: a 3090 Ti, 4090 D or laptop part differs in bandwidth or memory."""
    m = _RTX.search(name.strip())
    return f"rtx-{m.group(1)}" if m else None


def nvml_bandwidth_gbs(bus_width_bits: int, max_mem_clock_mhz: int) -> float:
    # NVML reports the memory clock at half the transfer rate (a 3090 gives 9751 MHz on 384 bits,
    # 936 GB/s), so two transfers per reported cycle.
    return 2 * max_mem_clock_mhz * 1e6 * bus_width_bits / 8 / 1e9


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


def detect_nvml(index: int = 0) -> DetectedGPU | None:
    try:
        import pynvml  # nvidia-ml-py, the `gpu` extra
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # no driver, no library: NVMLError subclasses
        log.debug("NVML unavailable: %s", e)
        return None
    try:
        if pynvml.nvmlDeviceGetCount() <= index:
            return None
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = _text(pynvml.nvmlDeviceGetName(h))
        total = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
        cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        try:
            bandwidth = nvml_bandwidth_gbs(pynvml.nvmlDeviceGetMemoryBusWidth(h),
                                           pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM))
        except Exception as e:  # older drivers lack the bus-width query
            log.debug("NVML gave no memory bus width: %s", e)
            bandwidth = None
        target_id = nvml_target_id(name)
        if target_id is not None:
            bandwidth = TARGETS[target_id].bandwidth_gbs
        return DetectedGPU(name, "nvml", total, False, (int(cc[0]), int(cc[1])), bandwidth, target_id,
                           f"driver {driver}")
    except Exception as e:
        log.warning("NVML found a GPU but could not describe it: %s", e)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as e:
            log.debug("nvmlShutdown: %s", e)


__all__ = [
    "DetectedGPU", "detect", "detect_jetson", "detect_nvml", "jetson_target_id", "jetson_family",
    "nvml_target_id", "nvml_bandwidth_gbs", "parse_meminfo_total", "parse_tegra_release",
    "MODEL_PATH", "TEGRA_RELEASE_PATH", "MEMINFO_PATH",
]
