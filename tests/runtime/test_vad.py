"""Silero VAD through onnxruntime and the streaming segmenter, on espeak-ng speech with silence, noise and
tones between the utterances. Truth edges come from each clean utterance's own energy envelope."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pulse import speak, speech_edges
from qinyu_edge.runtime.vad import (
    FRAME,
    SAMPLE_RATE,
    SileroVad,
    SpeechDiscarded,
    SpeechEnd,
    SpeechStart,
    VadConfig,
    VadSegmenter,
    package_file,
    silero_model_path,
)

from qinyu_edge.errors import ConfigError

TOLERANCE = int(0.100 * SAMPLE_RATE)
UTTERANCES = [
    ("Please turn on the lights in the kitchen.", "en-us", 160),
    ("What is the weather like tomorrow morning?", "en-gb", 175),
    ("Thank you very much, that was helpful.", "en-us", 200),
    ("Set a timer for ten minutes.", "en-gb-x-rp", 150),
]


def _pink(rng: np.random.Generator, n: int) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    k = np.arange(spec.size, dtype=np.float64)
    k[0] = 1.0
    x = np.fft.irfft(spec / np.sqrt(k), n)
    return x / x.std()


def _gap(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    if kind == "silence":
        return np.zeros(n)
    if kind == "white":
        return 0.03 * rng.standard_normal(n)
    if kind == "pink":
        return 0.05 * _pink(rng, n)
    if kind == "tone":  # a hum with a syllable-rate (4 Hz) envelope, plus hiss
        return 0.2 * np.sin(2 * np.pi * 300 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) + 0.01 * rng.standard_normal(n)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Four utterances (three voices, three speeds) separated by silence, white noise, pink noise and a tone."""
    d = tmp_path_factory.mktemp("vad_speech")
    rng = np.random.default_rng(7)
    parts, truth, pos = [], [], 0
    for (text, voice, speed), gap in zip(UTTERANCES, ["white", "silence", "pink", "tone"]):
        lead = _gap(gap, 1.2, rng)
        utt = speak(text, d, voice, speed)
        a, b = speech_edges(utt)
        parts += [lead, utt]
        truth.append((pos + lead.size + a, pos + lead.size + b))
        pos += lead.size + utt.size
    parts.append(_gap("silence", 1.0, rng))
    audio = np.concatenate(parts)
    audio = (audio + 0.001 * rng.standard_normal(audio.size)).astype(np.float32)  # no digital silence anywhere
    return audio, truth


@pytest.fixture(scope="module")
def vad():
    return SileroVad()


def _events(audio, config, vad, chunk=None):
    seg = VadSegmenter(config, vad)
    if chunk is None:
        return seg.process(audio) + seg.flush()
    out = []
    for i in range(0, audio.size, chunk):
        out += seg.process(audio[i:i + chunk])
    return out + seg.flush()


@pytest.mark.parametrize("preset", ["default", "official_web"])
def test_segment_edges_within_100ms(scene, vad, preset):
    audio, truth = scene
    events = _events(audio, VadConfig.preset(preset), vad)
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    starts = [e for e in events if isinstance(e, SpeechStart)]
    assert not [e for e in events if isinstance(e, SpeechDiscarded)]
    assert len(ends) == len(starts) == len(truth), [(type(e).__name__, getattr(e, "sample", getattr(e, "start_sample", 0)) / SAMPLE_RATE) for e in events]
    errors = [(e.start_sample - a, e.end_sample - b) for e, (a, b) in zip(ends, truth)]
    worst = max(abs(x) for pair in errors for x in pair)
    assert worst <= TOLERANCE, f"edge errors (ms): {[(s / 16, t / 16) for s, t in errors]}"
    for s, e in zip(starts, ends):
        assert s.sample == e.start_sample
        # Events come after the audio they describe, a hangover (plus at most a frame) after the speech.
        assert s.detected_sample > s.sample
        hang = VadConfig.preset(preset).hangover_ms * SAMPLE_RATE // 1000
        assert e.end_sample < e.detected_sample <= e.end_sample + hang + 2 * FRAME


def test_segment_audio_is_the_stream_slice_with_pre_roll(scene, vad):
    audio, _ = scene
    cfg = VadConfig(pre_roll_ms=150)
    for e in (e for e in _events(audio, cfg, vad) if isinstance(e, SpeechEnd)):
        assert e.audio_start_sample == e.start_sample - 150 * SAMPLE_RATE // 1000
        np.testing.assert_array_equal(e.audio, audio[e.audio_start_sample:e.end_sample])


