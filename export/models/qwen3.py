"""Qwen3 attention (VITA-QinYu-8B): GQA, per-head RMSNorm on q and k before rotate-half RoPE."""

from __future__ import annotations

import torch
from torch import nn

from qinyu_edge.config import BackboneConfig
from qinyu_edge.export.models.layers import RMSNorm, cached_attention, fused_linear


class Qwen3Attention(nn.Module):
    """Submodule names equal the checkpoint's `self_attn.*` keys.

    Cache per layer: key and value, each `[NULL_ROWS + P, B, kv_heads, head_dim]`; the key is stored
    normed and roped, exactly what the official DynamicCache holds.
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
        self, x: torch.Tensor, rope: tuple[torch.Tensor, ...], past: tuple[torch.Tensor, ...], mask: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """x [B,S,H]; rope = (rotation matrices [S,D,D],) (`Rotary.matrices`); past = (key, value)
        `[N+P,B,KVH,D]`; mask from `attention_mask` -> (out, (key, value) `[S,B,KVH,D]`)."""
        # Reshapes take S from the shared mask and infer B: the same shape tensors in every layer.
        s = mask.shape[0]
        kvh, d = self.num_kv_heads, self.head_dim
        g = self.num_heads // kvh
        # The softmax scale rides on the q norm's weight (RoPE is linear), so the score matmuls
        # carry no scale (see cached_attention).
        q, k, v = fused_linear(x, self.q_proj, self.k_proj, self.v_proj)
        rot = rope[0].to(x.dtype)
        # [B,S,KVH,G,D] @ [1,S,1,D,D]: each position's heads times that position's rotation.
        q = torch.matmul(self.q_norm(q.reshape(-1, s, kvh, g, d), self.scale), rot[None, :, None])
        q = q.permute(0, 2, 3, 1, 4)  # [B,KVH,G,S,D]
        k = torch.matmul(self.k_norm(k.reshape(-1, s, kvh, d)), rot[None]).transpose(0, 1)  # time-major [S,B,KVH,D]
        v = v.reshape(-1, s, kvh, d).transpose(0, 1)
        out = cached_attention(q, past[0], past[1], k, v, mask)  # [B,KVH,G,S,D]
        return self.o_proj(out.permute(0, 3, 1, 2, 4).reshape(-1, s, self.num_heads * d)), (k, v)
