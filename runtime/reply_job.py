"""One assistant reply generated in a worker thread, with its playback gated.

A preemptive reply starts on a tentative end of turn, before the turn is committed: the encoder,
prefill and decoding run at once, but every audio chunk is held back until `release()` (the commit).
If the user speaks again first, `discard()` cancels it; nothing was played, and since the loop asks
with commit=False, nothing entered the history. A reply started at the commit is released at birth.

`start_delay_s` postpones playback after the first chunk (computed by the loop from the measured
step rate) so that a reply generated near real time never runs dry; the sink plays silence first,
which delays the start exactly as a held chunk would, without stalling the generating thread.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from .audio_devices import AudioSink
from .conversation import Conversation, Reply


class ReplyJob:
    def __init__(self, conv: Conversation, audio: np.ndarray, sink: AudioSink, *, released: bool,
                 input_clock: Callable[[], float], start_delay_s: float = 0.0):
        self.conv, self.audio, self.sink = conv, audio, sink
        self.input_clock = input_clock  # seconds of input read so far: when the first sample played
        self.start_delay_s = start_delay_s
        self.cancel = threading.Event()
        self.released = released
        self._lock = threading.Lock()  # orders held chunks before later ones at release
        self._held: list[np.ndarray] = []
        self.started = time.perf_counter()  # wall clock when generation began
        self.reply: Reply | None = None
        self.error: BaseException | None = None
        self.first_played: float | None = None  # wall clock of the first chunk handed to playback
        self.first_played_input_s: float | None = None
        self.played_before = sink.played_seconds  # the sink's played seconds when playback of this reply began
        self.collected = False  # generation over, reply taken
        self.thread = threading.Thread(target=self._run, name="qinyu-reply", daemon=True)

    def start(self) -> ReplyJob:
        self.thread.start()
        return self

    def _play(self, chunk: np.ndarray) -> None:
        if self.first_played is None:
            delay = self.start_delay_s
            self.first_played = time.perf_counter() + delay
            self.first_played_input_s = self.input_clock() + delay
            if delay > 0:
                self.sink.write(np.zeros(round(delay * self.sink.rate), dtype=np.float32))
                self.played_before += delay  # the lead-in silence is not part of the reply
        self.sink.write(chunk)

    def _on_chunk(self, chunk: np.ndarray) -> None:
        if self.cancel.is_set():
            return
        with self._lock:
            if self.released:
                self._play(chunk)
            else:
                self._held.append(chunk)

    def _run(self) -> None:
        try:
            self.reply = self.conv.ask(self.audio, on_chunk=self._on_chunk, cancel=self.cancel, commit=False)
            if not self.cancel.is_set():
                # While the reply plays: the next prompt's start (this reply as text) into the cache.
                self.conv.prefill_ahead(self.reply)
        except BaseException as e:  # noqa: BLE001 - re-raised by the loop thread in join()
            self.error = e

    def release(self) -> None:
        """The turn is committed: play what was held, then every later chunk as it comes."""
        with self._lock:
            self.played_before = self.sink.played_seconds
            self.released = True
            held, self._held = self._held, []
            for chunk in held:
                self._play(chunk)

    def join(self) -> Reply:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        self.collected = True
        return self.reply

    def discard(self) -> None:
        """The user went on speaking: stop generating and drop everything, played or held (nothing was played)."""
        assert not self.released, "a released reply is cut by a barge-in, not discarded"
        self.cancel.set()
        self.thread.join()
        self._held.clear()


__all__ = ["ReplyJob"]
