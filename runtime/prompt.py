"""The prompt builder: ChatML token ids for one turn, with the audio and speaker slots the
prefill must fill (model-spec §1.3, §2, §3).

Both backbones use the same ChatML rendering: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per
message, then `<|im_start|>assistant\\n`; no BOS, no think block. The rendered string is tokenized
once with the checkpoint's tokenizer, special tokens matched as added tokens, exactly as
`apply_chat_template(tokenize=True)` does. Each `<|audio|>` is then widened to
`<|begin_of_audio|>` + N x `<|context_of_audio|>` + `<|end_of_audio|>`, N being the encoder's
output rows for that clip (T_lfr + 4 on the 8B, T_lfr on the 4B; the caller computes it).

The whole prompt is re-prefilled every turn: earlier user clips are supplied again, and every
`<|speaker|>` / `<|user_speaker|>` position is overwritten with a projected speaker vector, in
sequence order (the agent's voice first, from the system prompt, then one vector per user speech
turn, from that turn's clip).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import numpy as np
from tokenizers import Tokenizer

from qinyu_edge.errors import ContextFullError, PromptError
from qinyu_edge.tokens import TokenLayout

log = logging.getLogger(__name__)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_CONV = "<|end_of_conv|>"
AUDIO_TAG = "<|audio|>"
USER_SPEAKER_TAG = "<|user_speaker|>"
SPEAKER_TAG = "<|speaker|>"

# The official system prompt, line by line; the role description closes it.
SYSTEM_LINES = (
    "Your Name: QinYu-4o",
    "Your Origin: TME and Youtu Collaboration.",
    "Respond in text-audio interleaved manner.",
    "Your Voice Embedding: <|speaker|>.",
)
ROLE_LINE_PREFIX = "Your Role Description: "
DEFAULT_ROLE_DESCRIPTION = "一个声音可爱甜美的女性。"
ASR_INSTRUCTION = "Convert the speech to text."
TTS_INSTRUCTION = "Convert the text to speech."

# Upstream's hard cap on generated steps; the default room kept free for the reply.
DEFAULT_REPLY_RESERVE = 1024
# Positions one second of user speech takes (16.67 Hz encoder rows); only used in error messages.
_ROWS_PER_SECOND = 50 / 3


class Mode(str, Enum):
    CONVERSATION = "conversation"
    ROLEPLAY = "roleplay"
    ASR = "asr"
    TTS = "tts"


@dataclass(frozen=True)
class PromptTexts:
    """The fixed prompt wording. The defaults are the official strings; override to experiment."""

    system_lines: tuple[str, ...] = SYSTEM_LINES
    role_line_prefix: str = ROLE_LINE_PREFIX
    default_role_description: str = DEFAULT_ROLE_DESCRIPTION
    asr_instruction: str = ASR_INSTRUCTION
    tts_instruction: str = TTS_INSTRUCTION

    def system_prompt(self, role_description: str) -> str:
        return "\n".join((*self.system_lines, self.role_line_prefix + role_description))


def clean_reply(text: str) -> str:
    """A reply as it goes back into history: upstream strips it, removes `<|im_end|>` and
    `<|end_of_conv|>`, and strips again."""
    return text.strip().replace(IM_END, "").replace(END_OF_CONV, "").strip()


def reply_text(tokenizer: Tokenizer, text_ids: Sequence[int]) -> str:
    """The history text of a reply from its generated text-stream ids (audio steps excluded),
    decoded as upstream does: special tokens skipped, then `clean_reply`."""
    return clean_reply(tokenizer.decode(list(text_ids), skip_special_tokens=True))


@dataclass(frozen=True)
class Turn:
    """One message. A user turn has text, one audio clip, or both; `user_speaker` puts
    `<|user_speaker|>` in front (it takes the CAM++ vector of this turn's clip, so it needs one).
    An assistant turn is the reply text as it goes into history (see `Turn.reply`)."""

    role: Literal["user", "assistant"]
    text: str = ""
    audio: bool = False
    user_speaker: bool = False

    def __post_init__(self) -> None:
        if self.role == "assistant":
            if self.audio or self.user_speaker:
                raise ValueError("an assistant turn is text only: history keeps no reply audio")
        elif self.role == "user":
            if not self.text and not self.audio:
                raise ValueError("a user turn needs text, an audio clip, or both")
            if self.user_speaker and not self.audio:
                raise ValueError("<|user_speaker|> takes the speaker vector of the turn's clip; the turn has no audio")
        else:
            raise ValueError(f"role must be 'user' or 'assistant', not {self.role!r}")

    @classmethod
    def speech(cls, text: str = "", user_speaker: bool = True) -> Turn:
        return cls("user", text, audio=True, user_speaker=user_speaker)

    @classmethod
    def question(cls, text: str) -> Turn:
        return cls("user", text)

    @classmethod
    def reply(cls, text: str) -> Turn:
        return cls("assistant", clean_reply(text))


@dataclass
class Prompt:
    """Token ids of one prefill plus what must be written over their embeddings.

    audio_slots[i] = (start, rows): positions start..start+rows-1 (the `<|context_of_audio|>` run)
    take the projected encoder output of clip clip_indices[i]. speaker_slots are the positions of
    `<|speaker|>` and `<|user_speaker|>` in sequence order; speaker_clips[j] says whose vector goes
    there: None for the agent voice, else the clip whose CAM++ vector is used. Clips are numbered
    over the whole conversation (every user turn with audio in history + current, in order).
    """

    ids: np.ndarray
    audio_slots: list[tuple[int, int]]
    speaker_slots: list[int]
    speaker_clips: list[int | None]
    clip_indices: list[int]
    history_turns: int  # history turn pairs in this prompt
    dropped_turns: int  # history turn pairs left out so the prompt and reply reserve fit
    text: str  # the rendered ChatML, before the audio expansion

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class _Message:
    role: str
    content: str
    clip: int | None = None  # the conversation-wide clip index of its audio, if any
    user_speaker: bool = False
    free_text: str = ""  # the user's or the reply's own text, which must hold no reserved token

    def render(self) -> str:
        return f"{IM_START}{self.role}\n{self.content}{IM_END}\n"


_GENERATION_PROMPT = f"{IM_START}assistant\n"


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, layout: TokenLayout, max_context: int,
                 texts: PromptTexts = PromptTexts()) -> None:
        if max_context <= 0:
            raise ValueError(f"max_context must be positive, got {max_context}")
        self.tokenizer = tokenizer
        self.layout = layout
        self.max_context = max_context
        self.texts = texts
        self._added_ids = frozenset(tokenizer.get_added_tokens_decoder())
        for what, text in (("ASR instruction", texts.asr_instruction), ("TTS instruction", texts.tts_instruction),
                           ("role line prefix", texts.role_line_prefix)):
            self._check_text(text, what)
        # The system lines carry the agent's <|speaker|> and nothing else the prefill fills.
        for line in texts.system_lines:
            self._check_text(line.replace(SPEAKER_TAG, ""), "system prompt")

    def build(
        self,
        mode: Mode | str,
        history: Sequence[Turn],
        user: Turn,
        audio_rows: Sequence[int],
        role_description: str | None = None,
        reply_reserve: int = DEFAULT_REPLY_RESERVE,
        num_history: int | None = None,
    ) -> Prompt:
        """The prompt for `user` after `history` (alternating user/assistant pairs, oldest first).

        audio_rows[k] is the encoder row count of clip k, numbered over history + current.
        num_history keeps at most that many of the latest pairs (the web demo uses 4; None keeps
        all). Older pairs are then dropped, oldest first, until the prompt plus reply_reserve fits
        max_context; if the system prompt and current turn alone do not fit, ContextFullError.
        """
        mode = Mode(mode)
        if reply_reserve < 0:
            raise ValueError(f"reply_reserve must be >= 0, got {reply_reserve}")
        if num_history is not None and num_history < 0:
            raise ValueError(f"num_history must be >= 0 or None, got {num_history}")
        system, pairs, current = self._messages(mode, history, user, role_description)
        n_clips = sum(m.clip is not None for pair in pairs for m in pair) + (current.clip is not None)
        if len(audio_rows) != n_clips:
            raise ValueError(f"audio_rows has {len(audio_rows)} entries but the conversation has {n_clips} audio clip(s)")
        if any(int(r) <= 0 for r in audio_rows):
            raise ValueError(f"every clip needs at least one encoder row, got {list(audio_rows)}")
        rows = [int(r) for r in audio_rows]

        window = pairs if num_history is None else pairs[len(pairs) - min(num_history, len(pairs)):]
        budget = self.max_context - reply_reserve
        # Messages start with an added token, so their token counts add up; this picks the
        # number of pairs to keep without re-encoding the whole prompt for every candidate.
        fixed = sum(self._count(m, rows) for m in (*system, current)) + self._count_text(_GENERATION_PROMPT)
        keep = self._fitting_pairs(window, rows, budget - fixed)
        # The final ids come from one encode of the whole string, as upstream; should a tokenizer's
        # added tokens absorb neighbouring whitespace, the counts above are off and this still fits.
        while True:
            kept = window[len(window) - keep:]
            prompt = self._assemble([*system, *(m for pair in kept for m in pair), current], rows, keep, len(window) - keep)
            if len(prompt) <= budget:
                break
            if keep == 0:
                raise self._context_full(len(prompt), reply_reserve, current, rows)
            keep -= 1
        if prompt.dropped_turns:
            log.info("dropped the %d oldest history turn(s) to fit %d positions (prompt %d + reply reserve %d)",
                     prompt.dropped_turns, self.max_context, len(prompt), reply_reserve)
        return prompt

    def forgettable_turns(self, history: Sequence[Turn], audio_rows: Sequence[int], num_history: int | None) -> int:
        """How many of the oldest history turns no later prompt can use: those beyond `num_history`
        pairs, or beyond what fits the whole context even with an empty system prompt and turn."""
        pairs = self._history_pairs(history)
        window = pairs if num_history is None else pairs[len(pairs) - min(num_history, len(pairs)):]
        return 2 * (len(pairs) - self._fitting_pairs(window, [int(r) for r in audio_rows], self.max_context))

    def render(self, mode: Mode | str, history: Sequence[Turn], user: Turn, role_description: str | None = None) -> str:
        """The ChatML string of the full conversation, before tokenization and audio expansion."""
        system, pairs, current = self._messages(Mode(mode), history, user, role_description)
        return self._render([*system, *(m for pair in pairs for m in pair), current])

    # --- internals -------------------------------------------------------------------------

    def _messages(self, mode: Mode, history: Sequence[Turn], user: Turn,
                  role_description: str | None) -> tuple[list[_Message], list[tuple[_Message, _Message]], _Message]:
        if user.role != "user":
            raise ValueError("the current turn must be a user turn")
        if mode in (Mode.ASR, Mode.TTS):
            if history:
                raise ValueError(f"{mode.value} is a single-turn task (no system prompt, no history); pass history=[]")
            if role_description is not None:
                raise ValueError(f"{mode.value} has no system prompt, so no role description")
            return [], [], self._task_message(mode, user)

        if mode == Mode.ROLEPLAY and not role_description:
            raise PromptError("roleplay needs the role description of the character (--role)")
        desc = role_description if role_description is not None else self.texts.default_role_description
        self._check_text(desc, "role description")
        system = [_Message("system", self.texts.system_prompt(desc))]

        pairs = self._history_pairs(history)
        return system, pairs, self._user_message(user, sum(u.clip is not None for u, _ in pairs))

    def _history_pairs(self, history: Sequence[Turn]) -> list[tuple[_Message, _Message]]:
        if len(history) % 2:
            raise ValueError(f"history must be whole (user, assistant) pairs; it has {len(history)} turns")
        pairs: list[tuple[_Message, _Message]] = []
        clip = 0
        for i in range(0, len(history), 2):
            u, a = history[i], history[i + 1]
            if u.role != "user" or a.role != "assistant":
                raise ValueError(f"history turns {i} and {i + 1} must be a user turn then an assistant turn")
            # History text is checked only where a prompt keeps it (`_fitting_pairs`).
            msg = self._user_message(u, clip, check=False)
            clip += u.audio
            pairs.append((msg, _Message("assistant", a.text, free_text=a.text)))
        return pairs

    def _fitting_pairs(self, window: Sequence[tuple[_Message, _Message]], rows: list[int], budget: int) -> int:
        """How many of the newest pairs fit `budget` positions. Counted newest first and stopped at the
        first that does not fit, so the pairs a prompt drops are never tokenized: the cost of a turn
        stays flat however long the conversation grows."""
        keep = 0
        for user, reply in reversed(window):
            self._check_text(user.free_text, "user text of a history turn")
            self._check_text(reply.free_text, "assistant turn of the history")
            budget -= self._count(user, rows) + self._count(reply, rows)
            if budget < 0:
                break
            keep += 1
        return keep

    def _user_message(self, turn: Turn, clip: int, check: bool = True) -> _Message:
        if check:
            self._check_text(turn.text, "user text")
        content = (USER_SPEAKER_TAG if turn.user_speaker else "") + turn.text + (AUDIO_TAG if turn.audio else "")
        return _Message("user", content, clip if turn.audio else None, turn.user_speaker, turn.text)

    def _task_message(self, mode: Mode, turn: Turn) -> _Message:
        if mode == Mode.ASR:
            if not turn.audio or turn.text or turn.user_speaker:
                raise ValueError("an ASR turn is one audio clip with no text and no speaker: use Turn.speech(user_speaker=False)")
            return _Message("user", f"{self.texts.asr_instruction}\n{AUDIO_TAG}", 0)
        if turn.audio or not turn.text:
            raise ValueError("a TTS turn is text only: use Turn.question(text)")
        self._check_text(turn.text, "TTS text")
        return _Message("user", f"{self.texts.tts_instruction}\n{turn.text}")

    def _check_text(self, text: str, what: str) -> None:
        # The tokenizer matches added tokens anywhere in the string, so a marker inside free text
        # would become a control token and shift every audio and speaker slot after it.
        found = [self.tokenizer.id_to_token(i) for i in self._encode(text) if i in self._added_ids]
        if found:
            raise PromptError(f"the {what} contains reserved token(s) {sorted(set(found))}; remove them from the text")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _count_text(self, text: str) -> int:
        return len(self._encode(text))

    def _count(self, msg: _Message, rows: list[int]) -> int:
        # <|audio|> becomes begin + rows + end: rows + 1 more positions.
        return self._count_text(msg.render()) + (rows[msg.clip] + 1 if msg.clip is not None else 0)

    @staticmethod
    def _render(messages: Sequence[_Message]) -> str:
        return "".join(m.render() for m in messages) + _GENERATION_PROMPT

    def _assemble(self, messages: list[_Message], rows: list[int], history_turns: int, dropped: int) -> Prompt:
        text = self._render(messages)
        ids = np.asarray(self._encode(text), dtype=np.int64)
        lay = self.layout
        clips = [m.clip for m in messages if m.clip is not None]
        tags = np.flatnonzero(ids == lay.audio)
        pieces, slots, start, out_len = [], [], 0, 0
        for pos, clip in zip(tags, clips):
            n = rows[clip]
            pieces += [ids[start:pos], np.asarray([lay.begin_of_audio], np.int64),
                       np.full(n, lay.context_of_audio, np.int64), np.asarray([lay.end_of_audio], np.int64)]
            out_len += pos - start + 1
            slots.append((int(out_len), n))
            out_len += n + 1
            start = pos + 1
        pieces.append(ids[start:])
        full = np.concatenate(pieces)

        speaker_slots = np.flatnonzero((full == lay.speaker) | (full == lay.user_speaker))
        user_clips = iter([m.clip for m in messages if m.user_speaker])
        speaker_clips = [None if full[p] == lay.speaker else next(user_clips) for p in speaker_slots]
        return Prompt(
            ids=full, audio_slots=slots, speaker_slots=[int(p) for p in speaker_slots], speaker_clips=speaker_clips,
            clip_indices=clips, history_turns=history_turns, dropped_turns=dropped, text=text,
        )

    def _context_full(self, prompt_len: int, reserve: int, current: _Message, rows: list[int]) -> ContextFullError:
        clip = ""
        if current.clip is not None:
            n = rows[current.clip]
            clip = f"; the current audio clip alone takes {n} positions (about {n / _ROWS_PER_SECOND:.1f} s of speech)"
        return ContextFullError(
            f"the prompt needs {prompt_len + reserve} positions (system prompt and current turn {prompt_len}, "
            f"reply reserve {reserve}) but the context holds {self.max_context}, even with no history{clip}. "
            "Use a shorter recording (about 17 positions per second), lower the reply reserve, "
            "or use engines built for a larger context."
        )


__all__ = [
    "Mode", "Turn", "Prompt", "PromptBuilder", "PromptTexts", "clean_reply", "reply_text",
    "SYSTEM_LINES", "ROLE_LINE_PREFIX", "DEFAULT_ROLE_DESCRIPTION", "ASR_INSTRUCTION", "TTS_INSTRUCTION",
    "DEFAULT_REPLY_RESERVE",
]
