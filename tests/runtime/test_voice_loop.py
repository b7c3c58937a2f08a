"""The voice loop end to end: real VAD, real turn detection, the tiny bundle, file or PortAudio audio.

File tests run the microphone and the speaker on one clock at SPEED x real time, so the loop sees
the same timeline a person would, only faster.
"""

import threading
import time

import numpy as np
import pytest
from pulse import sound_card_fixture, speak, speech_edges, stop_process  # noqa: F401  (the sound_card fixture)

from qinyu_edge.runtime.audio_devices import AudioDeviceConfig, DeviceSink, DeviceSource, FileSink, FileSource
from qinyu_edge.runtime.audio_io import write_wav
from qinyu_edge.runtime.conversation import Conversation
from qinyu_edge.runtime.engine import Engine
from qinyu_edge.runtime.streaming import ChunkSchedule
from qinyu_edge.runtime.turn import TurnConfig, TurnDetector
from qinyu_edge.runtime.vad import VadConfig
from qinyu_edge.runtime.voice_loop import BargeIn, LoopConfig, ReplyDiscarded, State, StateChanged, TurnRecord, VoiceLoop

SPEED = 3.0
SR = 16000


@pytest.fixture(scope="module")
def engine():
    from qinyu_edge.export.bundle_export import preset_bundle

    return Engine(preset_bundle("tiny-8b"))


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    """Clips trimmed to their speech, so the silences the tests put around them are exact."""
    d = tmp_path_factory.mktemp("loop_speech")
    clips = {
        "question": speak("What is the tallest mountain in the world", d),
        "follow": speak("And how high is it", d),
        "first_half": speak("Tell me about the weather", d),
        "second_half": speak("in the mountains tomorrow", d),
    }
    return {k: v[slice(*speech_edges(v))] for k, v in clips.items()}


def silence(seconds):
    return np.zeros(int(seconds * SR), np.float32)


def session(tmp_path, engine, parts, *, duplex="half", turn="silence", max_new_tokens=40, realtime=True):
    wav = tmp_path / "mic.wav"
    write_wav(wav, np.concatenate(parts), SR)
    conv = Conversation(engine, max_new_tokens=max_new_tokens)
    src = FileSource(wav, realtime=realtime, speed=SPEED, tail_silence_s=2.0)
    sink = FileSink(tmp_path / "speaker.wav", realtime=realtime, speed=SPEED)
    detector = TurnDetector(VadConfig(), TurnConfig(kind=turn, silence_timeout_ms=800))
    loop = VoiceLoop(conv, src, sink, detector, LoopConfig(duplex=duplex, barge_in_min_ms=300))
    return loop, conv


def states(loop):
    return [e.new for e in loop.events if isinstance(e, StateChanged)]


def test_one_turn(tmp_path, engine, voice):
    loop, conv = session(tmp_path, engine, [silence(0.5), voice["question"]])
    turns = loop.run()
    assert len(turns) == 1
    assert states(loop)[:3] == [State.USER_SPEAKING, State.RESPONDING, State.SPEAKING]
    assert states(loop)[-1] == State.LISTENING
    rec = turns[0]
    assert rec.steps == 40 and rec.reply_audio_seconds > 0 and not rec.barge_in
    assert rec.first_chunk_ms is not None and rec.first_played_ms is not None
    # The input clock of the turn's edges: speech from 0.5 s, the voice stopped at the clip's end, the
    # commit 800 ms after the VAD's end edge (a frame before the last voiced frame), nothing played before.
    voiced = 0.5 + voice["question"].size / SR
    assert abs(rec.input_speech_start_s - 0.5) < 0.15
    assert abs(rec.input_speech_end_s - voiced) < 0.15
    assert 0.75 <= rec.input_commit_s - rec.input_speech_end_s < 0.85
    assert rec.input_first_audio_s >= rec.input_commit_s
    # Started on the tentative end (the VAD's end event), so first audio follows the commit closely.
    assert rec.preemptive and 0 < rec.vad_end_ms < 300
    assert [t.role for t in conv.history] == ["user", "assistant"]
    played = (tmp_path / "speaker.wav").stat().st_size
    assert played > 44 + 2 * 32000 * 0.5  # at least half a second of reply reached the speaker


