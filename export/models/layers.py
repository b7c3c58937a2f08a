"""Pieces shared by the two LLM backbones: RMSNorm, RoPE, the SwiGLU MLP, and cached attention.

Cached attention keeps the KV cache time-major (`[P, B, kv_heads, D]` per layer) and never
concatenates the past with the new block: scores against each are computed separately and only
the scores are joined, so a decode step reads the cache once and writes nothing but the new
position.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32 and cast back before the weight, as the
    official Qwen3RMSNorm / UTUV1RMSNorm do (so bf16/fp16 graphs round at the same place)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Rotary(nn.Module):
    """cos/sin tables for positions start..start+length-1 (HF "default" rope: no scaling).

    `inv_freq` is a non-persistent buffer so it stays out of `state_dict()` (the checkpoint has none).
    """

    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, start: torch.Tensor | int, length: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both [length, dim] in float32; angles in float32 like the official rotary module."""
        pos = torch.arange(length, device=self.inv_freq.device).float() + start
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...).

    The interleaved checkpoints (utu v1, DeepSeek-V3) store each rotated pair adjacently; the
    official code permutes them to the half-split layout and then applies rotate-half RoPE, so the
    roped vectors (and our cached rope key) are in half-split order.
    """
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x: [..., S, (heads,) D] with cos/sin already broadcastable to it. Math in x's dtype, like
    the official code (its cos/sin are cast to the activation dtype first)."""
    if interleaved:
        x = deinterleave(x)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def cached_attention(
    q: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a new block over a time-major cache plus itself, without joining K/V.

    q:      [B, KVH, G, S, Dk]  (query head kvh*G + g reads kv head kvh: GQA without repeat_kv)
    past_k: [P, B, KVH, Dk]     past_v: [P, B, KVH, Dv]   (P may be 0)
    new_k:  [S, B, KVH, Dk]     new_v:  [S, B, KVH, Dv]
    returns [B, KVH, G, S, Dv]

    The new block's positions follow the past ones, so every past position is visible and the new
    block is causal within itself (a boolean `where`, never an additive finfo.min mask, which
    overflows in fp16). Softmax runs in float32 over the joined scores, as the official eager path.
    """
    b, kvh, g, s, dk = q.shape
    p = past_k.shape[0]
    # Scale q, not the scores: fewer multiplies and smaller partial sums in fp16.
    qf = (q * scale).reshape(b, kvh, -1, dk)  # rows g*S + i
    scores_past = torch.matmul(qf, past_k.permute(1, 2, 3, 0))  # [B, KVH, G*S, P]
    scores_new = torch.matmul(qf, new_k.permute(1, 2, 3, 0))  # [B, KVH, G*S, S]
    idx = torch.arange(s, device=q.device)
    causal = (idx[:, None] >= idx[None, :]).repeat(g, 1)  # [G*S, S]
    scores_new = torch.where(causal, scores_new, torch.tensor(float("-inf"), dtype=scores_new.dtype))
    probs = torch.softmax(torch.cat((scores_past, scores_new), dim=-1).float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs[..., :p], past_v.permute(1, 2, 0, 3)) + torch.matmul(
        probs[..., p:], new_v.permute(1, 2, 0, 3)
    )
    return out.reshape(b, kvh, g, s, -1)
