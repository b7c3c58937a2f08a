"""Voice activity detection: the Silero VAD ONNX model (from the `silero-vad` wheel) run with onnxruntime,
and a streaming segmenter that turns per-frame speech probabilities into speech segments.

The model takes 512-sample frames at 16 kHz (32 ms) preceded by the last 64 samples of the previous
frame, and carries an LSTM state [2, 1, 128] from frame to frame. The `silero-vad` package itself
imports torch, so it is never imported: only its ONNX file is located and loaded.

Segmenting (hysteresis, as Silero's own iterator and the official web demo do it): a segment starts
at the first frame with p >= start_threshold; once a frame with p < end_threshold has occurred, the
segment ends when `hangover_ms` have passed with no frame reaching start_threshold again. A segment
whose speech is shorter than `min_speech_ms` is discarded (noise clicks, coughs).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qinyu_edge.errors import ConfigError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FRAME = 512  # the only frame size the Silero model accepts at 16 kHz
_CONTEXT = 64


def package_file(package: str, relative: str, install: str) -> Path:
    """A data file shipped inside an installed wheel, located without importing the package.

    Importing `silero_vad` or `pipecat` would pull torch or pipecat's own dependencies; finding the
    package directory through its import spec does not execute it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the Python package `{package}` is not installed; it ships {Path(relative).name}. Install it with `{install}`.")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise ConfigError(
        f"`{package}` is installed but has no {relative} (looked in {', '.join(spec.submodule_search_locations)}); "
        f"reinstall it with `{install}`, or set the model path in the config."
    )


SILERO_INSTALL = "pip install silero-vad --no-deps"


def silero_model_path() -> Path:
    return package_file("silero_vad", "data/silero_vad.onnx", SILERO_INSTALL)


def model_file(path: str | os.PathLike | None, default, what: str) -> Path:
    if path is None:
        return default()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} model file {path} does not exist; fix the path in the config or leave it unset to use the packaged model.")
    return path


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # One thread: the VAD and turn models run beside the LLM and must not steal its cores.
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


class SileroVad:
    """Speech probability per 512-sample frame of a 16 kHz stream (stateful; `reset` between streams)."""

    def __init__(self, model_path: str | os.PathLike | None = None, threads: int = 1):
        self.path = model_file(model_path, silero_model_path, "Silero VAD")
        self._session = ort_session(self.path, threads)
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._input = np.zeros((1, _CONTEXT + FRAME), dtype=np.float32)

    def __call__(self, frame: np.ndarray) -> float:
        frame = np.asarray(frame, dtype=np.float32).reshape(-1)
        if frame.size != FRAME:
            raise ValueError(f"Silero VAD takes frames of {FRAME} samples at 16 kHz, got {frame.size}")
        # The tail of the previous input is this frame's context.
        self._input[0, :_CONTEXT] = self._input[0, -_CONTEXT:]
        self._input[0, _CONTEXT:] = frame
        prob, self._state = self._session.run(None, {"input": self._input, "state": self._state, "sr": self._sr})
        return float(prob[0, 0])

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Per-frame probabilities of a whole clip from a fresh state (the last partial frame zero-padded)."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        n = -(-audio.size // FRAME)
        padded = np.zeros(n * FRAME, dtype=np.float32)
        padded[: audio.size] = audio
        self.reset()
        return np.array([self(padded[i * FRAME:(i + 1) * FRAME]) for i in range(n)], dtype=np.float32)