def test_two_turns(tmp_path, engine, voice):
    loop, conv = session(tmp_path, engine, [silence(0.5), voice["question"], silence(9.0), voice["follow"]])
    turns = loop.run()
    assert len(turns) == 2, [type(e).__name__ for e in loop.events]
    assert [t.role for t in conv.history] == ["user", "assistant"] * 2
    # The second prompt carried the first clip again and the first reply as text.
    assert len(conv.clips) == 2


def test_pause_mid_utterance_does_not_end_the_turn(tmp_path, engine, voice):
    parts = [silence(0.5), voice["first_half"], silence(0.45), voice["second_half"]]
    loop, conv = session(tmp_path, engine, parts)
    turns = loop.run()
    assert len(turns) == 1
    (end,) = [e for e in loop.events if type(e).__name__ == "TurnEnd"]
    assert len(end.segments) == 2  # two VAD segments, one turn
    assert abs(turns[0].user_seconds - (end.audio.size / SR)) < 1e-6
    assert end.audio.size / SR > (voice["first_half"].size + voice["second_half"].size) / SR


def test_speech_resuming_discards_the_preemptive_reply(tmp_path, engine, voice):
    """A 600 ms pause: the VAD's end event (200 ms) starts a preemptive reply; the user goes on before
    the 800 ms commit, so it is dropped unplayed, and the one reply answers the whole turn."""
    parts = [silence(0.5), voice["first_half"], silence(0.6), voice["second_half"]]
    loop, conv = session(tmp_path, engine, parts)
    turns = loop.run()
    discarded = [e for e in loop.events if isinstance(e, ReplyDiscarded)]
    assert len(discarded) == 1 and len(turns) == 1
    (end,) = [e for e in loop.events if type(e).__name__ == "TurnEnd"]
    assert len(end.segments) == 2
    assert [t.role for t in conv.history] == ["user", "assistant"] and len(conv.clips) == 1
    assert turns[0].preemptive and turns[0].input_first_audio_s >= turns[0].input_commit_s
    # Nothing reached the speaker before the commit: the speaker file is silent until then.
    from qinyu_edge.runtime.audio_io import load_16k_mono

    heard = load_16k_mono(tmp_path / "speaker.wav")
    before = heard[: int((turns[0].input_commit_s - 0.05) * SR)]
    assert before.size and float(np.abs(before).max()) < 1e-3 < float(np.abs(heard).max())


def test_without_preemption_the_reply_starts_at_the_commit(tmp_path, engine, voice):
    wav = tmp_path / "mic.wav"
    write_wav(wav, np.concatenate([silence(0.5), voice["question"]]), SR)
    detector = TurnDetector(VadConfig(), TurnConfig(kind="silence", silence_timeout_ms=800))
    loop = VoiceLoop(Conversation(engine, max_new_tokens=40), FileSource(wav, speed=SPEED, tail_silence_s=2.0),
                     FileSink(tmp_path / "speaker.wav", speed=SPEED), detector, LoopConfig(preemptive=False))
    (rec,) = loop.run()
    assert not rec.preemptive and rec.first_chunk_ms > rec.turn_decision_ms


