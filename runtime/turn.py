"""Turn detection: deciding that the user has finished speaking, on top of the VAD segments.

Three kinds, picked by `TurnConfig.kind`:
  * "smart_turn": Smart Turn v3.2 (the ONNX model shipped in the `pipecat-ai` wheel) judges the last
    <= 8 s of the turn's audio when the VAD ends a segment and again while the silence grows; the
    `EndpointPolicy` (endpointing.py) combines its probability with the silence length.
  * "silence": the turn ends after `silence_timeout_ms` of silence following speech.
  * "text": a `Transcriber` plus a `TextTurnModel` (e.g. TEN Turn Detection, or a classifier fed by
    SenseVoice's CTC transcript) judge the transcript under the same policy ("complete" counts as p=1).

A VAD split is not a turn: speech that resumes before the commit joins the open turn, whose audio is
one clip with the pause inside it.

Smart Turn's input (from pipecat's local_smart_turn_v3): the turn audio at 16 kHz, its last 8 s kept or
zero-padded at the FRONT to 8 s, normalised to zero mean and unit variance, Whisper log-mel [80, 800];
the output is one probability of "complete", compared with 0.5.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from qinyu_edge.errors import ConfigError

from .endpointing import EndpointPolicy
from .vad import (
    FRAME,
    SAMPLE_RATE,
    AudioHistory,
    SileroVad,
    SpeechDiscarded,
    SpeechEnd,
    SpeechStart,
    VadConfig,
    VadEvent,
    VadSegmenter,
    model_file,
    ort_session,
    package_file,
)
from .whisper_features import fit_window, log_mel

log = logging.getLogger(__name__)

SMART_TURN_INSTALL = "pip install pipecat-ai --no-deps"
_SMART_TURN_FILE = "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"


def smart_turn_model_path() -> Path:
    return package_file("pipecat", _SMART_TURN_FILE, SMART_TURN_INSTALL)


class TurnVerdict(str, Enum):
    COMPLETE = "complete"  # the user is done: answer
    INCOMPLETE = "incomplete"  # mid-thought: keep listening
    WAIT = "wait"  # the user asked the assistant to hold on: stop talking, answer nothing (TEN's "wait")


@dataclass(frozen=True)
class TurnDecision:
    verdict: TurnVerdict
    probability: float | None = None  # of "complete", when the model gives one
    text: str | None = None  # the transcript a text model judged


@runtime_checkable
class TurnModel(Protocol):
    """Judges whether the turn whose 16 kHz audio (from its first speech onset to now) is given has ended."""

    name: str

    def decide(self, audio: np.ndarray) -> TurnDecision: ...


@runtime_checkable
class Transcriber(Protocol):
    def transcribe(self, audio: np.ndarray) -> str: ...


@runtime_checkable
class TextTurnModel(Protocol):
    """A text end-of-turn classifier, e.g. TEN Turn Detection (finished / wait / unfinished)."""

    def classify(self, text: str) -> TurnDecision: ...


class SmartTurnModel:
    """Smart Turn v3.2 on CPU through onnxruntime (~70-80 ms per call on one thread)."""

    name = "smart_turn"

    def __init__(self, model_path: str | os.PathLike | None = None, threshold: float = 0.5, window_s: float = 8.0, threads: int = 1):
        self.path = model_file(model_path, smart_turn_model_path, "Smart Turn")
        self._session = ort_session(self.path, threads)
        self.threshold = threshold
        self.window = round(window_s * SAMPLE_RATE)
        shape = self._session.get_inputs()[0].shape
        if shape[1:] != [80, self.window // 160]:
            raise ConfigError(f"Smart Turn model {self.path} takes input_features {shape}, not [b, 80, {self.window // 160}]; set smart_turn_window_s to match it.")

    def features(self, audio: np.ndarray) -> np.ndarray:
        return log_mel(fit_window(audio, self.window), normalize=True)

    def probability(self, audio: np.ndarray) -> float:
        (out,) = self._session.run(None, {"input_features": self.features(audio)[None]})
        return float(np.asarray(out).reshape(-1)[0])

    def decide(self, audio: np.ndarray) -> TurnDecision:
        p = self.probability(audio)
        return TurnDecision(TurnVerdict.COMPLETE if p > self.threshold else TurnVerdict.INCOMPLETE, p)


class TextTurnAnalyzer:
    """A TurnModel from a transcriber and a text classifier (the official web demo's Whisper + TEN scheme)."""

    name = "text"

    def __init__(self, transcriber: Transcriber, model: TextTurnModel, min_chars: int = 2):
        self.transcriber = transcriber
        self.model = model
        self.min_chars = min_chars

    def decide(self, audio: np.ndarray) -> TurnDecision:
        text = self.transcriber.transcribe(audio).strip()
        # The official loop ignores transcripts of one character or less (ASR noise on breaths, clicks).
        if len(text) < self.min_chars:
            return TurnDecision(TurnVerdict.INCOMPLETE, None, text)
        decision = self.model.classify(text)
        return TurnDecision(decision.verdict, decision.probability, text if decision.text is None else decision.text)


@dataclass(frozen=True)
class TurnConfig:
    """End-of-turn settings. `kind` picks the detector; the rest apply where they say."""

    kind: Literal["smart_turn", "silence", "text"] = "smart_turn"
    # kind="silence": silence after the end of speech that ends the turn.
    silence_timeout_ms: int = 800
    # kind="smart_turn"/"text": how the model's verdicts and the silence length end the turn.
    endpoint: EndpointPolicy = EndpointPolicy()
    smart_turn_threshold: float = 0.5
    smart_turn_window_s: float = 8.0
    smart_turn_model_path: str | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("smart_turn", "silence", "text"):
            raise ConfigError(f"unknown turn detector {self.kind!r}; choose smart_turn, silence or text.")
        if self.silence_timeout_ms < 0:
            raise ConfigError(f"turn silence_timeout_ms must be >= 0, got {self.silence_timeout_ms}.")
        if not 0.0 < self.smart_turn_threshold < 1.0:
            raise ConfigError(f"smart_turn_threshold must be in (0, 1), got {self.smart_turn_threshold}.")


def build_turn_model(
    config: TurnConfig, *, transcriber: Transcriber | None = None, text_model: TextTurnModel | None = None
) -> TurnModel | None:
    """The model `config.kind` names (None for "silence"); a missing model file raises ConfigError naming the package."""
    if config.kind == "silence":
        return None
    if config.kind == "smart_turn":
        return SmartTurnModel(config.smart_turn_model_path, config.smart_turn_threshold, config.smart_turn_window_s, config.threads)
    if transcriber is None or text_model is None:
        raise ConfigError(
            "turn detector 'text' needs a transcriber and a text turn model (objects implementing "
            "qinyu_edge.runtime.turn.Transcriber and TextTurnModel); pass both, or pick kind 'smart_turn' or 'silence'."
        )
    return TextTurnAnalyzer(transcriber, text_model)


@dataclass(frozen=True)
class TurnCheck:
    """The turn model was consulted at `sample`, `silence_ms` after the last voiced frame (it took
    `latency_ms` of CPU time); `threshold` is what p(complete) had to reach to commit then."""

    sample: int
    decision: TurnDecision
    latency_ms: float
    silence_ms: float = 0.0
    threshold: float = float("inf")


@dataclass(frozen=True, eq=False)
class TurnTentative:
    """The turn may be over (the model leans "complete", or the VAD closed a segment in silence mode):
    a preemptive reply may start on `audio`, the turn so far. Speech resuming before the TurnEnd voids it."""

    sample: int
    voiced_end_sample: int
    audio: np.ndarray


@dataclass(frozen=True, eq=False)
class TurnEnd:
    """The user's turn is over. `audio` covers [audio_start_sample, end_sample) with the pauses inside it."""

    audio_start_sample: int
    start_sample: int
    end_sample: int
    voiced_end_sample: int  # end of the last frame the VAD scored as speech
    detected_sample: int
    audio: np.ndarray
    segments: tuple[tuple[int, int], ...]
    reason: Literal["model", "silence", "timeout", "end_of_stream"]
    decision: TurnDecision | None = None

    @property
    def verdict(self) -> TurnVerdict:
        return self.decision.verdict if self.reason == "model" and self.decision else TurnVerdict.COMPLETE

    @property
    def latency_ms(self) -> float:
        """From the VAD's end edge to the moment the end of the turn was known, in stream time."""
        return (self.detected_sample - self.end_sample) * 1000 / SAMPLE_RATE

    @property
    def voiced_latency_ms(self) -> float:
        """From the last voiced frame to the moment the end of the turn was known, in stream time."""
        return (self.detected_sample - self.voiced_end_sample) * 1000 / SAMPLE_RATE


TurnEvent = VadEvent | TurnCheck | TurnTentative | TurnEnd


class TurnDetector:
    """VAD segmenting plus end-of-turn detection over one 16 kHz stream.

    `process(samples)` returns, in stream order, the VAD events (SpeechStart / SpeechEnd /
    SpeechDiscarded), each TurnCheck, a TurnTentative where a reply may start early, and TurnEnd. Models run synchronously in the caller's thread
    (Smart Turn ~75 ms per check): callers reading from a device ring buffer lose nothing meanwhile.
    """

    def __init__(
        self,
        vad_config: VadConfig | None = None,
        turn_config: TurnConfig | None = None,
        *,
        vad: SileroVad | None = None,
        model: TurnModel | None = None,
        transcriber: Transcriber | None = None,
        text_model: TextTurnModel | None = None,
    ):
        self.turn_config = turn_config or TurnConfig()
        self.segmenter = VadSegmenter(vad_config, vad)
        if model is None:
            model = build_turn_model(self.turn_config, transcriber=transcriber, text_model=text_model)
        elif self.turn_config.kind == "silence":
            raise ConfigError("turn kind 'silence' uses no model; drop the model argument or pick another kind.")
        self.model = model
        self.policy = self.turn_config.endpoint
        self._timeout = round(self.turn_config.silence_timeout_ms * SAMPLE_RATE / 1000)
        self._cadence = round(self.policy.check_every_ms * SAMPLE_RATE / 1000)
        self.reset()

    def reset(self) -> None:
        self.segmenter.reset()
        self.history = AudioHistory()
        self._pending = np.zeros(0, dtype=np.float32)
        self._turn_start: int | None = None  # audio start of the open turn
        self._speech_start = 0
        self._segments: list[tuple[int, int]] = []
        self._last_decision: TurnDecision | None = None
        self._voiced_end = 0
        self._next_check: int | None = None  # stream sample of the next model run while silent
        self._tentative = False

    @property
    def position(self) -> int:
        return self.segmenter.position

    @property
    def in_turn(self) -> bool:
        return self._turn_start is not None

    def process(self, samples: np.ndarray) -> list[TurnEvent]:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._pending.size:
            samples = np.concatenate([self._pending, samples])
        n = samples.size // FRAME
        events: list[TurnEvent] = []
        for i in range(n):
            frame = samples[i * FRAME:(i + 1) * FRAME]
            self.history.append(frame)
            for ev in self.segmenter.process_frame(frame):
                events.append(ev)
                events.extend(self._on_vad(ev))
            events.extend(self._endpoint())
            if self._turn_start is None:
                cfg = self.segmenter.config
                keep = int((cfg.pre_roll_ms + cfg.start_pad_ms) * SAMPLE_RATE / 1000) + FRAME
                self.history.trim(self.position - keep)
        self._pending = samples[n * FRAME:].copy()
        return events

    def flush(self) -> list[TurnEvent]:
        """End of input: close an open segment and end an open turn."""
        events: list[TurnEvent] = []
        for ev in self.segmenter.flush():
            events.append(ev)
            events.extend(self._on_vad(ev, final=True))
        if self._turn_start is not None and self._segments:
            events.append(self._end("end_of_stream", None))
        self._turn_start = None
        self._pending = np.zeros(0, dtype=np.float32)
        return events

    def _on_vad(self, ev: VadEvent, final: bool = False) -> list[TurnEvent]:
        if isinstance(ev, SpeechStart):
            if self._turn_start is None:
                pre = int(self.segmenter.config.pre_roll_ms * SAMPLE_RATE / 1000)
                self._turn_start = max(ev.sample - pre, self.history.start)
                self._speech_start = ev.sample
                self._segments = []
                self._last_decision = None
            # Speech again before the commit: the same turn goes on, a tentative end is void.
            self._next_check = None
            self._tentative = False
            return []
        if isinstance(ev, SpeechDiscarded):
            if not self._segments:
                self._turn_start = None  # the turn never got real speech
            elif self.model is not None:
                self._next_check = self.position  # a cough in the pause: judge the silence again
            return []
        assert isinstance(ev, SpeechEnd)
        self._segments.append((ev.start_sample, ev.end_sample))
        self._voiced_end = ev.voiced_end_sample
        if final or ev.truncated:
            return []
        if self.model is None:
            self._tentative = True
            return [self._tentative_end()]
        self._next_check = self.position  # judged at once, then every check_every_ms
        return []

    def _endpoint(self) -> list[TurnEvent]:
        """The policy's verdict on the silence so far: nothing, a model check, a tentative end, the end."""
        if self._turn_start is None or not self._segments or self.segmenter.in_speech:
            return []
        if self.model is None:
            if self.position - self._segments[-1][1] >= self._timeout:
                return [self._end("silence", None)]
            return []
        silence_ms = (self.position - self._voiced_end) * 1000 / SAMPLE_RATE
        if silence_ms >= self.policy.max_silence_ms:
            return [self._end("timeout", self._last_decision)]
        if self._next_check is None or self.position < self._next_check:
            return []
        # Re-check every check_every_ms, and exactly when the silence reaches the hard minimum (the
        # first moment a commit is allowed), whichever comes first.
        at_min = self._voiced_end + round(self.policy.min_silence_ms * SAMPLE_RATE / 1000)
        self._next_check = self.position + self._cadence if self.position >= at_min else min(self.position + self._cadence, at_min)
        t0 = time.perf_counter()
        decision = self._last_decision = self.model.decide(self.history.slice(self._turn_start, self.position))
        threshold = self.policy.threshold(silence_ms)
        check = TurnCheck(self.position, decision, (time.perf_counter() - t0) * 1000, silence_ms, threshold)
        log.debug("turn check at %.2f s, %.0f ms of silence: %s (p=%s, needs %.2f, %.0f ms)", self.position / SAMPLE_RATE,
                  silence_ms, decision.verdict.value, decision.probability, threshold, check.latency_ms)
        if decision.verdict is TurnVerdict.WAIT:
            return [check, self._end("model", decision)]
        p = decision.probability
        if p is None:  # a model without a probability: its verdict is all or nothing
            p = 1.0 if decision.verdict is TurnVerdict.COMPLETE else 0.0
        events: list[TurnEvent] = [check]
        if not self._tentative and p >= self.policy.tentative_threshold:
            self._tentative = True
            events.append(self._tentative_end())
        if self.policy.commits(silence_ms, p):
            events.append(self._end("model", decision))
        return events

    def _tentative_end(self) -> TurnTentative:
        return TurnTentative(self.position, self._voiced_end, self.history.slice(self._turn_start, self._segments[-1][1]))

    def _end(self, reason, decision: TurnDecision | None) -> TurnEnd:
        end = self._segments[-1][1]
        ev = TurnEnd(
            self._turn_start, self._speech_start, end, self._voiced_end, self.position,
            self.history.slice(self._turn_start, end), tuple(self._segments), reason, decision,
        )
        self._turn_start = None
        self._segments = []
        self._next_check = None
        self._tentative = False
        return ev


__all__ = [
    "SMART_TURN_INSTALL",
    "SmartTurnModel",
    "TextTurnAnalyzer",
    "TextTurnModel",
    "Transcriber",
    "TurnCheck",
    "TurnConfig",
    "TurnDecision",
    "TurnDetector",
    "TurnEnd",
    "TurnEvent",
    "TurnModel",
    "TurnTentative",
    "TurnVerdict",
    "build_turn_model",
    "smart_turn_model_path",
]
