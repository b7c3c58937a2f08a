"""Turn detection: our numpy Whisper log-mel against transformers, Smart Turn v3.2 plumbing, silence
endpointing, and the text-model interface, on espeak-ng speech and on noise."""

from __future__ import annotations

import numpy as np
import pytest
from pulse import speak, speech_edges
from qinyu_edge.runtime.turn import (
    SmartTurnModel,
    SpeechEnd,
    SpeechStart,
    TextTurnAnalyzer,
    TurnCheck,
    TurnConfig,
    TurnDecision,
    TurnDetector,
    TurnEnd,
    TurnTentative,
    TurnVerdict,
    build_turn_model,
    smart_turn_model_path,
)
from qinyu_edge.runtime.endpointing import EndpointPolicy
from qinyu_edge.runtime.vad import FRAME, SAMPLE_RATE, SileroVad, VadConfig
from qinyu_edge.runtime.whisper_features import fit_window, log_mel

from qinyu_edge.errors import ConfigError

WINDOW = 8 * SAMPLE_RATE


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    """Clips trimmed to their speech, so the pauses the tests put between them are exact."""
    d = tmp_path_factory.mktemp("turn_speech")
    clips = {
        "lights": speak("Please turn on the lights in the kitchen.", d),
        "weather": speak("And what is the weather like tomorrow?", d, "en-gb", 170),
        "long": speak("I would like to know how long it takes to drive from the airport to the city centre in the morning, "
                      "and whether there is a train that is faster than the bus.", d, "en-us", 130),
    }
    return {k: v[slice(*speech_edges(v))] for k, v in clips.items()}


@pytest.fixture(scope="module")
def vad():
    return SileroVad()


@pytest.fixture(scope="module")
def smart_turn():
    return SmartTurnModel()


def _stream(*parts: np.ndarray | float) -> np.ndarray:
    """Concatenate speech arrays and silences given in seconds, over a -60 dBFS noise floor."""
    audio = np.concatenate([np.zeros(int(p * SAMPLE_RATE)) if isinstance(p, (int, float)) else p for p in parts])
    return (audio + 0.001 * np.random.default_rng(0).standard_normal(audio.size)).astype(np.float32)


def _run(detector: TurnDetector, audio: np.ndarray, chunk: int = 320):
    events = []
    for i in range(0, audio.size, chunk):
        events += detector.process(audio[i:i + chunk])
    return events + detector.flush()


# ---------------------------------------------------------------- features


