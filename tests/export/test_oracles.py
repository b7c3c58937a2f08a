"""Our backbones against independent implementations in transformers, on shared random tiny weights.

Qwen3 -> `Qwen3ForCausalLM`; utu v1 MLA -> `DeepseekV3ForCausalLM` with every layer dense. The
official utu attention and DeepSeek-V3's (transformers) agree on everything the tiny model
exercises: q_a/kv_a RMSNorm eps 1e-6, interleaved pairs de-interleaved before rotate-half RoPE,
one rope-key head broadcast to all heads, scale qk_head_dim^-0.5, no rope scaling.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qinyu_edge.config import TINY_MLA, TINY_QWEN3, BackboneConfig
from qinyu_edge.export.models.backbone import Backbone, build_backbone
from qinyu_edge.runtime.kv_cache import NULL_ROWS

transformers = pytest.importorskip("transformers")

VOCAB = 512
TOL = 2e-5  # fp32 on both sides; only summation order differs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def randomize_norms(model: Backbone, seed: int) -> None:
    """Checkpoint norms are not all ones; random ones catch a norm applied to the wrong tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))


def ours_and_hf(cfg: BackboneConfig, hf_model_cls, hf_config, absorbed: bool = True):
    torch.manual_seed(0)
    ours = build_backbone(cfg, absorbed=absorbed).eval()
    randomize_norms(ours, 1)
    hf = hf_model_cls(hf_config).eval()
    state = {f"model.{k}": v for k, v in ours.state_dict().items()}
    state["lm_head.weight"] = torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.05
    hf.load_state_dict(state, strict=True)  # proves the key names and shapes are the HF/official ones
    return ours, hf


def qwen3_pair():
    cfg = dataclasses.replace(TINY_QWEN3, vocab_size=VOCAB)
    hf_cfg = transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return ours_and_hf(cfg, transformers.Qwen3ForCausalLM, hf_cfg)


def mla_pair(absorbed: bool):
    cfg = dataclasses.replace(TINY_MLA, vocab_size=VOCAB)
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,  # K and V really have one head per query head
        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave,
        first_k_dense_replace=cfg.num_layers, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        moe_intermediate_size=16, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return ours_and_hf(cfg, transformers.DeepseekV3ForCausalLM, hf_cfg, absorbed)


def incremental(ours: Backbone, embeds: torch.Tensor, prefill: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Prefill `prefill` positions, then one position per call; last hidden of each call and the
    grown caches."""
    caches = ours.empty_cache(embeds.shape[0])
    hiddens = []
    for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, embeds.shape[1])]:
        hidden, *news = ours.step(embeds[:, start:stop], *caches)
        caches = tuple(torch.cat((c, n), dim=0) for c, n in zip(caches, news))
        hiddens.append(hidden)
    return torch.stack(hiddens, dim=1), caches


def test_qwen3_full_matches_transformers():
    ours, hf = qwen3_pair()
    embeds = torch.randn(2, 9, ours.cfg.hidden_size)
    with torch.no_grad():
        ref = hf.model(inputs_embeds=embeds).last_hidden_state
        got = ours.forward_full(embeds)
        logits_ref = hf(inputs_embeds=embeds).logits
    assert rel(got, ref) < TOL
    assert rel(got @ hf.lm_head.weight.T, logits_ref) < TOL


def test_qwen3_incremental_matches_transformers_cache():
    ours, hf = qwen3_pair()
    embeds = torch.randn(1, 12, ours.cfg.hidden_size)
    prefill = 5
    with torch.no_grad():
        ref = hf.model(inputs_embeds=embeds, use_cache=True)
        got, caches = incremental(ours, embeds, prefill)
    assert rel(got, ref.last_hidden_state[:, prefill - 1 :]) < TOL
    # Same cache contents as HF's DynamicCache (normed, roped keys): [B,KVH,T,D] vs our per-layer
    # [NULL_ROWS+T,B,KVH,D].
    for i, layer in enumerate(ref.past_key_values.layers):
        key, value = (c[NULL_ROWS:] for c in caches[2 * i : 2 * i + 2])
        assert rel(key.permute(1, 2, 0, 3), layer.keys) < TOL
        assert rel(value.permute(1, 2, 0, 3), layer.values) < TOL


@pytest.mark.parametrize("absorbed", [True, False])
def test_mla_full_matches_deepseek_v3(absorbed: bool):
    ours, hf = mla_pair(absorbed)
    embeds = torch.randn(2, 9, ours.cfg.hidden_size)
    with torch.no_grad():
        ref = hf.model(inputs_embeds=embeds).last_hidden_state
        got = ours.forward_full(embeds)
    assert rel(got, ref) < TOL


@pytest.mark.parametrize("absorbed", [True, False])
def test_mla_incremental_matches_deepseek_v3_cache(absorbed: bool):
    ours, hf = mla_pair(absorbed)
    cfg = ours.cfg
    embeds = torch.randn(1, 12, cfg.hidden_size)
    prefill = 4
    with torch.no_grad():
        ref = hf.model(inputs_embeds=embeds, use_cache=True)
        got, caches = incremental(ours, embeds, prefill)
    assert rel(got, ref.last_hidden_state[:, prefill - 1 :]) < TOL
    # transformers caches the same two tensors: normed latent [B,1,T,R] and roped rope key [B,1,T,rope].
    for i, layer in enumerate(ref.past_key_values.layers):
        lat = caches[i][NULL_ROWS:].transpose(0, 1)  # [B,T,R+rope]
        assert rel(lat[..., : cfg.kv_lora_rank], layer.keys[:, 0]) < TOL
        assert rel(lat[..., cfg.kv_lora_rank :], layer.values[:, 0]) < TOL


def test_mla_absorbed_equals_expanded():
    cfg = dataclasses.replace(TINY_MLA, vocab_size=VOCAB)
    torch.manual_seed(3)
    absorbed = build_backbone(cfg, absorbed=True).eval()
    randomize_norms(absorbed, 4)
    expanded = build_backbone(cfg, absorbed=False).eval()
    expanded.load_state_dict(absorbed.state_dict())
    for seq, past in [(7, 0), (1, 30), (4, 9)]:
        args = absorbed.example_inputs(seq, past, batch=2, seed=seq + past)
        with torch.no_grad():
            a, b = absorbed(*args), expanded(*args)
        for x, y in zip(a, b):
            assert rel(x, y) < 1e-5, (seq, past)
