"""A small tokenizer with the real VITA-QinYu added-token layout, for the tiny presets.

The base vocabulary is byte-level with no merges (256 ids, any text encodes), followed by the
ChatML tokens and then exactly the tokens VITA-QinYu appends, in the order the official tokenizer
update adds them. The embedding is padded to a multiple of 8, as the official fine-tuning does.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from qinyu_edge.config import IDS_PER_BOOK, N_CODEBOOKS
from qinyu_edge.tokens import AUDIO_MARKERS, CHATML_TOKENS, TAIL_TOKENS, VISION_TOKENS, audio_token_name


def build_tiny_tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHATML_TOKENS])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS + AUDIO_MARKERS])
    # The official update adds the audio ids as ordinary (non-special) added tokens.
    tok.add_tokens([
        AddedToken(audio_token_name(k, j), special=False, normalized=False)
        for k in range(N_CODEBOOKS) for j in range(IDS_PER_BOOK)
    ])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TAIL_TOKENS])
    return tok


def padded_vocab_size(tok: Tokenizer, multiple: int = 8) -> int:
    n = tok.get_vocab_size(with_added_tokens=True)
    return -(-n // multiple) * multiple
