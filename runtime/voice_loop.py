"""The voice loop: microphone -> VAD -> end of turn -> generation -> streaming playback, with barge-in.

A small explicit state machine. Every transition is an event (typed dataclasses), so a caller can log
or test the whole conversation; per-turn timings are collected for the JSONL log.

    listening --SpeechStart--> user_speaking --TurnEnd--> responding --first chunk--> speaking
        ^                                                   |                          |
        +------------------- reply done and played ---------+--------------------------+
    responding/speaking --user speech >= barge_in_min_ms (full duplex)--> barge-in: playback cut,
        generation cancelled at its next step, only the played part of the reply kept in history.
    user_speaking --TurnTentative--> a preemptive reply generates with its playback held
        (reply_job.py); TurnEnd releases it, SpeechStart before that discards it.

Generation runs in a worker thread; the loop keeps reading the microphone meanwhile, so a device
ring buffer never overflows and barge-in is heard while the reply plays.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Literal

import numpy as np

from qinyu_edge.errors import ConfigError

from .audio_devices import AudioDeviceLost, AudioSink, AudioSource
from .conversation import Conversation
from .reply_job import ReplyJob
from .streaming import SAMPLES_PER_FRAME, Interleave, playback_start_delay_s
from .turn import TurnDetector, TurnEnd, TurnTentative
from .vad import SpeechEnd, SpeechStart

log = logging.getLogger(__name__)

BLOCK = 512  # samples per mic read at 16 kHz (32 ms), the VAD's frame


class State(str, Enum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    RESPONDING = "responding"  # end of turn seen; encoding, prefill, generating before first audio
    SPEAKING = "speaking"  # reply audio is being played


@dataclass(frozen=True)
class LoopConfig:
    # half: the microphone is ignored while the assistant speaks (safe on open speakers without an echo
    # canceller); full: user speech during playback is a barge-in (a headset, or AEC: runtime/echo_cancel.py).
    duplex: Literal["half", "full"] = "half"
    barge_in_min_ms: int = 300  # user speech this long during a reply interrupts it
    # Start generating on a tentative end of turn, playing only once the turn commits.
    preemptive: bool = True
    # Delay the start of playback from the measured decode step rate so the reply never runs dry
    # (the first reply, before any measurement, starts at once).
    paced_start: bool = True
    drain_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.duplex not in ("half", "full"):
            raise ConfigError(f"duplex must be 'half' or 'full', got {self.duplex!r}")


@dataclass(frozen=True)
class StateChanged:
    old: State
    new: State
    at: float  # seconds since the loop started (wall clock)
    reason: str


@dataclass(frozen=True)
class DeviceLost:
    at: float
    message: str


@dataclass(frozen=True)
class ReplyDiscarded:
    """A preemptive reply was dropped unplayed: the user spoke again before the turn committed."""

    at: float
    generated_ms: float


@dataclass(frozen=True)
class BargeIn:
    at: float
    played_seconds: float
    kept_text: str


@dataclass
class TurnRecord:
    """One turn's timings in milliseconds from the end of the user's voice (the last frame the VAD
    scored as speech), and the input clock (seconds from the first input sample) of its edges."""

    index: int
    user_seconds: float
    turn_reason: str
    vad_end_ms: float = 0.0  # the VAD's end-of-segment event
    turn_decision_ms: float = 0.0  # the turn committed
    encoder_ms: float | None = None
    prefill_ms: float | None = None
    prefill_positions: int = 0  # the prompt's length
    reused_positions: int = 0  # of them, kept from the cache rather than run
    first_chunk_ms: float | None = None
    first_played_ms: float | None = None
    generation_end_ms: float | None = None
    reply_end_ms: float | None = None  # playback of the reply finished (or was cut)
    reply_text: str = ""
    reply_audio_seconds: float = 0.0
    steps: int = 0
    ms_per_step: float = 0.0
    playback_delay_ms: float = 0.0  # playback start held back after the first chunk (paced start)
    underruns: int = 0  # playback ran dry mid-reply
    stop: str = ""
    barge_in: bool = False
    preemptive: bool = False  # generation started on a tentative end, before the commit
    input_speech_start_s: float = 0.0
    input_speech_end_s: float = 0.0
    input_commit_s: float = 0.0
    input_first_audio_s: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


Event = StateChanged | BargeIn | ReplyDiscarded | DeviceLost | TurnRecord
EventCallback = Callable[[object], None]


@dataclass
class _Turn:
    """A committed turn's reply in flight and its record."""

    job: ReplyJob
    record: TurnRecord
    t_voiced_end: float  # wall clock of the end of the user's voice
    underruns_before: int  # the sink's underrun count when the reply began