@dataclass(frozen=True)
class VadConfig:
    """Segmenting settings.

    Defaults: Silero's own thresholds (0.5 to start, 0.15 lower to end) and 250 ms minimum, a 200 ms
    hangover (short, so Smart Turn is consulted quickly; pipecat uses 0.2 s with it), the start edge 30 ms
    before the first speech frame (the model reacts up to a frame late to onsets) and the end edge one
    frame before the first frame under end_threshold (its probability stays up 2-3 frames, 50-100 ms,
    past the end of speech on espeak-ng test speech).
    """

    start_threshold: float = 0.5
    end_threshold: float = 0.35
    min_speech_ms: int = 250
    # Silence (time since the first frame below end_threshold) that ends a segment.
    hangover_ms: int = 200
    # The start edge is this far before the first speech frame; the end edge this far after the start
    # of the first frame under end_threshold (negative: before it, down to -2 frames).
    start_pad_ms: int = 30
    end_pad_ms: int = -32
    # Audio kept before the start edge in the segment audio (onsets the VAD reacts to late).
    pre_roll_ms: int = 200
    max_speech_s: float = 60.0
    model_path: str | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.end_threshold <= self.start_threshold < 1.0:
            raise ConfigError(
                f"VAD thresholds must satisfy 0 < end_threshold <= start_threshold < 1, got end {self.end_threshold}, start {self.start_threshold}."
            )
        if not -64 <= self.end_pad_ms:
            raise ConfigError(f"VAD end_pad_ms must be >= -64 (two frames), got {self.end_pad_ms}.")
        for name in ("min_speech_ms", "hangover_ms", "start_pad_ms", "pre_roll_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"VAD {name} must be >= 0, got {getattr(self, name)}.")
        if self.end_pad_ms > self.hangover_ms:
            raise ConfigError(f"VAD end_pad_ms ({self.end_pad_ms}) cannot exceed hangover_ms ({self.hangover_ms}): the end edge must be known when the segment ends.")
        if self.max_speech_s * 1000 <= self.min_speech_ms:
            raise ConfigError(f"VAD max_speech_s ({self.max_speech_s}) must exceed min_speech_ms ({self.min_speech_ms} ms).")
        if self.threads < 1:
            raise ConfigError(f"VAD threads must be >= 1, got {self.threads}.")

    @classmethod
    def preset(cls, name: str) -> VadConfig:
        try:
            return VAD_PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown VAD preset {name!r}; choose one of {', '.join(VAD_PRESETS)}.") from None


VAD_PRESETS: dict[str, VadConfig] = {
    "default": VadConfig(),
    # The official web demo (model-spec 5): start 0.7, end 0.55 with 500 ms of hangover, segments under
    # 1 s dropped, the previous 256 ms window kept in front. It judged 256 ms windows; we judge 32 ms frames.
    "official_web": VadConfig(
        start_threshold=0.7, end_threshold=0.55, min_speech_ms=1000, hangover_ms=500, start_pad_ms=0, end_pad_ms=0, pre_roll_ms=256
    ),
}


def _ms(ms: float) -> int:
    return round(ms * SAMPLE_RATE / 1000)


@dataclass(frozen=True)
class SpeechStart:
    """Speech began at `sample` (16 kHz offset in the stream); known once `detected_sample` had been heard."""

    sample: int
    detected_sample: int
    probability: float

    @property
    def seconds(self) -> float:
        return self.sample / SAMPLE_RATE


@dataclass(frozen=True, eq=False)
class SpeechEnd:
    """A speech segment [start_sample, end_sample); `audio` covers [audio_start_sample, end_sample)."""

    start_sample: int
    end_sample: int
    # End of the last frame the model scored as speech (before end_pad_ms moves the edge): where the
    # voice stopped, the reference for honest turn-end delays.
    voiced_end_sample: int
    detected_sample: int
    audio_start_sample: int
    audio: np.ndarray
    truncated: bool = False  # cut at max_speech_s while still speaking

    @property
    def duration(self) -> float:
        return (self.end_sample - self.start_sample) / SAMPLE_RATE


@dataclass(frozen=True)
class SpeechDiscarded:
    """A start that ended before min_speech_ms of speech: noise, not a segment."""

    start_sample: int
    end_sample: int
    detected_sample: int


VadEvent = SpeechStart | SpeechEnd | SpeechDiscarded


class AudioHistory:
    """The recent part of a 16 kHz stream, addressed by absolute sample offsets."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self.start = 0  # absolute offset of the first kept sample
        self.end = 0

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self._chunks.append(np.asarray(samples, dtype=np.float32))
            self.end += samples.size

    def slice(self, a: int, b: int) -> np.ndarray:
        a, b = max(a, self.start), min(b, self.end)
        if b <= a:
            return np.zeros(0, dtype=np.float32)
        whole = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks = [whole]
        return whole[a - self.start:b - self.start].copy()

    def trim(self, keep_from: int) -> None:
        """Forget samples before `keep_from` (whole chunks only, so trimming stays cheap)."""
        while self._chunks and self.start + self._chunks[0].size <= keep_from:
            self.start += self._chunks.pop(0).size

    def clear(self, at: int = 0) -> None:
        self._chunks.clear()
        self.start = self.end = at


class VadSegmenter:
    """Feed 16 kHz audio in any chunk size; get SpeechStart / SpeechEnd / SpeechDiscarded events."""

    def __init__(self, config: VadConfig | None = None, vad: SileroVad | None = None):
        self.config = config or VadConfig()
        self.vad = vad or SileroVad(self.config.model_path, self.config.threads)
        c = self.config
        self._start_pad, self._end_pad = _ms(c.start_pad_ms), _ms(c.end_pad_ms)
        self._pre_roll, self._hangover = _ms(c.pre_roll_ms), _ms(c.hangover_ms)
        self._min_speech, self._max_speech = _ms(c.min_speech_ms), _ms(c.max_speech_s * 1000)
        self.reset()

    def reset(self) -> None:
        self.vad.reset()
        self.history = AudioHistory()
        self._pending = np.zeros(0, dtype=np.float32)
        self.position = 0  # samples judged so far (whole frames)
        self.last_probability = 0.0
        self._in_speech = False
        self._start = self._speech_from = 0
        self._silence_from: int | None = None
        self._last_end = 0

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    def process(self, samples: np.ndarray) -> list[VadEvent]:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._pending.size:
            samples = np.concatenate([self._pending, samples])
        n = samples.size // FRAME
        events: list[VadEvent] = []
        for i in range(n):
            events.extend(self.process_frame(samples[i * FRAME:(i + 1) * FRAME]))
        self._pending = samples[n * FRAME:].copy()
        return events

    def process_frame(self, frame: np.ndarray) -> list[VadEvent]:
        """Judge one 512-sample frame; the frame covers [position, position + 512)."""
        p = self.last_probability = self.vad(frame)
        f0 = self.position
        f1 = self.position = f0 + FRAME
        self.history.append(frame)
        c = self.config
        events: list[VadEvent] = []
        if not self._in_speech:
            if p >= c.start_threshold:
                self._in_speech = True
                self._speech_from = f0
                self._start = max(f0 - self._start_pad, self._last_end)
                self._silence_from = None
                events.append(SpeechStart(self._start, f1, p))
            else:
                # Keep enough for the pre-roll and pad of a segment that may start at the next frame.
                self.history.trim(f1 - self._pre_roll - self._start_pad - FRAME)
            return events
        if p >= c.start_threshold:
            self._silence_from = None
        elif p < c.end_threshold and self._silence_from is None:
            self._silence_from = f0
        if self._silence_from is not None and f1 - self._silence_from >= self._hangover:
            events.append(self._close(self._silence_from, f1, truncated=False))
        elif f1 - self._speech_from >= self._max_speech:
            events.append(self._close(f1, f1, truncated=True))
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: close an open segment at the last judged sample (a partial frame is dropped)."""
        self._pending = np.zeros(0, dtype=np.float32)
        if not self._in_speech:
            return []
        speech_end = self._silence_from if self._silence_from is not None else self.position
        return [self._close(speech_end, self.position, truncated=False)]

    def _close(self, speech_end: int, now: int, truncated: bool) -> VadEvent:
        self._in_speech = False
        # A cut at max_speech_s is mid-speech: no pad. The end never precedes the first speech frame.
        end = now if truncated else max(min(speech_end + self._end_pad, now), self._speech_from)
        self._last_end = end
        self._silence_from = None
        if speech_end - self._speech_from < self._min_speech:
            log.debug("VAD: %.0f ms of speech at %.2f s discarded", (speech_end - self._speech_from) / 16, self._start / SAMPLE_RATE)
            return SpeechDiscarded(self._start, end, now)
        audio_start = max(self._start - self._pre_roll, self.history.start)
        return SpeechEnd(self._start, end, min(speech_end, now), now, audio_start, self.history.slice(audio_start, end), truncated)


__all__ = [
    "FRAME",
    "SAMPLE_RATE",
    "SILERO_INSTALL",
    "VAD_PRESETS",
    "AudioHistory",
    "SileroVad",
    "SpeechDiscarded",
    "SpeechEnd",
    "SpeechStart",
    "VadConfig",
    "VadEvent",
    "VadSegmenter",
    "model_file",
    "ort_session",
    "package_file",
    "silero_model_path",
]