def test_chunk_size_does_not_change_events(scene, vad):
    audio, _ = scene
    whole = [(type(e).__name__, e.__dict__.get("sample"), e.__dict__.get("end_sample"), e.detected_sample) for e in _events(audio, VadConfig(), vad)]
    for chunk in (160, 777, 4096):
        chunked = [(type(e).__name__, e.__dict__.get("sample"), e.__dict__.get("end_sample"), e.detected_sample) for e in _events(audio, VadConfig(), vad, chunk)]
        assert chunked == whole


def test_noise_and_tones_start_no_speech(vad):
    rng = np.random.default_rng(3)
    n = 2 * SAMPLE_RATE
    t = np.arange(n) / SAMPLE_RATE
    signals = {
        "white 0.003": 0.003 * rng.standard_normal(n),
        "white 0.3": 0.3 * rng.standard_normal(n),
        "pink 0.1": 0.1 * _pink(rng, n),
        "tone 200 Hz": 0.3 * np.sin(2 * np.pi * 200 * t),
        "tone 1 kHz": 0.3 * np.sin(2 * np.pi * 1000 * t),
        "sweep": 0.3 * np.sin(2 * np.pi * (100 * t + 1000 * t**2)),
        "modulated hum": 0.3 * np.sin(2 * np.pi * 300 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)),
        "clicks": np.where(np.arange(n) % 4000 == 0, 0.9, 0.0),
    }
    for name, x in signals.items():
        events = _events(x.astype(np.float32), VadConfig(), vad)
        assert events == [], f"{name}: {events}"


def test_official_preset_values_and_short_speech(tmp_path, vad):
    web = VadConfig.preset("official_web")
    assert (web.start_threshold, web.end_threshold, web.hangover_ms, web.min_speech_ms) == (0.7, 0.55, 500, 1000)
    yes = speak("Yes.", tmp_path)
    audio = np.concatenate([np.zeros(SAMPLE_RATE), yes, np.zeros(SAMPLE_RATE)]).astype(np.float32)
    a, b = speech_edges(yes)
    assert b - a < SAMPLE_RATE  # under the official 1 s minimum
    assert [type(e) for e in _events(audio, web, vad)] == [SpeechStart, SpeechDiscarded]
    assert [type(e) for e in _events(audio, VadConfig(), vad)] == [SpeechStart, SpeechEnd]


def test_max_speech_cuts_long_segments(scene, vad):
    audio, truth = scene
    a, b = truth[0]
    events = _events(audio[: b + SAMPLE_RATE], VadConfig(max_speech_s=1.0), vad)
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert ends[0].truncated and abs(ends[0].duration - 1.0) < 0.1
    # Speech goes on: the next segment starts where the cut was, and the pieces cover the utterance.
    assert len(ends) >= 2 and 0 <= ends[1].start_sample - ends[0].end_sample <= FRAME
    covered = events[-1].end_sample - ends[0].start_sample
    assert abs(covered - (b - a)) <= TOLERANCE * 2


def test_vad_matches_silero_reference_wrapper(scene, vad):
    """Our onnxruntime loop against the silero-vad package's own ONNX wrapper (which needs torch; tests may use it)."""
    pytest.importorskip("torch")
    import torch
    from silero_vad.utils_vad import OnnxWrapper

    audio = scene[0][: 6 * SAMPLE_RATE]
    ref = OnnxWrapper(str(silero_model_path()), force_onnx_cpu=True)
    expected = np.array([ref(torch.from_numpy(audio[i:i + FRAME]), SAMPLE_RATE).item() for i in range(0, audio.size - FRAME + 1, FRAME)])
    ours = vad.probabilities(audio[: expected.size * FRAME])
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_runtime_imports_no_torch():
    """The device side loads the VAD, Smart Turn and audio modules without torch, transformers, silero_vad or pipecat."""
    code = (
        "import sys, numpy as np\n"
        "from qinyu_edge.runtime.turn import TurnDetector, TurnConfig\n"
        "import qinyu_edge.runtime.audio_devices\n"
        "td = TurnDetector(turn_config=TurnConfig(kind='smart_turn'))\n"
        "td.process(np.zeros(16000, np.float32))\n"
        "bad = [m for m in ('torch', 'transformers', 'silero_vad', 'pipecat') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_missing_model_and_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        SileroVad(tmp_path / "nope.onnx")
    with pytest.raises(ConfigError, match=r"pip install some-wheel"):
        package_file("qinyu_no_such_package", "data/model.onnx", "pip install some-wheel")
    with pytest.raises(ConfigError, match="end_threshold <= start_threshold"):
        VadConfig(start_threshold=0.4, end_threshold=0.6)
    with pytest.raises(ConfigError, match="official_web"):
        VadConfig.preset("loud")
    with pytest.raises(ValueError, match="512"):
        SileroVad()(np.zeros(480, np.float32))
