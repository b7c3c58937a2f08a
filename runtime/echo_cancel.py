"""Acoustic echo cancellation for the voice loop: the assistant's own voice is removed from the microphone.

WebRTC's audio processing module (AEC3, noise suppression, high-pass), as the `livekit` Python SDK packages it
(`livekit.rtc.AudioProcessingModule`), runs in this process. It is preferred over PulseAudio's
module-echo-cancel because it sees exactly the samples we play (the reference is not another PulseAudio
stream that may not be the one the speaker gets), works with any PortAudio backend, file and virtual
devices and no sound server at all, and ships prebuilt wheels for x86_64 and aarch64 (Jetson).

    sink (DeviceSink callback / FileSink) --played samples, rate, wall time--> PlaybackTap
    source --mic block--> EchoCancelledSource --10 ms frames: reference (tap) + mic--> AEC3 --> cleaned 16 kHz

The reference and the microphone are paired by wall time: the tap lays played audio on a 16 kHz timeline
of the monotonic clock (silence where nothing played), and each mic read takes the reference up to the
read's time. What is left is the echo path's delay (output + acoustic + input latency), estimated by GCC-PHAT
on reference vs raw mic once the far end has spoken enough and re-estimated periodically; and clock drift
between the two devices, estimated from sample counts against the monotonic clock and compensated by
resampling the reference (soxr) to the microphone's clock.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import soxr

from qinyu_edge.errors import QinyuError

from .audio_devices import CAPTURE_RATE, StreamStats

log = logging.getLogger(__name__)

FRAME = CAPTURE_RATE // 100  # the APM's 10 ms frame at 16 kHz
MIN_LEAD = CAPTURE_RATE // 200  # 5 ms: the least the reference must lead its echo by
AecMode = Literal["on", "off", "auto"]
# Device names that say the speaker cannot reach the microphone (no echo to cancel).
HEADSET_WORDS = ("headset", "headphone", "earbud", "earphone", "airpods")


class EchoCancellerUnavailable(QinyuError):
    """The echo canceller's package (livekit) cannot be imported."""


def load_apm():
    """livekit's AudioProcessingModule class, or EchoCancellerUnavailable saying how to get it."""
    try:
        from livekit.rtc import AudioFrame, AudioProcessingModule
    except ImportError as e:
        raise EchoCancellerUnavailable(
            f"acoustic echo cancellation needs the `livekit` package ({e}); install it with "
            "`pip install 'qinyu-edge[audio]'` (or `pip install livekit`), or run with --aec off."
        ) from None
    return AudioProcessingModule, AudioFrame


def is_headset(*names: str | None) -> bool:
    """True when a device name says it is a headset (its speaker does not feed its microphone)."""
    return any(w in (n or "").lower() for n in names for w in HEADSET_WORDS)


@dataclass(frozen=True)
class AecDecision:
    on: bool
    reason: str
    missing: bool = False  # wanted, but livekit cannot be imported


def resolve_aec(mode: AecMode, input_name: str | None, output_name: str | None) -> AecDecision:
    """What --aec means for these devices: auto is on when livekit imports and the devices are not a headset."""
    if mode not in ("on", "off", "auto"):
        raise QinyuError(f"--aec must be on, off or auto, got {mode!r}")
    if mode == "off":
        return AecDecision(False, "--aec off")
    if mode == "auto" and is_headset(input_name, output_name):
        return AecDecision(False, f"--aec auto: a headset ({input_name} / {output_name}) needs no echo canceller")
    try:
        load_apm()
    except EchoCancellerUnavailable as e:
        return AecDecision(False, str(e), missing=True)
    return AecDecision(True, f"--aec {mode}: echo canceller on ({input_name} / {output_name})")


