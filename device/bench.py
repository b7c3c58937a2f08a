"""Measure a bundle on this machine: per-component latency, end-to-end turns on real speech, memory,
power and the decode roofline, optionally side by side with the PyTorch reference.

Every timed figure runs `warmup` untimed calls, then `runs` timed ones, and keeps p50/p95/p99/min
(linear-interpolated percentiles; with few runs p99 is close to the maximum). Figures are kept as
they complete, so an interrupted run (Ctrl-C) still returns everything measured before it.

No torch here: `--against torch` imports the reference lazily (it needs the `export` extra).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

import qinyu_edge
from qinyu_edge.bundle import MANIFEST, load_bundle
from qinyu_edge.errors import QinyuError
from qinyu_edge.fileio import sha256_file

from . import telemetry

log = logging.getLogger(__name__)

FORMAT = "qinyu-edge-bench"
FORMAT_VERSION = 1
SECTIONS = ("environment", "components", "end_to_end", "memory", "power", "roofline", "against")
GPU_PROVIDERS = ("cuda", "tensorrt")
SAMPLES_OUT = 32000
FRAME_SECONDS = 0.08  # one 12.5 Hz code frame
# Different sentences, so the replies (and their lengths) differ between the spoken turns.
SENTENCES = (
    "Hello! Could you tell me what the weather will be like tomorrow morning?",
    "Please recommend a good book for a long train journey, something light and funny.",
)
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog while the band plays a slow song. "
PARITY_LIMIT = 1e-3  # the reference must compute the bundle's function before its timings mean anything

DEFINITIONS = {
    "time_to_first_audio_ms": "from the start of Conversation.ask (the end of user speech) until the first 32 kHz "
                              "audio chunk is decoded, as Reply.timings.first_audio_ms records it",
    "reply_latency_ms": "from the start of Conversation.ask until it returns with the last audio chunk decoded "
                        "(Reply.timings.total_ms)",
    "decode_steps_per_s": "decode steps (text and audio) per second of decode-loop wall time: 1000 / mean step ms, "
                          "from Reply.timings.ms_per_step; streaming decode inside the loop is included",
    "audio_s_per_wall_s": "seconds of 32 kHz speech the turn produced divided by the wall seconds of the whole turn "
                          "(frontend, encoder, prefill, decode and streaming decode): above 1 is faster than real "
                          "time; the reciprocal of Reply.timings.rtf",
    "ratio_vs_torch": "PyTorch reference p50 / this runtime's p50 for the same component, inputs and weights in the "
                      "same process, the two timed in alternating order (ABBA) so outside load falls on both alike: "
                      "above 1 means this runtime is faster",
    "roofline_fraction": "bytes the decode step must read (weights; with KV also the cache up to the context) over "
                         "the p50 decode step time, as a fraction of the target's memory bandwidth",
    "percentiles": "linear-interpolated percentiles over the timed runs (numpy.percentile); p99 of a few runs is "
                   "close to their maximum",
}


# --- options and figures ------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchOptions:
    runs: int = 30
    warmup: int = 3
    audio_seconds: tuple[float, ...] = (1.0, 5.0, 15.0)
    prompt_lengths: tuple[int, ...] = (32, 128, 512, 2048)
    contexts: tuple[int, ...] = (16, 256, 1024, 2048, 4000)
    schedules: tuple[str, ...] = ("official", "low_latency")
    e2e_runs: int = 3  # replies per spoken WAV
    max_new_tokens: int = 400
    first_chunks: tuple[int, ...] = (4, 8, 12, 16, 20, 24, 32)
    ttfa_runs: int = 3
    wavs: tuple[Path, ...] = ()  # extra user speech; rendered sentences are always used
    against: Literal["torch"] | None = None
    torch_device: str | None = None  # default: cuda for a GPU provider when torch has it, else cpu
    target: str | None = None  # a registry id; default: the GPU found here, else the host's copy bandwidth
    stop_after: int | None = None  # debug: send SIGINT to this process once this many figures are measured

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup < 0 or self.e2e_runs < 1 or self.ttfa_runs < 1:
            raise ValueError("runs, e2e runs and ttfa runs must be >= 1 and warm-up >= 0")


@dataclass
class Figure:
    id: str
    section: str
    label: str
    unit: str
    better: Literal["lower", "higher"] | None  # None: informational, never a regression
    value: float | None  # the headline: p50 of timed runs, or the one measured value
    stats: dict[str, float] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    p25, p50, p75, p95, p99 = np.percentile(a, [25, 50, 75, 95, 99])
    return {"n": int(a.size), "p50": float(p50), "p95": float(p95), "p99": float(p99), "min": float(a.min()),
            "max": float(a.max()), "mean": float(a.mean()), "p25": float(p25), "p75": float(p75)}


# --- weights read per decode step -----------------------------------------------------------------

# Bits per element of ONNX tensor types (TensorProto enum values), so packed 4-bit types count right.
_ONNX_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 16: 16,
              17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4}
_ONNX_NAMES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16", 17: "float8e4m3fn",
               18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz", 21: "uint4", 22: "int4", 23: "float4e2m1"}


def onnx_weight_bytes(path: Path) -> dict[str, int]:
    """Bytes of the initializers and Constant tensors of one ONNX file, by element type. Sizes come
    from the tensor shapes, and external data is not loaded, so nothing is read twice."""
    import onnx  # the `export` extra; callers fall back to file sizes without it

    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
                if a.type == onnx.AttributeProto.TENSOR]
    out: dict[str, int] = {}
    for t in tensors:
        bits = _ONNX_BITS.get(t.data_type)
        if bits is None:
            continue  # strings and other non-numeric constants: not weights
        n = math.prod(t.dims)
        name = _ONNX_NAMES[t.data_type]
        out[name] = out.get(name, 0) + (n * bits + 7) // 8
    return out


@dataclass
class WeightScan:
    method: str
    bytes: dict[str, int]  # component -> weight bytes
    precisions: dict[str, dict[str, int]]  # component -> element type -> bytes


def scan_weights(bundle: Any) -> WeightScan:
    names = list(bundle.components)
    try:
        per = {n: onnx_weight_bytes(bundle.path(n)) for n in names}
    except ImportError:
        return WeightScan("bundle file sizes (onnx is not installed to read the initializers; file sizes add the "
                          "graph itself, a small overestimate)",
                          {n: bundle.files[bundle.components[n].file].bytes for n in names},
                          {n: {} for n in names})
    return WeightScan("ONNX initializer and Constant tensor bytes (shapes x element size)",
                      {n: sum(v.values()) for n, v in per.items()}, per)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --- speech -------------------------------------------------------------------------------------------

def render_speech(folder: Path) -> list[Path]:
    """The bench's spoken user turns, rendered by espeak-ng; [] when espeak-ng is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return []
    paths = []
    for i, sentence in enumerate(SENTENCES):
        path = folder / f"turn{i}.wav"
        subprocess.run([exe, "-v", "en-us", "-w", str(path), sentence], check=True, capture_output=True, timeout=60)
        paths.append(path)
    return paths


