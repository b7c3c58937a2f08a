"""Cross-turn KV cache reuse: greedy tokens with reuse (and the idle-time prefill of the reply's text
form, as the voice loop runs it) equal those of a full re-prefill, on both tiny presets."""

import logging

import pytest
from pulse import speak

from qinyu_edge.runtime.conversation import Conversation
from qinyu_edge.runtime.engine import Engine

STEPS = 24
UTTERANCES = ["What is the weather like today?", "Tell me a short story.", "Thank you, goodbye."]


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    d = tmp_path_factory.mktemp("reuse_speech")
    return [speak(t, d) for t in UTTERANCES]


@pytest.fixture(scope="module")
def engine(preset_bundle):
    return Engine(preset_bundle[1])


def run(engine, turns, *, reuse, ahead=True, **conv_args):
    """Tokens and Timings of each turn; `turns` are (wav or None, text, user_speaker)."""
    conv = Conversation(engine, max_new_tokens=STEPS, reuse_cache=reuse, **conv_args)
    out = []
    for wav, text, user_speaker in turns:
        reply = conv.ask(wav, text, user_speaker, commit=False)
        if ahead:
            conv.prefill_ahead(reply)  # what the voice loop does while the reply plays
        conv.commit_turn(reply)
        out.append((reply.tokens, reply.timings))
    return out


def same_tokens(engine, turns, **conv_args):
    full = run(engine, turns, reuse=False, **conv_args)
    reused = run(engine, turns, reuse=True, **conv_args)
    assert [t for t, _ in reused] == [t for t, _ in full]
    assert all(t.reused_positions == 0 for _, t in full)
    return [t for _, t in reused]


def test_the_five_parity_cases(engine, speech):
    same_tokens(engine, [(None, "What can you do?", True)])
    same_tokens(engine, [(speech[0], "", False)])
    same_tokens(engine, [(speech[1], "", True)])
    same_tokens(engine, [(speech[2], "", True)], mode="roleplay", voice="2619-王承恩",
                role_description="A calm old lighthouse keeper who speaks slowly.")
    timings = same_tokens(engine, [(w, "", True) for w in speech])
    # From the second turn on, the prompt's start (system, history, the last reply as text) is reused.
    assert timings[0].reused_positions < timings[0].prefill_positions
    for t in timings[1:]:
        assert t.prefill_positions - t.reused_positions < t.prefill_positions // 2


def test_a_ten_turn_conversation(engine, speech):
    turns = [(speech[i % 3], "", True) if i % 2 else (None, f"Question number {i}, please answer.", True) for i in range(10)]
    timings = same_tokens(engine, turns)
    ran = [t.prefill_positions - t.reused_positions for t in timings]
    assert max(ran[1:]) < timings[-1].prefill_positions // 4  # only the new turn runs, however long the history


def test_reuse_after_the_window_drops_old_turns(engine, speech, caplog):
    """num_history=1: from the third turn the oldest exchange leaves the prompt, which then differs right
    after the system prompt; the common prefix is still kept, the rest re-prefilled, tokens unchanged."""
    turns = [(w, "", True) for w in speech] + [(None, "One more thing.", True)]
    with caplog.at_level(logging.DEBUG, logger="qinyu_edge.runtime.generate"):
        timings = same_tokens(engine, turns, num_history=1)
    trimmed = timings[2]
    assert trimmed.reused_positions < timings[1].reused_positions  # the drop cut the shared prefix short
    assert any("diverges" in r.message for r in caplog.records)


def test_barge_in_after_the_idle_time_prefill(engine, speech):
    """The idle-time prefill assumed the whole reply; a barge-in kept only part of it. The next turn
    keeps only what still matches and generates what a fresh full prefill of that history does."""
    def conversation(reuse):
        conv = Conversation(engine, max_new_tokens=STEPS, reuse_cache=reuse)
        first = conv.ask(speech[0], commit=False)
        conv.prefill_ahead(first)
        conv.commit_turn(first, conv.spoken_text(first, 0.3))
        return conv.ask(speech[1])

    reused, full = conversation(True), conversation(False)
    assert reused.tokens == full.tokens
    assert 0 < reused.timings.reused_positions < reused.timings.prefill_positions


def test_reuse_never_keeps_rows_that_differ(engine):
    """Another conversation on the same engine, sharing only the system prompt: reuse keeps exactly the
    rows that are equal, and decoding from there equals a full prefill."""
    gen = engine.generator
    a = run(engine, [(None, "Tell me about the sea.", True)], reuse=True, ahead=False)
    b = run(engine, [(None, "Tell me about mountains.", True)], reuse=True, ahead=False)
    c = run(engine, [(None, "Tell me about mountains.", True)], reuse=False, ahead=False)
    assert b[0][0] == c[0][0] and a[0][1].prefill_positions > 0
    assert 0 < b[0][1].reused_positions < b[0][1].prefill_positions
    assert gen.last_prefill.reused == 0 and gen.last_prefill.positions == c[0][1].prefill_positions


def test_prefill_ahead_takes_an_uncommitted_reply(engine):
    conv = Conversation(engine, max_new_tokens=4)
    reply = conv.ask(None, "Hello.")  # committed at once
    with pytest.raises(ValueError, match="not committed yet"):
        conv.prefill_ahead(reply)
