"""Multi-head latent attention of Youtu-LLM utu v1 (VITA-QinYu-4B), with a latent KV cache.

Per position and layer the cache holds `kv_lora_rank + qk_rope_head_dim` floats: the RMS-normed
latent followed by the roped, head-shared rope key (576 for the 4B, against 32 x (192 + 128) for
the expanded K/V the official DynamicCache keeps).

Two computations over the same weights and the same cache:
- absorbed (the export graph): kv_b_proj's key half is folded into the query
  (q_nope . (W_uk c) = (W_uk^T q_nope) . c), so every head scores directly against the cached
  `[latent | rope key]` vector, which acts as one shared K and V head (MQA with 576-d keys); the
  value half is applied after the weighted sum of latents.
- expanded (reference): the cache is decompressed through kv_b_proj into per-head K and V, as
  the official code does.
"""

from __future__ import annotations

import torch
from torch import nn

from qinyu_edge.config import BackboneConfig
from qinyu_edge.errors import ConfigError
from qinyu_edge.export.models.layers import RMSNorm, apply_rope, cached_attention

# The official attention builds q_a_layernorm / kv_a_layernorm without passing rms_norm_eps,
# so they take UTUV1RMSNorm's default.
LATENT_NORM_EPS = 1e-6


class MLAAttention(nn.Module):
    """Submodule names equal the checkpoint's `self_attn.*` keys (q_lora_rank > 0 variant)."""

    def __init__(self, cfg: BackboneConfig, absorbed: bool = True) -> None:
        super().__init__()
        if cfg.q_lora_rank <= 0:
            raise ConfigError("MLA backbone needs q_lora_rank > 0 (utu v1 has 1536); fix the backbone config.")
        self.absorbed = absorbed
        self.num_heads = cfg.num_attention_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.interleaved = cfg.rope_interleave
        self.scale = cfg.qk_head_dim**-0.5
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, h, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, ...], past: tuple[torch.Tensor, ...], mask: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """x [B,S,H]; rope = (cos, sin) [S,rope_dim]; past = (latent `[N+P,B,R+rope]`,); mask from
        `attention_mask` -> (out, (latent `[S,B,R+rope]`,))."""
        cos, sin = rope
        b, s, _ = x.shape
        r = self.kv_lora_rank
        # The softmax scale rides on the q_a norm's weight (q is linear in it): no scale on the
        # score matmuls (see cached_attention).
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x), self.scale))
        q = q.reshape(b, s, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope = q[..., : self.nope_dim]
        q_rope = apply_rope(q[..., self.nope_dim :], cos[:, None, :], sin[:, None, :], self.interleaved, self.rope_dim)
        ckv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(ckv[..., :r])
        k_rope = apply_rope(ckv[..., r:], cos, sin, self.interleaved, self.rope_dim)
        new = torch.cat((latent, k_rope), dim=-1).transpose(0, 1)  # [S,B,R+rope]
        if self.absorbed:
            out = self._absorbed(q_nope, q_rope, past[0], new, mask)
        else:
            out = self._expanded(q_nope, q_rope, past[0], new, mask)
        return self.o_proj(out), (new,)

    def _split_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj.weight as W_uk [heads, nope, R] and W_uv [heads, v, R]."""
        w = self.kv_b_proj.weight.reshape(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, past: torch.Tensor, new: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        b, s = q_nope.shape[:2]
        w_uk, w_uv = self._split_kv_b()
        q_lat = torch.matmul(q_nope.transpose(1, 2), w_uk)  # [B,heads,S,R]
        q_cat = torch.cat((q_lat, q_rope.transpose(1, 2)), dim=-1).unsqueeze(1)  # [B,1,heads,S,R+rope]
        past_c, new_c = past.unsqueeze(2), new.unsqueeze(2)  # one shared kv head
        # The whole cached vector serves as the value; its rope-key tail is dropped from the small
        # result instead of slicing (copying) the cache.
        o = cached_attention(q_cat, past_c, past_c, new_c, new_c, mask)[:, 0, :, :, : self.kv_lora_rank]
        out = torch.matmul(o, w_uv.transpose(1, 2))  # [B,heads,S,v]
        return out.transpose(1, 2).reshape(b, s, self.num_heads * self.v_dim)

    def _expand(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T,B,R+rope] -> per-head K [T,B,heads,nope+rope] and V [T,B,heads,v]."""
        t, b = cache.shape[:2]
        kv = self.kv_b_proj(cache[..., : self.kv_lora_rank]).reshape(t, b, self.num_heads, self.nope_dim + self.v_dim)
        k_rope = cache[..., None, self.kv_lora_rank :].expand(-1, -1, self.num_heads, -1)
        return torch.cat((kv[..., : self.nope_dim], k_rope), dim=-1), kv[..., self.nope_dim :]

    def _expanded(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, past: torch.Tensor, new: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        b, s = q_nope.shape[:2]
        q = torch.cat((q_nope, q_rope), dim=-1).permute(0, 2, 1, 3).unsqueeze(2)  # [B,heads,1,S,qk]
        past_k, past_v = self._expand(past)
        new_k, new_v = self._expand(new)
        out = cached_attention(q, past_k, past_v, new_k, new_v, mask)  # [B,heads,1,S,v]
        return out[:, :, 0].transpose(1, 2).reshape(b, s, self.num_heads * self.v_dim)
