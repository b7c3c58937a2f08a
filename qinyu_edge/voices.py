"""The agent voices of a bundle: list, add and remove them, keeping the bundle's hashes true.

Vectors live in the bundle's `speakers.safetensors` (name -> float32[192]); where each came from lives
in `bundle.json` under `origin.voices` (name -> {"source": "text" | "clip", ...}). A voice without an
entry there shipped with the checkpoint. Every change rewrites the speakers file atomically, then the
manifest with the file's new sha256, under a lock, so concurrent edits never interleave and the
voices already there are carried over bit for bit.
"""

from __future__ import annotations

import fcntl
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors.numpy import load_file, save_file

from .bundle import Bundle, file_entries, load_bundle, write_manifest
from .config import SPEAKER_DIM
from .errors import BundleError, QinyuError
from .fileio import atomic_path

SPEAKERS_FILE = "speakers.safetensors"
_NAME = re.compile(r"^[\w.\-·]{1,64}$")  # \w is Unicode: Chinese names such as 2619-王承恩 pass


class VoiceError(QinyuError):
    """A voice name or vector that cannot be stored."""


@dataclass(frozen=True)
class Voice:
    name: str
    vector: np.ndarray
    origin: dict[str, Any]  # {} for a shipped voice

    def describe(self) -> str:
        source = self.origin.get("source")
        if source == "text":
            return f'designed from text "{self.origin["role"]}" (seed {self.origin["seed"]})'
        if source == "clip":
            return f"from clip {self.origin['clip']} ({self.origin['seconds']:.1f} s)"
        return "shipped"


def check_vector(vector: np.ndarray) -> np.ndarray:
    vec = np.asarray(vector, np.float32).reshape(-1)
    if vec.shape != (SPEAKER_DIM,) or not np.isfinite(vec).all():
        raise VoiceError(f"a voice must be {SPEAKER_DIM} finite floats, got shape {vec.shape}")
    return vec


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


class VoiceStore:
    def __init__(self, bundle_dir: str | Path):
        self.root = Path(bundle_dir)
        load_bundle(self.root)  # refuse a tampered bundle before reading or writing anything

    @property
    def bundle(self) -> Bundle:
        return load_bundle(self.root, verify=False)

    def voices(self) -> dict[str, Voice]:
        path = self.root / SPEAKERS_FILE
        vectors = load_file(str(path)) if path.is_file() else {}
        origins = self.bundle.origin.get("voices", {})
        return {n: Voice(n, v, origins.get(n, {})) for n, v in sorted(vectors.items())}

    def check_new_name(self, name: str, force: bool = False) -> None:
        if not _NAME.match(name or ""):
            raise VoiceError(f"voice name {name!r}: use 1-64 letters, digits, '.', '-' or '_' (any script)")
        existing = self.voices().get(name)
        if existing is None:
            return
        if not existing.origin:
            raise VoiceError(f"{name!r} is a shipped voice of this bundle; pick another name (shipped voices are "
                             "never replaced)")
        if not force:
            raise VoiceError(f"a voice named {name!r} exists ({existing.describe()}); pick another name or pass "
                             "--force to replace it")

    def nearest_shipped(self, vector: np.ndarray, k: int = 3) -> list[tuple[str, float]]:
        scored = [(v.name, cosine(vector, v.vector)) for v in self.voices().values() if not v.origin]
        return sorted(scored, key=lambda s: -s[1])[:k]

    def add(self, name: str, vector: np.ndarray, origin: dict[str, Any], force: bool = False) -> Voice:
        vec = check_vector(vector)
        with self._locked():
            self.check_new_name(name, force)
            vectors = {v.name: v.vector for v in self.voices().values()}
            vectors[name] = vec
            self._write(vectors, {**self.bundle.origin.get("voices", {}), name: origin})
        return Voice(name, vec, origin)

    def remove(self, name: str) -> Voice:
        with self._locked():
            voice = self.voices().get(name)
            if voice is None:
                raise VoiceError(f"no voice named {name!r}; `qinyu-edge voice list --bundle {self.root}` shows them")
            if not voice.origin:
                raise VoiceError(f"{name!r} shipped with the bundle and is kept; only voices added with "
                                 "`voice design` or `voice add` can be removed")
            vectors = {v.name: v.vector for v in self.voices().values() if v.name != name}
            self._write(vectors, {k: o for k, o in self.bundle.origin.get("voices", {}).items() if k != name})
        return voice

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".voices.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            load_bundle(self.root)  # unchanged since we opened it, or changed consistently by another writer
            yield

    def add_files(self, folder: Path, names: tuple[str, ...]) -> None:
        """Move finished files from `folder` (inside the bundle, so a rename) into it and hash them."""
        with self._locked():
            for name in names:
                os.replace(folder / name, self.root / name)
            self._record(names, self.bundle.origin)

    def _write(self, vectors: dict[str, np.ndarray], origins: dict[str, Any]) -> None:
        with atomic_path(self.root / SPEAKERS_FILE) as tmp:
            save_file(vectors, str(tmp))
        self._record((SPEAKERS_FILE,), {**self.bundle.origin, "voices": origins})

    def _record(self, names: tuple[str, ...], origin: dict[str, Any]) -> None:
        bundle = self.bundle
        try:
            files = {**bundle.files, **file_entries(self.root, list(names))}
            write_manifest(replace(bundle, files=files, origin=origin))
        except OSError as e:
            raise BundleError(f"{', '.join(names)} written in {self.root} but bundle.json could not be ({e}); "
                              "free space or fix permissions, then run the command again") from e