def wire_echo_canceller(mode: AecMode, source, sink, duplex: str, input_name: str | None, output_name: str | None,
                        config: AecConfig | None = None) -> tuple[object, str, AecDecision]:
    """(the source the loop reads, the duplex mode to run, the decision) for `chat`.

    With AEC on, the sink reports what it plays to a tap and the loop reads the cleaned microphone. Without
    it on an open speaker because livekit is missing, full duplex would interrupt itself: half duplex runs.
    """
    decision = resolve_aec(mode, input_name, output_name)
    if decision.on:
        tap = PlaybackTap()
        sink.tap = tap
        log.info("%s", decision.reason)
        return EchoCancelledSource(source, tap, config or AecConfig()), duplex, decision
    if decision.missing:
        log.warning("no echo cancellation: %s", decision.reason)
        if duplex == "full" and not is_headset(input_name, output_name):
            log.warning("running in half duplex: on an open speaker the assistant would interrupt itself")
            return source, "half", decision
    return source, duplex, decision


@dataclass(frozen=True)
class AecConfig:
    noise_suppression: bool = False
    max_delay_ms: int = 500  # the longest echo path the delay estimate searches
    window_s: float = 2.0  # reference/mic history one delay estimate correlates
    reestimate_s: float = 2.0  # how often the delay is estimated again (while the far end speaks)
    active_fraction: float = 0.3  # share of the window with far-end speech needed for an estimate
    min_peak_ratio: float = 6.0  # GCC-PHAT peak over the correlation's RMS: below, the estimate is kept
    drift_min_span_s: float = 10.0  # sample counts over at least this long before a clock rate is trusted
    max_drift_ppm: float = 500.0  # larger rate errors are not crystal drift (a stall, a gap): ignored
    mic_window_s: float = 30.0  # the microphone's timing: earliest capture time over this many recent seconds

    def __post_init__(self) -> None:
        if not 0 < self.max_delay_ms < self.window_s * 1000:
            raise QinyuError(f"AEC max_delay_ms must be > 0 and below window_s, got {self.max_delay_ms}")


class RateEstimator:
    """A stream's real sample rate from (monotonic time, samples so far) pairs: the least-squares slope."""

    def __init__(self, skip_s: float = 2.0) -> None:
        # A stream's first seconds are not its steady rate (a playback stream fills its buffers at once).
        self.skip_s = skip_s
        self._first: float | None = None
        self._t: list[float] = []
        self._n: list[float] = []

    def add(self, t: float, count: int) -> None:
        if self._first is None:
            self._first = t
        if t - self._first < self.skip_s:
            return
        self._t.append(t)
        self._n.append(float(count))
        if len(self._t) > 4096:  # keep a long baseline, thinned
            self._t, self._n = self._t[::2], self._n[::2]

    def span(self) -> float:
        return self._t[-1] - self._t[0] if len(self._t) > 1 else 0.0

    def rate(self, max_error_ppm: float = 20.0) -> float | None:
        """The slope, once its standard error is below `max_error_ppm` of it (callback times jitter by tens of ms)."""
        if len(self._t) < 8:
            return None
        t = np.asarray(self._t) - self._t[0]
        n = np.asarray(self._n)
        slope, icpt = np.polyfit(t, n, 1)
        res = n - (slope * t + icpt)
        se = np.sqrt(np.sum(res ** 2) / (t.size - 2) / (np.sum((t - t.mean()) ** 2) + 1e-12))
        return float(slope) if slope > 0 and se / slope * 1e6 < max_error_ppm else None