class VoiceLoop:
    def __init__(self, conversation: Conversation, source: AudioSource, sink: AudioSink, detector: TurnDetector,
                 config: LoopConfig = LoopConfig(), on_event: EventCallback | None = None):
        self.conv, self.source, self.sink, self.detector = conversation, source, sink, detector
        self.config = config
        self.on_event = on_event
        self.state = State.LISTENING
        self.events: list[object] = []
        self.turns: list[TurnRecord] = []
        self._turn: _Turn | None = None  # the committed turn whose reply is in flight
        self._preempt: ReplyJob | None = None  # a reply started on a tentative end, not yet committed
        self._speech_start: int | None = None  # stream sample of the latest SpeechStart
        self._vad_end = 0  # stream sample of the latest SpeechEnd event
        self.level = 0.0  # RMS of the latest microphone block, for a level meter
        self._input_samples = 0  # samples read from the source so far: the input clock
        self._input_offset = 0  # input samples before the detector's stream position 0 (it is reset)
        self._ms_per_step: float | None = None  # measured on the previous reply
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._cut_on_stop = False

    # -- plumbing -------------------------------------------------------------------------------

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def _input_s(self, sample: int) -> float:
        """Input clock (seconds from the first input sample) of a detector stream sample."""
        return (self._input_offset + sample) / 16000

    def _emit(self, ev: object) -> None:
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(ev)

    def _go(self, new: State, reason: str) -> None:
        if new != self.state:
            ev = StateChanged(self.state, new, self._now(), reason)
            log.debug("%s -> %s (%s)", self.state.value, new.value, reason)  # on_event reports them
            self.state = new
            self._emit(ev)

    def stop(self, cut_reply: bool = False) -> None:
        """Ask the loop to end (from another thread or a signal handler). The reply in flight is played to
        its end; with cut_reply (a service being stopped) it is cut at once, as a barge-in cuts it, and
        only what was played joins the history and the turn record."""
        self._cut_on_stop = self._cut_on_stop or cut_reply
        self._stop.set()

    # -- replies ------------------------------------------------------------------------------

    def _start_delay_s(self) -> float:
        if not self.config.paced_start or not self._ms_per_step:
            return 0.0
        # Trained pattern: 4 text steps per 8 audio steps, so 1.5 steps per frame of 80 ms.
        il = Interleave()
        speed = (SAMPLES_PER_FRAME / 32) / (self._ms_per_step * (il.text + il.audio) / il.audio)
        # The longest reply it may be: every step an audio step.
        return playback_start_delay_s(self.conv.schedule, self.conv.max_new_tokens, speed)

    def _new_job(self, audio: np.ndarray, released: bool) -> ReplyJob:
        return ReplyJob(self.conv, audio, self.sink, released=released, input_clock=lambda: self._input_samples / 16000,
                        start_delay_s=self._start_delay_s()).start()

    def _preempt_reply(self, ev: TurnTentative) -> None:
        log.debug("tentative end of turn at %.2f s: preemptive reply started", self._input_s(ev.sample))
        self._preempt = self._new_job(ev.audio, released=False)

    def _discard_preempt(self) -> None:
        job, self._preempt = self._preempt, None
        assert job is not None
        job.discard()
        log.info("user spoke again: preemptive reply discarded unplayed")
        self._emit(ReplyDiscarded(self._now(), (time.perf_counter() - job.started) * 1e3))

    def _start_reply(self, end: TurnEnd, read_wall: float) -> None:
        # The last block read holds stream sample `position`; the voice stopped `lag` earlier than that
        # block arrived. The decision is known now, after the turn model has run.
        lag_s = (self.detector.position - end.voiced_end_sample) / 16000
        t_voiced_end = read_wall - lag_s
        job, self._preempt = self._preempt, None
        if job is not None and not np.array_equal(job.audio, end.audio):
            job.discard()  # cannot happen with one detector; a stale reply must never play
            job = None
        record = TurnRecord(index=len(self.turns), user_seconds=end.audio.size / 16000, turn_reason=end.reason,
                            vad_end_ms=(self._vad_end - end.voiced_end_sample) / 16,
                            turn_decision_ms=(time.perf_counter() - t_voiced_end) * 1e3, preemptive=job is not None,
                            input_speech_start_s=self._input_s(end.start_sample),
                            input_speech_end_s=self._input_s(end.voiced_end_sample),
                            input_commit_s=self._input_s(end.detected_sample))
        if job is None:
            job = self._new_job(end.audio, released=True)
        else:
            job.release()
        record.playback_delay_ms = job.start_delay_s * 1e3
        self._turn = _Turn(job, record, t_voiced_end, self.sink.stats.underruns)
        self._go(State.RESPONDING, f"end of turn ({end.reason})")

    def _since(self, wall: float | None) -> float | None:
        assert self._turn is not None
        return None if wall is None else (wall - self._turn.t_voiced_end) * 1e3

    def _collect(self) -> None:
        """The generation is over (done or cancelled): take its reply and timings."""
        turn = self._turn
        assert turn is not None
        try:
            reply = turn.job.join()
        except BaseException:
            self._turn = None
            raise
        rec, t = turn.record, reply.timings
        rec.encoder_ms, rec.prefill_ms = t.encoder_ms, t.prefill_ms
        rec.prefill_positions, rec.reused_positions = t.prefill_positions, t.reused_positions
        if t.first_audio_ms is not None:
            rec.first_chunk_ms = self._since(turn.job.started + t.first_audio_ms / 1e3)
        rec.generation_end_ms = self._since(time.perf_counter())
        rec.steps, rec.ms_per_step, rec.stop = t.steps, t.ms_per_step, reply.stop
        if t.steps >= 8:  # a step rate worth pacing the next reply by
            self._ms_per_step = t.ms_per_step
        rec.reply_audio_seconds = t.audio_seconds

    def _commit(self, barge_in: bool, cut: bool = False) -> None:
        """The reply has been played out (or cut: by a barge-in, or by stop(cut_reply=True)): it joins the
        history, as far as it was heard."""
        turn = self._turn
        assert turn is not None and turn.job.collected and turn.job.reply is not None
        rec, reply, job = turn.record, turn.job.reply, turn.job
        rec.first_played_ms = self._since(job.first_played)
        rec.input_first_audio_s = job.first_played_input_s
        rec.reply_end_ms = self._since(time.perf_counter())
        rec.underruns = self.sink.stats.underruns - turn.underruns_before
        self._turn = None
        rec.barge_in = barge_in
        if barge_in or cut:
            played = self.sink.played_seconds - job.played_before
            kept = self.conv.spoken_text(reply, played)
            self.conv.commit_turn(reply, kept)
            rec.reply_text = kept
            if barge_in:
                self._emit(BargeIn(self._now(), played, kept))
        else:
            self.conv.commit_turn(reply)
            rec.reply_text = reply.text
        self.turns.append(rec)
        self._emit(rec)

    # -- the loop -------------------------------------------------------------------------------

    def _cut_reply(self) -> float:
        """Stop the reply in flight now; the seconds of queued audio dropped."""
        assert self._turn is not None
        job = self._turn.job
        job.cancel.set()  # first, so no chunk decoded from here on is queued
        dropped = self.sink.flush()  # playback stops within one device block
        if not job.collected:
            self._collect()
        return dropped

    def _barge_in(self) -> None:
        dropped = self._cut_reply()
        log.info("barge-in: playback cut (%.2f s dropped), generation cancelled", dropped)
        self._commit(barge_in=True)
        self._go(State.USER_SPEAKING, "barge-in")

    def run(self) -> list[TurnRecord]:
        """Until the source ends (then the last reply is finished and played) or stop() is called."""
        self.source.start()
        self.sink.start()
        self._t0 = time.perf_counter()
        try:
            while not self._stop.is_set():
                if self._turn is not None and not self.source.paced:
                    # An unpaced source would be read to its end while the reply is made.
                    self._turn.job.thread.join()
                try:
                    block = self.source.read(BLOCK)
                except AudioDeviceLost as e:
                    # The session ends cleanly: the reply in flight is finished below, nothing hangs.
                    log.error("%s", e)
                    self._emit(DeviceLost(self._now(), str(e)))
                    break
                if block is None:
                    break
                self._input_samples += block.size
                self._step(block, time.perf_counter())
            if self._cut_on_stop and self._turn is not None:
                log.info("stopped: reply cut (%.2f s of queued audio dropped)", self._cut_reply())
                self._commit(barge_in=False, cut=True)
            if self.detector.in_turn and self._turn is None and not self._cut_on_stop:
                for ev in self.detector.flush():
                    if isinstance(ev, TurnEnd):
                        self._start_reply(ev, time.perf_counter())
            if self._turn is not None:
                if not self._turn.job.collected:
                    self._collect()
                self.sink.finish()
                self.sink.drain(self.config.drain_timeout_s)
                self._commit(barge_in=False)
            self._go(State.LISTENING, "done")
        finally:
            for job in (self._turn.job if self._turn else None, self._preempt):
                if job is not None:
                    job.cancel.set()
                    self.sink.flush()  # a reply thread blocked on a full playback queue returns at once
                    job.thread.join()
            self.source.close()
            self.sink.close()
        return self.turns

    def _step(self, block: np.ndarray, read_wall: float) -> None:
        self.level = float(np.sqrt(np.mean(np.square(block)))) if block.size else 0.0
        turn = self._turn
        if turn is not None:
            job = turn.job
            if job.first_played is not None and self.state == State.RESPONDING:
                self._go(State.SPEAKING, "first audio chunk")
            if not job.collected and not job.thread.is_alive():
                self._collect()
                self.sink.finish()
            if job.collected and self.sink.queued_seconds <= 0:
                self._commit(barge_in=False)
                if self.config.duplex == "half":
                    # What the mic heard meanwhile was our own voice; the detector's clock restarts.
                    self._input_offset = self._input_samples - block.size
                    self.detector.reset()
                self._go(State.LISTENING, "reply played")
        busy = self.state in (State.RESPONDING, State.SPEAKING)
        if busy and self.config.duplex == "half":
            return
        for ev in self.detector.process(block):
            self._emit(ev)
            if isinstance(ev, SpeechStart):
                self._speech_start = ev.sample
                if self._preempt is not None:
                    self._discard_preempt()
                if self.state == State.LISTENING:
                    self._go(State.USER_SPEAKING, "speech start")
            elif isinstance(ev, SpeechEnd):
                self._vad_end = ev.detected_sample
            elif isinstance(ev, TurnTentative):
                if self.config.preemptive and self.state == State.USER_SPEAKING and self._preempt is None:
                    self._preempt_reply(ev)
            elif isinstance(ev, TurnEnd) and self.state == State.USER_SPEAKING:
                self._start_reply(ev, read_wall)
        if self._turn is not None and self.detector.segmenter.in_speech and self._speech_start is not None:
            heard_ms = (self.detector.position - self._speech_start) * 1000 / 16000
            if heard_ms >= self.config.barge_in_min_ms:
                self._barge_in()