def clip_of(speech: np.ndarray | None, seconds: float, seed: int = 0) -> np.ndarray:
    """`seconds` of 16 kHz audio: the speech repeated end to end, or quiet noise without speech."""
    n = round(seconds * 16000)
    if speech is None or speech.size == 0:
        return (np.random.default_rng(seed).standard_normal(n) * 0.05).astype(np.float32)
    return np.resize(speech, n).astype(np.float32)


# --- the bench ------------------------------------------------------------------------------------------

Step = tuple[str, str, Callable[[], None]]  # (label, section, measure)


class Bench:
    """One benchmark run over a bundle. `run()` returns the JSON document (complete or partial)."""

    def __init__(self, bundle_dir: str | os.PathLike, engine_options: Any, options: BenchOptions = BenchOptions()):
        self.bundle_dir = Path(bundle_dir)
        self.engine_options = engine_options
        self.options = options
        self.bundle = load_bundle(self.bundle_dir)
        self.figures: dict[str, Figure] = {}
        self.measured = 0
        self.environment: dict[str, Any] = {}
        self.sections: dict[str, dict[str, Any]] = {s: {"status": "not run"} for s in SECTIONS}
        if options.against is None:
            self.sections["against"] = {"status": "not requested", "note": "run with --against torch"}
        self.extra: dict[str, Any] = {"memory": {}, "roofline": {}, "against": {}, "turn": None}
        self.engine: Any = None
        self.monitor: telemetry.GpuMonitor | None = None
        self.monitor_note = ""
        self.detected: Any = None
        self.weights: WeightScan | None = None
        self.speech: list[np.ndarray] = []
        self.speech_note = ""
        self.bandwidth: dict[str, Any] | None = None
        self.reference: Any = None
        self.interrupted_during: str | None = None
        self.step_seconds: dict[str, float] = {}  # where the run's time went
        self.load_average = {"start": _load_average(), "end": None}
        self.seconds = 0.0
        self._tmp: tempfile.TemporaryDirectory | None = None

    # -- measurement primitives

    def _tick(self) -> None:
        """Inside every timed loop: the `stop_after` debug option interrupts here, by a real SIGINT."""
        limit = self.options.stop_after
        if limit is not None and self.measured >= limit:
            signal.raise_signal(signal.SIGINT)

    def _time(self, fn: Callable[[], Any]) -> list[float]:
        for _ in range(self.options.warmup):
            fn()
        out = []
        for _ in range(self.options.runs):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
            self._tick()
        return out

    def _add(self, fig: Figure) -> Figure:
        self.figures[fig.id] = fig
        self.measured += 1
        self.sections[fig.section]["status"] = "measured"
        return fig

    def _timed(self, id: str, section: str, label: str, ms: list[float], better: str | None = "lower",
               **params: Any) -> Figure:
        stats = summarize(ms)
        return self._add(Figure(id, section, label, "ms", better, stats["p50"], stats, params))  # type: ignore[arg-type]

    # -- plan

    def steps(self) -> list[Step]:
        o = self.options
        steps: list[Step] = [("environment", "environment", self._environment),
                             ("load engine", "memory", self._load_engine),
                             ("host memory bandwidth", "roofline", self._bandwidth),
                             ("render speech", "end_to_end", self._render_speech)]
        comp = "components"
        steps += [(f"frontend + encoder, {s:g} s", comp, lambda s=s: self._audio_components(s))
                  for s in o.audio_seconds]
        steps += [("CAM++ speaker embedding", comp, self._campplus),
                  ("speaker projector", comp, self._speaker_projector)]
        steps += [(f"prefill {n}", comp, lambda n=n: self._prefill(n)) for n in self._prompt_lengths()]
        steps += [(f"decode step, context {c}", comp, lambda c=c: self._decode(c)) for c in self._contexts()]
        steps += [(f"XY decoder chunk {new}+{ctx}", comp, lambda p=(ctx, new): self._xy_chunk(*p))
                  for ctx, new in self._chunk_pairs()]
        steps += [("end-to-end turns", "end_to_end", self._end_to_end)]
        steps += [("time to first audio by first-chunk size", "end_to_end", self._ttfa_sweep)]
        steps += [("memory", "memory", self._memory)]
        if o.against == "torch":
            ag = "against"
            steps += [("load the PyTorch reference", ag, self._load_reference)]
            steps += [(f"torch encoder, {s:g} s", ag, lambda s=s: self._torch_audio(s)) for s in o.audio_seconds]
            steps += [("torch speaker projector", ag, self._torch_speaker_projector)]
            steps += [(f"torch decode step, context {c}", ag, lambda c=c: self._torch_decode(c))
                      for c in self._contexts()]
            steps += [(f"torch XY decoder chunk {new}+{ctx}", ag, lambda p=(ctx, new): self._torch_xy(*p))
                      for ctx, new in self._chunk_pairs()]
        return steps

    def _capacity(self) -> int:
        """KV positions: the loaded cache's, or before loading one fewer than the graph's largest past
        (the runtime may keep a masked null row in front)."""
        if self.engine is not None:
            return int(self.engine.cache.capacity)
        return self.engine_options.context or self.bundle.components["backbone"].shape_ranges["past"][2] - 1

    def _prompt_lengths(self) -> list[int]:
        seq_max = self.bundle.components["backbone"].shape_ranges["seq"][2]
        return sorted({n for n in self.options.prompt_lengths if 1 <= n <= min(seq_max, self._capacity())})

    def _contexts(self) -> list[int]:
        return sorted({c for c in self.options.contexts if 0 <= c < self._capacity()})

    def _chunk_pairs(self) -> list[tuple[int, int]]:
        """(left context, new frames) of every decoder call the schedules make, as StreamingDecoder does."""
        from qinyu_edge.runtime.streaming import ChunkSchedule

        lo, _, hi = self.bundle.components["xy_decoder"].shape_ranges.get("frames", (1, 0, 375))
        pairs = set()
        for name in self.options.schedules:
            sched = ChunkSchedule.parse(name)
            for i in range(len(sched.sizes) + 1):
                ctx = 0 if i == 0 else sched.size(i - 1)
                if lo <= ctx + sched.size(i) <= hi:
                    pairs.add((ctx, sched.size(i)))
        return sorted(pairs, key=lambda p: (p[1], p[0]))

    # -- run

    def run(self, progress: Any = None) -> dict[str, Any]:
        steps = self.steps()
        task = progress.add_task("bench", total=len(steps)) if progress is not None else None
        t0 = time.perf_counter()
        current = ("", "")
        try:
            for label, section, fn in steps:
                current = (label, section)
                if progress is not None:
                    progress.update(task, description=label)
                t1 = time.perf_counter()
                fn()
                self.step_seconds[label] = round(time.perf_counter() - t1, 3)
                if progress is not None:
                    progress.advance(task)
        except KeyboardInterrupt:
            self.interrupted_during = current[0]
            sec = self.sections[current[1]]
            if sec["status"] == "measured":
                sec["status"] = "interrupted (partial)"
            log.warning("interrupted during %r; keeping the %d figures measured so far", current[0], self.measured)
        finally:
            self.seconds = time.perf_counter() - t0
            self.load_average["end"] = _load_average()
            if self.monitor is not None:
                self.monitor.close()
            if self._tmp is not None:
                self._tmp.cleanup()
        return self.document()

    # -- environment

    def _environment(self) -> None:
        from .detect import detect

        b = self.bundle
        self.detected = detected = detect()
        self.monitor, how = telemetry.open_gpu_monitor()
        self.monitor_note = how if self.monitor is not None else f"n/a: {how}"
        self.weights = scan_weights(b)
        versions = {"qinyu-edge": qinyu_edge.__version__, "python": platform.python_version()}
        for pkg in ("onnxruntime", "onnxruntime-gpu", "numpy", "tensorrt", "nvidia-ml-py", "jetson-stats", "onnx"):
            v = telemetry.package_version(pkg)
            if v is not None:
                versions[pkg] = v
        import onnxruntime as ort

        self.environment = {
            "machine": {"cpu": telemetry.cpu_name(), "logical_cpus": os.cpu_count(), "platform": platform.platform()},
            "gpu": None if detected is None else dataclasses.asdict(detected),
            "gpu_note": "" if detected is not None else "no NVIDIA GPU found (no NVML device, no Jetson model file)",
            "gpu_monitor": self.monitor_note,
            "clocks": self.monitor.clocks() if self.monitor is not None else {},
            "devfreq": telemetry.devfreq_clocks(),
            "power_mode": telemetry.nvpmodel_query(),
            "versions": versions,
            "onnxruntime_providers": ort.get_available_providers(),
            "bundle": {
                "path": str(b.root.resolve()), "sha256": sha256_file(b.root / MANIFEST), "name": b.config.name,
                "variant": b.config.variant, "preset": b.origin.get("preset"), "exported_with": b.qinyu_edge_version,
                "opset": b.opset,
            },
            "engines": self.engine_options.engines,
            "precisions": {n: self._dominant(p) for n, p in self.weights.precisions.items()},
            "weight_bytes": self.weights.bytes,
            "weight_bytes_method": self.weights.method,
            "weight_bytes_by_type": self.weights.precisions,
        }
        self.sections["environment"]["status"] = "measured"

    @staticmethod
    def _dominant(by_type: dict[str, int]) -> str:
        if not by_type:
            return "unknown (onnx not installed)"
        total = sum(by_type.values())
        return ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1]) if v)

    def _load_engine(self) -> None:
        from qinyu_edge.runtime.engine import Engine

        rss0 = telemetry.rss_bytes()
        t0 = time.perf_counter()
        self.engine = Engine(self.bundle_dir, self.engine_options, verify=False)  # load_bundle verified it
        ms = (time.perf_counter() - t0) * 1e3
        self.environment["decode_step"] = ("one call: the fused decode graph, embedding rows gathered on the host"
                                           if self.engine.generator.fused is not None else
                                           "three calls: the embedding, backbone and greedy-heads sessions")
        self._add(Figure("memory/engine_load_time", "memory", "engine load time (sessions, tokenizer, cache)", "ms",
                         "lower", ms))
        rss = telemetry.rss_bytes()
        if rss is not None:
            self._add(Figure("memory/rss_after_load", "memory", "process RSS after loading the engine", "bytes",
                             "lower", float(rss), params={"rss_before_load": rss0}))

    def _bandwidth(self) -> None:
        """The bandwidth the roofline divides by: a named target, the GPU the provider runs on, or
        the host's measured copy bandwidth (a CPU provider computes from host memory)."""
        from .targets import get_target, local_target

        host = telemetry.host_copy_bandwidth()
        self._add(Figure("roofline/host_copy_bandwidth", "roofline", "host memory copy bandwidth (measured)", "GB/s",
                         "higher", host.gbs, params={"buffer_bytes": host.buffer_bytes, "definition": host.definition}))
        gpu = self.detected
        bw = None
        why = "the provider is the CPU" if gpu is not None else "no GPU was found"
        if self.options.target:
            t = get_target(self.options.target)
            bw = {"gbs": t.bandwidth_gbs, "source": f"target {t.id} ({t.name}) from the registry"}
        elif self.engine_options.provider in GPU_PROVIDERS and gpu is not None:
            try:
                t = local_target(gpu)
                if t.bandwidth_gbs is not None:
                    bw = {"gbs": t.bandwidth_gbs, "source": f"the GPU found here: {t.name} ({t.id})"}
                else:
                    why = f"{t.name} did not report its memory bandwidth"
            except QinyuError as e:
                why = str(e)
        self.bandwidth = bw or {"gbs": host.gbs,
                                "source": f"measured host memory-copy bandwidth ({why}): {host.definition}"}

    def _render_speech(self) -> None:
        from qinyu_edge.runtime.audio_io import load_16k_mono

        self._tmp = tempfile.TemporaryDirectory(prefix="qinyu-bench-")
        rendered = render_speech(Path(self._tmp.name))
        self.speech = [load_16k_mono(p) for p in rendered + list(self.options.wavs)]
        if rendered:
            self.speech_note = "English sentences rendered by espeak-ng (en-us), resampled to 16 kHz"
        else:
            self.speech_note = "espeak-ng is not installed (apt-get install espeak-ng): no rendered speech"
        self.extra["speech"] = {"note": self.speech_note, "clips_s": [round(len(w) / 16000, 3) for w in self.speech],
                                "sentences": list(SENTENCES) if rendered else [],
                                "user_wavs": [str(p) for p in self.options.wavs]}

    # -- components

    def _audio_components(self, seconds: float) -> None:
        eng = self.engine
        wav = clip_of(self.speech[0] if self.speech else None, seconds)
        feats = eng.features(wav)
        lo, _, hi = self.bundle.components["encoder"].shape_ranges.get("frames", (1, 0, 10**9))
        tag = f"{seconds:g}s"
        self._timed(f"frontend/{tag}", "components", f"frontend (fbank, LFR, CMVN), {seconds:g} s audio",
                    self._time(lambda: eng.features(wav)), seconds=seconds, frames=int(feats.shape[0]))
        if not lo <= feats.shape[0] <= hi:
            self.sections["components"].setdefault("skipped", []).append(
                f"encoder at {seconds:g} s: {feats.shape[0]} frames, outside the bundle's range {lo}..{hi}")
            return
        x = feats[None].astype(np.float32)
        enc_sess, proj_sess = eng.sessions["encoder"], eng.sessions["audio_projector"]
        enc = enc_sess.run({"features": x})["encoder_out"]
        self._timed(f"encoder/{tag}", "components", f"SenseVoice encoder, {seconds:g} s audio",
                    self._time(lambda: enc_sess.run({"features": x})), seconds=seconds, frames=int(feats.shape[0]))
        self._timed(f"audio_projector/{tag}", "components", f"audio projector, {seconds:g} s audio",
                    self._time(lambda: proj_sess.run({"encoder_out": enc})), seconds=seconds, rows=int(enc.shape[1]))

    def _campplus(self) -> None:
        from qinyu_edge.runtime.frontend import campplus_chunks, campplus_fbank

        eng = self.engine
        cfg = eng.config.campplus
        chunk = campplus_chunks(clip_of(self.speech[0] if self.speech else None, cfg.chunk_seconds),
                                cfg.chunk_seconds, cfg.max_seconds)[0]
        sess = eng.sessions["campplus"]

        def one() -> None:
            sess.run({"fbank": campplus_fbank(chunk, cfg.feat_dim)[None].astype(np.float32)})

        self._timed("campplus/chunk", "components", f"CAM++ speaker embedding of one {cfg.chunk_seconds:g} s chunk "
                    "(fbank + network)", self._time(one), chunk_seconds=cfg.chunk_seconds)

    def _speaker_projector(self) -> None:
        sess = self.engine.sessions["speaker_projector"]
        x = np.random.default_rng(0).standard_normal((2, 192)).astype(np.float32)
        self._timed("speaker_projector/2", "components", "speaker projector, 2 vectors (agent + user)",
                    self._time(lambda: sess.run({"speaker": x})), speakers=2)

    def _prompt_embeds(self, n: int) -> np.ndarray:
        eng = self.engine
        ids = np.resize(np.asarray(eng.tokenizer.encode(PROMPT_TEXT * 8).ids, np.int64), n)
        return np.ascontiguousarray(eng.generator.embed(ids.reshape(1, n, 1)), np.float32)

    def _prefill(self, n: int) -> None:
        gen = self.engine.generator
        emb = self._prompt_embeds(n)
        self._timed(f"prefill/{n}", "components", f"prefill, {n}-position prompt", self._time(lambda: gen.prefill(emb)),
                    prompt_length=n)

    def _decode(self, ctx: int) -> None:
        eng = self.engine
        gen, cache, lay = eng.generator, eng.cache, eng.layout
        x = self._prompt_embeds(1)
        hist = np.full((1, 5), -1, np.int64)
        audio_ids = np.array([[[lay.book_start(k) + 7 for k in range(lay.n_codebooks)]]], np.int64)

        def backbone() -> None:
            cache.reset()
            cache.advance(ctx)
            gen._forward(x)

        def step() -> None:
            # One generator step on its audio path: heads choose, the 8 codebook rows are embedded
            # and averaged, the backbone runs one position into the cache. Through the fused decode
            # graph the choice comes out of the forward itself.
            cache.reset()
            cache.advance(ctx)
            if gen.fused is None:
                gen.greedy.run({"hidden": gen.hidden, "history": hist})
            gen._embeds[...] = gen.embed(audio_ids)
            gen._forward(gen._embeds)

        what = "backbone + heads + greedy choice (fused)" if gen.fused is not None else "backbone"
        self._timed(f"backbone_step/ctx={ctx}", "components", f"{what}, one position at context {ctx}",
                    self._time(backbone), context=ctx)
        self._timed(f"decode_step/ctx={ctx}", "components",
                    f"decode step (heads + embedding + backbone) at context {ctx}", self._time(step), context=ctx)
        cache.reset()

    def _xy_chunk(self, ctx: int, new: int) -> None:
        sess = self.engine.sessions["xy_decoder"]
        codes = np.random.default_rng(ctx * 1000 + new).integers(0, 1024, (1, 8, ctx + new)).astype(np.int64)
        fig = self._timed(f"xy_decoder/chunk={new}+ctx={ctx}", "components",
                          f"XY decoder chunk: {new} new frames + {ctx} context frames",
                          self._time(lambda: sess.run({"codes": codes})), new_frames=new, context_frames=ctx)
        # How much faster than playback: the chunk's new audio over its decode time.
        fig.params["audio_s_per_wall_s"] = new * FRAME_SECONDS / (fig.value / 1e3)

    # -- end to end

    def _conversation(self, schedule: Any) -> Any:
        from qinyu_edge.runtime.conversation import Conversation

        eng = self.engine
        voice = None if eng.voices else np.zeros(192, np.float32)  # a bundle without voices: timing only
        return Conversation(eng, mode="conversation", voice=voice, max_new_tokens=self.options.max_new_tokens,
                            schedule=schedule)

    def _turn(self, wav: np.ndarray, schedule: Any, stop_at_first_audio: bool = False) -> dict[str, Any]:
        chunk_ms: list[float] = []
        cancel = threading.Event()
        conv = self._conversation(schedule)
        t0 = time.perf_counter()

        def on_chunk(chunk: np.ndarray) -> None:
            chunk_ms.append((time.perf_counter() - t0) * 1e3)
            if stop_at_first_audio:
                cancel.set()

        meter = telemetry.PowerMeter(self.monitor) if self.monitor is not None else None
        if meter is not None:
            with meter:
                reply = conv.ask(wav, on_chunk=on_chunk, cancel=cancel, commit=False)
        else:
            reply = conv.ask(wav, on_chunk=on_chunk, cancel=cancel, commit=False)
        self._tick()
        t = dataclasses.asdict(reply.timings)
        return {"timings": t, "stop": reply.stop, "steps": reply.timings.steps, "chunk_ms": chunk_ms,
                "audio_frames": int(reply.frames.shape[0]), "prompt_length": len(reply.prompt),
                "power": None if meter is None or meter.reading is None else dataclasses.asdict(meter.reading)}

    def _end_to_end(self) -> None:
        from qinyu_edge.runtime.streaming import ChunkSchedule

        if not self.speech:
            self.sections["end_to_end"] = {"status": "not run", "note": self.speech_note}
            return
        schedule = ChunkSchedule.official()
        self._turn(self.speech[0], schedule)  # warm-up: first-call allocations are not the user's latency
        turns = []
        for _ in range(self.options.e2e_runs):
            for i, wav in enumerate(self.speech):
                rec = self._turn(wav, schedule)
                rec["clip"] = i
                rec["clip_s"] = len(wav) / 16000
                turns.append(rec)
        self._e2e_figures(turns, schedule.name)

    def _e2e_figures(self, turns: list[dict[str, Any]], schedule: str) -> None:
        t = [r["timings"] for r in turns]
        sec = "end_to_end"
        n_turns = len(turns)
        params = {"turns": n_turns, "schedule": schedule, "max_new_tokens": self.options.max_new_tokens}
        first = [x["first_audio_ms"] for x in t if x["first_audio_ms"] is not None]
        if first:
            self._timed("e2e/time_to_first_audio", sec, "time to first audio (from the end of user speech)", first,
                        steps_to_first_audio=[x["steps_to_first_audio"] for x in t], **params)
        self._timed("e2e/reply_latency", sec, "reply latency (whole turn, last audio chunk decoded)",
                    [x["total_ms"] for x in t], **params)
        steps_s = [1e3 / x["ms_per_step"] for x in t if x["ms_per_step"] > 0]
        if steps_s:
            s = summarize(steps_s)
            self._add(Figure("e2e/decode_steps_per_s", sec, "decode steps per second", "steps/s", "higher",
                             s["p50"], s, params))
        rate = [x["audio_seconds"] / (x["total_ms"] / 1e3) for x in t if x["total_ms"] > 0 and x["audio_seconds"] > 0]
        if rate:
            s = summarize(rate)
            self._add(Figure("e2e/audio_s_per_wall_s", sec, "audio seconds produced per wall second", "x",
                             "higher", s["p50"], s, params))
        for key, id, label in (("frontend_ms", "frontend", "frontend"),
                               ("encoder_ms", "encoder", "encoder + projector"),
                               ("speaker_ms", "speaker", "CAM++ speaker vector"),
                               ("prompt_ms", "prompt", "prompt build + embedding"),
                               ("prefill_ms", "prefill", "prefill"),
                               ("ms_per_step", "step", "mean decode step"),
                               ("host_ms_per_step", "host_per_step", "host overhead per step")):
            self._timed(f"e2e/{id}", sec, f"in a turn: {label}", [x[key] for x in t], **params)
        self.extra["turns"] = [{k: v for k, v in r.items() if k != "chunk_ms"} for r in turns]
        self.sections[sec]["stops"] = {s: sum(r["stop"] == s for r in turns) for s in {r["stop"] for r in turns}}
        order = sorted(range(n_turns), key=lambda i: t[i]["total_ms"])
        median = turns[order[n_turns // 2]]
        self.extra["turn"] = {"timings": median["timings"], "chunk_ms": median["chunk_ms"], "stop": median["stop"],
                              "clip_s": median["clip_s"], "prompt_length": median["prompt_length"],
                              "note": "the turn with the median reply latency"}
        self._power_figures(turns)

    def _power_figures(self, turns: list[dict[str, Any]]) -> None:
        readings = [r["power"] for r in turns if r["power"] is not None and r["power"]["joules"] is not None]
        if self.monitor is None:
            self.sections["power"] = {"status": "not reported on this platform", "note": self.monitor_note}
            return
        if not readings:
            self.sections["power"] = {"status": "not reported on this platform",
                                      "note": f"{self.monitor_note} gave no power reading"}
            return
        j = summarize([r["joules"] for r in readings])
        w = summarize([r["watts"] for r in readings])
        params = {"method": readings[0]["method"], "turns": len(readings), "monitor": self.monitor_note}
        if self.engine_options.provider == "cpu" and self.monitor.source == "nvml":
            params["note"] = "the provider is the CPU: this is the discrete GPU's (mostly idle) power, not the work's"
        self._add(Figure("power/joules_per_reply", "power", "energy per reply (GPU or board)", "J", "lower",
                         j["p50"], j, params))
        self._add(Figure("power/watts_per_reply", "power", "mean power during a reply", "W", "lower", w["p50"], w,
                         params))

    def _ttfa_sweep(self) -> None:
        """Time to first audio for each first-chunk size (the rest of the official schedule kept),
        the sizes visited round-robin so drifting load from other processes falls on all alike.
        Each turn is cancelled once its first chunk is out."""
        from qinyu_edge.runtime.streaming import ChunkSchedule, StreamingDecoder

        if not self.speech:
            return
        official = ChunkSchedule.official()
        schedules = {}
        for first in self.options.first_chunks:
            sched = ChunkSchedule.custom((first, *official.sizes[1:]), name=f"first={first}")
            try:
                StreamingDecoder(self.engine.sessions["xy_decoder"], sched)  # the schedule's own checks
            except ValueError as e:
                self.sections["end_to_end"].setdefault("skipped", []).append(f"first chunk {first}: {e}")
                continue
            schedules[first] = sched
        recs: dict[int, list[dict[str, Any]]] = {f: [] for f in schedules}
        for _ in range(self.options.ttfa_runs):
            for first, sched in schedules.items():
                recs[first].append(self._turn(self.speech[0], sched, stop_at_first_audio=True))
        for first, rs in recs.items():
            ms = [r["timings"]["first_audio_ms"] for r in rs if r["timings"]["first_audio_ms"] is not None]
            if ms:
                self._timed(f"e2e/ttfa/first_chunk={first}", "end_to_end",
                            f"time to first audio with a {first}-frame first chunk", ms, first_chunk=first,
                            schedule=list(schedules[first].sizes),
                            steps_to_first_audio=[r["timings"]["steps_to_first_audio"] for r in rs],
                            stops=[r["stop"] for r in rs])

    # -- memory

    def _memory(self) -> None:
        eng = self.engine
        cache = eng.cache
        self._add(Figure("memory/kv_cache_bytes", "memory", "KV cache (preallocated, whole capacity)", "bytes",
                         "lower", float(cache.nbytes),
                         params={"capacity": cache.capacity, "bytes_per_position": cache.bytes_per_position,
                                 "dtype": str(cache.buffers[0].dtype)}))
        peak = telemetry.peak_rss_bytes()
        if peak is not None:
            self._add(Figure("memory/rss_peak", "memory", "peak process RSS during the run", "bytes", "lower",
                             float(peak)))
        gpu: dict[str, Any] = {"status": self.monitor_note}
        if self.monitor is not None:
            gpu.update(self.monitor.memory())
            if gpu.get("process_bytes") is not None:
                self._add(Figure("memory/gpu_process_bytes", "memory", "GPU memory held by this process", "bytes",
                                 "lower", float(gpu["process_bytes"]), params={"source": gpu.get("source")}))
            if gpu.get("device_used_bytes") is not None:
                self._add(Figure("memory/gpu_device_used_bytes", "memory", "GPU memory in use (all processes)",
                                 "bytes", None, float(gpu["device_used_bytes"]), params={"source": gpu.get("source")}))
        self.extra["memory"] = {"gpu": gpu}

    # -- the PyTorch reference

    def _load_reference(self) -> None:
        t0 = time.perf_counter()
        from qinyu_edge.export.bench_reference import TorchReference

        self.reference = TorchReference.for_bundle(self.bundle, self.options.torch_device,
                                                   self.engine_options.provider, self.engine_options.threads)
        parity = self.reference.parity(self.engine)
        self.extra["against"] = {"reference": self.reference.describe(), "load_s": time.perf_counter() - t0,
                                 "parity_rel": parity}
        worst = max(parity.values())
        if not worst <= PARITY_LIMIT:
            self.reference = None
            self.sections["against"] = {
                "status": "not run", "note": f"the PyTorch reference does not compute the bundle's function (worst "
                f"relative error {worst:.2e} > {PARITY_LIMIT:g}): it is not the same weights; no ratios taken"}
            return
        self.environment["versions"]["torch"] = self.reference.torch_version

    def _paired(self, id: str, label: str, ours: Callable[[], Any], theirs: Callable[[], Any],
                **params: Any) -> None:
        """Time this runtime and the reference on the same call in alternating order (ABBA: o t, t o,
        t o, o t, ...), so load from other processes falls on both alike; keeps both series."""
        ref = self.reference
        for _ in range(self.options.warmup):
            ours()
            theirs()
        if ref.sync is not None:
            ref.sync()
        ms: dict[str, list[float]] = {"ours": [], "torch": []}
        calls = {"ours": ours, "torch": theirs}
        for i in range(self.options.runs):
            for who in (("ours", "torch") if i % 4 in (0, 3) else ("torch", "ours")):
                t0 = time.perf_counter()
                calls[who]()
                if who == "torch" and ref.sync is not None:
                    ref.sync()
                ms[who].append((time.perf_counter() - t0) * 1e3)
            self._tick()
        ours_stats = summarize(ms["ours"])
        self._timed(f"torch/{id}", "against", f"PyTorch reference: {label}", ms["torch"], None, device=ref.device,
                    ours_paired=ours_stats, **params)

    def _torch_audio(self, seconds: float) -> None:
        if self.reference is None:
            return
        ref, eng = self.reference, self.engine
        feats = eng.features(clip_of(self.speech[0] if self.speech else None, seconds))
        tag = f"{seconds:g}s"
        if f"encoder/{tag}" not in self.figures:
            return  # outside the encoder's range: skipped for the runtime too
        x = feats[None].astype(np.float32)
        enc = eng.sessions["encoder"].run({"features": x})["encoder_out"]
        enc_t, x_t = ref.encoder_inputs(feats)
        self._paired(f"encoder/{tag}", f"encoder, {seconds:g} s audio",
                     lambda: eng.sessions["encoder"].run({"features": x}), lambda: ref.run("encoder", x_t), seconds=seconds)
        self._paired(f"audio_projector/{tag}", f"audio projector, {seconds:g} s audio",
                     lambda: eng.sessions["audio_projector"].run({"encoder_out": enc}),
                     lambda: ref.run("audio_projector", enc_t), seconds=seconds)

    def _torch_speaker_projector(self) -> None:
        if self.reference is None:
            return
        ref, sess = self.reference, self.engine.sessions["speaker_projector"]
        x = np.random.default_rng(0).standard_normal((2, 192)).astype(np.float32)
        xt = ref.tensor(x)
        self._paired("speaker_projector/2", "speaker projector, 2 vectors", lambda: sess.run({"speaker": x}),
                     lambda: ref.run("speaker_projector", xt), speakers=2)

    def _torch_decode(self, ctx: int) -> None:
        if self.reference is None:
            return
        ref, gen, cache = self.reference, self.engine.generator, self.engine.cache
        x = self._prompt_embeds(1)

        def ours() -> None:
            cache.reset()
            cache.advance(ctx)
            gen._forward(x)

        self._paired(f"backbone_step/ctx={ctx}", f"backbone, one position at context {ctx} (torch grows its cache "
                     "with torch.cat)", ours, ref.decode_step(ctx, x), context=ctx)
        cache.reset()

    def _torch_xy(self, ctx: int, new: int) -> None:
        if self.reference is None:
            return
        ref, sess = self.reference, self.engine.sessions["xy_decoder"]
        codes = np.random.default_rng(ctx * 1000 + new).integers(0, 1024, (1, 8, ctx + new)).astype(np.int64)
        codes_t = ref.tensor(codes)
        self._paired(f"xy_decoder/chunk={new}+ctx={ctx}", f"XY decoder chunk, {new} new + {ctx} context frames",
                     lambda: sess.run({"codes": codes}), lambda: ref.run("xy", codes_t), new_frames=new, context_frames=ctx)

    # -- derived figures and the document

    def _derived(self) -> dict[str, Figure]:
        """Roofline fractions and torch ratios, computed from whatever was measured."""
        out: dict[str, Figure] = {}
        roof: dict[str, Any] = {}
        if self.weights is not None and self.bandwidth is not None and self.engine is not None:
            w = self.weights.bytes
            h = self.bundle.config.backbone.hidden_size
            per_row = 4 * h  # float32 embedding rows
            emb_rows = self.bundle.layout.n_codebooks * per_row
            step_bytes = w["backbone"] + w["heads_greedy"] + emb_rows
            per_pos = self.engine.cache.bytes_per_position
            bw = self.bandwidth["gbs"]
            roof = {
                "bandwidth_gbs": bw, "bandwidth_source": self.bandwidth["source"],
                "weight_bytes_per_step": step_bytes,
                "weight_bytes_breakdown": {"backbone": w["backbone"], "heads_greedy": w["heads_greedy"],
                                           "embedding_rows_read": emb_rows},
                "embedding_table_bytes": w["embedding"],
                "kv_bytes_per_position": per_pos,
                "method": self.weights.method,
                "note": "a decode step reads every backbone and head weight once and only the 8 embedding rows it "
                        "gathers (the whole table would be " + f"{w['embedding']} bytes); the KV variant adds the "
                        "cache read up to the context."
                        + (" These weights fit in the CPU caches, so the fraction measures per-call overhead, not a "
                           "memory roofline; only real sizes are bound by memory."
                           if step_bytes < 64 * 2**20 else ""),
                "per_context": [],
            }
            for fid, fig in self.figures.items():
                if not fid.startswith("decode_step/ctx=") or bw is None:
                    continue
                ctx = fig.params["context"]
                s = fig.value / 1e3
                kv = ctx * per_pos
                achieved = step_bytes / s / 1e9
                achieved_kv = (step_bytes + kv) / s / 1e9
                row = {"context": ctx, "step_ms": fig.value, "weights_gbs": achieved, "weights_fraction": achieved / bw,
                       "weights_kv_gbs": achieved_kv, "weights_kv_fraction": achieved_kv / bw, "kv_bytes": kv}
                roof["per_context"].append(row)
                out[f"roofline/weights_fraction/ctx={ctx}"] = Figure(
                    f"roofline/weights_fraction/ctx={ctx}", "roofline",
                    f"weight bytes per step / step time, fraction of {bw:.0f} GB/s, context {ctx}", "fraction",
                    "higher", achieved / bw, params={"context": ctx, "achieved_gbs": achieved})
                out[f"roofline/weights_kv_fraction/ctx={ctx}"] = Figure(
                    f"roofline/weights_kv_fraction/ctx={ctx}", "roofline",
                    f"(weights + KV read) / step time, fraction of {bw:.0f} GB/s, context {ctx}", "fraction",
                    "higher", achieved_kv / bw, params={"context": ctx, "achieved_gbs": achieved_kv})
            roof["per_context"].sort(key=lambda r: r["context"])
        ratios = []
        for fid, fig in self.figures.items():
            if not fid.startswith("torch/"):
                continue
            comp = fid[len("torch/"):]
            ours = fig.params["ours_paired"]["p50"]
            r = fig.value / ours
            ratios.append({"figure": comp, "ours_ms": ours, "torch_ms": fig.value, "ratio": r})
            out[f"vs_torch/{comp}"] = Figure(f"vs_torch/{comp}", "against", f"PyTorch / ours: {comp}", "x",
                                             "higher", r, params={"ours_ms": ours, "torch_ms": fig.value})
        self.extra["roofline"] = roof
        if ratios:
            self.extra["against"]["ratios"] = ratios
            self.sections["against"]["status"] = "measured"
        if roof.get("per_context"):
            self.sections["roofline"]["status"] = "measured"
        elif self.sections["roofline"]["status"] == "measured":
            self.sections["roofline"]["status"] = "partial (bandwidth only: no decode step was measured)"
        return out

    def document(self) -> dict[str, Any]:
        derived = self._derived()
        figures = {**self.figures, **derived}
        if self.sections["power"]["status"] == "not run" and self.monitor is None and self.environment:
            self.sections["power"] = {"status": "not reported on this platform", "note": self.monitor_note}
        for sec in self.sections.values():
            if self.interrupted_during is not None and sec["status"] == "not run":
                sec["status"] = "interrupted before it ran"
        eo = self.engine_options
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
            "status": {"complete": self.interrupted_during is None, "interrupted_during": self.interrupted_during,
                       "seconds": round(self.seconds, 3), "figures_measured": self.measured,
                       "step_seconds": self.step_seconds,
                       # Other work on the machine skews every figure; a load above the CPU count is a warning.
                       "load_average_1min": self.load_average, "logical_cpus": os.cpu_count()},
            "environment": self.environment,
            "settings": {
                "backend": eo.backend, "provider": eo.provider, "threads": eo.threads,
                "threads_note": "ONNX Runtime's default (one per physical core)" if eo.threads is None else "",
                "context": self._capacity(), "target": self.options.target,
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.options).items()
                   if k not in ("wavs", "target")},
                "wavs": [str(p) for p in self.options.wavs],
            },
            "sections": self.sections,
            "figures": {k: v.to_dict() for k, v in figures.items()},
            "memory": self.extra["memory"], "power": self.sections["power"],
            "roofline": self.extra["roofline"], "against": self.extra["against"],
            "turn": self.extra["turn"], "turns": self.extra.get("turns", []), "speech": self.extra.get("speech", {}),
            "definitions": DEFINITIONS,
        }


def to_json(doc: dict[str, Any]) -> str:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.integer, np.floating)):
            return clean(v.item())
        if isinstance(v, Path):
            return str(v)
        return v

    return json.dumps(clean(doc), indent=2, ensure_ascii=False, allow_nan=False)


__all__ = [
    "DEFINITIONS",
    "SECTIONS",
    "Bench",
    "BenchOptions",
    "Figure",
    "onnx_weight_bytes",
    "render_speech",
    "scan_weights",
    "summarize",
    "to_json",
]
