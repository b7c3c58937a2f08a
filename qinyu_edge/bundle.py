"""The model bundle: a folder with one ONNX file per component and `bundle.json` describing it.

Read on the device without torch. `load_bundle` checks the format version and, unless told not to,
the sha256 of every file, so a tampered or half-copied bundle is refused before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .bundle_paths import inside
from .config import ModelConfig
from .errors import BundleError
from .fileio import atomic_write_text, sha256_file
from .tokens import TokenLayout

# 6: the host table is the embedding graph's side file, a .npy whose data the graph points into
# (5 kept a second copy in `embedding_table.npy`; both read the same). 5: a `decode` component
# (backbone + heads_greedy fused; engines/decode_graphs.py) and an optional `host_embedding` table
# (4 reads the same otherwise). 4: optional `ort_variants` (3 reads the same otherwise). 3: the
# backbone takes `past_length` and masks cache rows past it (2: per-layer caches with a leading
# null row, holding exactly the past; 1: joint [P, L, ...] caches).
FORMAT_VERSION = 6
OLDEST_READABLE = 3
MANIFEST = "bundle.json"
DECODE = "decode"  # the component that fuses backbone and heads_greedy (engines/decode_graphs.py)
HOST_FILE = "host.safetensors"
SPEAKERS_FILE = "speakers.safetensors"  # optional: a bundle may have no named voices
TOKENIZER_FILE = "tokenizer.json"
# What the runtime opens eagerly; heads_logits is optional (only sampling needs it).
REQUIRED_COMPONENTS = ("encoder", "audio_projector", "speaker_projector", "embedding", "backbone",
                       "heads_greedy", "xy_decoder", "campplus")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, int64
    shape: tuple[int | str, ...]  # str = a named dynamic axis


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Named dynamic axes -> [min, opt, max], the ranges TensorRT optimization profiles are built from.
    shape_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    description: str = ""
    # ONNX Runtime graph optimizers that must stay off for this graph (a known ORT bug workaround).
    ort_disabled_optimizers: tuple[str, ...] = ()
    # The side files its tensors live in: its own `<file>.data`, or other graphs' (the fused decode
    # graph reads the backbone's and the heads'). Empty in bundles written before it was recorded:
    # then its own `.data`, if the bundle lists one.
    data_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Bundle:
    root: Path
    format_version: int
    qinyu_edge_version: str
    config: ModelConfig
    layout: TokenLayout
    components: dict[str, ComponentSpec]
    files: dict[str, FileEntry]
    origin: dict[str, Any]
    opset: int
    parity: dict[str, Any] = field(default_factory=dict)
    # Component -> the same component as a graph of ONNX Runtime's fused CPU operators (com.microsoft
    # domain, same weights; see export/ort_backbone.py), which the ort backend runs on the CPU provider.
    ort_variants: dict[str, ComponentSpec] = field(default_factory=dict)
    # The embedding table as a .npy the runtime memory-maps and gathers rows from on the host (no
    # embedding graph per step); None where the bundle has none (older, or a quantized table).
    host_embedding: str | None = None

    def file(self, name: str) -> Path:
        """A file of the bundle by its manifest name, confined to the bundle folder."""
        return inside(self.root, name, f"a file named in {MANIFEST}")

    def path(self, component: str) -> Path:
        try:
            return self.file(self.components[component].file)
        except KeyError:
            raise BundleError(
                f"bundle {self.root} has no component {component!r} (it has {', '.join(self.components)}). "
                "Re-export it with this version of qinyu-edge."
            ) from None

    def to_json(self) -> str:
        d = {
            "format_version": self.format_version,
            "qinyu_edge_version": self.qinyu_edge_version,
            "config": self.config.to_dict(),
            "token_layout": self.layout.to_dict(),
            "components": {k: asdict(v) for k, v in self.components.items()},
            "files": {k: asdict(v) for k, v in self.files.items()},
            "origin": self.origin,
            "opset": self.opset,
            "parity": self.parity,
            "ort_variants": {k: asdict(v) for k, v in self.ort_variants.items()},
            "host_embedding": self.host_embedding,
        }
        return json.dumps(d, indent=2, ensure_ascii=False)


def _component(d: dict[str, Any]) -> ComponentSpec:
    def specs(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in items)

    return ComponentSpec(
        name=d["name"], file=d["file"], inputs=specs(d["inputs"]), outputs=specs(d["outputs"]),
        shape_ranges={k: tuple(v) for k, v in d.get("shape_ranges", {}).items()},
        description=d.get("description", ""),
        ort_disabled_optimizers=tuple(d.get("ort_disabled_optimizers", ())),
        data_files=tuple(d.get("data_files", ())),
    )


def file_entries(root: Path, names: list[str]) -> dict[str, FileEntry]:
    paths = {n: inside(root, n, "a bundle file") for n in sorted(names)}
    return {n: FileEntry(sha256_file(p), p.stat().st_size) for n, p in paths.items()}


def used_files(bundle: Bundle) -> list[str]:
    """Every file the runtime opens: each component's ONNX and its external-data side file, the ONNX
    Runtime variants, the tokenizer, the host tensors, the host embedding table and the voices. All
    must be listed in `files`."""
    # (Missing host or tokenizer files are the runtime's to report: tools like lint do not need them.)
    names = [n for n in (HOST_FILE, TOKENIZER_FILE, SPEAKERS_FILE) if bundle.file(n).exists()]
    if bundle.host_embedding is not None:
        names.append(bundle.host_embedding)
    for spec in [*bundle.components.values(), *bundle.ort_variants.values()]:
        names.append(spec.file)
        if bundle.file(spec.file + ".data").exists():
            names.append(spec.file + ".data")
        names += [f for f in spec.data_files if f not in names]
    return names


def weight_files(bundle: Bundle, onnx_file: str) -> list[str]:
    """The side files the graph `onnx_file` reads its tensors from."""
    spec = next((c for c in [*bundle.components.values(), *bundle.ort_variants.values()] if c.file == onnx_file), None)
    if spec is not None and spec.data_files:
        return list(spec.data_files)
    return [f"{onnx_file}.data"] if f"{onnx_file}.data" in bundle.files else []


def weights_sha256(named: list[tuple[str, str]]) -> str | None:
    """One digest for a graph's side files, given (name, sha256) of each: the file's own sha256 when
    there is one file (what engine manifests recorded before graphs shared files), else the sha256
    of the names and digests, so a change to any of them changes it."""
    if len(named) <= 1:
        return named[0][1] if named else None
    return hashlib.sha256("".join(f"{n} {h}\n" for n, h in named).encode()).hexdigest()


def bundle_weights_sha256(bundle: Bundle, onnx_file: str) -> str | None:
    """`weights_sha256` of the graph's side files, from the digests the bundle's manifest lists."""
    return weights_sha256([(f, bundle.files[f].sha256) for f in weight_files(bundle, onnx_file) if f in bundle.files])


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_names(bundle: Bundle) -> None:
    """Refuse a manifest naming anything outside the folder, or a component that is not ONNX."""
    for name in [*bundle.files, *([bundle.host_embedding] if bundle.host_embedding is not None else [])]:
        bundle.file(name)
    for name in [*bundle.components, *bundle.ort_variants]:
        # Component names become file names elsewhere (NAME.plan, calibration folders).
        if not _PLAIN_NAME.fullmatch(name) or set(name) == {"."}:
            raise BundleError(f"{bundle.root / MANIFEST}: component name {name!r} is not a plain name (letters, "
                              "digits, `_`, `-`, `.`); the bundle is damaged or hostile. Export it again.")
    for spec in [*bundle.components.values(), *bundle.ort_variants.values()]:
        bundle.file(spec.file)
        for name in spec.data_files:
            bundle.file(name)
        if not spec.file.endswith(".onnx"):
            raise BundleError(f"{bundle.root / MANIFEST}: component {spec.name} is the file {spec.file!r}, "
                              "not an .onnx graph; the bundle is damaged. Export it again.")


def check_runnable(bundle: Bundle) -> None:
    """The runtime needs every component of REQUIRED_COMPONENTS (tools such as lint take any subset)."""
    missing = [c for c in REQUIRED_COMPONENTS if c not in bundle.components]
    if missing:
        raise BundleError(f"{bundle.root / MANIFEST} has no component {', '.join(missing)} (the runtime needs "
                          f"{', '.join(REQUIRED_COMPONENTS)}); the bundle is damaged. Export it again.")


def write_manifest(bundle: Bundle) -> Path:
    return atomic_write_text(bundle.root / MANIFEST, bundle.to_json())


def load_bundle(root: str | os.PathLike, verify: bool = True) -> Bundle:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"{root} is not a model bundle (no {MANIFEST}). Make one with "
            "`qinyu-edge export --preset tiny-4b --out DIR` or from checkpoint folders."
        )
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON ({e}); the bundle is damaged. Export it again.") from e
    if not isinstance(d, dict):
        raise BundleError(f"{path} holds a JSON {type(d).__name__}, not an object; the bundle is damaged. Export it again.")
    version = d.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{path}: format_version is {version!r} ({type(version).__name__}), not an integer; "
                          "the bundle is damaged. Export it again.")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{root} has bundle format {version!r}, newer than this qinyu-edge reads ({FORMAT_VERSION}). "
            "Upgrade qinyu-edge, or export the bundle with the version installed here."
        )
    if version < OLDEST_READABLE:
        raise BundleError(
            f"{root} has bundle format {version}, older than this qinyu-edge reads ({OLDEST_READABLE}): its graphs "
            "have another interface. Export the bundle again with the version installed here."
        )
    try:
        bundle = Bundle(
            root=root, format_version=version, qinyu_edge_version=d["qinyu_edge_version"],
            config=ModelConfig.from_dict(d["config"]), layout=TokenLayout.from_dict(d["token_layout"]),
            components={k: _component(v) for k, v in d["components"].items()},
            files={k: FileEntry(**v) for k, v in d["files"].items()},
            origin=d.get("origin", {}), opset=d["opset"], parity=d.get("parity", {}),
            ort_variants={k: _component(v) for k, v in d.get("ort_variants", {}).items()},
            host_embedding=d.get("host_embedding"),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise BundleError(f"{path} lacks or mangles the field {e}; export the bundle again.") from e
    _check_names(bundle)
    if verify:
        verify_files(bundle)
    return bundle


def verify_files(bundle: Bundle) -> None:
    """Every file the runtime uses is listed, and every listed file exists with its recorded size and sha256."""
    problems = [f"{name}: used but not listed in `files`, so it cannot be checked"
                for name in used_files(bundle) if name not in bundle.files]
    for name, entry in bundle.files.items():
        p = bundle.file(name)
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != entry.bytes:
            problems.append(f"{name}: {p.stat().st_size} bytes, manifest says {entry.bytes}")
        elif sha256_file(p) != entry.sha256:
            problems.append(f"{name}: sha256 differs from the manifest")
    if problems:
        raise BundleError(
            f"bundle {bundle.root} does not match its {MANIFEST}:\n  " + "\n  ".join(problems)
            + "\n  The bundle was changed or copied incompletely: copy it again or re-export it."
        )