def test_log_mel_matches_transformers_whisper_extractor(voice):
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor(chunk_length=8)
    rng = np.random.default_rng(1)
    cases = {
        "short speech, front-padded": voice["lights"],
        "speech over 8 s, truncated to its end": voice["long"],
        "noise": (0.05 * rng.standard_normal(3 * SAMPLE_RATE)).astype(np.float32),
    }
    for name, audio in cases.items():
        window = fit_window(audio, WINDOW)
        ref = fe(window, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="max_length", max_length=WINDOW,
                 truncation=True, do_normalize=True).input_features[0]
        ours = log_mel(window, normalize=True)
        assert ours.shape == ref.shape == (80, 800)
        err = float(np.abs(ours - ref).max())
        assert err <= 1e-4, f"{name}: max abs error {err}"
    # Without waveform normalisation as well (the plain Whisper definition).
    window = fit_window(voice["lights"], WINDOW)
    ref = fe(window, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
    assert float(np.abs(log_mel(window, normalize=False) - ref).max()) <= 1e-4


def test_window_keeps_the_end_and_pads_the_front(voice):
    long = voice["long"]
    assert long.size > WINDOW
    np.testing.assert_array_equal(fit_window(long, WINDOW), long[-WINDOW:])
    short = voice["lights"]
    w = fit_window(short, WINDOW)
    assert w.size == WINDOW and not w[: WINDOW - short.size].any()
    np.testing.assert_array_equal(w[WINDOW - short.size:], short)


# ---------------------------------------------------------------- Smart Turn


def test_smart_turn_model_io(smart_turn, voice):
    assert smart_turn_model_path().name == "smart-turn-v3.2-cpu.onnx"
    feats = smart_turn.features(voice["lights"])
    assert feats.shape == (80, 800) and feats.dtype == np.float32
    probs = [smart_turn.probability(a) for a in (voice["lights"], voice["long"], np.zeros(SAMPLE_RATE, np.float32))]
    assert all(0.0 <= p <= 1.0 for p in probs)
    # The decision is the probability against the threshold.
    d = smart_turn.decide(voice["lights"])
    assert d.probability == pytest.approx(probs[0])
    assert d.verdict is (TurnVerdict.COMPLETE if probs[0] > 0.5 else TurnVerdict.INCOMPLETE)
    # Only the last 8 s count: audio before them changes nothing.
    prefixed = np.concatenate([voice["weather"], voice["long"]])
    assert smart_turn.probability(prefixed) == pytest.approx(probs[1], abs=1e-6)


def test_smart_turn_detector_ends_each_turn(vad, smart_turn, voice):
    """Two requests 3.5 s apart: each ends by the policy, re-checked on its cadence while silence grows."""
    policy = EndpointPolicy()
    audio = _stream(0.5, voice["lights"], 3.5, voice["weather"], 3.5)
    det = TurnDetector(VadConfig(), TurnConfig(kind="smart_turn"), vad=vad, model=smart_turn)
    events = _run(det, audio)
    ends = [e for e in events if isinstance(e, TurnEnd)]
    checks = [e for e in events if isinstance(e, TurnCheck)]
    assert len(ends) == 2 and len(checks) >= 2
    frame_ms = 1000 * FRAME / SAMPLE_RATE
    for end in ends:
        assert end.reason in ("model", "timeout")
        assert len(end.segments) == 1 and end.start_sample == end.segments[0][0]
        assert end.voiced_end_sample >= end.end_sample  # the VAD edge sits a frame before the voice stops
        np.testing.assert_array_equal(end.audio, audio[end.audio_start_sample:end.end_sample])
        assert policy.min_silence_ms <= end.voiced_latency_ms < policy.max_silence_ms + frame_ms
        mine = [c for c in checks if end.voiced_end_sample < c.sample <= end.detected_sample]
        # Asked when the segment closed, then every check_every_ms while the silence grew, and once
        # as it reached the hard minimum (the first moment a commit is allowed).
        gaps = np.diff([c.sample for c in mine]) * 1000 / SAMPLE_RATE
        assert mine and all(0 < g <= policy.check_every_ms + frame_ms for g in gaps)
        assert any(0 <= c.silence_ms - policy.min_silence_ms < frame_ms for c in mine)
        last = mine[-1]
        if end.reason == "model":
            assert last.sample == end.detected_sample and last.decision.probability >= last.threshold
        else:
            assert all(c.decision.probability < c.threshold for c in mine)


def test_endpoint_policy_rule():
    p = EndpointPolicy(min_silence_ms=300, max_silence_ms=700, start_threshold=0.9, end_threshold=0.5)
    assert not p.commits(299, 1.0)  # the hard minimum holds whatever the model says
    assert p.threshold(300) == pytest.approx(0.9) and p.threshold(500) == pytest.approx(0.7)
    assert p.commits(500, 0.71) and not p.commits(500, 0.69)
    assert p.commits(700, 0.0) and p.commits(700, None)  # the fallback
    assert not p.commits(650, None)
    with pytest.raises(ConfigError, match="min_silence_ms <= max_silence_ms"):
        EndpointPolicy(min_silence_ms=900, max_silence_ms=800)
    with pytest.raises(ConfigError, match="falls as silence grows"):
        EndpointPolicy(start_threshold=0.4, end_threshold=0.6)


def test_mid_sentence_pauses_join_one_turn_and_the_end_commits_soon(vad, smart_turn, voice):
    """Pauses of 200-400 ms split the VAD segments, never the turn (the silence rule holds even where
    Smart Turn, deaf to espeak's flat prosody, calls a half sentence complete); the real end commits
    within the policy's window from the last voiced frame."""
    policy = EndpointPolicy()
    audio = _stream(0.5, voice["lights"], 0.2, voice["weather"], 0.4, voice["lights"], 0.3, voice["weather"], 2.0)
    events = _run(TurnDetector(VadConfig(), TurnConfig(kind="smart_turn"), vad=vad, model=smart_turn), audio)
    ends = [e for e in events if isinstance(e, TurnEnd)]
    assert len(ends) == 1 and len(ends[0].segments) >= 2
    assert ends[0].voiced_latency_ms < policy.max_silence_ms + 1000 * FRAME / SAMPLE_RATE
    np.testing.assert_array_equal(ends[0].audio, audio[ends[0].audio_start_sample:ends[0].end_sample])
    # The real end was announced as tentative before (or as) it committed: a preemptive reply's start.
    tentative = [e for e in events if isinstance(e, TurnTentative)]
    assert tentative and tentative[-1].voiced_end_sample == ends[0].voiced_end_sample
    assert tentative[-1].sample <= ends[0].detected_sample


def test_noise_and_tones_make_no_turn(vad, smart_turn):
    rng = np.random.default_rng(5)
    t = np.arange(4 * SAMPLE_RATE) / SAMPLE_RATE
    audio = np.concatenate([
        0.05 * rng.standard_normal(t.size),
        0.3 * np.sin(2 * np.pi * 440 * t),
        0.3 * np.sin(2 * np.pi * 300 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)),
    ]).astype(np.float32)
    for kind, model in (("smart_turn", smart_turn), ("silence", None)):
        events = _run(TurnDetector(VadConfig(), TurnConfig(kind=kind), vad=vad, model=model), audio)
        assert events == [], f"{kind}: {events}"


# ---------------------------------------------------------------- silence endpointing