def test_paced_start_keeps_a_slow_reply_from_running_dry(tmp_path, engine, voice, monkeypatch):
    """Decode steps slowed to 60 ms (0.9x real time: a frame of 80 ms takes 1.5 steps) and the
    4-frame first chunk: the first reply, played at its first chunk, runs dry; the second, delayed
    by what the first reply's step rate predicts, plays through without an underrun."""
    real = engine.generator.generate

    def slow(*args, on_text, on_audio, **kwargs):
        def text(token):
            time.sleep(0.06)
            on_text(token)

        def audio(row):
            time.sleep(0.06)
            on_audio(row)

        return real(*args, on_text=text, on_audio=audio, **kwargs)

    monkeypatch.setattr(engine.generator, "generate", slow)
    wav = tmp_path / "mic.wav"
    write_wav(wav, np.concatenate([silence(0.5), voice["question"], silence(5.0), voice["follow"]]), SR)
    conv = Conversation(engine, max_new_tokens=40, schedule=ChunkSchedule.fast_start())
    detector = TurnDetector(VadConfig(), TurnConfig(kind="silence", silence_timeout_ms=500))
    loop = VoiceLoop(conv, FileSource(wav, tail_silence_s=4.0), FileSink(tmp_path / "speaker.wav"), detector)
    first, second = loop.run()
    assert first.playback_delay_ms == 0 and first.underruns > 0
    assert second.playback_delay_ms > 0 and second.underruns == 0
    assert second.first_played_ms >= second.first_chunk_ms + second.playback_delay_ms - 50


def test_a_user_who_talks_over_every_reply(tmp_path, engine, voice):
    """Full duplex, long replies, and the user cuts in 1.5 s after every turn: every reply is cut,
    every interruption becomes the next turn, the history keeps only what was played."""
    parts = [silence(0.5)]
    for _ in range(3):
        parts += [voice["question"], silence(1.5)]
    loop, conv = session(tmp_path, engine, parts, duplex="full", max_new_tokens=300)
    turns = loop.run()
    assert len(turns) == 3 and [t.barge_in for t in turns] == [True, True, False]
    assert len([e for e in loop.events if isinstance(e, BargeIn)]) == 2
    assert [t.role for t in conv.history] == ["user", "assistant"] * 3
    for rec, said in zip(turns, conv.history[1::2]):
        assert said.text == rec.reply_text


def test_a_turn_longer_than_30_seconds(tmp_path, engine, voice):
    """35 s of speech without a pause long enough to end the turn: one clip, encoded whole, answered."""
    speech = np.concatenate([voice["question"], silence(0.25)] * 16)[: 35 * SR]
    loop, conv = session(tmp_path, engine, [silence(0.5), speech], realtime=False, max_new_tokens=8)
    (rec,) = loop.run()
    assert rec.user_seconds > 34 and rec.steps > 0
    assert conv.clips[0].seconds > 34 and conv.clips[0].embeds.shape[0] > 500


def test_barge_in_cuts_playback_and_keeps_only_what_was_played(tmp_path, engine, voice):
    # A long reply (300 steps, ~15 s of speech); the user speaks again 2.5 s after the end of turn.
    parts = [silence(0.5), voice["question"], silence(2.5), voice["follow"]]
    loop, conv = session(tmp_path, engine, parts, duplex="full", max_new_tokens=300)
    turns = loop.run()
    barges = [e for e in loop.events if isinstance(e, BargeIn)]
    assert len(barges) == 1, [type(e).__name__ for e in loop.events]
    first = turns[0]
    # Generation may have finished (tiny model) or been cancelled; playback was cut either way.
    assert first.barge_in and first.stop in ("cancelled", "max_new_tokens")
    assert barges[0].played_seconds < min(5.0, first.reply_audio_seconds / 2)
    assert conv.history[1].text == barges[0].kept_text
    # The interrupting speech became the next turn.
    assert len(turns) == 2 and not turns[1].barge_in


def test_half_duplex_ignores_speech_while_speaking(tmp_path, engine, voice):
    parts = [silence(0.5), voice["question"], silence(2.5), voice["follow"]]
    loop, _ = session(tmp_path, engine, parts, duplex="half", max_new_tokens=300)
    turns = loop.run()
    assert not any(isinstance(e, BargeIn) for e in loop.events)
    assert len(turns) == 1 and turns[0].stop == "max_new_tokens"