class PlaybackTap:
    """What the speaker actually played, on a 16 kHz timeline of the monotonic clock.

    `played` is called from a PortAudio callback: it only appends to a deque (atomic under the GIL); the
    reader resamples and places the audio. A continuous stream (a device's callbacks, silence included)
    reports `contiguous=True` after its first block: its samples follow each other on the device's clock,
    whatever the callbacks' timing jitter. Otherwise (a file sink's segments) playback reported more than
    20 ms after the end of the previous report starts a new run, after a gap of silence.
    """

    SNAP = CAPTURE_RATE // 50  # 20 ms

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.origin = clock()
        # (at, rate, samples, contiguous), or (at, 0, None, False) for a cut
        self._inbox: collections.deque[tuple[float, int, np.ndarray | None, bool]] = collections.deque()
        self._buf = np.zeros(0, dtype=np.float32)  # timeline from index self._base on
        self._base = 0  # timeline index of self._buf[0]
        self._resamplers: dict[int, soxr.ResampleStream] = {}
        self.samples_played = 0  # at 16 kHz, every report
        self.drift_ppm = 0.0  # the sink's clock against the microphone's, as compensated
        self._drift_rs: soxr.ResampleStream | None = None
        self._new_run()

    def played(self, samples: np.ndarray, rate: int, at: float | None = None, contiguous: bool = False) -> None:
        """The sink played `samples` (mono, at `rate`) starting at monotonic time `at` (default: now), right
        after the previous report when `contiguous`."""
        self._inbox.append((self.clock() if at is None else at, int(rate), np.array(samples, dtype=np.float32).reshape(-1), contiguous))

    def cut(self, at: float) -> None:
        """What was reported to play from monotonic time `at` on will not play (the sink was flushed)."""
        self._inbox.append((at, 0, None, False))

    def _new_run(self) -> None:
        self._run = RateEstimator()  # the sink's clock: 16 kHz samples vs time, within one run
        self._run_count = 0

    def sink_rate(self, min_span_s: float) -> float | None:
        """The sink's clock in 16 kHz samples per monotonic second, over the current run once it is long enough."""
        return self._run.rate() if self._run.span() >= min_span_s else None

    def compensate(self, ppm: float) -> None:
        """Resample what is played from now on by `ppm` (soxr), so it spans the microphone's time it really took."""
        self.drift_ppm = ppm
        self._drift_rs = soxr.ResampleStream(CAPTURE_RATE, CAPTURE_RATE / (1 + ppm * 1e-6), 1, dtype="float32", quality="QQ")

    def _place(self, at: float, rate: int, x: np.ndarray | None, contiguous: bool) -> None:
        if x is None:
            keep = max(0, round((at - self.origin) * CAPTURE_RATE) - self._base)
            self._buf = self._buf[:keep]
            self._new_run()
            return
        if rate != CAPTURE_RATE:
            rs = self._resamplers.get(rate)
            if rs is None:
                # Quick (cubic) quality: the better filters hold back tens of ms of output, which would
                # leave the reference behind the microphone; the reference only has to resemble the echo.
                rs = self._resamplers[rate] = soxr.ResampleStream(rate, CAPTURE_RATE, 1, dtype="float32", quality="QQ")
            x = rs.resample_chunk(x)
        self._run_count += x.size
        self._run.add(at + x.size / CAPTURE_RATE, self._run_count)
        self.samples_played += x.size
        if self._drift_rs is not None:
            x = self._drift_rs.resample_chunk(x)
        end = self._base + self._buf.size
        pos = round((at - self.origin) * CAPTURE_RATE)
        if not contiguous and pos > end + self.SNAP:  # a gap: silence, and a new run for the rate estimate
            self._buf = np.concatenate([self._buf, np.zeros(pos - end, np.float32), x])
            self._new_run()
        else:
            self._buf = np.concatenate([self._buf, x])

    def take(self, until: float) -> np.ndarray:
        """The reference from where the last take ended up to monotonic time `until` (zeros where nothing played)."""
        while self._inbox:
            self._place(*self._inbox.popleft())
        stop = round((until - self.origin) * CAPTURE_RATE)
        if stop <= self._base:
            return np.zeros(0, np.float32)
        n = stop - self._base
        out = self._buf[:n]
        if out.size < n:
            out = np.concatenate([out, np.zeros(n - out.size, np.float32)])
        self._buf = self._buf[n:]
        self._base = stop
        return out


def gcc_phat(ref: np.ndarray, mic: np.ndarray, max_lag: int) -> tuple[int, float]:
    """(lag in samples by which `mic` trails `ref`, -max_lag..max_lag; peak over the correlation's RMS) by GCC-PHAT."""
    nfft = 1 << (ref.size + mic.size - 1).bit_length()
    r, m = np.fft.rfft(ref, nfft), np.fft.rfft(mic, nfft)
    cross = m * np.conj(r)
    # Whitening bins where the reference has no energy would only add noise to the correlation.
    power = np.abs(r) ** 2
    cross = np.where(power > power.max() * 1e-4, cross / (np.abs(cross) + 1e-12), 0)
    cc = np.fft.irfft(cross, nfft)
    cc = np.concatenate([cc[-max_lag:], cc[: max_lag + 1]])  # lags -max_lag .. max_lag
    i = int(np.argmax(cc))
    return i - max_lag, float(cc[i] / (np.sqrt(np.mean(cc ** 2)) + 1e-12))


