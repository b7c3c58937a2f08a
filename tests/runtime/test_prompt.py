"""The prompt builder on the tiny tokenizer (it has the real added-token layout).

Expected strings are written out from model-spec §3; expected ids come from encoding those
strings piece by piece around each `<|audio|>`, independently of how the builder does it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qinyu_edge.errors import ContextFullError
from qinyu_edge.export.tiny_tokenizer import build_tiny_tokenizer
from qinyu_edge.runtime.prompt import Mode, PromptBuilder, PromptTexts, Turn, reply_text
from qinyu_edge.tokens import TokenLayout

SYSTEM = (
    "<|im_start|>system\nYour Name: QinYu-4o\nYour Origin: TME and Youtu Collaboration.\n"
    "Respond in text-audio interleaved manner.\nYour Voice Embedding: <|speaker|>.\n"
    "Your Role Description: 一个声音可爱甜美的女性。<|im_end|>\n"
)
SPEECH = "<|im_start|>user\n<|user_speaker|><|audio|><|im_end|>\n"
GEN = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def lay(tok):
    return TokenLayout.from_tokenizer(tok)


@pytest.fixture(scope="module")
def builder(tok, lay):
    return PromptBuilder(tok, lay, max_context=100_000)


def expected_ids(tok, lay, text: str, rows: list[int]) -> list[int]:
    pieces = text.split("<|audio|>")
    assert len(pieces) == len(rows) + 1
    out = tok.encode(pieces[0], add_special_tokens=False).ids
    for n, piece in zip(rows, pieces[1:]):
        out += [lay.begin_of_audio] + [lay.context_of_audio] * n + [lay.end_of_audio]
        out += tok.encode(piece, add_special_tokens=False).ids
    return out


def conversation(n_pairs: int) -> list[Turn]:
    replies = ["你好！我是琴语。😀", "Sure, here is a poem.\n床前明月光", "🎵 la la", "好的<|end_of_conv|>", "ok"]
    hist: list[Turn] = []
    for i in range(n_pairs):
        hist += [Turn.speech(), Turn.reply(replies[i % len(replies)])]
    return hist


def test_first_speech_turn_exact(builder, tok, lay):
    p = builder.build(Mode.CONVERSATION, [], Turn.speech(), [7])
    assert p.text == SYSTEM + SPEECH + GEN
    assert p.ids.dtype == np.int64
    assert p.ids.tolist() == expected_ids(tok, lay, p.text, [7])
    # No BOS and no think block: the prompt starts at <|im_start|> and ends with "assistant\n".
    assert p.ids[0] == lay.im_start
    gen = tok.encode(GEN, add_special_tokens=False).ids
    assert p.ids[-len(gen):].tolist() == gen
    assert (p.history_turns, p.dropped_turns, p.clip_indices) == (0, 0, [0])


def test_roleplay_substitutes_description(builder, tok, lay):
    desc = "该角色是一个中年男性， 身份是皇帝近侍, 执行命令迅速果断。"
    p = builder.build("roleplay", [], Turn.speech(), [3], role_description=desc)
    assert p.text == SYSTEM.replace("一个声音可爱甜美的女性。", desc) + SPEECH + GEN
    assert p.ids.tolist() == expected_ids(tok, lay, p.text, [3])
    with pytest.raises(ValueError, match="role description"):
        builder.build("roleplay", [], Turn.speech(), [3])


def test_asr_prompt(builder, tok, lay):
    p = builder.build("asr", [], Turn.speech(user_speaker=False), [11])
    assert p.text == "<|im_start|>user\nConvert the speech to text.\n<|audio|><|im_end|>\n" + GEN
    assert p.ids.tolist() == expected_ids(tok, lay, p.text, [11])
    assert p.speaker_slots == [] and p.speaker_clips == []
    with pytest.raises(ValueError, match="ASR"):
        builder.build("asr", [], Turn.speech(), [11])
    with pytest.raises(ValueError, match="single-turn"):
        builder.build("asr", conversation(1), Turn.speech(user_speaker=False), [4, 11])


def test_tts_prompt(builder, tok):
    text = "两个黄鹂鸣翠柳，One Two 123 🐦"
    p = builder.build("tts", [], Turn.question(text), [])
    assert p.text == f"<|im_start|>user\nConvert the text to speech.\n{text}<|im_end|>\n" + GEN
    assert p.ids.tolist() == tok.encode(p.text, add_special_tokens=False).ids
    assert p.audio_slots == [] and p.speaker_slots == []


def test_text_question_and_speech_with_text(builder, tok, lay):
    p = builder.build("conversation", [], Turn.question("介绍一下上海"), [])
    assert p.text == SYSTEM + "<|im_start|>user\n介绍一下上海<|im_end|>\n" + GEN
    assert p.speaker_clips == [None]  # only the agent voice
    p = builder.build("conversation", [], Turn.speech("听这个"), [2])
    assert p.text == SYSTEM + "<|im_start|>user\n<|user_speaker|>听这个<|audio|><|im_end|>\n" + GEN
    assert p.ids.tolist() == expected_ids(tok, lay, p.text, [2])


@pytest.mark.parametrize("query_rows", [4, 0])  # 8B keeps the 4 query rows, 4B drops them
def test_audio_expansion(builder, lay, query_rows):
    t_lfr = [17, 5, 30]
    rows = [t + query_rows for t in t_lfr]
    p = builder.build("conversation", conversation(2), Turn.speech(), rows)
    assert p.clip_indices == [0, 1, 2]
    assert [n for _, n in p.audio_slots] == rows
    for start, n in p.audio_slots:
        assert p.ids[start - 1] == lay.begin_of_audio
        assert (p.ids[start:start + n] == lay.context_of_audio).all()
        assert p.ids[start + n] == lay.end_of_audio
    assert int((p.ids == lay.context_of_audio).sum()) == sum(rows)
    assert not (p.ids == lay.audio).any()
    # The two variants differ only by the widened runs.
    other = builder.build("conversation", conversation(2), Turn.speech(), t_lfr)
    assert len(p) - len(other) == 3 * query_rows


def test_speaker_slots_order(builder, lay):
    hist = conversation(1) + [Turn.question("文字提问"), Turn.reply("回答")] + conversation(1)
    p = builder.build("conversation", hist, Turn.speech(), [4, 5, 6])
    # Agent first (system prompt), then one <|user_speaker|> per user speech turn, in order;
    # the text question takes no clip and no speaker vector.
    assert p.speaker_clips == [None, 0, 1, 2]
    assert p.ids[p.speaker_slots[0]] == lay.speaker
    assert all(p.ids[s] == lay.user_speaker for s in p.speaker_slots[1:])
    assert p.speaker_slots == sorted(p.speaker_slots)
    assert p.speaker_slots[0] < p.audio_slots[0][0]
    # Each <|user_speaker|> comes right before its own clip's begin-of-audio.
    for slot, clip in zip(p.speaker_slots[1:], p.speaker_clips[1:]):
        start, _ = p.audio_slots[p.clip_indices.index(clip)]
        assert slot == start - 2
    mask = np.flatnonzero((p.ids == lay.speaker) | (p.ids == lay.user_speaker)).tolist()
    assert p.speaker_slots == mask


def test_history_is_text_only_and_stripped(builder, tok):
    raw = "  这是回答。😀<|end_of_conv|><|im_end|> "
    turn = Turn.reply(raw)
    assert turn.text == "这是回答。😀"
    p = builder.build("conversation", [Turn.speech(), turn], Turn.speech(), [3, 3])
    assert p.text == SYSTEM + SPEECH + "<|im_start|>assistant\n这是回答。😀<|im_end|>\n" + SPEECH + GEN
    # From generated ids: special tokens are skipped on decode, as upstream does.
    gen = tok.encode(" Hi 你好<|end_of_conv|><|im_end|>", add_special_tokens=False).ids
    assert reply_text(tok, gen) == "Hi 你好"
    with pytest.raises(ValueError):
        Turn("assistant", "x", audio=True)


def test_num_history_window(builder, tok, lay):
    hist = conversation(5)
    rows = [3, 4, 5, 6, 7, 8]
    p = builder.build("conversation", hist, Turn.speech(), rows, num_history=2)
    assert (p.history_turns, p.dropped_turns) == (2, 0)
    assert p.clip_indices == [3, 4, 5]
    assert p.speaker_clips == [None, 3, 4, 5]
    assert p.text == builder.render("conversation", hist[-4:], Turn.speech())
    assert p.ids.tolist() == expected_ids(tok, lay, p.text, rows[3:])
    assert builder.build("conversation", hist, Turn.speech(), rows, num_history=0).text == SYSTEM + SPEECH + GEN


def test_context_drops_oldest_pairs_until_it_fits(tok, lay, builder):
    hist, rows, reserve = conversation(4), [9, 10, 11, 12, 13], 64
    lengths = [len(builder.build("conversation", hist, Turn.speech(), rows, num_history=k)) for k in range(5)]
    assert lengths == sorted(lengths) and len(set(lengths)) == 5

    exact = PromptBuilder(tok, lay, max_context=lengths[2] + reserve)
    p = exact.build("conversation", hist, Turn.speech(), rows, reply_reserve=reserve)
    assert (p.history_turns, p.dropped_turns) == (2, 2)
    assert p.ids.tolist() == builder.build("conversation", hist, Turn.speech(), rows, num_history=2).ids.tolist()
    assert p.clip_indices == [2, 3, 4] and p.speaker_clips == [None, 2, 3, 4]

    tight = PromptBuilder(tok, lay, max_context=lengths[2] + reserve - 1)
    p = tight.build("conversation", hist, Turn.speech(), rows, reply_reserve=reserve)
    assert (p.history_turns, p.dropped_turns, len(p)) == (1, 3, lengths[1])

    # The window is applied first; dropped_turns counts only what the context forced out.
    p = exact.build("conversation", hist, Turn.speech(), rows, reply_reserve=reserve, num_history=3)
    assert (p.history_turns, p.dropped_turns) == (2, 1)


def test_context_full_error(tok, lay, builder):
    rows, reserve = [40], 100
    need = len(builder.build("conversation", [], Turn.speech(), rows)) + reserve
    small = PromptBuilder(tok, lay, max_context=need - 1)
    with pytest.raises(ContextFullError) as e:
        small.build("conversation", conversation(0), Turn.speech(), rows, reply_reserve=reserve)
    msg = str(e.value)
    assert f"needs {need} positions" in msg and f"holds {need - 1}" in msg
    assert "reply reserve 100" in msg and "takes 40 positions" in msg
    assert "shorter recording" in msg and "larger context" in msg
    # One position more and it fits, with nothing to drop.
    fits = PromptBuilder(tok, lay, max_context=need).build("conversation", [], Turn.speech(), rows, reply_reserve=reserve)
    assert len(fits) + reserve == need


def test_chinese_and_emoji_round_trip(builder, tok, lay):
    question = "今天天气怎么样？🌦️👩‍👩‍👧 Ünïcödé"
    hist = [Turn.question("第一个问题🙂"), Turn.reply("回答 ✅")]
    p = builder.build("conversation", hist, Turn.speech(question), [5])
    expanded = p.text.replace("<|audio|>", "<|begin_of_audio|>" + "<|context_of_audio|>" * 5 + "<|end_of_audio|>")
    assert tok.decode(p.ids.tolist(), skip_special_tokens=False) == expanded
    assert question in p.text


def test_reserved_tokens_in_text_are_rejected(builder):
    with pytest.raises(ValueError, match=r"<\|speaker\|>"):
        builder.build("conversation", [], Turn.question("say <|speaker|> please"), [])
    with pytest.raises(ValueError, match="reserved"):
        builder.build("roleplay", [], Turn.speech(), [3], role_description="x<|audio|>")
    with pytest.raises(ValueError, match="reserved"):
        builder.build("conversation", [Turn.question("q"), Turn("assistant", "a<|audio_0_5|>")], Turn.speech(), [3])


def test_argument_checks(builder):
    with pytest.raises(ValueError, match="2 audio clip"):
        builder.build("conversation", conversation(1), Turn.speech(), [3])
    with pytest.raises(ValueError, match="pairs"):
        builder.build("conversation", [Turn.speech()], Turn.speech(), [3, 3])
    with pytest.raises(ValueError, match="at least one"):
        builder.build("conversation", [], Turn.speech(), [0])
    with pytest.raises(ValueError):
        Turn.question("")
    with pytest.raises(ValueError, match="no audio"):
        Turn("user", "x", user_speaker=True)


def test_texts_are_overridable(tok, lay):
    b = PromptBuilder(tok, lay, 10_000, PromptTexts(default_role_description="A calm voice."))
    assert b.build("conversation", [], Turn.speech(), [2]).text.startswith(
        SYSTEM.replace("一个声音可爱甜美的女性。", "A calm voice.")[:-len("<|im_end|>\n")])
    with pytest.raises(ValueError, match="reserved"):
        PromptBuilder(tok, lay, 10_000, PromptTexts(asr_instruction="<|audio|>"))


def test_same_ids_as_transformers_tokenization(builder, tok):
    # apply_chat_template(tokenize=True) calls the tokenizer on the rendered string with
    # add_special_tokens=False; the builder's pre-expansion ids must be exactly that.
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    text = builder.render("conversation", conversation(3), Turn.speech("🙂"))
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False).ids


def test_import_without_torch():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import qinyu_edge.runtime.prompt
        assert "torch" not in sys.modules and "transformers" not in sys.modules
    """)
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
