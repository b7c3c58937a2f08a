"""Build plans: for a bundle and a target, exactly what the TensorRT builder gets per component.

Pure data, no tensorrt: which ONNX (the precision lives in the ONNX, so one strongly typed build
path serves TensorRT 10.3 through 11.x), the optimization profiles from the bundle's shape ranges,
workspace, builder optimization level, timing cache and compatibility choices. A plan is written as
JSON beside the engines, so `qinyu-edge build --plan-only` shows what a device would build, and a
manifest entry whose plan differs from today's is stale.

A bundle holds one graph per component; a quantized bundle (`quantize_bundle`) records each
component's precision in bundle.json's origin and the fp32 bundle it came from. Where the target's
TensorRT is known to reject a component's Q/DQ graph, a wider graph of the same component is
built instead: from a fallback bundle the user names (an fp16 one, say) or the fp32 source bundle.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qinyu_edge.bundle import Bundle, ComponentSpec, bundle_weights_sha256, load_bundle
from qinyu_edge.config import PREFILL_CHUNK
from qinyu_edge.device.targets import GiB, PRECISIONS, Target
from qinyu_edge.engine_manifest import (
    BuilderSettings, OptimizationProfile, ShapeRange, format_version, parse_trt_version,
)
from qinyu_edge.errors import BundleError, ConfigError
from qinyu_edge.fileio import atomic_write_text

log = logging.getLogger(__name__)

PLAN_FILE = "build-plan.json"
PLAN_FORMAT = 1

# The TensorRT versions our targets run (tensorrt-facts.md section 1): JetPack 6 (10.3), JetPack 7.0
# on Thor (10.13), JetPack 7.2 (10.16), TensorRT 11.4 (x86 wheels, AGX Orin and Thor SBSA).
# tests/engines/test_trt_symbols.py checks every trt name the builder and session use against each.
SUPPORTED_TRT: tuple[tuple[int, int], ...] = ((10, 3), (10, 13), (10, 16), (11, 4))
# Newest TensorRT on PyPI when no target lists a version (tensorrt-facts.md section 1, x86).
PYPI_TRT = "11.4"

# Enum members the builder looks up BY NAME from a plan; nothing else is accepted from a plan file.
NETWORK_FLAGS = ("STRONGLY_TYPED",)
BUILDER_FLAGS = ("VERSION_COMPATIBLE",)
HARDWARE_LEVELS = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}

# trt symbols that exist only from some TensorRT version on (design/tensorrt-python-api-symbols.json).
# Code that may use one asks `trt_has` first; test_trt_symbols checks this table against the JSON.
TRT_SINCE: dict[str, tuple[int, int]] = {
    "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY": (10, 13),
}


def trt_has(symbol: str, trt_version: tuple[int, ...]) -> bool:
    since = TRT_SINCE.get(symbol)
    return since is None or tuple(trt_version[:2]) >= since


@dataclass(frozen=True)
class KnownRejection:
    """A Q/DQ precision some TensorRT version is reported to refuse on some GPUs."""

    compute_capability: tuple[int, int]
    precision: str
    trt: tuple[int, int] | None  # the major.minor it is reported on; None: every version we plan for
    reason: str


# Reported failures: the plan builds a wider graph instead. tensorrt-facts.md section 7.
KNOWN_REJECTIONS: tuple[KnownRejection, ...] = (
    KnownRejection((8, 7), "int8", (10, 16),
                   "INT8 Q/DQ graphs fail to build on Orin with TensorRT 10.16 (Myelin: 'Could not infer output "
                   "types for operation: dequantize', NVIDIA/TensorRT#4832)"),
)
# Where the same failure may occur but no report pins it to this version, the Q/DQ graph is built
# and a wider graph is kept as the plan's fallback for a failed build.
SUSPECT_QDQ: dict[tuple[int, int], tuple[str, ...]] = {
    (8, 7): ("int8",),  # NVIDIA/TensorRT#4832 was seen on 10.16.2; other versions on Orin are UNVERIFIED
}

# The backbone serves two shapes of work: prefill (the prompt, in chunks of at most PREFILL_CHUNK
# positions, each over the cache the chunks before it wrote) and decode (one position over a cache
# of at least one position). Separate profiles let TensorRT tune each.
SPLIT_PROFILES = {"backbone": ("seq", "past")}


@dataclass(frozen=True)
class Fallback:
    bundle: str  # absolute folder of the bundle holding the fallback graph
    onnx_file: str
    onnx_sha256: str
    precision: str
    reason: str
    onnx_data_sha256: str | None = None


@dataclass(frozen=True)
class BuildPlan:
    """Everything the builder needs for one component; JSON round-trips exactly."""

    component: str
    bundle: str  # absolute bundle folder
    onnx_file: str  # relative to the bundle
    onnx_sha256: str
    precision: str  # what that ONNX holds
    requested_precision: str
    target: str
    target_name: str
    compute_capability: str
    trt_version: str
    profiles: tuple[OptimizationProfile, ...]
    settings: BuilderSettings
    plan_file: str  # relative to the engine set folder
    # Weights of a graph past protobuf's limit live in `<onnx_file>.data`: they are part of the graph.
    onnx_data_sha256: str | None = None
    fallback: Fallback | None = None
    notes: tuple[str, ...] = ()
    format_version: int = PLAN_FORMAT

    def __post_init__(self) -> None:
        s = self.settings
        bad = [n for n in s.network_flags if n not in NETWORK_FLAGS]
        bad += [n for n in s.builder_flags if n not in BUILDER_FLAGS]
        if s.hardware_compatibility_level not in HARDWARE_LEVELS.values():
            bad.append(s.hardware_compatibility_level)
        if bad:
            raise ConfigError(f"build plan for {self.component} names TensorRT settings this builder does not use: "
                              f"{', '.join(map(str, bad))}. Make the plan again with `qinyu-edge build --plan-only`.")
        for p in (self.precision, self.requested_precision):
            if p not in PRECISIONS:
                raise ConfigError(f"build plan for {self.component}: unknown precision {p!r} ({', '.join(PRECISIONS)})")
        if not 0 <= s.optimization_level <= 5:
            raise ConfigError(f"builder optimization level must be 0..5, got {s.optimization_level}")
        if s.workspace_bytes <= 0:
            raise ConfigError(f"workspace must be positive, got {s.workspace_bytes} bytes")

    @property
    def trt(self) -> tuple[int, ...]:
        return parse_trt_version(self.trt_version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "component": self.component, "bundle": self.bundle,
            "onnx_file": self.onnx_file, "onnx_sha256": self.onnx_sha256, "precision": self.precision,
            "requested_precision": self.requested_precision, "target": self.target, "target_name": self.target_name,
            "compute_capability": self.compute_capability, "trt_version": self.trt_version,
            "profiles": [p.to_dict() for p in self.profiles], "settings": self.settings.to_dict(),
            "plan_file": self.plan_file, "onnx_data_sha256": self.onnx_data_sha256,
            "fallback": None if self.fallback is None else vars(self.fallback).copy(),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildPlan":
        version = d.get("format_version")
        if version != PLAN_FORMAT:
            raise ConfigError(f"build plan format {version!r} is not {PLAN_FORMAT}; make the plan again "
                              "with `qinyu-edge build --plan-only`")
        try:
            fb = d.get("fallback")
            return cls(
                component=d["component"], bundle=d["bundle"], onnx_file=d["onnx_file"], onnx_sha256=d["onnx_sha256"],
                precision=d["precision"], requested_precision=d["requested_precision"], target=d["target"],
                target_name=d["target_name"], compute_capability=d["compute_capability"],
                trt_version=d["trt_version"],
                profiles=tuple(OptimizationProfile.from_dict(p) for p in d["profiles"]),
                settings=BuilderSettings.from_dict(d["settings"]), plan_file=d["plan_file"],
                onnx_data_sha256=d.get("onnx_data_sha256"), fallback=None if fb is None else Fallback(**fb), notes=tuple(d.get("notes", ())),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"build plan lacks or mangles the field {e}; make it again with "
                              "`qinyu-edge build --plan-only`") from e


@dataclass(frozen=True)
class BuildOptions:
    precision: str | None = None  # None: whatever the bundle holds; else it must hold that
    trt_version: str | None = None  # None: the target's usual TensorRT
    hardware_compatibility: str = "none"  # none | ampere_plus | same_compute_capability
    version_compatible: bool = False
    workspace_bytes: int | None = None
    optimization_level: int | None = None
    fallback_bundles: tuple[Bundle, ...] = ()  # wider graphs for components TensorRT rejects here


# --- choices ---------------------------------------------------------------------------------

def usual_trt_versions(target: Target) -> tuple[str, ...]:
    """TensorRT versions the target's software stacks name, first = the usual one."""
    found = re.findall(r"TensorRT (\d+\.\d+(?:\.\d+)*)", " ".join(target.software))
    return tuple(dict.fromkeys(found)) or (PYPI_TRT,)