@dataclass
class AecStats:
    frames: int = 0
    delay_ms: float | None = None  # the latest accepted estimate
    delay_estimates: int = 0
    drift_ppm: float = 0.0  # the speaker's clock against the microphone's: the reference is resampled by it
    ref_underflows: int = 0  # mic frames with no reference yet (zeros used)
    realigned: int = 0  # times the reference was found behind the echo and moved


class EchoCancelledSource:
    """An AudioSource whose reads are the microphone with the tap's playback cancelled (16 kHz mono float32)."""

    rate = CAPTURE_RATE

    def __init__(self, source, tap: PlaybackTap, config: AecConfig = AecConfig()):
        Apm, self._Frame = load_apm()
        self.source, self.tap, self.config = source, tap, config
        self._apm = Apm(echo_cancellation=True, noise_suppression=config.noise_suppression,
                        high_pass_filter=True, auto_gain_control=False)
        self.aec = AecStats()
        self._ref = np.zeros(0, np.float32)  # reference taken from the tap, not yet paired
        self._out = np.zeros(0, np.float32)  # cleaned samples not yet returned
        hist = int(config.window_s * CAPTURE_RATE)
        self._hist_ref = collections.deque(maxlen=hist // FRAME)
        self._hist_mic = collections.deque(maxlen=hist // FRAME)
        self._next_estimate = int(config.reestimate_s * 100)
        self._mic_count = 0
        self._mic_rate = RateEstimator()
        self._reads: collections.deque[tuple[float, int]] = collections.deque()  # (monotonic time, samples so far)
        self._mic = np.zeros(0, np.float32)  # raw mic samples waiting for their reference
        self._skip_ref = 0  # reference samples still to drop (realignment)

    @property
    def stats(self) -> StreamStats:
        return self.source.stats

    @property
    def paced(self) -> bool:
        return self.source.paced

    def start(self) -> None:
        self.source.start()

    def close(self) -> None:
        self.source.close()

    def discard(self) -> int:
        return self.source.discard() if hasattr(self.source, "discard") else 0

    def read(self, n: int) -> np.ndarray | None:
        while self._out.size < n:
            need = -(-(n - self._out.size) // FRAME) * FRAME  # whole 10 ms frames
            block = self.source.read(need)
            if block is None:
                return None
            self._process(np.asarray(block, np.float32), self.tap.clock())
        out, self._out = self._out[:n], self._out[n:]
        return out

    # -- internals ----------------------------------------------------------------------------------

    def _update_drift(self) -> None:
        """The speaker's and the microphone's clocks, each measured against the monotonic clock; when both are
        known and differ (crystal drift), the reference is resampled onto the microphone's clock."""
        span = self.config.drift_min_span_s
        spk = self.tap.sink_rate(span)
        mic = self._mic_rate.rate() if self._mic_rate.span() >= span else None
        if spk is None or mic is None:
            return
        ppm = (spk / mic - 1) * 1e6
        if abs(ppm) <= self.config.max_drift_ppm and abs(ppm - self.tap.drift_ppm) >= 20:
            self.tap.compensate(ppm)
            self.aec.drift_ppm = ppm
            log.info("AEC: the speaker's clock runs %.0f ppm off the microphone's; reference resampled", ppm)

    def _mic_time(self, now: float) -> float:
        """When the newest mic sample was captured. A read returns at or after the capture of its last sample, so
        the earliest (read time - samples / 16 kHz) over the recent reads is the stream's start, free of read jitter."""
        self._mic_rate.add(now, self._mic_count)
        self._update_drift()
        self._reads.append((now, self._mic_count))
        while self._reads[-1][0] - self._reads[0][0] > self.config.mic_window_s:
            self._reads.popleft()
        start = min(t - n / CAPTURE_RATE for t, n in self._reads)
        return start + self._mic_count / CAPTURE_RATE

    def _process(self, mic: np.ndarray, now: float) -> None:
        self._mic_count += mic.size
        self._ref = np.concatenate([self._ref, self.tap.take(self._mic_time(now))])
        if self._skip_ref:
            n = min(self._skip_ref, self._ref.size)
            self._ref, self._skip_ref = self._ref[n:], self._skip_ref - n
        self._mic = np.concatenate([self._mic, mic])
        lag = self._mic.size - self._ref.size
        if lag > 10 * FRAME:  # the reference stays behind (a stalled tap): pair with silence
            self.aec.ref_underflows += 1
            self._ref = np.concatenate([self._ref, np.zeros(lag, np.float32)])
        elif lag < -10 * FRAME:  # the mic's timing moved back: the oldest reference is in the past
            self._ref = self._ref[-lag:]
        mic, self._mic = self._mic, np.zeros(0, np.float32)
        frames = min(mic.size, self._ref.size) // FRAME
        self._mic = mic[frames * FRAME:]
        cleaned = np.empty(frames * FRAME, np.float32)
        for i in range(frames):
            ref, raw = self._ref[i * FRAME:(i + 1) * FRAME], mic[i * FRAME:(i + 1) * FRAME]
            cleaned[i * FRAME:(i + 1) * FRAME] = self._frame(ref, raw)
        self._ref = self._ref[frames * FRAME:]
        self._out = np.concatenate([self._out, cleaned])

    def _frame(self, ref: np.ndarray, raw: np.ndarray) -> np.ndarray:
        self._hist_ref.append(ref)
        self._hist_mic.append(raw)
        self.aec.frames += 1
        if self.aec.frames >= self._next_estimate:
            self._estimate_delay()
        self._apm.process_reverse_stream(self._Frame(_pcm16(ref), CAPTURE_RATE, 1, FRAME))
        if self.aec.delay_ms is not None:
            self._apm.set_stream_delay_ms(int(round(self.aec.delay_ms)))
        frame = self._Frame(_pcm16(raw), CAPTURE_RATE, 1, FRAME)
        self._apm.process_stream(frame)
        return np.frombuffer(bytes(frame.data), np.int16).astype(np.float32) / 32768.0

    def _estimate_delay(self) -> None:
        cfg = self.config
        self._next_estimate = self.aec.frames + int(cfg.reestimate_s * 100)
        if len(self._hist_ref) < self._hist_ref.maxlen:
            return
        ref, mic = np.concatenate(self._hist_ref), np.concatenate(self._hist_mic)
        rms = np.sqrt(np.mean(ref.reshape(-1, FRAME) ** 2, axis=1))
        if np.mean(rms > 1e-3) < cfg.active_fraction:
            return  # not enough far-end speech to correlate
        lag, ratio = gcc_phat(ref, mic, cfg.max_delay_ms * CAPTURE_RATE // 1000)
        if ratio < cfg.min_peak_ratio:
            log.debug("AEC: delay estimate rejected (peak ratio %.1f)", ratio)
            return
        if lag < MIN_LEAD:
            # The echo comes before its reference (a late first playback callback put the reference late): the
            # canceller cannot use a reference from the future, so the reference is moved ahead to lead by 10 ms.
            # (The mic then waits for its reference that much longer: the added latency is `skip`.)
            self._skip_ref += 2 * MIN_LEAD - lag
            self._hist_ref.clear()
            self._hist_mic.clear()
            self.aec.realigned += 1
            log.info("AEC: the reference trailed the echo by %.0f ms; moved ahead", -lag * 1000 / CAPTURE_RATE)
            lag = 2 * MIN_LEAD
        delay = lag * 1000 / CAPTURE_RATE
        if self.aec.delay_ms is None or abs(delay - self.aec.delay_ms) > 2:
            log.info("AEC: echo delay %.0f ms (GCC-PHAT peak ratio %.1f)", delay, ratio)
        self.aec.delay_ms = delay
        self.aec.delay_estimates += 1


def _pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 32767 / 32768) * 32768).astype(np.int16).tobytes()
