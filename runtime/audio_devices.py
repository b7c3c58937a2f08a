"""Live audio in and out through PortAudio (sounddevice, or PyAudio as a second backend), and file-backed
stand-ins with the same interface.

Every source delivers 16 kHz mono float32 (what the VAD and SenseVoice take); every sink takes 32 kHz
mono float32 (what the XY decoder produces). Devices are opened at a rate they accept and converted
with soxr streaming resamplers on the caller's side, so the PortAudio callback only copies samples.

Between the callback and the caller sits a single-producer single-consumer ring: each side advances
only its own counter, and a Python int assignment is atomic under the GIL, so the ring needs no lock
(the only one the callback touches is inside threading.Event.set, which wakes the reader and is held
for microseconds; the playback side's producer lock is never taken by the callback). The capture ring drops
what does not fit (an overrun: the reader fell behind); the playback callback plays silence when the
ring is empty in the middle of an utterance (an underrun: the producer fell behind). Both are counted
in `stats`, alongside the xruns PortAudio itself reports.

Failure modes end in an `AudioDeviceError` that says what to do, never in a hang: no device, an
unknown or ambiguous device name, a rate the device refuses, a busy device, and a device that stops
mid-stream (its stream finishes, or no callback arrives for `stall_timeout_s`), which raises
`AudioDeviceLost`; `reopen()` then tries the same device again. Opening and closing streams run with a
time bound, as a dead sound server can block PortAudio calls.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import soxr

from qinyu_edge.errors import QinyuError

from .audio_io import read_audio, to_16k_mono, write_wav

log = logging.getLogger(__name__)

CAPTURE_RATE = 16000
PLAYBACK_RATE = 32000
Backend = Literal["sounddevice", "pyaudio"]
Kind = Literal["input", "output"]
_FALLBACK_RATES = (48000, 44100, 32000, 16000, 24000, 22050, 96000, 8000)


class AudioDeviceError(QinyuError):
    """A sound device cannot be found, opened or used."""


class AudioDeviceLost(AudioDeviceError):
    """A running stream stopped: the device was unplugged or the sound server went away."""


@dataclass(frozen=True)
class AudioDeviceConfig:
    """Which devices to open and how. Device: None (system default), an index, or a name (exact, else a unique substring)."""

    backend: Backend = "sounddevice"
    input_device: str | int | None = None
    output_device: str | int | None = None
    # None: the model rate (16 kHz in, 32 kHz out) when the device accepts it, else its default rate.
    input_rate: int | None = None
    output_rate: int | None = None
    block_ms: float = 32.0  # samples per callback: 512 at 16 kHz, one VAD frame
    # PortAudio's suggested latency (sounddevice only). "low" (~9 ms through PulseAudio) glitches on a busy
    # CPU without PortAudio noticing; "high" (~35 ms) holds, and a flush still stops speech within it.
    latency: Literal["low", "high"] | float = "high"
    capture_ring_s: float = 4.0
    playback_ring_s: float = 60.0  # generated speech can run ahead of playback by this much
    stall_timeout_s: float = 2.0  # no callback for this long on a started stream: the device is gone
    open_timeout_s: float = 5.0  # bound on opening / starting / closing a stream
    resample_quality: Literal["QQ", "LQ", "MQ", "HQ", "VHQ"] = "HQ"

    def __post_init__(self) -> None:
        if self.backend not in ("sounddevice", "pyaudio"):
            raise AudioDeviceError(f"unknown audio backend {self.backend!r}; choose 'sounddevice' or 'pyaudio'.")
        for name in ("block_ms", "capture_ring_s", "playback_ring_s", "stall_timeout_s", "open_timeout_s"):
            if getattr(self, name) <= 0:
                raise AudioDeviceError(f"audio {name} must be > 0, got {getattr(self, name)}.")


@dataclass
class StreamStats:
    """Counters a stream keeps (written by the callback thread, read by anyone)."""

    device: str = ""
    device_rate: int = 0
    channels: int = 0
    callbacks: int = 0
    overruns: int = 0  # capture blocks the ring could not take in full
    overrun_samples: int = 0  # at the device rate
    underruns: int = 0  # playback blocks that ran dry mid-utterance
    underrun_samples: int = 0
    xruns: int = 0  # over/underflows PortAudio itself reported
    reopens: int = 0


class RingBuffer:
    """Single-producer single-consumer float32 ring; `write` on one thread, `read_into` on another."""

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"ring capacity must be > 0, got {capacity}")
        self.capacity = int(capacity)
        self._buf = np.zeros(self.capacity, dtype=np.float32)
        self._w = 0  # total samples written: only the producer assigns it
        self._r = 0  # total samples read: only the consumer assigns it
        self._clear_to = 0  # producer's request to drop everything written before this mark

    def available(self) -> int:
        return self._w - max(self._r, self._clear_to)

    def free(self) -> int:
        return self.capacity - (self._w - self._r)

    def write(self, x: np.ndarray) -> int:
        """Copy as much of `x` as fits; return how many samples were taken."""
        n = min(x.size, self.free())
        if n <= 0:
            return 0
        i = self._w % self.capacity
        first = min(n, self.capacity - i)
        self._buf[i:i + first] = x[:first]
        self._buf[: n - first] = x[first:n]
        self._w += n  # published last: the consumer never sees samples before they are copied
        return n

    def read_into(self, out: np.ndarray) -> int:
        """Fill the front of `out` with the oldest samples; return how many."""
        if self._clear_to > self._r:
            self._r = min(self._clear_to, self._w)
        n = min(out.size, self._w - self._r)
        if n <= 0:
            return 0
        i = self._r % self.capacity
        first = min(n, self.capacity - i)
        out[:first] = self._buf[i:i + first]
        out[first:n] = self._buf[: n - first]
        self._r += n
        return n

    def read(self, n: int) -> np.ndarray:
        out = np.empty(min(n, self.available()), dtype=np.float32)
        return out[: self.read_into(out)]

    def request_clear(self) -> int:
        """Producer side: have the consumer skip everything queued so far; returns the samples dropped (approx.)."""
        dropped = self.available()
        self._clear_to = self._w
        return dropped


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    host_api: str
    max_input_channels: int
    max_output_channels: int
    default_rate: float

    def channels(self, kind: Kind) -> int:
        return self.max_input_channels if kind == "input" else self.max_output_channels


# ---------------------------------------------------------------- backends


class _Stream(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...
    @property
    def active(self) -> bool: ...


# callback(buffer [frames, channels] float32, xrun flag): fills `buffer` for output, reads it for input.
_Callback = Callable[[np.ndarray, bool], None]


class _SoundDevice:
    name = "sounddevice"

    def __init__(self) -> None:
        try:
            import sounddevice
        except OSError as e:  # the Python package is there but libportaudio is not
            raise AudioDeviceError(f"PortAudio is not installed ({e}); install it with `apt-get install libportaudio2`.") from None
        except ImportError:
            raise AudioDeviceError("the sounddevice backend needs `pip install sounddevice` (and Debian `libportaudio2`).") from None
        self.sd = sounddevice
        self.errors: tuple[type[BaseException], ...] = (sounddevice.PortAudioError, OSError, ValueError)

    def devices(self) -> list[DeviceInfo]:
        apis = self.sd.query_hostapis()
        return [
            DeviceInfo(d["index"], d["name"], apis[d["hostapi"]]["name"], d["max_input_channels"], d["max_output_channels"], d["default_samplerate"])
            for d in self.sd.query_devices()
        ]

    def default(self, kind: Kind) -> int | None:
        idx = self.sd.default.device[0 if kind == "input" else 1]
        return None if idx is None or idx < 0 else int(idx)

    def supports(self, index: int, kind: Kind, rate: int, channels: int) -> bool:
        check = self.sd.check_input_settings if kind == "input" else self.sd.check_output_settings
        try:
            check(device=index, samplerate=rate, channels=channels, dtype="float32")
            return True
        except (self.sd.PortAudioError, ValueError):
            return False

    def open(self, kind: Kind, index: int, rate: int, channels: int, blocksize: int, latency, callback: _Callback, on_finished) -> _Stream:
        if kind == "input":
            def cb(indata, frames, time_info, status):
                callback(indata, bool(status.input_overflow or status.input_underflow))
            cls = self.sd.InputStream
        else:
            def cb(outdata, frames, time_info, status):
                callback(outdata, bool(status.output_underflow or status.output_overflow))
            cls = self.sd.OutputStream
        return cls(device=index, samplerate=rate, channels=channels, dtype="float32", blocksize=blocksize, latency=latency,
                   callback=cb, finished_callback=on_finished)

    def error_code(self, e: BaseException) -> tuple[int | None, str]:
        if isinstance(e, self.sd.PortAudioError):
            code = e.args[1] if len(e.args) > 1 else None
            host = e.args[2] if len(e.args) > 2 else None
            text = str(e.args[0]) + (f" ({host[2]}, host error {host[1]})" if host else "")
            if host and host[1] == -16:  # ALSA EBUSY
                code = _PA_DEVICE_UNAVAILABLE
            return code, text
        return None, str(e)

    def rescan(self) -> None:
        # PortAudio lists devices once per initialisation; re-initialising closes every open stream.
        self.sd._terminate()
        self.sd._initialize()


class _PyAudioStream:
    def __init__(self, pa, stream) -> None:
        self._pa, self._s = pa, stream

    def start(self) -> None:
        self._s.start_stream()

    def stop(self) -> None:
        self._s.stop_stream()

    def abort(self) -> None:
        pass  # PyAudio has no abort; close() discards pending buffers of an active stream (Pa_CloseStream)

    def close(self) -> None:
        try:
            self._s.close()
        finally:
            self._pa.terminate()

    @property
    def active(self) -> bool:
        return self._s.is_active()


class _PyAudio:
    name = "pyaudio"

    def __init__(self) -> None:
        try:
            import pyaudio
        except ImportError:
            raise AudioDeviceError("the pyaudio backend needs `pip install pyaudio` (built against Debian `portaudio19-dev`).") from None
        self.pyaudio = pyaudio
        self.errors: tuple[type[BaseException], ...] = (OSError, ValueError)

    def _instance(self):
        return self.pyaudio.PyAudio()

    def devices(self) -> list[DeviceInfo]:
        pa = self._instance()
        try:
            out = []
            for i in range(pa.get_device_count()):
                d = pa.get_device_info_by_index(i)
                api = pa.get_host_api_info_by_index(d["hostApi"])["name"]
                out.append(DeviceInfo(i, d["name"], api, int(d["maxInputChannels"]), int(d["maxOutputChannels"]), float(d["defaultSampleRate"])))
            return out
        finally:
            pa.terminate()

    def default(self, kind: Kind) -> int | None:
        pa = self._instance()
        try:
            info = pa.get_default_input_device_info() if kind == "input" else pa.get_default_output_device_info()
            return int(info["index"])
        except OSError:
            return None
        finally:
            pa.terminate()

    def supports(self, index: int, kind: Kind, rate: int, channels: int) -> bool:
        pa = self._instance()
        f = self.pyaudio.paFloat32
        try:
            if kind == "input":
                return bool(pa.is_format_supported(rate, input_device=index, input_channels=channels, input_format=f))
            return bool(pa.is_format_supported(rate, output_device=index, output_channels=channels, output_format=f))
        except ValueError:
            return False
        finally:
            pa.terminate()

    def open(self, kind: Kind, index: int, rate: int, channels: int, blocksize: int, latency, callback: _Callback, on_finished) -> _Stream:
        pyaudio = self.pyaudio
        flags = pyaudio.paInputOverflow | pyaudio.paInputUnderflow if kind == "input" else pyaudio.paOutputUnderflow | pyaudio.paOutputOverflow
        if kind == "input":
            def cb(in_data, frame_count, time_info, status):
                callback(np.frombuffer(in_data, dtype=np.float32).reshape(frame_count, channels), bool(status & flags))
                return None, pyaudio.paContinue
        else:
            def cb(in_data, frame_count, time_info, status):
                out = np.zeros((frame_count, channels), dtype=np.float32)
                callback(out, bool(status & flags))
                return out.tobytes(), pyaudio.paContinue
        pa = self._instance()
        try:
            dev = {"input_device_index": index} if kind == "input" else {"output_device_index": index}
            s = pa.open(format=pyaudio.paFloat32, channels=channels, rate=rate, input=kind == "input", output=kind == "output",
                        frames_per_buffer=blocksize, stream_callback=cb, start=False, **dev)
        except BaseException:
            pa.terminate()
            raise
        return _PyAudioStream(pa, s)

    def error_code(self, e: BaseException) -> tuple[int | None, str]:
        if isinstance(e, OSError) and isinstance(e.errno, int):
            return e.errno, str(e.strerror or e)
        return None, str(e)

    def rescan(self) -> None:
        # Each PyAudio() initialises PortAudio, so the next one lists devices afresh (unless another user holds it).
        return None


def _backend(name: Backend):
    return _SoundDevice() if name == "sounddevice" else _PyAudio()


def list_devices(backend: Backend = "sounddevice") -> list[DeviceInfo]:
    return _backend(backend).devices()


def rescan_devices(backend: Backend = "sounddevice") -> None:
    """Make PortAudio list devices again (after a sound server started or a device was plugged in).

    PortAudio enumerates devices only when initialised, and re-initialising it CLOSES EVERY OPEN STREAM in
    the process: call this only with no stream running.
    """
    if _stuck_streams:
        raise AudioDeviceError(f"PortAudio cannot be re-initialised in this process: {_stuck_streams[0]} never "
                               "returned after its sound server went away (re-initialising would wait for it "
                               "forever). Restart qinyu-edge to see the devices again.")
    _backend(backend).rescan()


# Streams whose stop or close never returned (their sound server died under them). PortAudio then can
# neither be terminated nor re-initialised without waiting for them forever: rescans refuse, and the
# backend's own teardown at exit is skipped (the OS reclaims the stream).
_stuck_streams: list[str] = []


def _describe(devs: list[DeviceInfo], kind: Kind) -> str:
    usable = [d for d in devs if d.channels(kind) > 0]
    if not usable:
        return f"PortAudio sees no {kind} devices"
    return f"{kind} devices: " + "; ".join(f"[{d.index}] {d.name} ({d.host_api}, {d.channels(kind)} ch, {d.default_rate:.0f} Hz)" for d in usable)


_NO_DEVICE_HINT = (
    "Check that a microphone/speaker is connected and a sound server (PulseAudio or PipeWire) is running, "
    "pick one with --input-device/--output-device (name or index), or use files instead (--input FILE / --output FILE)."
)


def find_device(spec: str | int | None, kind: Kind, backend: Backend = "sounddevice") -> DeviceInfo:
    """The device `spec` names: None (system default), an index, an exact name, or a unique name substring."""
    return _find(_backend(backend), spec, kind)


def _find(be, spec: str | int | None, kind: Kind) -> DeviceInfo:
    devs = be.devices()
    usable = [d for d in devs if d.channels(kind) > 0]
    if spec is None:
        idx = be.default(kind)
        match = [d for d in usable if d.index == idx]
        if match:
            return match[0]
        if not usable:
            raise AudioDeviceError(f"no audio {kind} device: PortAudio ({be.name}) finds none. {_NO_DEVICE_HINT}")
        raise AudioDeviceError(f"there is no default audio {kind} device; name one. {_describe(devs, kind)}.")
    if isinstance(spec, str) and spec.strip().lstrip("-").isdigit():
        spec = int(spec)
    if isinstance(spec, int):
        match = [d for d in usable if d.index == spec]
        if not match:
            raise AudioDeviceError(f"there is no audio {kind} device with index {spec}. {_describe(devs, kind)}.")
        return match[0]
    exact = [d for d in usable if d.name.lower() == spec.lower()]
    if len(exact) == 1:
        return exact[0]
    partial = exact or [d for d in usable if spec.lower() in d.name.lower()]
    if len(partial) == 1:
        return partial[0]
    if not partial:
        raise AudioDeviceError(f"no audio {kind} device is named like {spec!r}. {_describe(devs, kind)}. {_NO_DEVICE_HINT}")
    raise AudioDeviceError(f"{spec!r} matches {len(partial)} {kind} devices ({', '.join(repr(d.name) for d in partial)}); use an index or a longer name.")


_PA_INVALID_CHANNELS = -9998
_PA_INVALID_RATE = -9997
_PA_INVALID_DEVICE = -9996
_PA_DEVICE_UNAVAILABLE = -9985


def _open_error(be, e: BaseException, kind: Kind, dev: DeviceInfo, rate: int) -> AudioDeviceError:
    code, text = be.error_code(e)
    what = f"audio {kind} device [{dev.index}] {dev.name!r}"
    if code == _PA_DEVICE_UNAVAILABLE or "busy" in text.lower():
        return AudioDeviceError(f"{what} is busy: another program holds it ({text}). Close that program, or choose another device (--{kind}-device).")
    if code == _PA_INVALID_DEVICE:
        return AudioDeviceError(f"{what} is no longer available ({text}); it was unplugged or its sound server stopped. {_NO_DEVICE_HINT}")
    if code in (_PA_INVALID_RATE, _PA_INVALID_CHANNELS):
        return AudioDeviceError(f"{what} refuses {rate} Hz mono/stereo float ({text}); set another {kind}_rate, or leave it unset to let qinyu-edge pick.")
    return AudioDeviceError(f"cannot open {what} at {rate} Hz: {text}. {_NO_DEVICE_HINT}")


def _bounded(fn: Callable[[], object], timeout: float, what: str) -> object:
    """Run a PortAudio call that a dead sound server can block; raise instead of hanging."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    t = threading.Thread(target=run, name=f"qinyu-audio-{what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AudioDeviceError(f"{what} did not finish within {timeout:.0f} s; the sound server or driver is not responding. Restart it, or pick another device.")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")


class _DeviceStream:
    """Shared device handling: choose device and rate, open with time bounds, detect loss, reopen."""

    kind: Kind
    model_rate: int

    def __init__(self, config: AudioDeviceConfig, device: str | int | None, rate: int | None):
        self.config = config
        self._spec, self._want_rate = device, rate
        self._be = _backend(config.backend)
        self._stream: _Stream | None = None
        self._finished = False  # the stream ended without our asking: set from PortAudio's thread
        self._closing = False
        self._lost = False  # check_alive found the device gone: the stream is aborted, not stopped
        self._last_callback = 0.0
        self.stats = StreamStats()
        self._callbacks_at_open = 0
        self.device: DeviceInfo | None = None

    # -- choosing
    def _choose_rate(self, dev: DeviceInfo) -> tuple[int, int]:
        channel_options = [c for c in (1, 2) if c <= dev.channels(self.kind)] or [dev.channels(self.kind)]
        rates = [self._want_rate] if self._want_rate else list(dict.fromkeys([self.model_rate, int(dev.default_rate), *_FALLBACK_RATES]))
        for rate in rates:
            for ch in channel_options:
                if self._be.supports(dev.index, self.kind, int(rate), ch):
                    return int(rate), ch
        if self._want_rate and any(self._be.supports(dev.index, self.kind, int(dev.default_rate), c) for c in channel_options):
            raise AudioDeviceError(
                f"audio {self.kind} device [{dev.index}] {dev.name!r} does not accept {self._want_rate} Hz float32 with 1 or 2 channels; "
                f"leave {self.kind}_rate unset to let qinyu-edge pick (its default rate is {dev.default_rate:.0f} Hz)."
            )
        # Nothing passes the check, not even the device's own rate: opening will report the device's real error.
        return int(rates[0]), channel_options[0]

    def start(self) -> None:
        """Open the device and start streaming (raises AudioDeviceError with the reason and the fix)."""
        if self._stream is not None:
            return
        dev = _find(self._be, self._spec, self.kind)
        rate, channels = self._choose_rate(dev)
        blocksize = max(64, round(rate * self.config.block_ms / 1000))
        self._prepare(rate)
        self._finished = self._closing = False
        try:
            stream = _bounded(
                lambda: self._be.open(self.kind, dev.index, rate, channels, blocksize, self.config.latency, self._callback, self._on_finished),
                self.config.open_timeout_s, f"opening {dev.name!r}",
            )
        except self._be.errors as e:
            raise _open_error(self._be, e, self.kind, dev, rate) from None
        self._last_callback = time.monotonic()
        self._callbacks_at_open = self.stats.callbacks
        try:
            _bounded(stream.start, self.config.open_timeout_s, f"starting {dev.name!r}")
        except self._be.errors as e:
            self._abandon(stream)
            raise _open_error(self._be, e, self.kind, dev, rate) from None
        self._stream, self.device = stream, dev
        self.stats.device, self.stats.device_rate, self.stats.channels = dev.name, rate, channels
        log.info("audio %s: [%d] %s at %d Hz, %d ch, %d-sample blocks (%s)", self.kind, dev.index, dev.name, rate, channels, blocksize, self._be.name)

    def _on_finished(self) -> None:
        if not self._closing:
            self._finished = True

    def check_alive(self) -> None:
        """Raise AudioDeviceLost if the stream ended on its own or its callbacks stopped."""
        if self._stream is None:
            raise AudioDeviceError(f"the audio {self.kind} stream is not started; call start() first.")
        name = self.device.name if self.device else "?"
        try:
            active = self._stream.active
        except self._be.errors:  # PortAudio cannot even query a stream whose device is gone
            active = False
        if self._finished or not active:
            self._lost = True
            raise AudioDeviceLost(f"audio {self.kind} device {name!r} stopped (unplugged, or the sound server went away); reopen() it, or pick another device.")
        silent = time.monotonic() - self._last_callback
        # A device may take a while to deliver its first block (Bluetooth, a waking sound server).
        started = self.stats.callbacks > self._callbacks_at_open
        if silent > (self.config.stall_timeout_s if started else max(self.config.stall_timeout_s, self.config.open_timeout_s)):
            self._lost = True
            raise AudioDeviceLost(f"audio {self.kind} device {name!r} delivered nothing for {silent:.1f} s; it hangs or was removed. reopen() it, or pick another device.")

    def _abandon(self, stream: _Stream) -> None:
        # A lost stream is aborted, not stopped: stopping waits for its buffers to play out on a
        # device that is gone, and on a dead PulseAudio server that wait never ends.
        lost = self._lost

        def shut() -> None:
            try:
                stream.abort() if lost else stream.stop()
            finally:
                stream.close()
        what = f"closing the audio {self.kind} stream"
        try:
            _bounded(shut, self.config.open_timeout_s, what)
        except AudioDeviceError as e:  # still blocked inside PortAudio: left to the OS
            log.warning("audio %s: %s; PortAudio will not be re-initialised in this process", self.kind, e)
            _stuck_streams.append(what)
            # sounddevice terminates PortAudio at exit, which would wait for the stuck stream forever
            # (PyAudio and sounddevice share the one libportaudio).
            sd = sys.modules.get("sounddevice")
            if sd is not None:
                atexit.unregister(sd._exit_handler)
        except self._be.errors as e:
            log.warning("audio %s: closing the stream failed: %s", self.kind, e)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        self._closing = True
        if stream is not None:
            self._abandon(stream)
        self._lost = False

    def reopen(self) -> None:
        """Close (if needed) and open the same device again, e.g. after AudioDeviceLost."""
        self.close()
        self.stats.reopens += 1
        self.start()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # subclass hooks
    def _prepare(self, device_rate: int) -> None:
        raise NotImplementedError

    def _callback(self, buf: np.ndarray, xrun: bool) -> None:
        raise NotImplementedError


class DeviceSource(_DeviceStream):
    """Microphone capture: `read(n)` returns n samples of 16 kHz mono float32."""

    kind = "input"
    model_rate = CAPTURE_RATE
    rate = CAPTURE_RATE
    paced = True

    def __init__(self, config: AudioDeviceConfig | None = None):
        config = config or AudioDeviceConfig()
        super().__init__(config, config.input_device, config.input_rate)
        self._data = threading.Event()

    def _prepare(self, device_rate: int) -> None:
        self._ring = RingBuffer(int(device_rate * self.config.capture_ring_s))
        self._resampler = None
        if device_rate != CAPTURE_RATE:
            self._resampler = soxr.ResampleStream(device_rate, CAPTURE_RATE, 1, dtype="float32", quality=self.config.resample_quality)
        self._out: list[np.ndarray] = []
        self._out_len = 0

    def _callback(self, buf: np.ndarray, xrun: bool) -> None:
        self._last_callback = time.monotonic()
        st = self.stats
        st.callbacks += 1
        if xrun:
            st.xruns += 1
        mono = buf[:, 0] if buf.shape[1] == 1 else buf.mean(axis=1)
        took = self._ring.write(mono)
        if took < mono.size:
            st.overruns += 1
            st.overrun_samples += mono.size - took
        self._data.set()

    def read(self, n: int) -> np.ndarray | None:
        """Block until n samples are there; None once closed. Raises AudioDeviceLost if the device stops."""
        if self._stream is None:
            if self._closing:
                return None
            raise AudioDeviceError("the audio input stream is not started; call start() first.")
        if n <= 0:
            return np.zeros(0, dtype=np.float32)
        while self._out_len < n:
            self._data.clear()
            raw = self._ring.read(self._ring.available())
            if raw.size:
                out = raw if self._resampler is None else self._resampler.resample_chunk(raw)
                self._out.append(out)
                self._out_len += out.size
                continue
            if self._stream is None:  # closed by another thread while waiting
                return None
            self.check_alive()
            self._data.wait(0.05)
        whole = np.concatenate(self._out) if len(self._out) > 1 else self._out[0]
        head, rest = whole[:n], whole[n:]
        self._out, self._out_len = ([rest] if rest.size else []), rest.size
        return np.ascontiguousarray(head, dtype=np.float32)

    def discard(self) -> int:
        """Drop what has been captured but not read (e.g. audio recorded while the assistant spoke)."""
        dropped = self._ring.available() + self._out_len
        self._ring.read(self._ring.available())
        self._out, self._out_len = [], 0
        return dropped


class DeviceSink(_DeviceStream):
    """Speaker playback: `write(x)` queues 32 kHz mono float32; `flush()` stops at once (barge-in).

    write / finish / flush may be called from different threads (a generation thread writes while the
    loop flushes on barge-in): they serialise on a producer lock the callback never takes, and a flush
    also drops the rest of a write that is waiting for room at that moment.
    """

    kind = "output"
    model_rate = PLAYBACK_RATE
    rate = PLAYBACK_RATE

    def __init__(self, config: AudioDeviceConfig | None = None):
        config = config or AudioDeviceConfig()
        super().__init__(config, config.output_device, config.output_rate)
        self._utterance_open = False
        self._played_s = 0.0
        self._lock = threading.Lock()
        self._epoch = 0  # bumped by flush(): writes from before it stop
        self.tap: PlaybackListener | None = None  # told what each callback played (the echo canceller's reference)

    def _new_resampler(self, device_rate: int):
        if device_rate == PLAYBACK_RATE:
            return None
        return soxr.ResampleStream(PLAYBACK_RATE, device_rate, 1, dtype="float32", quality=self.config.resample_quality)

    def _prepare(self, device_rate: int) -> None:
        self._ring = RingBuffer(int(device_rate * self.config.playback_ring_s))
        self._device_rate = device_rate
        self._tapped = False  # a new stream: its first block is placed by its time
        self._resampler = self._new_resampler(device_rate)
        self._scratch = np.zeros(0, dtype=np.float32)

    def _callback(self, buf: np.ndarray, xrun: bool) -> None:
        self._last_callback = time.monotonic()
        st = self.stats
        st.callbacks += 1
        if xrun:
            st.xruns += 1
        frames = buf.shape[0]
        if self._scratch.size < frames:
            self._scratch = np.zeros(frames, dtype=np.float32)
        got = self._ring.read_into(self._scratch[:frames])
        buf[:got] = self._scratch[:got, None]
        buf[got:] = 0.0
        self._played_s += got / self._device_rate
        if self.tap is not None:  # every block, silence included: one continuous stream on the device's clock
            self.tap.played(buf[:, 0], self._device_rate, self._last_callback, contiguous=self._tapped)
            self._tapped = True
        if got < frames and self._utterance_open:
            st.underruns += 1
            st.underrun_samples += frames - got

    def write(self, samples: np.ndarray, timeout: float | None = None) -> None:
        """Queue 32 kHz mono samples; blocks while the ring is full (up to `timeout`, then TimeoutError)."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        with self._lock:
            if self._stream is None:
                raise AudioDeviceError("the audio output stream is not started; call start() first.")
            if self._resampler is not None:
                x = self._resampler.resample_chunk(x)
            epoch = self._epoch
        self._push(x, timeout, epoch)

    def _push(self, x: np.ndarray, timeout: float | None, epoch: int) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while x.size:
            with self._lock:
                if epoch != self._epoch or self._stream is None:  # flushed or closed meanwhile
                    return
                took = self._ring.write(x)
                if took:
                    # Only now: an empty ring before the first samples of an utterance is not an underrun.
                    self._utterance_open = True
                x = x[took:]
            if not x.size:
                return
            self.check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"audio output queue full for {timeout} s ({self.config.playback_ring_s} s of audio queued)")
            time.sleep(min(0.02, self.config.block_ms / 1000))

    def finish(self) -> None:
        """The current utterance is complete: play its tail, and do not count the silence after it as an underrun."""
        with self._lock:
            tail = np.zeros(0, dtype=np.float32)
            if self._stream is not None and self._resampler is not None:
                tail = self._resampler.resample_chunk(tail, last=True)
                self._resampler = self._new_resampler(self._device_rate)
            epoch = self._epoch
        self._push(tail, None, epoch)
        self._utterance_open = False

    def flush(self) -> float:
        """Drop everything queued (barge-in); returns the seconds dropped. PortAudio's own buffer (~latency) still plays."""
        with self._lock:
            self._utterance_open = False
            self._epoch += 1
            if self._stream is None:
                return 0.0
            dropped = self._ring.request_clear()
            self._resampler = self._new_resampler(self._device_rate)
        return dropped / self._device_rate

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until the queue has played (True), or `timeout` passed (False). Raises AudioDeviceLost."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._stream is not None and self._ring.available() > 0:
            self.check_alive()
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    @property
    def queued_seconds(self) -> float:
        return self._ring.available() / self._device_rate if self._stream is not None else 0.0

    @property
    def played_seconds(self) -> float:
        """Audio handed to the device since it was created (what the user heard, give or take the output latency)."""
        return self._played_s


# ---------------------------------------------------------------- files


class _Clock:
    """Stream time for file stand-ins: wall time since start() x speed, or unbounded when not real time."""

    def __init__(self, realtime: bool, speed: float):
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.realtime, self.speed = realtime, speed
        self.t0 = time.monotonic()

    def now(self, rate: int) -> float:
        return (time.monotonic() - self.t0) * self.speed * rate

    def wait_until(self, pos: float, rate: int) -> None:
        if self.realtime:
            delay = (pos / rate) / self.speed - (time.monotonic() - self.t0)
            if delay > 0:
                time.sleep(delay)


class FileSource:
    """An audio file as a microphone: 16 kHz mono chunks, paced in real time (or `realtime=False`: at once)."""

    rate = CAPTURE_RATE

    def __init__(self, path: str | os.PathLike, realtime: bool = True, speed: float = 1.0, tail_silence_s: float = 0.0):
        self.path = Path(path)
        samples, rate = read_audio(self.path)
        audio = to_16k_mono(samples, rate, source=str(self.path))
        # Trailing silence lets a VAD and turn detector reach their end-of-speech decisions.
        self._audio = np.concatenate([audio, np.zeros(int(tail_silence_s * CAPTURE_RATE), dtype=np.float32)])
        self._realtime, self._speed = realtime, speed
        self.paced = realtime
        self._pos = 0
        self._clock: _Clock | None = None
        self.stats = StreamStats(device=f"file:{self.path}", device_rate=int(rate), channels=1)

    @property
    def duration(self) -> float:
        return self._audio.size / CAPTURE_RATE

    def start(self) -> None:
        if self._clock is None:
            self._clock = _Clock(self._realtime, self._speed)

    def read(self, n: int) -> np.ndarray | None:
        """The next n samples (the last chunk zero-padded), released when they would have been captured; None at the end."""
        if self._clock is None:
            raise AudioDeviceError("the file source is not started; call start() first.")
        if self._pos >= self._audio.size:
            return None
        chunk = self._audio[self._pos:self._pos + n]
        self._pos += n
        self._clock.wait_until(self._pos, CAPTURE_RATE)
        self.stats.callbacks += 1
        if chunk.size < n:
            chunk = np.concatenate([chunk, np.zeros(n - chunk.size, dtype=np.float32)])
        return chunk.copy()

    def close(self) -> None:
        self._pos = self._audio.size

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileSink:
    """A speaker that records to a WAV file at 32 kHz.

    In real time it plays like a device: written audio is scheduled after what is queued (or now, when
    idle), `flush()` cuts what has not been "played" yet, gaps mid-utterance count as underruns, and the
    file holds the timeline from start() with silence where nothing played. With `realtime=False` all
    audio is played at once, back to back. Like DeviceSink, write and flush may come from different threads.
    """

    rate = PLAYBACK_RATE

    def __init__(self, path: str | os.PathLike, realtime: bool = True, speed: float = 1.0, queue_s: float = 60.0):
        self.path = Path(path)
        self._realtime, self._speed, self._queue = realtime, speed, int(queue_s * PLAYBACK_RATE)
        self._segments: list[tuple[int, np.ndarray]] = []
        self._end = 0  # timeline position where queued audio ends
        self._utterance_open = False
        self._clock: _Clock | None = None
        self._lock = threading.Lock()
        self._played_at_close = 0.0
        self.stats = StreamStats(device=f"file:{self.path}", device_rate=PLAYBACK_RATE, channels=1)
        self.tap: PlaybackListener | None = None  # told what plays when (real time and speed 1 only)

    def start(self) -> None:
        if self._clock is None:
            self._clock = _Clock(self._realtime, self._speed)

    def _now(self) -> int:
        assert self._clock is not None
        return int(self._clock.now(PLAYBACK_RATE)) if self._realtime else self._end

    def write(self, samples: np.ndarray, timeout: float | None = None) -> None:
        clock = self._clock
        if clock is None:
            raise AudioDeviceError("the file sink is not started; call start() first.")
        x = np.asarray(samples, dtype=np.float32).reshape(-1).copy()
        backlog = self._end - self._now() - self._queue
        if self._realtime and backlog > 0:
            if timeout is not None and backlog / PLAYBACK_RATE / self._speed > timeout:
                raise TimeoutError(f"audio output queue full for {timeout} s")
            clock.wait_until(self._end - self._queue, PLAYBACK_RATE)
        with self._lock:
            now = self._now()
            start = max(self._end, now)
            if start > self._end and self._utterance_open:
                self.stats.underruns += 1
                self.stats.underrun_samples += start - self._end
            self._segments.append((start, x))
            self._end = start + x.size
            if self.tap is not None:
                self.tap.played(x, PLAYBACK_RATE, clock.t0 + start / PLAYBACK_RATE / self._speed)
            self._utterance_open = True
            self.stats.callbacks += 1

    def finish(self) -> None:
        self._utterance_open = False

    def flush(self) -> float:
        with self._lock:
            self._utterance_open = False
            if self._clock is None:
                return 0.0
            now = self._now()
            if self._end <= now:
                return 0.0
            dropped = self._end - now
            self._segments = [(start, x[: now - start]) for start, x in self._segments if start < now]
            self._end = now
            if self.tap is not None:
                self.tap.cut(self._clock.t0 + now / PLAYBACK_RATE / self._speed)
        return dropped / PLAYBACK_RATE

    def drain(self, timeout: float | None = None) -> bool:
        if self._clock is None:
            return True
        wait = (self._end - self._now()) / PLAYBACK_RATE / self._speed
        if timeout is not None and wait > timeout:
            time.sleep(max(timeout, 0.0))
            return False
        self._clock.wait_until(self._end, PLAYBACK_RATE)
        return True

    @property
    def queued_seconds(self) -> float:
        return max(0, self._end - self._now()) / PLAYBACK_RATE if self._clock else 0.0

    @property
    def played_seconds(self) -> float:
        if self._clock is None:
            return self._played_at_close
        now = self._now()
        return sum(min(x.size, max(0, now - s)) for s, x in self._segments) / PLAYBACK_RATE

    def rendered(self) -> np.ndarray:
        """The timeline so far, with silence in the gaps."""
        out = np.zeros(self._end, dtype=np.float32)
        for start, x in self._segments:
            out[start:start + x.size] = x
        return out

    def close(self) -> None:
        """Write the WAV file (what has been played; audio still queued is cut, as a closed device would)."""
        if self._clock is not None:
            self.flush()
            self._played_at_close = self.played_seconds
            write_wav(self.path, self.rendered(), PLAYBACK_RATE)
            self._clock = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PlaybackListener(Protocol):
    """Told what a sink played (mono samples at `rate`, starting at monotonic time `at`, or right after the previous
    report when `contiguous`: a device stream's next block); `cut(at)` takes back
    what was reported to play from `at` on (a flush). Called from a PortAudio callback: it must only copy."""

    def played(self, samples: np.ndarray, rate: int, at: float, contiguous: bool = False) -> None: ...
    def cut(self, at: float) -> None: ...


class AudioSource(Protocol):
    """16 kHz mono float32 in: a DeviceSource or a FileSource."""

    rate: int
    stats: StreamStats
    # False: read() returns at once rather than at the capture pace (a file run with --fast), so
    # nothing is heard while a reply is made; a listener waits for the reply before reading on.
    paced: bool

    def start(self) -> None: ...
    def read(self, n: int) -> np.ndarray | None: ...
    def close(self) -> None: ...


class AudioSink(Protocol):
    """32 kHz mono float32 out: a DeviceSink or a FileSink."""

    rate: int
    stats: StreamStats

    def start(self) -> None: ...
    def write(self, samples: np.ndarray, timeout: float | None = None) -> None: ...
    def finish(self) -> None: ...
    def flush(self) -> float: ...
    def drain(self, timeout: float | None = None) -> bool: ...
    def close(self) -> None: ...
    @property
    def queued_seconds(self) -> float: ...
    @property
    def played_seconds(self) -> float: ...


__all__ = [
    "CAPTURE_RATE",
    "PLAYBACK_RATE",
    "AudioDeviceConfig",
    "AudioDeviceError",
    "AudioDeviceLost",
    "AudioSink",
    "AudioSource",
    "DeviceInfo",
    "DeviceSink",
    "DeviceSource",
    "FileSink",
    "FileSource",
    "PlaybackListener",
    "RingBuffer",
    "StreamStats",
    "find_device",
    "list_devices",
    "rescan_devices",
]