def test_silence_timeout_joins_short_pauses_and_ends_after_long_ones(vad, voice):
    cfg = TurnConfig(kind="silence", silence_timeout_ms=800)
    audio = _stream(0.5, voice["lights"], 0.5, voice["weather"], 2.0, voice["lights"], 2.0)
    events = _run(TurnDetector(VadConfig(), cfg, vad=vad), audio)
    ends = [e for e in events if isinstance(e, TurnEnd)]
    assert [len(e.segments) for e in ends] == [2, 1]  # the 0.5 s pause stays inside the first turn
    assert all(e.reason == "silence" for e in ends)
    for e in ends:
        assert 800 <= e.latency_ms < 800 + 1000 * FRAME / SAMPLE_RATE
    # The turn's audio keeps the pause between its segments.
    first = ends[0]
    np.testing.assert_array_equal(first.audio, audio[first.audio_start_sample:first.end_sample])
    assert first.segments[1][0] - first.segments[0][1] > 0.3 * SAMPLE_RATE
    # Events come in stream order: SpeechStart, SpeechEnd ... TurnEnd.
    kinds = [type(e) for e in events]
    assert kinds[:2] == [SpeechStart, SpeechEnd] and kinds[-1] is TurnEnd


def test_end_of_stream_closes_an_open_turn(vad, voice):
    audio = _stream(0.3, voice["lights"], 0.3)
    events = _run(TurnDetector(VadConfig(), TurnConfig(kind="silence", silence_timeout_ms=2000), vad=vad), audio)
    assert isinstance(events[-1], TurnEnd) and events[-1].reason == "end_of_stream"


# ---------------------------------------------------------------- text turn models


class _SegmentCounter:
    """A transcriber for rendered speech: it knows the scripted sentences and returns them by turn length."""

    def __init__(self, script: list[tuple[float, str]]):
        self.script = script
        self.calls = 0

    def transcribe(self, audio: np.ndarray) -> str:
        self.calls += 1
        seconds = audio.size / SAMPLE_RATE
        return " ".join(text for start, text in self.script if start < seconds)


class _PunctuationTurnModel:
    """A rule a user could plug in: a request ending in '?' or '.' is finished; 'hold on' means wait."""

    def classify(self, text: str) -> TurnDecision:
        if "hold on" in text.lower():
            return TurnDecision(TurnVerdict.WAIT)
        return TurnDecision(TurnVerdict.COMPLETE if text.rstrip().endswith(("?", ".")) else TurnVerdict.INCOMPLETE)


def test_text_turn_model_interface(vad, voice):
    # First turn: "and what is" (judged incomplete) ... pause ... "the weather?" -> complete.
    audio = _stream(0.5, voice["lights"], 1.0, voice["weather"], 1.5)
    lights = voice["lights"].size / SAMPLE_RATE
    transcriber = _SegmentCounter([(0.0, "please turn on the lights and"), (lights + 1.4, "what is the weather?")])
    det = TurnDetector(VadConfig(), TurnConfig(kind="text", endpoint=EndpointPolicy(max_silence_ms=3000)), vad=vad,
                       transcriber=transcriber, text_model=_PunctuationTurnModel())
    assert isinstance(det.model, TextTurnAnalyzer)
    events = _run(det, audio)
    checks = [e for e in events if isinstance(e, TurnCheck)]
    ends = [e for e in events if isinstance(e, TurnEnd)]
    # Re-asked through the first pause ("incomplete"), then "complete" from the end of the request on;
    # "complete" counts as p=1, so the commit is the first such check past the hard minimum.
    verdicts = [c.decision.verdict for c in checks]
    first = verdicts.index(TurnVerdict.COMPLETE)
    assert first >= 2 and set(verdicts[first:]) == {TurnVerdict.COMPLETE}
    assert [c.silence_ms >= EndpointPolicy().min_silence_ms for c in checks[first:]] == [False] * (len(checks) - first - 1) + [True]
    assert checks[-1].decision.text == "please turn on the lights and what is the weather?"
    assert len(ends) == 1 and ends[0].reason == "model" and len(ends[0].segments) == 2


def test_wait_verdict_ends_the_turn_without_answer(vad, voice):
    audio = _stream(0.5, voice["lights"], 1.0)
    det = TurnDetector(VadConfig(), TurnConfig(kind="text"), vad=vad,
                       transcriber=_SegmentCounter([(0.0, "hold on a second")]), text_model=_PunctuationTurnModel())
    ends = [e for e in _run(det, audio) if isinstance(e, TurnEnd)]
    assert len(ends) == 1 and ends[0].verdict is TurnVerdict.WAIT


# ---------------------------------------------------------------- configuration errors


def test_configuration_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_turn_model(TurnConfig(smart_turn_model_path=str(tmp_path / "missing.onnx")))
    with pytest.raises(ConfigError, match="transcriber and a text turn model"):
        build_turn_model(TurnConfig(kind="text"))
    with pytest.raises(ConfigError, match="smart_turn, silence or text"):
        TurnConfig(kind="ten")
    assert build_turn_model(TurnConfig(kind="silence")) is None

