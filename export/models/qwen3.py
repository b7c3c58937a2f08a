"""Qwen3 attention (VITA-QinYu-8B): GQA, per-head RMSNorm on q and k before rotate-half RoPE."""

from __future__ import annotations

import torch
from torch import nn

from qinyu_edge.config import BackboneConfig
from qinyu_edge.export.models.layers import RMSNorm, apply_rope, cached_attention


class Qwen3Attention(nn.Module):
    """Submodule names equal the checkpoint's `self_attn.*` keys.

    Cache per layer: key and value, each `[P, B, kv_heads, head_dim]`; the key is stored normed and
    roped, exactly what the official DynamicCache holds.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """x [B,S,H]; cos/sin [S,head_dim]; past = (key, value) `[P,B,KVH,D]` -> (out, (key, value) `[S,B,KVH,D]`)."""
        b, s, _ = x.shape
        kvh, d = self.num_kv_heads, self.head_dim
        g = self.num_heads // kvh
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads of [B,S,heads,D]
        q = apply_rope(self.q_norm(self.q_proj(x).reshape(b, s, self.num_heads, d)), cos, sin, False)
        k = apply_rope(self.k_norm(self.k_proj(x).reshape(b, s, kvh, d)), cos, sin, False)
        v = self.v_proj(x).reshape(b, s, kvh, d)
        q = q.reshape(b, s, kvh, g, d).permute(0, 2, 3, 1, 4)  # [B,KVH,G,S,D]
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # time-major [S,B,KVH,D]
        out = cached_attention(q, past[0], past[1], k, v, self.scale)  # [B,KVH,G,S,D]
        out = out.permute(0, 3, 1, 2, 4).reshape(b, s, self.num_heads * d)
        return self.o_proj(out), (k, v)