def test_portaudio_loop_on_a_virtual_sound_card(sound_card, tmp_path, engine, voice):
    """Play speech into a virtual microphone, run the loop on real PortAudio streams, record the speaker."""
    wav = tmp_path / "mic.wav"
    write_wav(wav, np.concatenate([silence(0.3), voice["question"], silence(0.3)]), SR)
    raw = tmp_path / "speaker.raw"
    rec = sound_card.record_speaker(raw)
    cfg = AudioDeviceConfig(input_device="pulse", output_device="pulse", latency="high")
    conv = Conversation(engine, max_new_tokens=60)
    loop = VoiceLoop(conv, DeviceSource(cfg), DeviceSink(cfg), TurnDetector(VadConfig(), TurnConfig(kind="silence")))
    try:
        player = sound_card.player(wav)

        def speak_then_stop():
            # The loop only ends on stop(): it must be stopped even when playing the speech fails.
            try:
                time.sleep(0.5)
                player.run()
                deadline = time.monotonic() + 60
                while (player.error is None and time.monotonic() < deadline
                       and not any(isinstance(e, TurnRecord) for e in loop.events)):
                    time.sleep(0.1)
                time.sleep(0.5)
            finally:
                loop.stop()

        t = threading.Thread(target=speak_then_stop)
        t.start()
        turns = loop.run()
        t.join()
    finally:
        stop_process(rec)
    if player.error is not None:
        pytest.skip(f"the virtual sound card could not play into the mic: {player.error}")
    assert len(turns) == 1 and turns[0].reply_audio_seconds > 0
    heard = np.fromfile(raw, dtype="<f4")
    assert heard.size > 0 and float(np.abs(heard).max()) > 1e-3  # the reply came out of the speaker


def test_demo_on_a_given_bundle_and_any_input_format(tmp_path, speech_files, capsys):
    """`demo --bundle B --input` a 44.1 kHz stereo file; each --log line carries the input clock."""
    import json

    from qinyu_edge.cli import main
    from qinyu_edge.export.bundle_export import preset_bundle

    log = tmp_path / "turns.jsonl"
    rc = main(["demo", "--bundle", str(preset_bundle("tiny-4b")), "--input", str(speech_files["stereo44k"]), "--fast",
               "--output", str(tmp_path / "reply.wav"), "--log", str(log), "--max-new-tokens", "8"])
    assert rc == 0 and "tiny-4b" in capsys.readouterr().out
    (line,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert 0 < line["input_speech_start_s"] < line["input_speech_end_s"] < line["input_commit_s"] <= line["input_first_audio_s"]
    assert line["prefill_positions"] > 0 and line["underruns"] >= 0


def test_unpaced_file_answers_every_utterance(tmp_path, engine, voice):
    """`demo --fast`: before, the file was read to its end while the first reply was made, so only the
    first of several questions was answered."""
    parts = [silence(0.5), voice["question"], silence(1.5), voice["follow"], silence(1.5), voice["question"]]
    loop, conv = session(tmp_path, engine, parts, realtime=False, max_new_tokens=20)
    turns = loop.run()
    assert len(turns) == 3 and len(conv.history) == 6


def test_turn_check_lines_say_what_the_policy_needs():
    """The policy, not the model's own 0.5 cut, ends a turn: a check line names the p it needs, or that it is
    too early (before, "incomplete (p=0.27, commits at 0.20)" was printed just before the turn ended)."""
    from qinyu_edge.runtime.turn import TurnCheck, TurnDecision, TurnVerdict
    from qinyu_edge.runtime.voice_cli import _describe

    early = _describe(TurnCheck(0, TurnDecision(TurnVerdict.COMPLETE, 0.92), 60.0, silence_ms=224))
    due = _describe(TurnCheck(0, TurnDecision(TurnVerdict.INCOMPLETE, 0.27), 58.0, silence_ms=384, threshold=0.2))
    assert "p=0.92" in early and "too early to end the turn" in early
    assert "p=0.27" in due and "the turn ends at p >= 0.20" in due
