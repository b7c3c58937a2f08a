"""Calibration inputs from real speech: espeak-ng prompts run through the fp32 bundle with the
runtime, each component's actual inputs captured as it is called.

Every session of an `Engine` is wrapped by a tap that copies what the runtime feeds it, so the
encoder sees real speech features, the projectors real encoder output and CAM++ vectors, the heads
real hidden states, the XY decoder the code chunks the streaming schedule sends. The backbone is
the exception: copying its whole KV cache at every decode step would cost gigabytes at real sizes,
so its tap keeps only the input embeddings of each call, which joined give each turn's whole
sequence (prompt, then one position per generated step). Its samples are windows of that sequence
with the cache of everything before them: the attention is causal, so a window gives exactly the
activations those positions had in the prefill or the decode steps. Windows keep M > 1 rows in
every MatMul (ModelOpt's GEMV detection quantizes nothing at batch 1) and share one length (AWQ
concatenates activations across samples).

On disk a set is a folder per component holding one `NNNN.npz` per sample, keyed by the
component's input names: the multi-batch layout AutoCast reads, and each file on its own is a
valid `--calibration_data` for ModelOpt's command line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnxruntime.quantization.calibrate import CalibrationDataReader

from qinyu_edge.bundle import ComponentSpec, load_bundle
from qinyu_edge.errors import AudioInputError, QinyuError
from qinyu_edge.fileio import atomic_write_text
from qinyu_edge.runtime.audio_io import load_16k_mono
from qinyu_edge.runtime.conversation import Conversation, Reply
from qinyu_edge.runtime.engine import Engine, EngineOptions
from qinyu_edge.runtime.kv_cache import KVCache
from qinyu_edge.runtime.session import CopyStats, Session
from qinyu_edge.side_file import graph_files

from .decode_graphs import DERIVED
from .plan import component_precision

log = logging.getLogger(__name__)

INDEX_FILE = "calibration.json"
BACKBONE = "backbone"


@dataclass(frozen=True)
class Turn:
    """One user turn: speech rendered by espeak-ng from `speech`, or the text question `text`."""

    speech: str | None = None
    text: str = ""
    user_speaker: bool = True


@dataclass(frozen=True)
class Case:
    """A conversation of one or more turns on one `Conversation`."""

    name: str
    turns: tuple[Turn, ...]
    mode: str = "conversation"
    voice: str | None = None  # agent voice name; None: the bundle's default
    role: str | None = None


# Disjoint from the accuracy report's held-out cases (engines/accuracy.py), so the report never
# scores a model on the inputs it was calibrated with.
CALIBRATION_CASES: tuple[Case, ...] = (
    Case("book", (Turn("Could you recommend a good book to read on a rainy afternoon?"),)),
    Case("egg", (Turn("How many minutes does it take to boil an egg?", user_speaker=False),)),
    Case("sailor", (Turn("Please sing me a song about the sea and the stars."),), mode="roleplay",
         voice="2619-王承恩", role="A cheerful sailor who loves old songs."),
    Case("trip", (Turn("I am planning a trip to the mountains next week."), Turn("What should I pack for the cold?"))),
    Case("sky", (Turn(text="Explain why the sky is blue in two sentences."),)),
    Case("butler", (Turn("Tell me a joke about computers."),), mode="roleplay", role="A grumpy robot butler."),
)


@dataclass(frozen=True)
class CaptureOptions:
    max_new_tokens: int = 32
    # Backbone samples: windows of this many positions, spread evenly over each turn's sequence
    # (prompt and reply), each with the real cache of the positions before it.
    window: int = 16
    windows_per_turn: int = 6
    # Samples kept per component (evenly spread over the calls); bounds memory and calibration time.
    max_samples: int = 48
    voice: str | None = None  # agent voice for prompts that name none (None: the bundle's default)


def render_speech(text: str, folder: Path, name: str = "speech") -> np.ndarray:
    """`text` spoken by espeak-ng (en-us), as the 16 kHz mono float32 waveform the runtime takes."""
    if shutil.which("espeak-ng") is None:
        raise AudioInputError("espeak-ng is not installed; it renders the calibration speech "
                              "(Debian: apt-get install espeak-ng, or scripts/setup.sh)")
    wav = folder / f"{name}.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), text], check=True, capture_output=True)
    return load_16k_mono(wav)


class _Tap:
    """A session that copies every input it is given and then runs the real session."""

    def __init__(self, inner: Session, keep: Sequence[str] | None = None):
        self.inner = inner
        self.name = inner.name
        self.input_names = inner.input_names
        self.output_names = inner.output_names
        self.keep = tuple(keep) if keep is not None else inner.input_names
        self.calls: list[dict[str, np.ndarray]] = []

    @property
    def stats(self) -> CopyStats:
        return self.inner.stats

    def run(self, inputs: Mapping[str, np.ndarray], into: Mapping[str, np.ndarray] | None = None
            ) -> dict[str, np.ndarray]:
        self.calls.append({n: np.array(inputs[n], copy=True) for n in self.keep})
        return self.inner.run(inputs, into=into)


def _tap_engine(engine: Engine) -> dict[str, _Tap]:
    """Wrap every session of `engine` (and the generator's references to them) in a tap."""
    taps = {name: _Tap(s, keep=("inputs_embeds",) if name == BACKBONE else None)
            for name, s in engine.sessions.items()}
    engine.sessions.update(taps)
    gen = engine.generator
    gen.embedding, gen.backbone, gen.greedy = taps["embedding"], taps[BACKBONE], taps["heads_greedy"]
    if gen.logits is not None:
        gen.logits = taps["heads_logits"]
    return taps


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    idx = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    return [items[i] for i in idx]


def turn_sequences(calls: Sequence[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
    """Each turn's whole input sequence [1, S, H] from the backbone's recorded calls.

    A turn is its prefill call (the runtime re-prefills every turn) and then one call of one
    position per decode step.
    """
    turns: list[list[np.ndarray]] = []
    for call in calls:
        e = call["inputs_embeds"]
        if e.shape[1] > 1 or not turns:
            turns.append([e])
        else:
            turns[-1].append(e)
    return [np.concatenate(t, axis=1) for t in turns]


def backbone_windows(session: Session, spec: ComponentSpec, seq: np.ndarray, window: int, count: int
                     ) -> list[dict[str, np.ndarray]]:
    """`count` windows of `window` positions spread over `seq` [1, S, H], each with the cache of the
    positions before it, filled by a prefill through the runtime's own `KVCache`."""
    if seq.shape[1] < window:
        return []
    cache = KVCache.for_backbone(spec, seq.shape[1])
    samples = []
    for p in np.unique(np.linspace(0, seq.shape[1] - window, count).round().astype(int)):
        cache.reset()
        if p > 0:
            session.run({"inputs_embeds": np.ascontiguousarray(seq[:, :p]), **cache.past()}, into=cache.slot(int(p)))
            cache.advance(int(p))
        samples.append({"inputs_embeds": np.ascontiguousarray(seq[:, p:p + window]),
                        **{n: a.copy() for n, a in cache.past().items()}})
    return samples


@dataclass
class CalibrationSet:
    """Per component, a list of samples: input name -> array, as the runtime fed them."""

    samples: dict[str, list[dict[str, np.ndarray]]]
    sources: list[str] = field(default_factory=list)

    def __getitem__(self, component: str) -> list[dict[str, np.ndarray]]:
        got = self.samples.get(component)
        if not got:
            raise QinyuError(
                f"the calibration set has no samples for {component!r} (it has {', '.join(self.samples)}); capture "
                "it again with cases that reach it: speech for the encoder and CAM++, replies long enough to speak "
                "for the XY decoder"
            )
        return got

    def reader(self, component: str) -> SampleReader:
        return SampleReader(self[component])

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the set atomically: a temp folder beside `folder`, renamed into place."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
        try:
            index = {"sources": self.sources, "components": {}}
            for comp, samples in self.samples.items():
                (tmp / comp).mkdir()
                for i, s in enumerate(samples):
                    with open(tmp / comp / f"{i:04d}.npz", "wb") as f:
                        np.savez(f, **s)
                index["components"][comp] = len(samples)
            atomic_write_text(tmp / INDEX_FILE, json.dumps(index, indent=2, ensure_ascii=False))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CalibrationSet:
        folder = Path(folder)
        try:
            index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise QinyuError(f"{folder} is not a calibration set (no {INDEX_FILE}); "
                             "make one with `qinyu-edge quantize --save-calibration DIR`") from None
        samples = {}
        for comp, n in index["components"].items():
            samples[comp] = []
            for i in range(n):
                with np.load(folder / comp / f"{i:04d}.npz", allow_pickle=False) as z:
                    samples[comp].append({k: z[k] for k in z.files})
        return cls(samples, index.get("sources", []))

    def component_folder(self, component: str, root: Path) -> Path:
        """Write one component's samples as AutoCast's multi-batch folder of npz files (a scratch copy)."""
        out = root / component
        out.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(self[component]):
            np.savez(out / f"{i:04d}.npz", **s)
        return out


class SampleReader(CalibrationDataReader):
    """ONNX Runtime's calibration reader over a list of samples of any shapes (ModelOpt takes it)."""

    def __init__(self, samples: list[dict[str, np.ndarray]]):
        if not samples:
            raise QinyuError("no calibration samples for this component")
        self.samples = samples
        self._it: Iterator[dict[str, np.ndarray]] = iter(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def get_first(self) -> dict[str, np.ndarray]:
        return self.samples[0]

    def rewind(self) -> None:
        self._it = iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def render_cases(cases: Sequence[Case]) -> dict[str, np.ndarray]:
    """Every spoken turn of `cases` rendered once: sentence -> 16 kHz waveform."""
    sentences = sorted({t.speech for c in cases for t in c.turns if t.speech is not None})
    with tempfile.TemporaryDirectory(prefix="qinyu-speech-") as tmp:
        return {text: render_speech(text, Path(tmp), f"s{i}") for i, text in enumerate(sentences)}


def run_cases(engine: Engine, cases: Sequence[Case], max_new_tokens: int, speech: Mapping[str, np.ndarray],
              voice: str | None = None) -> dict[str, list[Reply]]:
    """Run each case as a conversation on `engine` (spoken turns from `render_cases`); replies per case."""
    replies: dict[str, list[Reply]] = {}
    for case in cases:
        conv = Conversation(engine, mode=case.mode, voice=case.voice or voice, role_description=case.role,
                            max_new_tokens=max_new_tokens)
        replies[case.name] = [conv.ask(speech[t.speech] if t.speech is not None else None, t.text,
                                       user_speaker=t.user_speaker) for t in case.turns]
    return replies


class BundleTooLargeError(QinyuError):
    """The fp32 bundle cannot run on this machine: more weights than free memory."""


def run_memory(weight_bytes: int) -> int:
    """Memory a run of graphs holding `weight_bytes` needs: the weights, a tenth more for ONNX
    Runtime's arenas and activations, and 1 GiB for the process itself."""
    return int(weight_bytes * 1.1) + (1 << 30)


# What a calibration run too large for this machine can do instead.
CALIBRATION_WAY_OUT = ("Quantize the backbone alone without calibration (`--recipe int4-rtn --components backbone`, "
                       "streamed one weight at a time), or capture the calibration set on a larger machine "
                       "(`--save-calibration DIR`) and pass it with `--calibration DIR`.")


def check_runs_here(bundle_dir: str | os.PathLike, what: str, way_out: str = CALIBRATION_WAY_OUT) -> None:
    """Refuse to run a bundle (for calibration or the accuracy report) where its graphs need more
    than the memory available: ONNX Runtime holds every weight, and the kernel would kill the
    process after minutes of swapping instead."""
    from qinyu_edge.device.telemetry import available_memory_bytes

    bundle = load_bundle(bundle_dir, verify=False)  # sizes only: the run that follows verifies the files
    # Each session holds its own weights, also where two graphs keep them in one side file.
    files = [(n, name) for name, spec in bundle.components.items() if name not in DERIVED
             for n in graph_files(bundle.root, spec.file) if n in bundle.files]
    # ONNX Runtime's CPU kernels take fp32: it holds an fp16 graph's weights widened (the real 4B's
    # 8.3 GB fp16 backbone was 17.1 GB resident once loaded).
    need = sum(bundle.files[n].bytes * (2 if component_precision(bundle, name) == "fp16" else 1)
               for n, name in files)
    free = available_memory_bytes()
    if free is not None and run_memory(need) > free:
        raise BundleTooLargeError(
            f"{what} runs the bundle {bundle.root} in ONNX Runtime: {need / 1e9:.1f} GB of weights, "
            f"{run_memory(need) / 1e9:.1f} GB with its working memory, and this machine has {free / 1e9:.1f} GB "
            f"available. {way_out}"
        )


def capture(bundle_dir: str | os.PathLike, cases: Sequence[Case] = CALIBRATION_CASES,
            options: CaptureOptions = CaptureOptions(), threads: int | None = None,
            speech: Mapping[str, np.ndarray] | None = None) -> CalibrationSet:
    """Run `cases` through the fp32 bundle and keep each component's real inputs."""
    check_runs_here(bundle_dir, "capturing calibration inputs")
    # The portable graphs: they are what gets quantized (ONNX Runtime variants are dropped then).
    engine = Engine(bundle_dir, EngineOptions(threads=threads, ort_variants=False, fused=False))
    taps = _tap_engine(engine)
    replies = run_cases(engine, cases, options.max_new_tokens, speech or render_cases(cases), options.voice)
    for name, rs in replies.items():
        log.info("captured case %s: %s steps", name, [len(r.tokens) for r in rs])
    sources = [t.speech or t.text for c in cases for t in c.turns]
    samples: dict[str, list[dict[str, np.ndarray]]] = {}
    for name, tap in taps.items():
        if name == BACKBONE:
            spec = engine.bundle.components[BACKBONE]
            calls = [w for seq in turn_sequences(tap.calls)
                     for w in backbone_windows(tap.inner, spec, seq, options.window, options.windows_per_turn)]
        else:
            calls = tap.calls
        samples[name] = _spread(calls, options.max_samples)
    for name, spec in engine.bundle.components.items():
        if not samples.get(name):
            # heads_logits runs (and is opened) only when sampling; heads_greedy is fed the same hidden states.
            wanted = [t.name for t in spec.inputs]
            donor = next((d for d in samples.values() if d and set(wanted) <= set(d[0])), [])
            samples[name] = [{n: s[n] for n in wanted} for s in donor]
    empty = [n for n, s in samples.items() if not s]
    if empty:
        log.warning("the cases never called %s: no samples for them", ", ".join(empty))
    return CalibrationSet({n: s for n, s in samples.items() if s}, sources)


__all__ = [
    "CALIBRATION_CASES",
    "BundleTooLargeError",
    "CalibrationSet",
    "CaptureOptions",
    "Case",
    "SampleReader",
    "Turn",
    "backbone_windows",
    "capture",
    "check_runs_here",
    "run_memory",
    "render_cases",
    "render_speech",
    "run_cases",
    "turn_sequences",
]
