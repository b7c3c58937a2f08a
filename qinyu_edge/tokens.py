"""The token layout, resolved by name from the tokenizer (ids are never hard-coded).

VITA-QinYu adds, after the base vocabulary: vision tokens, the audio markers, `<|end_of_conv|>`,
8 x 1032 audio ids in one contiguous block (codebook k, index j < 1024 is code j, 1024..1031 are
`<|audio_k_{p}_pad|>`), then `<|audio_token_start|>`, `<|audio_token_end|>`, `<function=`,
`</function>`, `<|speaker|>`, `<|user_speaker|>`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from .config import CODES_PER_BOOK, IDS_PER_BOOK, N_CODEBOOKS
from .errors import TokenizerError


class _Vocab(Protocol):
    def token_to_id(self, token: str) -> int | None: ...


def audio_token_name(book: int, index: int) -> str:
    if index < CODES_PER_BOOK:
        return f"<|audio_{book}_{index}|>"
    return f"<|audio_{book}_{index - CODES_PER_BOOK}_pad|>"


VISION_TOKENS = (
    "<|begin_of_image|>", "<|end_of_image|>", "<|context_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>", "<|context_of_video|>",
    "<|begin_of_patch|>", "<|end_of_patch|>", "<|context_of_patch|>",
    "<|begin_of_quad|>", "<|end_of_quad|>", "<|begin_of_ref|>", "<|end_of_ref|>",
    "<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>",
)
AUDIO_MARKERS = ("<|begin_of_audio|>", "<|end_of_audio|>", "<|context_of_audio|>", "<|audio|>", "<|end_of_conv|>")
TAIL_TOKENS = (
    "<|audio_token_start|>", "<|audio_token_end|>", "<function=", "</function>",
    "<|speaker|>", "<|user_speaker|>", "<|im_end|>",
)
CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class TokenLayout:
    im_start: int
    im_end: int
    begin_of_audio: int
    end_of_audio: int
    context_of_audio: int
    audio: int
    end_of_conv: int
    speaker: int
    user_speaker: int
    func_start: int
    func_end: int
    audio_start: int  # id of <|audio_0_0|>, called A in model-spec.md
    n_codebooks: int = N_CODEBOOKS
    ids_per_book: int = IDS_PER_BOOK
    codes_per_book: int = CODES_PER_BOOK

    @property
    def audio_end(self) -> int:
        """One past the last audio id (<|audio_7_7_pad|>)."""
        return self.audio_start + self.n_codebooks * self.ids_per_book

    def book_start(self, k: int) -> int:
        return self.audio_start + k * self.ids_per_book

    def is_audio(self, token: int) -> bool:
        return self.audio_start <= token < self.audio_end

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenLayout":
        return cls(**d)

    @classmethod
    def from_tokenizer(cls, vocab: _Vocab) -> "TokenLayout":
        names = {
            "im_start": "<|im_start|>", "im_end": "<|im_end|>",
            "begin_of_audio": "<|begin_of_audio|>", "end_of_audio": "<|end_of_audio|>",
            "context_of_audio": "<|context_of_audio|>", "audio": "<|audio|>",
            "end_of_conv": "<|end_of_conv|>", "speaker": "<|speaker|>", "user_speaker": "<|user_speaker|>",
            "func_start": "<function=", "func_end": "</function>", "audio_start": audio_token_name(0, 0),
        }
        ids = {field: vocab.token_to_id(tok) for field, tok in names.items()}
        missing = [names[f] for f, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(
                f"the tokenizer lacks {len(missing)} token(s) VITA-QinYu needs: {', '.join(missing)}. "
                "Use the tokenizer files from the VITA-QinYu checkpoint folder, not the base LLM's."
            )
        layout = cls(**ids)
        # The heads slice the vocabulary by arithmetic, so the whole block must be contiguous.
        bad = []
        for k in range(N_CODEBOOKS):
            for j in range(IDS_PER_BOOK):
                name = audio_token_name(k, j)
                if vocab.token_to_id(name) != layout.book_start(k) + j:
                    bad.append(name)
        if bad:
            raise TokenizerError(
                f"the 8x1032 audio block is not contiguous from {names['audio_start']} (id {layout.audio_start}): "
                f"{len(bad)} token(s) missing or out of place, first {bad[:5]}. This tokenizer does not belong "
                "to a VITA-QinYu checkpoint."
            )
        return layout
