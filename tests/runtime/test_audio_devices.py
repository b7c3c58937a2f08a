"""Audio I/O: the ring buffer, file-backed source and sink, and real PortAudio streams (sounddevice and
PyAudio) on a PulseAudio virtual sound card, including a sound server that dies mid-stream."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soxr
from pulse import align, sound_card_fixture, speak, stop_process  # noqa: F401  (the sound_card fixture)
from qinyu_edge.runtime.audio_devices import (
    AudioDeviceConfig,
    AudioDeviceError,
    AudioDeviceLost,
    DeviceInfo,
    DeviceSink,
    DeviceSource,
    FileSink,
    FileSource,
    RingBuffer,
    _open_error,
    _SoundDevice,
    find_device,
    list_devices,
    rescan_devices,
)
from qinyu_edge.runtime.audio_io import read_audio, to_16k_mono, write_wav

MIN_CORRELATION = 0.95  # PulseAudio resamples with its own (speex) filter, so round trips are not bit-exact
# Round trips check content, not latency: a roomy buffer keeps a loaded test machine from glitching.
ROOMY = 0.1


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    d = tmp_path_factory.mktemp("dev_speech")
    audio = speak("Hello, this is a test.", d)
    wav = d / "speech16k.wav"
    write_wav(wav, audio, 16000)
    return read_audio(wav)[0], wav


# ---------------------------------------------------------------- ring buffer


def test_ring_buffer_wraps_drops_and_clears():
    ring = RingBuffer(10)
    assert ring.write(np.arange(7, dtype=np.float32)) == 7
    np.testing.assert_array_equal(ring.read(5), [0, 1, 2, 3, 4])
    # 2 queued, 8 free: the write wraps around the end and the excess is refused, not overwritten.
    assert ring.write(np.arange(10, 20, dtype=np.float32)) == 8
    assert ring.available() == 10 and ring.free() == 0
    np.testing.assert_array_equal(ring.read(100), [5, 6, 10, 11, 12, 13, 14, 15, 16, 17])
    ring.write(np.ones(6, dtype=np.float32))
    assert ring.request_clear() == 6
    assert ring.available() == 0
    out = np.full(4, -1.0, dtype=np.float32)
    assert ring.read_into(out) == 0
    ring.write(np.full(3, 2.0, dtype=np.float32))  # written after the clear: kept
    np.testing.assert_array_equal(ring.read(10), [2, 2, 2])


def test_ring_buffer_between_threads_keeps_every_sample_in_order():
    ring = RingBuffer(4096)
    total = 300_000
    ramp = np.arange(total, dtype=np.float32)
    got: list[np.ndarray] = []

    def produce():
        rng = np.random.default_rng(0)
        pos = 0
        while pos < total:
            took = ring.write(ramp[pos:pos + int(rng.integers(1, 3000))])
            pos += took
            if not took:
                time.sleep(0.0005)

    t = threading.Thread(target=produce)
    t.start()
    rng = np.random.default_rng(1)
    n = 0
    deadline = time.monotonic() + 20
    while n < total and time.monotonic() < deadline:
        chunk = ring.read(int(rng.integers(1, 4000)))
        got.append(chunk)
        n += chunk.size
        if not chunk.size:
            time.sleep(0.0005)
    t.join(5)
    np.testing.assert_array_equal(np.concatenate(got), ramp)


# ---------------------------------------------------------------- files


def test_file_source_paces_in_real_time_and_converts(tmp_path, speech):
    audio16 = speech[0]
    stereo44 = tmp_path / "stereo44.wav"
    up = soxr.resample(audio16, 16000, 44100)
    write_wav(stereo44, np.stack([up, 0.5 * up], axis=1), 44100, subtype="FLOAT")
    expected = to_16k_mono(*read_audio(stereo44))

    for realtime in (True, False):
        src = FileSource(stereo44, realtime=realtime, tail_silence_s=0.25)
        src.start()
        t0 = time.monotonic()
        chunks = []
        while (c := src.read(512)) is not None:
            assert c.size == 512
            chunks.append(c)
        elapsed = time.monotonic() - t0
        got = np.concatenate(chunks)
        np.testing.assert_array_equal(got[: expected.size], expected)
        assert not got[expected.size:].any() and got.size - expected.size >= 0.25 * 16000
        if realtime:
            assert abs(elapsed - src.duration) < 0.25, (elapsed, src.duration)
        else:
            assert elapsed < 0.2 * src.duration


def test_file_sink_plays_like_a_device(tmp_path):
    tone = np.sin(2 * np.pi * 440 * np.arange(32000) / 32000).astype(np.float32) * 0.5  # 1 s
    path = tmp_path / "out.wav"
    sink = FileSink(path, realtime=True)
    sink.start()
    t0 = time.monotonic()
    sink.write(tone)
    time.sleep(0.3)
    elapsed = time.monotonic() - t0
    dropped = sink.flush()  # barge-in: what has not played yet is gone
    assert abs(dropped - (1.0 - elapsed)) < 0.05 and sink.queued_seconds == 0
    assert abs(sink.played_seconds - elapsed) < 0.05
    sink.write(tone[:3200])  # after a flush the next utterance starts: no underrun for the pause
    assert sink.stats.underruns == 0
    t1 = time.monotonic()
    time.sleep(0.3)  # the 0.1 s runs out mid-utterance ...
    sink.write(tone[:3200])  # ... so this gap is an underrun
    gap = time.monotonic() - t1 - 0.1
    assert sink.stats.underruns == 1 and abs(sink.stats.underrun_samples / 32000 - gap) < 0.05
    sink.finish()
    assert sink.drain(2.0)
    sink.close()
    out, rate = read_audio(path)
    assert rate == 32000
    # 10 ms frames with the tone in them: the part played before the cut, the next 0.1 s right after
    # it, then the gap, then the last 0.1 s.
    loud = np.sqrt((out[: out.size // 320 * 320].reshape(-1, 320) ** 2).mean(axis=1)) > 0.1
    edges = np.flatnonzero(np.diff(np.concatenate([[0], loud.astype(np.int8), [0]])))
    durations = (edges[1::2] - edges[::2]) / 100
    assert len(durations) == 2, durations
    assert abs(durations[0] - (elapsed + 0.1)) <= 0.03 and abs(durations[1] - 0.1) <= 0.02
    assert abs((edges[2] - edges[1]) / 100 - gap) <= 0.03


def test_file_sink_fast_mode_is_contiguous(tmp_path):
    parts = [np.full(1000, 0.1 * (i + 1), np.float32) for i in range(3)]
    sink = FileSink(tmp_path / "fast.wav", realtime=False)
    sink.start()
    for p in parts:
        sink.write(p)
    sink.finish()
    assert sink.drain(0.1) and sink.queued_seconds == 0 and sink.flush() == 0.0
    sink.close()
    out, _ = read_audio(tmp_path / "fast.wav")
    np.testing.assert_allclose(out, np.concatenate(parts), atol=1 / 32768)


# ---------------------------------------------------------------- errors without a sound card


def test_no_device_is_a_clear_error(tmp_path):
    old = os.environ.get("PULSE_SERVER")
    os.environ["PULSE_SERVER"] = f"unix:{tmp_path / 'no-server'}"
    try:
        rescan_devices()
        if list_devices():
            pytest.skip("this machine has sound devices that do not go through PulseAudio")
        with pytest.raises(AudioDeviceError, match="no audio input device"):
            find_device(None, "input")
        t0 = time.monotonic()
        for cls in (DeviceSource, DeviceSink):
            for backend in ("sounddevice", "pyaudio"):
                with pytest.raises(AudioDeviceError, match="sound server"):
                    cls(AudioDeviceConfig(backend=backend)).start()
        assert time.monotonic() - t0 < 5
    finally:
        if old is None:
            os.environ.pop("PULSE_SERVER", None)
        else:
            os.environ["PULSE_SERVER"] = old
        rescan_devices()


def test_busy_device_message():
    """ALSA reports a held device as EBUSY (-16) inside an unanticipated host error; PortAudio as paDeviceUnavailable."""
    import sounddevice as sd

    dev = DeviceInfo(3, "USB Audio", "ALSA", 1, 0, 48000.0)
    be = _SoundDevice()
    for err in (sd.PortAudioError("Error opening InputStream: Unanticipated host error", -9999, (0, -16, "Device or resource busy")),
                sd.PortAudioError("Error opening InputStream: Device unavailable", -9985)):
        msg = str(_open_error(be, err, "input", dev, 48000))
        assert "busy" in msg and "USB Audio" in msg and "--input-device" in msg


# ---------------------------------------------------------------- real PortAudio streams


def _capture(card, wav, seconds, config):
    src = DeviceSource(config)
    src.start()
    player = card.player(wav)
    t0 = time.monotonic()
    player.start()
    chunks = []
    while time.monotonic() - t0 < seconds:
        chunks.append(src.read(512))
    player.join_or_skip()
    src.close()
    assert src.read(512) is None  # closed: end of stream, no hang
    return np.concatenate(chunks), src


def test_devices_by_name_and_index(sound_card):
    pulse = find_device("pulse", "input")
    assert pulse.name == "pulse"
    assert find_device(pulse.index, "output").name == "pulse"
    assert find_device(str(pulse.index), "input") == pulse
    assert find_device("PULSE", "input") == pulse
    assert find_device("uls", "input") == pulse
    with pytest.raises(AudioDeviceError, match="matches 2"):
        find_device("e", "input")  # 'pulse' and 'default'
    with pytest.raises(AudioDeviceError, match=r"no audio input device is named like 'usb mic'.*\[\d+\] pulse"):
        find_device("usb mic", "input")
    with pytest.raises(AudioDeviceError, match="no audio output device with index 99"):
        find_device(99, "output")


@pytest.mark.parametrize("backend,rate", [("sounddevice", None), ("sounddevice", 48000), ("pyaudio", 44100)])
def test_capture_from_virtual_microphone(sound_card, speech, backend, rate):
    audio, wav = speech
    got, src = _capture(sound_card, wav, audio.size / 16000 + 0.6, AudioDeviceConfig(backend=backend, input_device="pulse", input_rate=rate, latency=ROOMY))
    assert src.stats.device_rate == (rate or 16000)  # the model rate when the device takes it
    lag, corr = align(got, audio)
    assert corr > MIN_CORRELATION, (lag, corr, src.stats)
    assert src.stats.overruns == 0 and src.stats.callbacks > 0


@pytest.mark.parametrize("backend,rate", [("sounddevice", None), ("pyaudio", 48000)])
def test_playback_to_virtual_speaker(sound_card, speech, tmp_path, backend, rate):
    audio, _ = speech
    audio32 = soxr.resample(audio, 16000, 32000)
    raw = tmp_path / "speaker.raw"
    rec = sound_card.record_speaker(raw, rate=16000)
    try:
        time.sleep(0.2)
        with DeviceSink(AudioDeviceConfig(backend=backend, output_device="pulse", output_rate=rate, latency=ROOMY)) as sink:
            assert sink.stats.device_rate == (rate or 32000)
            # One write: a loaded test machine could stall a writer of small chunks long enough to leave a
            # gap (an underrun), which would shift the rest of the recording.
            sink.write(audio32)
            sink.finish()
            assert sink.drain(5.0)
            assert abs(sink.played_seconds - audio.size / 16000) < 0.05
            time.sleep(0.3)
        assert sink.stats.underruns == 0
    finally:
        stop_process(rec)
    lag, corr = align(np.fromfile(raw, dtype="<f4"), audio)
    assert corr > MIN_CORRELATION, (lag, corr, sink.stats)


def test_capture_overrun_is_counted_and_reading_resumes(sound_card):
    with DeviceSource(AudioDeviceConfig(input_device="pulse", capture_ring_s=0.25)) as src:
        time.sleep(0.8)  # the reader stalls: about 0.55 s cannot fit
        assert src.stats.overruns > 0 and src.stats.overrun_samples > 0.3 * 16000
        assert src.discard() >= 0.2 * 16000
        assert src.read(1600).size == 1600


def test_playback_underrun_and_flush(sound_card):
    with DeviceSink(AudioDeviceConfig(output_device="pulse")) as sink:
        sink.write(np.zeros(3200, np.float32))
        time.sleep(0.5)  # the 0.1 s ran dry mid-utterance
        assert sink.stats.underruns > 0
        sink.finish()
        time.sleep(0.1)
        count = sink.stats.underruns
        time.sleep(0.3)  # after finish() silence is expected, not an underrun
        assert sink.stats.underruns == count
        t0 = time.monotonic()
        sink.write(np.zeros(3 * 32000, np.float32))
        time.sleep(0.3)
        dropped = sink.flush()
        # Everything not yet handed to PortAudio is dropped: the rest of the 3 s, give or take its buffering.
        assert abs((3.0 - (time.monotonic() - t0)) - dropped) < 0.15
        assert sink.drain(1.0) and sink.queued_seconds == 0


def test_flush_from_another_thread_stops_a_blocked_writer(sound_card):
    """A generation thread blocked on a full queue returns as soon as the loop flushes (barge-in)."""
    with DeviceSink(AudioDeviceConfig(output_device="pulse", playback_ring_s=0.5)) as sink:
        writer = threading.Thread(target=sink.write, args=(np.full(3 * 32000, 0.1, np.float32),))
        writer.start()
        time.sleep(0.4)
        assert writer.is_alive() and sink.queued_seconds > 0.3  # waiting for room
        sink.flush()
        writer.join(0.5)
        assert not writer.is_alive()
        time.sleep(0.1)
        assert sink.queued_seconds == 0 and sink.played_seconds < 1.0


def server_death_scenario(sound_card, backend: str) -> None:
    """The sound server is killed under a running capture and playback stream: both report the loss
    at once, reopening without a server is a clear error, and both reopen when it is back."""
    cfg = AudioDeviceConfig(backend=backend, input_device="pulse", output_device="pulse", stall_timeout_s=1.0)
    src, sink = DeviceSource(cfg), DeviceSink(cfg)
    src.start()
    sink.start()
    try:
        src.read(1600)
        sink.write(np.zeros(5 * 32000, np.float32))
        sound_card.kill_daemon()
        t0 = time.monotonic()
        with pytest.raises(AudioDeviceLost, match="reopen"):
            while time.monotonic() - t0 < 10:
                src.read(512)
        with pytest.raises(AudioDeviceLost):
            sink.drain(10)
        assert time.monotonic() - t0 < 3
        with pytest.raises(AudioDeviceError, match="sound server"):
            src.reopen()  # no server yet: a clear error, at once
        sound_card.start()  # the server comes back: the same device reopens
        src.reopen()
        sink.reopen()
        assert src.read(1600).size == 1600
        sink.write(np.zeros(1600, np.float32))
        sink.finish()
        assert sink.drain(2.0)
        assert src.stats.reopens == 2 and sink.stats.reopens == 1
    finally:
        t0 = time.monotonic()
        src.close()
        sink.close()
        assert time.monotonic() - t0 < 2
        if sound_card.daemon is None:
            sound_card.start()


SCENARIO = """
import sys, tempfile
from pathlib import Path
sys.path.insert(0, {here!r})
from pulse import _use_server, start_sound_card
from test_audio_devices import server_death_scenario
card = start_sound_card(Path(tempfile.mkdtemp(prefix="qypa-")))
_use_server(card.server)
try:
    server_death_scenario(card, {backend!r})
finally:
    card.stop()
print("scenario passed")
"""


@pytest.mark.parametrize("backend", ["sounddevice", "pyaudio"])
def test_sound_server_dies_mid_stream(backend):
    """In a process of its own, which must also exit: a stream left blocked inside PortAudio by the dead
    server once hung PortAudio's re-initialisation and its teardown at exit (and with them the test run)."""
    code = SCENARIO.format(here=str(Path(__file__).parent), backend=backend)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the process did not finish within 120 s:\n{e.stdout}\n{e.stderr}")
    if r.returncode and "Skipped: " in r.stderr:
        pytest.skip(r.stderr.rsplit("Skipped: ", 1)[1].strip())
    assert r.returncode == 0 and "scenario passed" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
