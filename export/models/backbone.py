"""The LLM backbone graph: embeddings in, final-normed last hidden state and new KV out.

`state_dict()` keys equal the official checkpoint's keys without the leading `model.`. The
embedding table is held for loading and for building `inputs_embeds` on the host; the graph itself
starts from `inputs_embeds` (text rows, 8-row audio means, projector outputs are all mixed there).

Cache: one time-major tensor per layer and kind, so each is a contiguous view of the host's
preallocated buffer, appending a step copies nothing, and the graph reads each layer's cache where
it lies (no per-layer slice of a joint tensor):
- Qwen3: `past_key_{i}`, `past_value_{i}` `[N + W, B, kv_heads, head_dim]`.
- MLA: `past_latent_{i}` `[N + W, B, kv_lora_rank + qk_rope_head_dim]`.
The first N = NULL_ROWS rows are a null slot the attention masks out; `past_length` (int64 [1]) = P
real positions follow, and the rest of the W >= P window is masked too (keep every row finite,
e.g. zero). The window lets the host bind the same arrays step after step. The graph returns only
the S new positions (`new_*`, `[S, B, ...]`); they are positions P..P+S-1, so one graph serves
prefill (P = 0) and decode (S = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qinyu_edge.config import BackboneConfig
from qinyu_edge.errors import ConfigError
from qinyu_edge.export.models.layers import RMSNorm, Rotary, SwiGLU, attention_mask
from qinyu_edge.export.models.mla import MLAAttention
from qinyu_edge.export.models.qwen3 import Qwen3Attention
from qinyu_edge.runtime.kv_cache import NULL_ROWS


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
        self, x: torch.Tensor, rope: tuple[torch.Tensor, ...], past: tuple[torch.Tensor, ...], mask: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        a, new = self.self_attn(self.input_layernorm(x), rope, past, mask)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), new


class Backbone(nn.Module):
    """The decoder stack common to both architectures; subclasses fix the cache tensors."""

    cache_kinds: tuple[str, ...] = ()  # per layer, in graph order

    def __init__(self, cfg: BackboneConfig, layers: list[DecoderLayer], rope_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(rope_dim, cfg.rope_theta)

    @property
    def cache_names(self) -> tuple[str, ...]:
        """The cache tensors in `forward`'s order: every kind of layer 0, then layer 1, ..."""
        return tuple(f"{kind}_{i}" for i in range(self.cfg.num_layers) for kind in self.cache_kinds)

    def cache_entry_shape(self) -> tuple[int, ...]:
        """Per position and batch item: the trailing dims of each cache tensor."""
        raise NotImplementedError

    def rope(self, start: torch.Tensor | int, length: torch.Tensor | int) -> tuple[torch.Tensor, ...]:
        """What every layer's attention rotates positions start..start+length-1 with: cos, sin."""
        return self.rotary(start, length)

    def cache_shape(self, length: int, batch: int = 1) -> tuple[int, ...]:
        """One cache tensor holding `length` positions (after the null slot)."""
        return (NULL_ROWS + length, batch, *self.cache_entry_shape())

    def empty_cache(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        """The caches before the first position: the zero null slot only."""
        return tuple(torch.zeros(self.cache_shape(0, batch), dtype=dtype) for _ in self.cache_names)

    def example_inputs(
        self, seq: int, past: int, batch: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0, ahead: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """Random `inputs_embeds`, `past_length` and caches in `forward`'s argument order (tracing,
        tests); the null slot and `ahead` rows after the past are random too, which the graph must ignore."""
        gen = torch.Generator().manual_seed(seed)
        embeds = torch.randn(batch, seq, self.cfg.hidden_size, generator=gen).to(dtype)
        shape = self.cache_shape(past + ahead, batch)
        caches = tuple(torch.randn(shape, generator=gen).to(dtype) for _ in self.cache_names)
        return (embeds, torch.tensor([past]), *caches)

    def signature(self) -> OnnxSignature:
        pasts = tuple(f"past_{n}" for n in self.cache_names)
        news = tuple(f"new_{n}" for n in self.cache_names)
        axes: dict[str, dict[int, str]] = {"inputs_embeds": {0: "batch", 1: "seq"}, "hidden": {0: "batch"}}
        axes.update({n: {0: "past", 1: "batch"} for n in pasts})
        axes.update({n: {0: "seq", 1: "batch"} for n in news})
        return OnnxSignature(("inputs_embeds", "past_length", *pasts), ("hidden", *news), axes)

    def stack(
        self, inputs_embeds: torch.Tensor, past_length: torch.Tensor, caches: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """All layers over a new block: (pre-final-norm hidden [B,S,H], new caches [S,B,...] in
        `cache_names` order)."""
        k = len(self.cache_kinds)
        rows, seq = caches[0].shape[0], inputs_embeds.shape[1]
        rope = self.rope(past_length, seq)
        mask = attention_mask(rows, seq, past_length, inputs_embeds.device)
        x = inputs_embeds
        news: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, new = layer(x, rope, tuple(caches[i * k : (i + 1) * k]), mask)
            news.extend(new)
        return x, tuple(news)

    def forward_full(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states of every position of a prompt with no past: [B,S,H]."""
        empty = self.empty_cache(inputs_embeds.shape[0], inputs_embeds.dtype)
        return self.norm(self.stack(inputs_embeds, torch.tensor([0]), empty)[0])

    def forward(self, inputs_embeds: torch.Tensor, past_length: torch.Tensor, *caches: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        """[B,S,H], the past's length (int64 [1]) and the caches (`cache_names` order) -> hidden [B,H]
        of the last position, then the S new positions of every cache tensor, same order."""
        x, news = self.stack(inputs_embeds, past_length, caches)
        return (self.norm(x[:, -1]), *news)

    def step(self, inputs_embeds: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`forward` over caches that hold exactly the past (null slot, then P positions)."""
        return self(inputs_embeds, torch.tensor([caches[0].shape[0] - NULL_ROWS]), *caches)


class Qwen3Backbone(Backbone):
    cache_kinds = ("key", "value")

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg, [DecoderLayer(cfg, Qwen3Attention(cfg)) for _ in range(cfg.num_layers)], cfg.head_dim)

    def cache_entry_shape(self) -> tuple[int, ...]:
        return (self.cfg.num_key_value_heads, self.cfg.head_dim)

    def rope(self, start: torch.Tensor | int, length: torch.Tensor | int) -> tuple[torch.Tensor, ...]:
        """One rotation matrix per position ([S, D, D], `Rotary.matrices`)."""
        return (self.rotary.matrices(*self.rotary(start, length)),)


class MLABackbone(Backbone):
    cache_kinds = ("latent",)

    def __init__(self, cfg: BackboneConfig, absorbed: bool = True) -> None:
        layers = [DecoderLayer(cfg, MLAAttention(cfg, absorbed)) for _ in range(cfg.num_layers)]
        super().__init__(cfg, layers, cfg.qk_rope_head_dim)

    def cache_entry_shape(self) -> tuple[int, ...]:
        return (self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim,)


def hollow_backbone(cfg: BackboneConfig) -> Backbone:
    """The backbone with its parameters on the meta device (shapes, no memory): what a
    streamed export traces. Its position tables are real, as the graph folds them in."""
    with torch.device("meta"):
        backbone = build_backbone(cfg)
    backbone.rotary = Rotary(2 * backbone.rotary.inv_freq.shape[0], cfg.rope_theta)
    return backbone


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
