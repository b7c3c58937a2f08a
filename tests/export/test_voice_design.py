"""VoiceDesign in PyTorch: the released layouts round-trip, bad checkpoints are named, the sampler
integrates as upstream's Euler loop does, and a design is a pure function of text and seed."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qinyu_edge.errors import CheckpointError
from qinyu_edge.export.models.voice_design import VoiceDesignHead
from qinyu_edge.voice_sampling import REAL, TINY, time_grid
from qinyu_edge.export.state_dict import atomic_torch_save, torch_load
from qinyu_edge.export.voice_design import (
    CHECKPOINT_FILE, TEXT_ENCODER_DIR, load_text_encoder, load_voice_designer, load_voicedesign,
    tiny_voice_designer, write_tiny_voicedesign,
)
from qinyu_edge.role_text import RoleTextError, check_role, normalise_role

ROLE = "该角色是一个中年男性，身份是小吃店老板，温和爽朗，声音低沉"


@pytest.fixture(scope="module")
def designer():
    return tiny_voice_designer()


@pytest.fixture
def folder(tmp_path):
    return write_tiny_voicedesign(tmp_path / "vd", seed=1)


def test_same_text_and_seed_same_vector(designer):
    a, b = designer.design(ROLE, seed=3), designer.design(ROLE, seed=3)
    assert a.shape == (192,) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, b)
    assert not np.allclose(a, designer.design(ROLE, seed=4))
    assert not np.allclose(a, designer.design("a gentle old lady with a warm, low voice", seed=3))


def test_real_estimator_size():
    # Upstream's wrapper gives the attention block's conv FFN the hidden width (384), not 512.
    head = VoiceDesignHead(REAL, 1024)
    assert sum(p.numel() for p in head.estimator.parameters()) == 17_947_712
    assert sum(p.numel() for p in head.projection.parameters()) == 1024 * 192 + 192


def test_normalisation_as_upstream():
    assert normalise_role("该角色是一个「中」年「男」性， 性格「豪爽直率、重义气」") == "中年男性，性格豪爽直率、重义气。"
    assert normalise_role("该角色是一个「」年「女」性， 性格「温柔」") == "性格温柔。"
    # Free text loses the template prefix and every 年 and 性, as in training.
    assert normalise_role("该角色是一个幼年男性，身份是太孙殿下，性格沉稳") == "幼男，身份是太孙殿下，格沉稳"
    assert normalise_role("「」年性") == "一个通用角色。"
    with pytest.raises(RoleTextError, match="empty"):
        check_role("   ")
    with pytest.raises(RoleTextError, match="more than"):
        check_role("温" * 401)


def test_time_grid_and_guided_euler():
    grid = time_grid(20)
    assert grid[0] == 0 and abs(grid[-1] - 1) < 1e-6 and np.all(np.diff(grid) > 0)
    assert grid[1] < grid[10] - grid[9]  # cosine: small first steps

    class Field(torch.nn.Module):  # v = c + 1: guidance gives 1.7 c + 1, integrated over t in [0, 1]
        def forward(self, x, mask, t, cond):
            return (cond + 1).unsqueeze(-1).expand_as(x)

    head = VoiceDesignHead(TINY, 8)
    head.estimator = Field()
    cond, noise = torch.randn(1, 192), torch.randn(1, 192)
    out = head.sample(cond, noise)
    torch.testing.assert_close(out, noise + 1.7 * cond + 1, atol=1e-5, rtol=1e-5)


def test_layouts_round_trip(folder, tmp_path):
    loaded = load_voice_designer(folder)
    state = torch_load(folder / CHECKPOINT_FILE)
    assert any(k.startswith("decoder.estimator.blocks.0.block.adaLN_modulation.") for k in state)
    assert "decoder.text_encoder.projection.weight" in state
    assert loaded.head.cfg.n_layers == TINY.n_layers and loaded.head.cfg.filter_channels == TINY.filter_channels
    # Upstream wrappers and the frozen embedding copy load the same head.
    frozen = {"decoder.text_encoder.text_encoder.embed_tokens.weight": torch.zeros(3, 3)}
    atomic_torch_save({"state_dict": {**state, **frozen}}, tmp_path / "wrapped.pt")
    again = load_voicedesign(tmp_path / "wrapped.pt", loaded.encoder.config.hidden_size)
    for k, v in loaded.head.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    # A causal-LM style folder (`model.` prefix, an lm_head) gives the same encoder.
    te = folder / TEXT_ENCODER_DIR
    plain = load_file(str(te / "model.safetensors"))
    save_file({**{f"model.{k}": v for k, v in plain.items()}, "lm_head.weight": plain["embed_tokens.weight"].clone()},
              str(te / "model.safetensors"))
    assert np.array_equal(load_voice_designer(folder).design(ROLE, 0), loaded.design(ROLE, 0))


def test_missing_and_unexpected_keys_in_one_error(folder):
    state = torch_load(folder / CHECKPOINT_FILE)
    del state["decoder.estimator.final_proj.weight"]
    state["decoder.extra.weight"] = torch.zeros(1)
    atomic_torch_save(state, folder / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError) as e:
        load_voice_designer(folder)
    assert "1 missing key(s): estimator.final_proj.weight" in str(e.value)
    assert "1 unexpected key(s): decoder.extra.weight" in str(e.value)


def test_text_encoder_folder_errors(folder):
    te = folder / TEXT_ENCODER_DIR
    (te / "config.json").write_text((te / "config.json").read_text().replace('"qwen3"', '"qwen2"'))
    with pytest.raises(CheckpointError, match="model_type 'qwen2'"):
        load_text_encoder(te)
    (te / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="lacks tokenizer.json"):
        load_text_encoder(te)
