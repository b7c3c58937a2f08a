
import pytest


from qinyu_edge.config import PRESETS, ModelConfig, preset
from qinyu_edge.errors import ConfigError, TokenizerError
from qinyu_edge.export.tiny_tokenizer import build_tiny_tokenizer, padded_vocab_size
from qinyu_edge.tokens import TokenLayout, audio_token_name


def test_real_param_counts_match_model_spec():
    # model-spec section 7: 8.256B and 4.519B backbone parameters.
    assert abs(preset("qinyu-8b").backbone.param_count() / 1e9 - 8.256) < 0.001
    assert abs(preset("qinyu-4b").backbone.param_count() / 1e9 - 4.519) < 0.001


def test_variant_level_choices():
    for name, cfg in PRESETS.items():
        assert cfg.keep_query_rows == (cfg.variant == "8b"), name
        assert cfg.audio_projector.norm == ("layer_norm" if cfg.variant == "8b" else "rms_norm"), name
        assert cfg.backbone.is_mla == (cfg.variant == "4b"), name
        assert cfg.xy.samples_per_frame == 2560 and cfg.xy.sample_rate == 32000, name
    assert preset("qinyu-4b").audio_projector.eps == 2.0**-7


def test_config_round_trip_through_dict():
    for cfg in PRESETS.values():
        again = ModelConfig.from_dict(cfg.to_dict())
        assert again == cfg


def test_config_from_dict_rejects_unknown_fields():
    d = preset("tiny-4b").to_dict()
    d["backbone"]["mystery"] = 1
    with pytest.raises(ConfigError, match="mystery"):
        ModelConfig.from_dict(d)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="tiny-4b"):
        preset("tiny-2b")


def test_tiny_tokenizer_has_the_real_layout():
    tok = build_tiny_tokenizer()
    layout = TokenLayout.from_tokenizer(tok)
    # The official order: markers, end_of_conv, then the audio block right after it.
    assert layout.audio_start == layout.end_of_conv + 1
    assert (layout.begin_of_audio, layout.end_of_audio, layout.context_of_audio, layout.audio) == tuple(
        range(layout.begin_of_audio, layout.begin_of_audio + 4))
    assert tok.token_to_id("<|audio_7_7_pad|>") == layout.audio_end - 1
    assert layout.func_start == layout.audio_end + 2
    assert layout.speaker == layout.func_start + 2 and layout.user_speaker == layout.speaker + 1
    assert padded_vocab_size(tok) % 8 == 0 and padded_vocab_size(tok) >= tok.get_vocab_size()
    text = "<|im_start|>user\n<|user_speaker|><|audio|>你好<|im_end|>"
    ids = tok.encode(text).ids
    assert layout.user_speaker in ids and layout.audio in ids and ids[-1] == layout.im_end
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_layout_refuses_a_tokenizer_without_audio_tokens():
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    with pytest.raises(TokenizerError, match=r"<\|speaker\|>"):
        TokenLayout.from_tokenizer(tok)


def test_layout_refuses_a_broken_audio_block():
    tok = build_tiny_tokenizer()
    vocab = dict(tok.get_vocab(with_added_tokens=True))
    # A tokenizer where one audio id sits elsewhere: simulate by a lookup that moves one id.
    moved = audio_token_name(3, 500)

    class Shifted:
        def token_to_id(self, t):
            return vocab[t] + 1 if t == moved else vocab.get(t)

    with pytest.raises(TokenizerError, match="not contiguous"):
        TokenLayout.from_tokenizer(Shifted())
