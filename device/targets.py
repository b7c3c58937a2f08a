"""The GPUs users deploy on: memory, bandwidth, compute and what TensorRT supports there.

Every figure carries its source in a comment. "derived" marks our own arithmetic from a sourced
figure; UNVERIFIED marks third-party or inferred facts to check on a device. Memory sizes are the
physical DRAM (GiB, as the boards are sold); bandwidths are decimal GB/s, as vendors quote them.
Dense tensor rates are what a batch-1 LLM sees (no 2:4 sparsity). On GeForce cards the FP16 figure
is with FP32 accumulation, what TensorRT's LLM kernels use, which is half the FP16-accumulate rate;
Jetson tensor cores run both at the same rate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from qinyu_edge.errors import ConfigError

if TYPE_CHECKING:
    from .detect import DetectedGPU

GB = 10**9
GiB = 2**30

# Widest first, so "lower precision" means further right.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "fp8", "int8", "fp4", "int4")


def precisions_for(cc: tuple[int, int]) -> tuple[str, ...]:
    """Weight precisions TensorRT builds for a compute capability (tensorrt-facts.md section 6)."""
    have = ["fp32", "fp16"]
    if cc >= (7, 5):
        have.append("int8")  # explicit Q/DQ INT8: every tensor-core GPU TensorRT 10 supports
    if cc >= (8, 9):
        have.append("fp8")  # FP8 Q/DQ needs Ada or newer; on Orin the build fails (Model-Optimizer#70)
    if cc >= (10, 0):
        have.append("fp4")  # NVFP4 needs Blackwell (ModelOpt support matrix)
    if cc >= (8, 0):
        have.append("int4")  # W4A16 weight-only needs Ampere+ (ModelOpt support matrix)
    return tuple(p for p in PRECISIONS if p in have)


@dataclass(frozen=True)
class Target:
    """One deployment GPU. `memory_bytes` is the whole DRAM of the board (shared with the CPU when
    `unified_memory`), `system_reserved_bytes` what the OS and firmware keep of it."""

    id: str
    name: str
    family: Literal["jetson", "rtx", "local"]
    compute_capability: tuple[int, int]
    memory_bytes: int
    unified_memory: bool
    bandwidth_gbs: float | None  # None only for a local GPU whose bandwidth could not be read
    fp16_tflops: float | None  # dense tensor FP16 (FP32 accumulate)
    int8_tops: float | None  # dense tensor INT8
    system_reserved_bytes: int
    software: tuple[str, ...]  # usual JetPack / CUDA / TensorRT stacks
    notes: tuple[str, ...] = ()

    @property
    def precisions(self) -> tuple[str, ...]:
        return precisions_for(self.compute_capability)

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compute_capability"] = self.sm
        d["precisions"] = list(self.precisions)
        d["memory_gb"] = round(self.memory_bytes / GB, 2)
        return d


# --- software stacks (tensorrt-facts.md section 1) ------------------------------------------

JETPACK_RELEASES: dict[str, tuple[str, str, str]] = {
    # L4T release -> (JetPack, CUDA, TensorRT)
    "36.3": ("6.0", "12.2", "8.6.2 (UNVERIFIED)"),
    "36.4": ("6.1", "12.6", "10.3"),  # pytorch.org/TensorRT/getting_started/jetpack.html
    "36.4.3": ("6.2", "12.6", "10.3 (UNVERIFIED)"),
    "36.4.4": ("6.2.1", "12.6", "10.3 (UNVERIFIED)"),
    "36.5.0": ("6.2.2", "12.6", "10.3 (UNVERIFIED)"),
    "38.2": ("7.0", "13.0", "10.13.3.9"),  # github.com/NVIDIA/TensorRT/issues/4590
    "38.4": ("7.1", "13.0", "10.13.x (UNVERIFIED)"),
    "39.2": ("7.2", "13.2", "10.16.2.10"),  # github.com/NVIDIA/TensorRT/issues/4832
    "39.2.1": ("7.2.1", "13.2", "10.16.2.10"),
}


def jetpack_for_l4t(l4t: str) -> tuple[str, str, str] | None:
    """(JetPack, CUDA, TensorRT) for an L4T release such as "36.4.3"; None for releases not listed
    (a near match could name the wrong TensorRT)."""
    hit = JETPACK_RELEASES.get(l4t)
    if hit is None and l4t.endswith(".0"):
        hit = JETPACK_RELEASES.get(l4t[:-2])  # nv_tegra_release writes 36.4 as "R36, REVISION: 4.0"
    return hit


_ORIN_SOFTWARE = (
    "JetPack 6.1-6.2.2 (L4T 36.4-36.5): CUDA 12.6, TensorRT 10.3",
    "JetPack 7.2 (L4T 39.2): CUDA 13.2, TensorRT 10.16.2",
)
# TensorRT 11.4.1 names only AGX Orin and Thor among Jetsons [MIGJ-11.4.1].
_AGX_ORIN_SOFTWARE = _ORIN_SOFTWARE + ("JetPack 7.2.2+: CUDA 13.x, TensorRT 11.4.1 (SBSA package)",)
_THOR_SOFTWARE = (
    "JetPack 7.0 (L4T 38.2): CUDA 13.0, TensorRT 10.13.3",
    "JetPack 7.2 (L4T 39.2): CUDA 13.2, TensorRT 10.16.2",
    "JetPack 7.2.2+: CUDA 13.x, TensorRT 11.4.1 (SBSA package)",
)
_RTX_SOFTWARE = ("TensorRT 10.x (CUDA 12) or 11.x (CUDA 12/13) wheels from PyPI",)

_ORIN_NOTES = (
    "no FP8/FP4 on SM 8.7; INT4 weight-only with group size 128 only (TensorRT Edge-LLM supported-models)",
    "INT8 Q/DQ engines fail to build on TensorRT 10.16.2 / JetPack 7.2 (NVIDIA/TensorRT#4832): keep an fp16 fallback",
)

# Firmware carve-outs plus a headless JetPack boot. An 8 GB Orin Nano reports MemTotal 7,650,336 kB
# (public jetson-stats test fixture) of 8 GiB, so ~0.9 GB is carved out; a headless Ubuntu/L4T boot
# keeps ~1.1 GB more (UNVERIFIED: check `free -m` after boot; a desktop session adds ~1 GB).
JETSON_CARVEOUT_BYTES = int(0.9 * GB)
JETSON_OS_BYTES = int(1.1 * GB)
JETSON_RESERVED_BYTES = JETSON_CARVEOUT_BYTES + JETSON_OS_BYTES
# Discrete cards: the driver, display and ECC pages hold a few hundred MB of VRAM (UNVERIFIED).
DISCRETE_RESERVED_BYTES = int(0.5 * GB)


def _jetson(id: str, name: str, cc: tuple[int, int], mem_gib: int, bw: float, fp16: float, int8: float,
            software: tuple[str, ...], notes: tuple[str, ...]) -> Target:
    return Target(id, name, "jetson", cc, mem_gib * GiB, True, bw, fp16, int8, JETSON_RESERVED_BYTES, software, notes)


def _rtx(id: str, name: str, cc: tuple[int, int], mem_gib: int, bw: float, fp16: float, int8: float,
         notes: tuple[str, ...] = ()) -> Target:
    return Target(id, name, "rtx", cc, mem_gib * GiB, False, bw, fp16, int8, DISCRETE_RESERVED_BYTES, _RTX_SOFTWARE, notes)


# Jetson Orin tensor rates: the AGX Orin technical brief gives 170 sparse INT8 TOPS for 16 SMs at
# 1.3 GHz, i.e. 8192 sparse INT8 ops per SM per clock; dense INT8 is half that and dense FP16 a
# quarter. Smaller modules are derived from their SM count and GPU clock with the same per-SM rate
# (derived), which reproduces the datasheets' 40 / 67 TOPS (Orin Nano / Super) and 100 / 70 TOPS
# module totals (GPU + DLA) for Orin NX.
_TARGET_LIST: tuple[Target, ...] = (
    # Orin Nano 8GB: 8 SMs at 625 MHz, 128-bit LPDDR5 at 68 GB/s; datasheet "up to 40 (sparse) /
    # 20 (dense) INT8 TOPS" (Orin Nano datasheet); bandwidth: field-notes A3 (brojogopalsapui.com).
    _jetson("orin-nano-8", "Jetson Orin Nano 8GB", (8, 7), 8, 68.0, 10.0, 20.0, _ORIN_SOFTWARE, _ORIN_NOTES),
    # Super mode (MAXN SUPER, JetPack 6.1+ clocks): GPU 1020 MHz, memory 102 GB/s, 67 sparse TOPS
    # (Orin Nano Super Developer Kit datasheet, Dec 2024, via brojogopalsapui.com). Same module.
    _jetson("orin-nano-8-super", "Jetson Orin Nano 8GB (Super mode)", (8, 7), 8, 102.0, 16.7, 33.4, _ORIN_SOFTWARE,
            _ORIN_NOTES + ("MAXN SUPER is reported missing or capped at 624 MHz on JetPack 7.2 (NVIDIA forum "
                           "t/377003, UNVERIFIED); check `nvpmodel -q`",)),
    # Orin NX 8GB: 8 SMs at 765 MHz (derived 50 sparse GPU TOPS + 20 for its one DLA = the 70 TOPS
    # module figure); 128-bit LPDDR5 at 102.4 GB/s (docs.ultralytics.com/guides/nvidia-jetson).
    _jetson("orin-nx-8", "Jetson Orin NX 8GB", (8, 7), 8, 102.4, 12.5, 25.0, _ORIN_SOFTWARE, _ORIN_NOTES),
    # Orin NX 16GB: 8 SMs at 918 MHz (deviceQuery on an Orin NX 16GB, gist atinfinity/8cede915),
    # derived 60 sparse GPU TOPS; 102.4 GB/s (field-notes A3).
    _jetson("orin-nx-16", "Jetson Orin NX 16GB", (8, 7), 16, 102.4, 15.0, 30.0, _ORIN_SOFTWARE, _ORIN_NOTES),
    # AGX Orin 32GB: 14 SMs (1792 CUDA cores) at 930 MHz, derived 107 sparse GPU TOPS;
    # 256-bit LPDDR5 at 204.8 GB/s (AGX Orin series technical brief).
    _jetson("agx-orin-32", "Jetson AGX Orin 32GB", (8, 7), 32, 204.8, 26.7, 53.3, _AGX_ORIN_SOFTWARE, _ORIN_NOTES),
    # AGX Orin 64GB: 16 SMs at 1.3 GHz, 170 sparse INT8 TOPS, 85 sparse FP16 TFLOPS (AGX Orin
    # technical brief); 204.8 GB/s (field-notes A3, docs.ultralytics.com).
    _jetson("agx-orin-64", "Jetson AGX Orin 64GB", (8, 7), 64, 204.8, 42.5, 85.0, _AGX_ORIN_SOFTWARE, _ORIN_NOTES),
    # AGX Thor (T5000): Blackwell, 20 SMs, CC 11.0 under CUDA 13 (SM 10.1 under CUDA 12.8;
    # NVIDIA/TensorRT#4590); 128 GB LPDDR5X, 256-bit, 273 GB/s (RidgeRun Thor SoM overview);
    # 2070 sparse FP4 TFLOPS (NVIDIA). Dense FP8 = 2070/4 and dense FP16 = 2070/8 (derived, UNVERIFIED);
    # INT8 taken at the FP8 rate (UNVERIFIED).
    _jetson("agx-thor", "Jetson AGX Thor (T5000)", (11, 0), 128, 273.0, 258.8, 517.5, _THOR_SOFTWARE,
            ("weakly typed FP8/FP4 builder flags silently build FP32 on TensorRT 10.13.3 (NVIDIA/TensorRT#4590): "
             "use Q/DQ with strong typing",)),
    # RTX 3090: GA102, 24 GB GDDR6X, 936 GB/s (field-notes A3); 71 dense FP16 (FP32 acc.) TFLOPS,
    # 284 dense INT8 TOPS (NVIDIA Ampere GA102 whitepaper).
    _rtx("rtx-3090", "GeForce RTX 3090", (8, 6), 24, 936.0, 71.0, 284.0),
    # RTX 4090: AD102, 24 GB GDDR6X, 1008 GB/s (field-notes A3); 165.2 dense FP16 (FP32 acc.)
    # TFLOPS, 660.6 dense INT8 TOPS (NVIDIA Ada whitepaper, as listed by hmc-tech.com).
    _rtx("rtx-4090", "GeForce RTX 4090", (8, 9), 24, 1008.0, 165.2, 660.6),
    # RTX 5090: GB202, 32 GB GDDR7, 1792 GB/s (field-notes A3; spheron.network spec sheet);
    # 838.4 sparse FP16 (FP16 acc.) -> 209.5 dense FP32-acc. (derived); 3352 sparse FP4 AI TOPS
    # -> 838 dense INT8 (derived, castromedia.org normalisation).
    _rtx("rtx-5090", "GeForce RTX 5090", (12, 0), 32, 1792.0, 209.5, 838.0,
         ("SM 12.0 needs TensorRT >= 10.8 (UNVERIFIED) or 11.x",)),
)

TARGETS: dict[str, Target] = {t.id: t for t in _TARGET_LIST}
LOCAL = "local"


def target_ids() -> tuple[str, ...]:
    return (*TARGETS, LOCAL)


def get_target(target_id: str, detected: "DetectedGPU | None" = None) -> Target:
    """A registry target, or `local` for the GPU this machine reports (detected now unless given)."""
    if target_id == LOCAL:
        return local_target(detected)
    try:
        return TARGETS[target_id]
    except KeyError:
        raise ConfigError(f"unknown target {target_id!r}; known targets: {', '.join(target_ids())} "
                          "(`qinyu-edge targets` lists them)") from None


def local_target(detected: "DetectedGPU | None" = None) -> Target:
    """The target for the GPU found here: its registry entry when it is a known board or card,
    otherwise a generic entry built from what the GPU reports (no peak rates)."""
    if detected is None:
        from .detect import detect

        detected = detect()
    if detected is None:
        raise ConfigError("no NVIDIA GPU was found on this machine (no NVML device, no Jetson model file); "
                          f"plan for a named target instead: {', '.join(TARGETS)}")
    if detected.target_id is not None:
        return TARGETS[detected.target_id]
    if detected.compute_capability is None or detected.memory_bytes is None:
        raise ConfigError(f"the GPU {detected.name!r} did not report its compute capability and memory; "
                          f"plan for a named target instead: {', '.join(TARGETS)}")
    if detected.unified_memory:
        # MemTotal already excludes the carve-outs; only the OS share remains to reserve.
        reserved = JETSON_OS_BYTES
    else:
        reserved = DISCRETE_RESERVED_BYTES
    software = tuple(s for s in (detected.software,) if s)
    return Target(LOCAL, detected.name, "local", detected.compute_capability, detected.memory_bytes,
                  detected.unified_memory, detected.bandwidth_gbs, None, None, reserved, software,
                  ("generic entry from what the GPU reports: no peak rates; bandwidth "
                   + ("estimated from the memory clock and bus width" if detected.bandwidth_gbs else "unknown"),))


__all__ = [
    "GB", "GiB", "PRECISIONS", "precisions_for", "Target", "TARGETS", "LOCAL", "target_ids", "get_target",
    "local_target", "jetpack_for_l4t", "JETPACK_RELEASES", "JETSON_RESERVED_BYTES", "JETSON_OS_BYTES",
    "DISCRETE_RESERVED_BYTES",
]
