"""Engine sets: one TensorRT plan per component plus `manifest.json`, and the checks a plan must
pass before anything deserializes it.

Nothing here imports tensorrt: the manifest is read, written and checked on any machine, so a
mismatched engine is refused with its reason before TensorRT gets a chance to fail obscurely
("Engine deserialization failed"). A plan is tied to the exact TensorRT build and the GPU's
compute capability (tensorrt-facts.md section 4); the manifest records both, the sha256 of the
ONNX it came from and of the plan itself, so a stale, foreign or tampered plan is named as such.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shlex
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from .bundle_paths import inside
from .errors import QinyuError
from .fileio import atomic_write_text

MANIFEST = "manifest.json"
# Components that run only between replies or one after another in the reply loop, never two at
# once: their TensorRT contexts share one block of execution memory (runtime/trt_session.py), and
# the planner counts the largest of them instead of the sum.
SHARED_SCRATCH_COMPONENTS = ("encoder", "audio_projector", "speaker_projector", "campplus", "xy_decoder")
FORMAT_VERSION = 1

# Serialized-engine header, as trtexec `--getPlanVersionOnly` reads it in NVIDIA's own sample code
# (NVIDIA/TensorRT samples/common/sampleEngines.cpp `printPlanVersion`, identical at the v10.3.0,
# v10.13.3 and v11.1 tags): bytes 0-3 are the uint32 tag 0x74727466, bytes 4-7 the serialization
# version (only 0 is understood there), bytes 24-27 the TensorRT major, minor, patch and build, one
# byte each. Both Jetson (aarch64) and x86 are little-endian. Whether version-compatible plans use
# the same layout is UNVERIFIED.
PLAN_TAG = 0x74727466
PLAN_HEADER_BYTES = 28
_KNOWN_SERIALIZATION_VERSIONS = (0,)


class EngineError(QinyuError):
    """An engine set is missing, stale, foreign or tampered with; the message says how to rebuild."""


# --- versions --------------------------------------------------------------------------------

def parse_trt_version(text: str) -> tuple[int, ...]:
    """"10.3.0.26" -> (10, 3, 0, 26); "10.3" -> (10, 3). Raises ValueError on anything else."""
    parts = text.strip().split(".")
    if not 2 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
        raise ValueError(f"{text!r} is not a TensorRT version (major.minor[.patch[.build]])")
    return tuple(int(p) for p in parts)


def format_version(v: Iterable[int]) -> str:
    return ".".join(str(int(x)) for x in v)


def same_trt_build(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Equal on every part both give: a plan needs the exact major, minor, patch and build, but
    some installs report only three parts (then three are compared)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


# --- plan header -----------------------------------------------------------------------------

class PlanHeader(NamedTuple):
    trt_version: tuple[int, int, int, int] | None
    serialization_version: int | None
    problem: str | None  # why the version could not be read; None when it was


def read_plan_header(data: bytes | memoryview) -> PlanHeader:
    """The TensorRT version a serialized engine was built with, from its first 28 bytes."""
    head = bytes(data[:PLAN_HEADER_BYTES])
    if len(head) < PLAN_HEADER_BYTES:
        return PlanHeader(None, None, f"it is {len(head)} bytes long, shorter than a TensorRT plan header")
    tag, serialization = struct.unpack_from("<II", head, 0)
    if tag != PLAN_TAG:
        return PlanHeader(None, None, f"it does not start with the TensorRT plan tag (0x{tag:08x}, "
                                      f"expected 0x{PLAN_TAG:08x}): not a serialized engine")
    if serialization not in _KNOWN_SERIALIZATION_VERSIONS:
        return PlanHeader(None, serialization, f"its serialization version {serialization} is one this "
                                               "reader does not know, so its TensorRT version cannot be read")
    major, minor, patch, build = head[24:28]
    return PlanHeader((major, minor, patch, build), serialization, None)


# --- manifest entries ------------------------------------------------------------------------

ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max


@dataclass(frozen=True)
class OptimizationProfile:
    """One TensorRT optimization profile: min/opt/max shape of every dynamic input."""

    name: str
    shapes: dict[str, ShapeRange]

    def contains(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        for name, (lo, _, hi) in self.shapes.items():
            s = shapes.get(name)
            if s is None or len(s) != len(lo) or any(not a <= x <= b for a, x, b in zip(lo, s, hi)):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OptimizationProfile":
        return cls(d["name"], {k: tuple(tuple(int(x) for x in s) for s in v) for k, v in d["shapes"].items()})


@dataclass(frozen=True)
class BuilderSettings:
    """What the builder config gets. Flags and levels are TensorRT enum member NAMES: the integer
    values differ between TensorRT versions (STRONGLY_TYPED is 1 in 10.x and 0 in 11.x), so an
    integer is never stored."""

    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag members
    builder_flags: tuple[str, ...]  # BuilderFlag members (never precision flags: networks are strongly typed)
    hardware_compatibility_level: str  # HardwareCompatibilityLevel member
    workspace_bytes: int
    optimization_level: int  # builder_optimization_level 0..5
    timing_cache: str | None  # file in the engine set folder, shared by its components

    @property
    def version_compatible(self) -> bool:
        return "VERSION_COMPATIBLE" in self.builder_flags

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["network_flags"] = list(self.network_flags)
        d["builder_flags"] = list(self.builder_flags)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuilderSettings":
        return cls(tuple(d["network_flags"]), tuple(d["builder_flags"]), d["hardware_compatibility_level"],
                   int(d["workspace_bytes"]), int(d["optimization_level"]), d.get("timing_cache"))


def cc_text(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def parse_cc(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def rebuild_command(bundle: str, target: str, precision: str, out: str | None = None,
                    fallback_bundles: Iterable[str] = ()) -> str:
    cmd = ["qinyu-edge", "build", "--bundle", bundle, "--target", target, "--precision", precision]
    for fb in fallback_bundles:
        cmd += ["--fallback-bundle", fb]
    if out is not None:
        cmd += ["--out", out]
    return " ".join(shlex.quote(c) for c in cmd)


@dataclass(frozen=True)
class EngineManifest:
    """One built plan: where it came from, what it is for, and how it was built."""

    component: str
    onnx_file: str  # relative to `bundle`
    onnx_sha256: str
    plan_file: str  # relative to the engine set folder
    plan_sha256: str
    plan_bytes: int
    trt_version: str  # tensorrt.__version__ of the builder
    gpu_name: str  # CUDA device name of the build GPU
    compute_capability: str  # "8.7"
    precision: str  # what the built ONNX holds (a fallback can make it differ from the request)
    profiles: tuple[OptimizationProfile, ...]
    builder: BuilderSettings
    target: str
    bundle: str  # the bundle folder whose graph was built (a fallback bundle's, when a fallback was built)
    rebuild: str  # the command that builds this entry again
    created: str
    build_plan: dict[str, Any] = field(default_factory=dict)  # the BuildPlan that produced it, for staleness
    notes: tuple[str, ...] = ()
    onnx_data_sha256: str | None = None  # the graph's external weights (`<onnx_file>.data`), if any

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profiles"] = [p.to_dict() for p in self.profiles]
        d["builder"] = self.builder.to_dict()
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineManifest":
        return cls(
            component=d["component"], onnx_file=d["onnx_file"], onnx_sha256=d["onnx_sha256"],
            plan_file=d["plan_file"], plan_sha256=d["plan_sha256"], plan_bytes=int(d["plan_bytes"]),
            trt_version=d["trt_version"], gpu_name=d["gpu_name"], compute_capability=d["compute_capability"],
            precision=d["precision"], profiles=tuple(OptimizationProfile.from_dict(p) for p in d["profiles"]),
            builder=BuilderSettings.from_dict(d["builder"]), target=d["target"], bundle=d["bundle"],
            rebuild=d["rebuild"], created=d["created"], build_plan=d.get("build_plan", {}),
            notes=tuple(d.get("notes", ())), onnx_data_sha256=d.get("onnx_data_sha256"),
        )


# --- checks ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineMismatch:
    component: str
    # plan_missing, plan_sha256, plan_header, plan_version, trt_version, compute_capability, gpu, onnx_sha256,
    # onnx_data_sha256 (the graph's weights)
    check: str
    reason: str
    command: str

    def __str__(self) -> str:
        return f"{self.component}: {self.reason}\n  rebuild it: {self.command}"


def _buffer_sha256(data: bytes | memoryview, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    # Released on exit, so an mmap passed in can be closed right after (even when a check fails).
    with memoryview(data) as view:
        for i in range(0, view.nbytes, chunk):
            h.update(view[i : i + chunk])
    return h.hexdigest()


def _mismatch(entry: EngineManifest, check: str, reason: str) -> EngineMismatch:
    return EngineMismatch(entry.component, check, reason, entry.rebuild)


def check_plan_file(entry: EngineManifest, plan_bytes: bytes | memoryview | None,
                    onnx_sha: str | None = None, weights_sha: str | None = None) -> EngineMismatch | None:
    """The plan file is the one the manifest describes (size, sha256, header version) and, when
    `onnx_sha` / `weights_sha` (`bundle_weights_sha256`) are given, was built from that ONNX and those
    weights: a graph file says where its weights lie, not what they are. Needs no TensorRT and no GPU."""
    plan = entry.plan_file
    if plan_bytes is None:
        return _mismatch(entry, "plan_missing", f"the plan {plan} listed in the manifest does not exist")
    with memoryview(plan_bytes) as view:
        size = view.nbytes
    if size != entry.plan_bytes:
        return _mismatch(entry, "plan_sha256", f"the plan {plan} is {size} bytes, the manifest says "
                                               f"{entry.plan_bytes}: it was changed or copied incompletely")
    sha = _buffer_sha256(plan_bytes)
    if sha != entry.plan_sha256:
        return _mismatch(entry, "plan_sha256", f"the plan {plan} has sha256 {sha[:16]}..., the manifest says "
                                               f"{entry.plan_sha256[:16]}...: it was changed after it was built")
    header = read_plan_header(plan_bytes)
    if header.trt_version is None:
        return _mismatch(entry, "plan_header", f"the plan {plan} cannot be used: {header.problem}")
    if not same_trt_build(header.trt_version, parse_trt_version(entry.trt_version)):
        return _mismatch(entry, "plan_version", f"the plan {plan} says TensorRT {format_version(header.trt_version)} "
                                                f"in its header but the manifest says {entry.trt_version}: the plan "
                                                "is not the one this manifest describes")
    if onnx_sha is not None and onnx_sha != entry.onnx_sha256:
        return _mismatch(entry, "onnx_sha256", f"the bundle's {entry.onnx_file} changed since the plan was built "
                                               f"(sha256 {onnx_sha[:16]}..., the plan was built from "
                                               f"{entry.onnx_sha256[:16]}...)")
    if weights_sha is not None and entry.onnx_data_sha256 is not None and weights_sha != entry.onnx_data_sha256:
        return _mismatch(entry, "onnx_data_sha256", f"the weights of the bundle's {entry.onnx_file} changed since the "
                                                    f"plan was built (sha256 {weights_sha[:16]}..., the plan was built "
                                                    f"from {entry.onnx_data_sha256[:16]}...)")
    return None


def check_machine(entry: EngineManifest, runtime_trt_version: str | None, gpu: str | None,
                  cc: tuple[int, int] | None) -> EngineMismatch | None:
    """The plan runs with this TensorRT on this GPU. Arguments given as None are not checked."""
    built = parse_trt_version(entry.trt_version)
    if runtime_trt_version is not None:
        here = parse_trt_version(runtime_trt_version)
        if entry.builder.version_compatible:
            # Version-compatible plans run on the same or a newer TensorRT of the same major only.
            n = min(len(here), len(built))
            if here[0] != built[0] or here[:n] < built[:n]:
                return _mismatch(entry, "trt_version", f"the plan was built version-compatible with TensorRT "
                                                       f"{entry.trt_version}; it runs on {built[0]}.x from that "
                                                       f"version on, not on {runtime_trt_version}")
        elif not same_trt_build(here, built):
            return _mismatch(entry, "trt_version", f"the plan was built with TensorRT {entry.trt_version} but this "
                                                   f"machine has {runtime_trt_version}; a plan runs only on the exact "
                                                   "TensorRT build that made it")
    level = entry.builder.hardware_compatibility_level
    if cc is not None:
        if level == "AMPERE_PLUS":
            if tuple(cc) < (8, 0):
                return _mismatch(entry, "compute_capability", f"the plan was built Ampere-compatible; this GPU has "
                                                              f"compute capability {cc_text(cc)}, older than Ampere (8.0)")
        elif tuple(cc) != parse_cc(entry.compute_capability):
            return _mismatch(entry, "compute_capability", f"the plan was built for compute capability "
                                                          f"{entry.compute_capability} ({entry.gpu_name}) but this GPU "
                                                          f"has {cc_text(cc)}")
    if gpu is not None and level == "NONE" and gpu != entry.gpu_name:
        return _mismatch(entry, "gpu", f"the plan was built on {entry.gpu_name!r} but this GPU is {gpu!r}; plans are "
                                       "tuned for the GPU that built them")
    return None


def check_engine(entry: EngineManifest, runtime_trt_version: str | None, gpu: str | None,
                 cc: tuple[int, int] | None, onnx_sha: str | None, plan_bytes: bytes | memoryview | None,
                 weights_sha: str | None = None) -> EngineMismatch | None:
    """None when the plan may be deserialized here, else the first thing that does not match:
    the plan file (`check_plan_file`), then this machine (`check_machine`). Arguments given as None
    are not checked (no TensorRT installed, GPU unknown, bundle not at hand); `plan_bytes` may be
    any buffer (bytes, memoryview, mmap) and None means the plan file does not exist."""
    return (check_plan_file(entry, plan_bytes, onnx_sha, weights_sha)
            or check_machine(entry, runtime_trt_version, gpu, cc))


@contextlib.contextmanager
def open_plan(path: str | os.PathLike) -> Iterator[mmap.mmap | bytes | None]:
    """A plan file mapped read-only (hashed and deserialized without a second copy in memory,
    which matters for multi-GB plans on 8 GB boards); None when it does not exist."""
    path = Path(path)
    if not path.is_file():
        yield None
        return
    if path.stat().st_size == 0:  # mmap cannot map an empty file
        yield b""
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        yield data


# --- the engine set --------------------------------------------------------------------------

@dataclass
class EngineSet:
    """A folder of plans for one target and its manifest.json."""

    root: Path
    target: str
    bundle: str
    engines: dict[str, EngineManifest] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = {"format_version": self.format_version, "target": self.target, "bundle": self.bundle,
             "engines": {k: v.to_dict() for k, v in self.engines.items()}}
        return json.dumps(d, indent=2, ensure_ascii=False)

    def write(self) -> Path:
        """Atomic: a reader sees the old manifest or the new one, never half of one."""
        return atomic_write_text(self.root / MANIFEST, self.to_json())

    def plan_path(self, entry: EngineManifest) -> Path:
        """The entry's plan file, confined to the engine set folder."""
        return inside(self.root, entry.plan_file, f"a plan file named in {MANIFEST}")

    def entry_for_plan(self, plan_file: str) -> EngineManifest:
        for entry in self.engines.values():
            if entry.plan_file == plan_file:
                return entry
        raise EngineError(f"{self.root / MANIFEST} lists no plan named {plan_file!r} (it lists "
                          f"{', '.join(e.plan_file for e in self.engines.values()) or 'none'}); a plan without "
                          "its manifest entry is refused. Rebuild the engine set with `qinyu-edge build`.")

    @classmethod
    def load(cls, root: str | os.PathLike) -> "EngineSet":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise EngineError(f"{root} is not an engine set (no {MANIFEST}). Build one with "
                              "`qinyu-edge build --bundle BUNDLE --target TARGET`.")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise EngineError(f"{path} is not valid JSON ({e}). Rebuild the engine set with `qinyu-edge build --force`.") from e
        version = d.get("format_version") if isinstance(d, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise EngineError(f"{path}: format_version is {version!r}, not an integer; the manifest is damaged. "
                              "Rebuild the engine set with `qinyu-edge build --force`.")
        if version > FORMAT_VERSION:
            raise EngineError(f"{path} has engine-set format {version!r}, newer than this qinyu-edge reads "
                              f"({FORMAT_VERSION}). Upgrade qinyu-edge or rebuild the engines with this one.")
        try:
            engine_set = cls(root, d["target"], d["bundle"],
                             {k: EngineManifest.from_dict(v) for k, v in d["engines"].items()}, version)
            for entry in engine_set.engines.values():
                engine_set.plan_path(entry)
            return engine_set
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EngineError(f"{path} lacks or mangles the field {e}. Rebuild the engine set with "
                              "`qinyu-edge build --force`.") from e


__all__ = [
    "MANIFEST", "FORMAT_VERSION", "PLAN_TAG", "PLAN_HEADER_BYTES", "EngineError", "parse_trt_version",
    "format_version", "same_trt_build", "PlanHeader", "read_plan_header", "ShapeRange", "OptimizationProfile",
    "BuilderSettings", "cc_text", "parse_cc", "rebuild_command", "EngineManifest", "EngineMismatch",
    "check_plan_file", "check_machine", "check_engine", "open_plan", "EngineSet",
]
