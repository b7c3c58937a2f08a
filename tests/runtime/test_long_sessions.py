"""Per-turn cost and memory stay bounded however long a conversation runs; long audio is refused cheaply."""

import numpy as np
import pytest

from qinyu_edge.errors import ContextFullError
from qinyu_edge.runtime.conversation import Conversation
from qinyu_edge.runtime.engine import Engine, EngineOptions
from qinyu_edge.runtime.prompt import PromptBuilder, Turn


@pytest.fixture(scope="module")
def engine():
    from qinyu_edge.export.bundle_export import preset_bundle

    return Engine(preset_bundle("tiny-8b"), EngineOptions(context=1024))


class CountingTokenizer:
    """The real tokenizer, counting the characters it is asked to encode."""

    def __init__(self, tokenizer):
        self._tokenizer, self.chars = tokenizer, 0

    def encode(self, text, **kw):
        self.chars += len(text)
        return self._tokenizer.encode(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_prompt_build_does_not_tokenize_dropped_turns(engine):
    counted = CountingTokenizer(engine.tokenizer)
    builder = PromptBuilder(counted, engine.layout, 1024)
    pair = [Turn.question("Tell me something about the sea, please."), Turn.reply("The sea is wide and deep. " * 4)]
    work = {}
    for n in (20, 1000):
        counted.chars = 0
        prompt = builder.build("conversation", pair * n, Turn.question("And then?"), [], reply_reserve=256)
        work[n] = counted.chars
        assert prompt.dropped_turns > 0
    # Before: every history turn was encoded on every build, 50x the text for 1,000 pairs.
    assert work[1000] == work[20]


def test_conversation_forgets_what_no_prompt_can_use(engine):
    conv = Conversation(engine, max_new_tokens=8, num_history=2)
    rng = np.random.default_rng(0)
    for _ in range(6):
        conv.ask((0.1 * rng.standard_normal(16000)).astype(np.float32), user_speaker=False)
    # Before: 6 clips and 12 history turns, growing every turn.
    assert len(conv.history) == 4 and len(conv.clips) == 2
    unbounded = Conversation(engine, max_new_tokens=8)
    for _ in range(12):
        reply = unbounded.ask(text="Tell me about the mountains and the sea. " * 3)
        # What the last prompt used, and this turn, are kept; no more than the context could hold.
        assert 2 * (reply.prompt.history_turns + 1) <= len(unbounded.history) < 24
    assert reply.prompt.dropped_turns > 0  # the window is full: the bound above was reached, not avoided

def test_long_audio_is_refused_before_encoding(engine):
    conv = Conversation(engine, max_new_tokens=8)
    encoder = engine.sessions["encoder"]
    calls = encoder.stats.calls
    with pytest.raises(ContextFullError, match="the current audio clip alone takes"):
        conv.ask(np.zeros(16000 * 120, np.float32))  # 2 minutes: about 2,000 positions
    assert encoder.stats.calls == calls