def default_workspace(target: Target) -> int:
    """TensorRT's default workspace is all device memory, which on a shared-memory Jetson starves
    the build (tensorrt-facts.md section 7): cap it at an eighth of the usable memory, 256 MiB..4 GiB."""
    usable = target.memory_bytes - target.system_reserved_bytes
    mib = 2**20
    return max(256 * mib, min(4 * GiB, usable // 8)) // mib * mib


def default_optimization_level(target: Target) -> int:
    # Level 3 is TensorRT's default; 8 GB boards get killed for memory in long builds, and a lower
    # level tries fewer tactics (tensorrt-facts.md section 7).
    return 2 if target.unified_memory and target.memory_bytes <= 8 * GiB else 3


def component_precision(bundle: Bundle, component: str) -> str:
    """The precision of a component's graph as `quantize_bundle` records it; an export is fp32."""
    return bundle.origin.get("precision", {}).get(component, "fp32")


def bundle_precision(bundle: Bundle) -> str:
    """The narrowest precision any component holds (int4 for an int4-awq bundle)."""
    return max((component_precision(bundle, c) for c in bundle.components), key=PRECISIONS.index, default="fp32")


def source_bundle(bundle: Bundle) -> Bundle | None:
    """The fp32 bundle a quantized bundle was made from, when it is still where it was and still
    holds the graphs it held then."""
    source = bundle.origin.get("quantization", {}).get("source", {})
    path = source.get("bundle")
    if not path or not (Path(path) / "bundle.json").is_file():
        return None
    try:
        src = load_bundle(path, verify=False)
    except BundleError as e:
        log.info("the source bundle %s cannot serve as a fallback: %s", path, e)
        return None
    recorded = source.get("files", {})
    same = all(src.files.get(n) is not None and src.files[n].sha256 == f.get("sha256") for n, f in recorded.items())
    return src if same else None


def _rejection(target: Target, precision: str, trt: tuple[int, ...]) -> KnownRejection | None:
    for r in KNOWN_REJECTIONS:
        if r.compute_capability == target.compute_capability and r.precision == precision and (
                r.trt is None or r.trt == tuple(trt[:2])):
            return r
    return None


def _wider(bundles: list[Bundle], component: str, precision: str) -> Bundle | None:
    """A bundle holding a wider graph of `component` than `precision`: fp16 first (it keeps most
    of the speed), then fp32."""
    for want in ("fp16", "fp32"):
        if PRECISIONS.index(want) >= PRECISIONS.index(precision):
            continue
        for b in bundles:
            if component in b.components and component_precision(b, component) == want:
                return b
    return None


def _choose_onnx(bundle: Bundle, others: list[Bundle], component: str, target: Target, trt: tuple[int, ...]
                 ) -> tuple[Bundle, Fallback | None, list[str]]:
    """(bundle whose graph is built, fallback for a failed build, notes)."""
    precision = component_precision(bundle, component)
    rejected = _rejection(target, precision, trt)
    if rejected is not None:
        wider = _wider(others, component, precision)
        if wider is None:
            raise ConfigError(
                f"{rejected.reason}, and no wider graph of {component} is at hand: pass --fallback-bundle with an "
                f"fp16 bundle (`qinyu-edge quantize --recipe fp16`) or keep the fp32 bundle this one was made from "
                "where it was"
            )
        return wider, None, [f"{precision}: {rejected.reason}; building the {component_precision(wider, component)} "
                             f"graph of {wider.root} instead"]
    fallback = None
    if precision in SUSPECT_QDQ.get(target.compute_capability, ()):
        wider = _wider(others, component, precision)
        if wider is not None:
            f = wider.components[component].file
            fallback = Fallback(str(Path(wider.root).resolve()), f, wider.files[f].sha256,
                                component_precision(wider, component),
                                f"{precision} Q/DQ builds are reported to fail on {target.name} "
                                "(NVIDIA/TensorRT#4832; UNVERIFIED for this TensorRT version)",
                                bundle_weights_sha256(wider, f))
    return bundle, fallback, []


def _range(spec: ComponentSpec, axis: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = spec.shape_ranges[axis]
    except KeyError:
        raise ConfigError(f"component {spec.name} has the dynamic axis {axis!r} but the bundle gives no shape range "
                          "for it; re-export the bundle with this version of qinyu-edge") from None
    if not 0 <= lo <= opt <= hi:
        raise ConfigError(f"component {spec.name}: shape range {axis}={[lo, opt, hi]} is not min <= opt <= max")
    return int(lo), int(opt), int(hi)


def _input_ranges(spec: ComponentSpec, axes: dict[str, tuple[int, int, int]]) -> dict[str, ShapeRange]:
    out: dict[str, ShapeRange] = {}
    for t in spec.inputs:
        if not any(isinstance(d, str) for d in t.shape):
            continue
        dims = [axes[d] if isinstance(d, str) else (int(d),) * 3 for d in t.shape]
        out[t.name] = tuple(tuple(d[i] for d in dims) for i in range(3))  # type: ignore[assignment]
    return out


def profiles_for(spec: ComponentSpec) -> tuple[OptimizationProfile, ...]:
    """Optimization profiles from the bundle's shape ranges; none for a fully static graph."""
    names = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    if not names:
        return ()
    axes = {n: _range(spec, n) for n in sorted(names)}
    split = SPLIT_PROFILES.get(spec.name)
    if split is None or not set(split) <= names:
        return (OptimizationProfile("default", _input_ranges(spec, axes)),)
    seq, past = split
    p_lo, p_opt, p_hi = axes[past]
    if p_hi <= p_lo:
        raise ConfigError(f"component {spec.name}: the {past} range {axes[past]} leaves no room for decoding")
    # Prefill is tuned for the first chunk (an empty cache: the bundle's masked null rows) and takes
    # later chunks over any past; no call is longer than one chunk.
    s_lo, s_opt, s_hi = axes[seq]
    chunk = min(s_hi, PREFILL_CHUNK)
    prefill = {**axes, seq: (s_lo, min(s_opt, chunk), chunk), past: (p_lo, p_lo, p_hi)}
    decode = {**axes, seq: (1, 1, 1), past: (p_lo + 1, min(max(p_opt, p_lo + 1), p_hi), p_hi)}
    return (OptimizationProfile("prefill", _input_ranges(spec, prefill)),
            OptimizationProfile("decode", _input_ranges(spec, decode)))


def _settings(target: Target, trt: tuple[int, ...], options: BuildOptions) -> tuple[BuilderSettings, list[str]]:
    notes: list[str] = []
    level = HARDWARE_LEVELS.get(options.hardware_compatibility)
    if level is None:
        raise ConfigError(f"unknown hardware compatibility {options.hardware_compatibility!r}; "
                          f"choose {', '.join(HARDWARE_LEVELS)}")
    if target.family == "jetson" and (level != "NONE" or options.version_compatible):
        raise ConfigError(f"{target.name}: hardware- and version-compatible plans are not supported on JetPack "
                          "(tensorrt-facts.md section 4); build on each device without those options")
    if level != "NONE" and not trt_has(f"HardwareCompatibilityLevel.{level}", trt):
        raise ConfigError(f"TensorRT {format_version(trt)} has no {level} hardware compatibility "
                          f"(it arrived in {format_version(TRT_SINCE[f'HardwareCompatibilityLevel.{level}'])})")
    if level == "AMPERE_PLUS" and target.compute_capability < (8, 0):
        raise ConfigError(f"{target.name} (SM {target.sm}) is older than Ampere: AMPERE_PLUS plans cannot be built there")
    if level != "NONE":
        notes.append(f"{level} plans drop cuDNN/cuBLAS tactics and may run slower (tensorrt-facts.md section 2)")
    # TensorRT 11 networks are always strongly typed; STRONGLY_TYPED is ignored there (section 1).
    network_flags = ("STRONGLY_TYPED",) if trt[0] == 10 else ()
    workspace = options.workspace_bytes or default_workspace(target)
    opt_level = default_optimization_level(target) if options.optimization_level is None else options.optimization_level
    return BuilderSettings(
        network_flags=network_flags,
        builder_flags=("VERSION_COMPATIBLE",) if options.version_compatible else (),
        hardware_compatibility_level=level, workspace_bytes=int(workspace), optimization_level=int(opt_level),
        timing_cache=f"timing-trt{format_version(trt)}.cache",
    ), notes


def resolve_trt_version(target: Target, trt_version: str | None) -> tuple[str, tuple[int, ...], list[str]]:
    text = trt_version or usual_trt_versions(target)[0]
    try:
        v = parse_trt_version(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if v[0] < 10:
        raise ConfigError(f"TensorRT {text} is too old: qinyu-edge builds with TensorRT 10.3 or newer "
                          "(on Jetson Orin that is JetPack 6.1 or later)")
    notes = []
    if tuple(v[:2]) not in SUPPORTED_TRT:
        notes.append(f"TensorRT {text} is not one of the versions this builder is checked against "
                     f"({', '.join(format_version(s) for s in SUPPORTED_TRT)})")
    return text, v, notes


def make_build_plans(bundle: Bundle, target: Target, options: BuildOptions = BuildOptions(),
                     components: tuple[str, ...] | None = None) -> list[BuildPlan]:
    """One plan per component (all by default). Raises ConfigError for a precision the target
    lacks or a bundle that does not hold the precision asked for."""
    names = components or tuple(bundle.components)
    unknown = [n for n in names if n not in bundle.components]
    if unknown:
        raise ConfigError(f"the bundle has no component {', '.join(unknown)} (it has {', '.join(bundle.components)})")
    held = bundle_precision(bundle)
    precision = options.precision or held
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if not target.supports(precision):
        raise ConfigError(f"{target.name} (SM {target.sm}) has no {precision} in TensorRT; it supports "
                          f"{', '.join(target.precisions)}")
    root = str(Path(bundle.root).resolve())
    if precision != held:
        recipe = "int4-awq" if precision == "int4" else precision
        raise ConfigError(
            f"the bundle {root} holds {held} graphs, not {precision}: the precision lives in the ONNX. Make a "
            f"{precision} bundle from the fp32 export (`qinyu-edge quantize --bundle FP32_BUNDLE --recipe {recipe} "
            "--out DIR`) and build that bundle."
        )
    lacking = {n: component_precision(bundle, n) for n in names if not target.supports(component_precision(bundle, n))}
    if lacking:
        raise ConfigError(f"{target.name} (SM {target.sm}) cannot build " + ", ".join(f"{n} ({p})" for n, p in lacking.items())
                          + f"; it supports {', '.join(target.precisions)}")
    trt_text, trt, version_notes = resolve_trt_version(target, options.trt_version)
    settings, setting_notes = _settings(target, trt, options)
    source = source_bundle(bundle)
    others = [*options.fallback_bundles, *([source] if source is not None else [])]
    plans = []
    for name in names:
        spec = bundle.components[name]
        chosen, fallback, notes = _choose_onnx(bundle, others, name, target, trt)
        onnx = chosen.components[name].file
        plans.append(BuildPlan(
            component=name, bundle=str(Path(chosen.root).resolve()), onnx_file=onnx,
            onnx_sha256=chosen.files[onnx].sha256, precision=component_precision(chosen, name),
            requested_precision=precision, target=target.id, target_name=target.name,
            compute_capability=target.sm, trt_version=trt_text, profiles=profiles_for(spec), settings=settings,
            plan_file=f"{name}.plan", onnx_data_sha256=bundle_weights_sha256(chosen, onnx), fallback=fallback, notes=tuple(version_notes + setting_notes + notes),
        ))
    return plans


def default_engine_dir(bundle_root: str | os.PathLike, target_id: str) -> Path:
    return Path(bundle_root) / "engines" / target_id


def write_plans(path: str | os.PathLike, plans: list[BuildPlan]) -> Path:
    return atomic_write_text(path, json.dumps({"format_version": PLAN_FORMAT,
                                               "plans": [p.to_dict() for p in plans]}, indent=2))


def read_plans(path: str | os.PathLike) -> list[BuildPlan]:
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the build plan {path}: {e}") from e
    return [BuildPlan.from_dict(p) for p in d.get("plans", [])]


__all__ = [
    "PLAN_FILE", "SUPPORTED_TRT", "NETWORK_FLAGS", "BUILDER_FLAGS", "HARDWARE_LEVELS", "TRT_SINCE", "trt_has",
    "KnownRejection", "KNOWN_REJECTIONS", "SUSPECT_QDQ", "Fallback", "BuildPlan", "BuildOptions",
    "usual_trt_versions", "default_workspace", "default_optimization_level", "component_precision",
    "bundle_precision", "source_bundle", "profiles_for",
    "resolve_trt_version", "make_build_plans", "default_engine_dir", "write_plans", "read_plans",
]
