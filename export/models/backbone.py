"""The LLM backbone graph: embeddings in, final-normed last hidden state and new KV out.

`state_dict()` keys equal the official checkpoint's keys without the leading `model.`. The
embedding table is held for loading and for building `inputs_embeds` on the host; the graph itself
starts from `inputs_embeds` (text rows, 8-row audio means, projector outputs are all mixed there).

Cache layout, time-major so the host appends a step without copying the past:
- Qwen3: `past_key`, `past_value` `[P, L, B, kv_heads, head_dim]`.
- MLA: `past_latent` `[P, L, B, kv_lora_rank + qk_rope_head_dim]`.
The graph returns only the S new positions in the same layout; positions are P..P+S-1, so one
graph serves prefill (P = 0) and decode (S = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qinyu_edge.config import BackboneConfig
from qinyu_edge.errors import ConfigError
from qinyu_edge.export.models.layers import RMSNorm, Rotary, SwiGLU
from qinyu_edge.export.models.mla import MLAAttention
from qinyu_edge.export.models.qwen3 import Qwen3Attention


# ONNX Runtime (1.31) folds the cache transpose into FusedMatMul(transBatchB), whose shape helper
# divides by the cache's time axis: an empty past (prefill, P = 0) kills the process with SIGFPE.
# Sessions of the backbone graph turn that fusion off; it costs one transposed copy of each layer's
# cache slice per step.
ORT_DISABLED_OPTIMIZERS = ("MatmulTransposeFusion",)


@dataclass(frozen=True)
class OnnxSignature:
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: BackboneConfig, attention: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        a, new = self.self_attn(self.input_layernorm(x), cos, sin, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), new


class Backbone(nn.Module):
    """The decoder stack common to both architectures; subclasses fix the cache tensors."""

    cache_names: tuple[str, ...] = ()

    def __init__(self, cfg: BackboneConfig, layers: list[DecoderLayer], rope_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(rope_dim, cfg.rope_theta)

    def cache_entry_shape(self) -> tuple[int, ...]:
        """Per position and layer and batch item: the trailing dims of each cache tensor."""
        raise NotImplementedError

    def cache_shape(self, length: int, batch: int = 1) -> tuple[int, ...]:
        return (length, self.cfg.num_layers, batch, *self.cache_entry_shape())

    def example_inputs(
        self, seq: int, past: int, batch: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """Random `inputs_embeds` and caches in `forward`'s argument order (tracing, tests)."""
        gen = torch.Generator().manual_seed(seed)
        embeds = torch.randn(batch, seq, self.cfg.hidden_size, generator=gen).to(dtype)
        caches = tuple(torch.randn(self.cache_shape(past, batch), generator=gen).to(dtype) for _ in self.cache_names)
        return (embeds, *caches)

    def signature(self) -> OnnxSignature:
        pasts = tuple(f"past_{n}" for n in self.cache_names)
        news = tuple(f"new_{n}" for n in self.cache_names)
        axes: dict[str, dict[int, str]] = {"inputs_embeds": {0: "batch", 1: "seq"}, "hidden": {0: "batch"}}
        axes.update({n: {0: "past", 2: "batch"} for n in pasts})
        axes.update({n: {0: "seq", 2: "batch"} for n in news})
        return OnnxSignature(("inputs_embeds", *pasts), ("hidden", *news), axes)

    def stack(
        self, inputs_embeds: torch.Tensor, caches: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """All layers over a new block: (pre-final-norm hidden [B,S,H], new caches [S,L,B,...])."""
        cos, sin = self.rotary(caches[0].shape[0], inputs_embeds.shape[1])
        x = inputs_embeds
        news: list[tuple[torch.Tensor, ...]] = []
        for i, layer in enumerate(self.layers):
            x, new = layer(x, cos, sin, tuple(c[:, i] for c in caches))
            news.append(new)
        return x, tuple(torch.stack(parts, dim=1) for parts in zip(*news))

    def forward_full(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states of every position of a prompt with no past: [B,S,H]."""
        b = inputs_embeds.shape[0]
        empty = tuple(inputs_embeds.new_zeros(self.cache_shape(0, b)) for _ in self.cache_names)
        return self.norm(self.stack(inputs_embeds, empty)[0])


class Qwen3Backbone(Backbone):
    cache_names = ("key", "value")

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg, [DecoderLayer(cfg, Qwen3Attention(cfg)) for _ in range(cfg.num_layers)], cfg.head_dim)

    def cache_entry_shape(self) -> tuple[int, ...]:
        return (self.cfg.num_key_value_heads, self.cfg.head_dim)

    def forward(
        self, inputs_embeds: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B,S,H], [P,L,B,KVH,D] x2 -> hidden [B,H] (last position), new_key/new_value [S,L,B,KVH,D]."""
        x, (key, value) = self.stack(inputs_embeds, (past_key, past_value))
        return self.norm(x[:, -1]), key, value


class MLABackbone(Backbone):
    cache_names = ("latent",)

    def __init__(self, cfg: BackboneConfig, absorbed: bool = True) -> None:
        layers = [DecoderLayer(cfg, MLAAttention(cfg, absorbed)) for _ in range(cfg.num_layers)]
        super().__init__(cfg, layers, cfg.qk_rope_head_dim)

    def cache_entry_shape(self) -> tuple[int, ...]:
        return (self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim,)

    def forward(self, inputs_embeds: torch.Tensor, past_latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,S,H], [P,L,B,R+rope] -> hidden [B,H] (last position), new_latent [S,L,B,R+rope]."""
        x, (latent,) = self.stack(inputs_embeds, (past_latent,))
        return self.norm(x[:, -1]), latent


def build_backbone(cfg: BackboneConfig, absorbed: bool = True) -> Backbone:
    """The backbone for `cfg.arch`; `absorbed` picks the MLA computation (ignored for Qwen3)."""
    if cfg.arch == "qwen3":
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {cfg.num_key_value_heads}; fix the backbone config."
            )
        return Qwen3Backbone(cfg)
    if cfg.arch == "utu_mla":
        return MLABackbone(cfg, absorbed)
    raise ConfigError(f"unknown backbone arch {cfg.arch!r}; expected 'qwen3' or 'utu_mla'.")
