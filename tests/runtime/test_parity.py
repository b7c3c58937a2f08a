"""Token-identical parity: the ONNX runtime conversation against the PyTorch reference loop.

The five cases the runtime must match on both tiny presets: a text question, a spoken question
(real espeak-ng speech), speech with the user's CAM++ embedding, role-play with a named agent
voice and a role description, and a three-turn spoken conversation.
"""

import subprocess

import numpy as np
import pytest

from qinyu_edge.export.qinyu_checkpoint import load_preset
from qinyu_edge.export.reference import ReferenceTurn, reference_conversation
from qinyu_edge.runtime.audio_io import load_16k_mono
from qinyu_edge.runtime.conversation import Conversation
from qinyu_edge.runtime.engine import Engine

STEPS = 48
UTTERANCES = ["What is the weather like today?", "Tell me a short story.", "Thank you, goodbye."]


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    d = tmp_path_factory.mktemp("utterances")
    out = []
    for i, text in enumerate(UTTERANCES):
        raw, wav = d / f"raw{i}.wav", d / f"u{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), text], check=True)
        subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav)], check=True)
        out.append(load_16k_mono(wav))
    return out


@pytest.fixture(scope="module")
def both(preset_bundle):
    name, path = preset_bundle
    return Engine(path), load_preset(name)


def run_both(engine, model, turns, mode="conversation", voice="tian", role=None):
    conv = Conversation(engine, mode=mode, voice=voice, role_description=role, max_new_tokens=STEPS)
    ours = [conv.ask(t.wav_16k, t.text, t.user_speaker) for t in turns]
    vec = engine.voice(voice) if mode in ("conversation", "roleplay") else None
    ref = reference_conversation(model, turns, mode=mode, voice=vec, role_description=role,
                                 max_new_tokens=STEPS, max_context=engine.cache.capacity)
    return ours, ref


def assert_same(ours, ref):
    for o, r in zip(ours, ref, strict=True):
        assert o.tokens == r.tokens
        assert o.text_tokens == r.text_tokens
        assert o.stop == r.stop


def test_text_question(both):
    ours, ref = run_both(*both, [ReferenceTurn(text="What can you do?")])
    assert_same(ours, ref)
    assert ours[0].prompt.audio_slots == []


def test_spoken_question(both, speech):
    ours, ref = run_both(*both, [ReferenceTurn(speech[0], user_speaker=False)])
    assert_same(ours, ref)
    (start, rows), = ours[0].prompt.audio_slots
    assert rows == ours[0].clips[0].embeds.shape[0]


def test_speech_with_user_speaker_embedding(both, speech):
    ours, ref = run_both(*both, [ReferenceTurn(speech[1], user_speaker=True)])
    assert_same(ours, ref)
    assert len(ours[0].prompt.speaker_slots) == 2  # the agent in the system prompt, then the user
    assert ours[0].clips[0].speaker is not None and np.isfinite(ours[0].clips[0].speaker).all()


def test_roleplay_with_agent_voice(both, speech):
    role = "A calm old lighthouse keeper who speaks slowly."
    ours, ref = run_both(*both, [ReferenceTurn(speech[2])], mode="roleplay", voice="2619-王承恩", role=role)
    assert_same(ours, ref)
    engine = both[0]
    assert role in engine.tokenizer.decode(ours[0].prompt.ids.tolist(), skip_special_tokens=False)


def test_three_turn_conversation(both, speech):
    ours, ref = run_both(*both, [ReferenceTurn(w) for w in speech])
    assert_same(ours, ref)
    # Each later prompt carries the earlier clips again and the earlier replies as text.
    assert [len(r.prompt.audio_slots) for r in ours] == [1, 2, 3]
    assert len(ours[2].prompt.ids) > len(ours[1].prompt.ids) > len(ours[0].prompt.ids)


def test_long_clip_speaker_vector_is_the_mean_over_chunks(both):
    """A 25 s clip is three 10 s chunks, embedded in one call and averaged, as upstream."""
    from qinyu_edge.export.speaker_checkpoint import campplus_embedding

    engine, model = both
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(25 * 16000)).astype(np.float32)
    ours = engine.speaker_vector(wav)
    ref = campplus_embedding(model.campplus, wav)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_roleplay_with_designed_voice(both, speech):
    from qinyu_edge.export.voice_design import tiny_voice_designer

    role = "该角色是一个「中」年「男」性， 性格「温和爽朗」"
    voice = tiny_voice_designer().design(role, seed=7)
    ours, ref = run_both(*both, [ReferenceTurn(speech[0])], mode="roleplay", voice=voice, role=role)
    assert_same(ours, ref)
    assert len(ours[0].tokens) > 0
