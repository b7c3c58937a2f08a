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

from qinyu_edge.runtime.kv_cache import NULL_ROWS


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32 and cast back before the weight, as the
    official Qwen3RMSNorm / UTUV1RMSNorm do (so bf16/fp16 graphs round at the same place)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """`gain` multiplies the weight (a constant the exporter folds into it), e.g. the attention
        scale, so the scaled result costs no extra op."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight if gain == 1.0 else self.weight * gain
        return weight * xf.to(x.dtype)


def fused_linear(x: torch.Tensor, *linears: nn.Linear) -> tuple[torch.Tensor, ...]:
    """`x` through several bias-free linears that share it.

    In an ONNX export they become one MatMul over the concatenated weights (folded to one constant)
    and a Split: one parallel section per step instead of several, which is what a decode step of
    one-row products pays for. Eager PyTorch runs them apart: concatenating there would copy the
    weights on every call.
    """
    if torch.onnx.is_in_onnx_export():
        sizes = [lin.out_features for lin in linears]
        return F.linear(x, torch.cat([lin.weight for lin in linears])).split(sizes, dim=-1)
    return tuple(lin(x) for lin in linears)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class Rotary(nn.Module):
    """cos/sin tables for positions start..start+length-1 (HF "default" rope: no scaling).

    `inv_freq` is a non-persistent buffer so it stays out of `state_dict()` (the checkpoint has none).
    """

    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # rotate_half as a matrix (x @ rot == cat(-x[half:], x[:half])), for `matrices`.
        half = dim // 2
        rot = torch.zeros(dim, dim)
        rot[half:, :half] = -torch.eye(half)
        rot[:half, half:] = torch.eye(half)
        self.register_buffer("rot", rot, persistent=False)
        self.register_buffer("eye", torch.eye(dim), persistent=False)

    def forward(self, start: torch.Tensor | int, length: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both [length, dim] in float32; angles in float32 like the official rotary module."""
        pos = torch.arange(length, device=self.inv_freq.device).float() + start
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def matrices(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The rotation of each position as one matrix: x @ m == x * cos + rotate_half(x) * sin,
        [length, dim, dim] in float32. Built once per graph; in each layer one small matmul per
        tensor then replaces rotate-half's slices, negation and concat and the three elementwise
        ops, which in a decode step cost more in per-op overhead than in arithmetic."""
        return self.eye * cos[:, None, :] + self.rot * sin[:, None, :]


def rotate_half(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`dim` is x's last size as a Python int: constant slice bounds, no shape ops in the graph."""
    half = dim // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...).

    The interleaved checkpoints (utu v1, DeepSeek-V3) store each rotated pair adjacently; the
    official code permutes them to the half-split layout and then applies rotate-half RoPE, so the
    roped vectors (and our cached rope key) are in half-split order.
    """
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, dim: int) -> torch.Tensor:
    """x: [..., S, (heads,) dim] with cos/sin already broadcastable to it; `dim` as a Python int.
    Math in x's dtype, like the official code (its cos/sin are cast to the activation dtype first)."""
    if interleaved:
        x = deinterleave(x)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x, dim) * sin


def attention_mask(past_rows: torch.Tensor | int, seq: torch.Tensor | int, past_length: torch.Tensor | int,
                   device: torch.device | None = None) -> torch.Tensor:
    """Which of the joined [past rows | new block] columns each new position sees: bool [S, N + W + S].

    The past rows are the N = NULL_ROWS null rows, then `past_length` real positions, then rows the
    host keeps for positions still to come (its cache window grows in steps, so the bound arrays
    stay the same from step to step): only the real positions are seen, and the new block causally.
    Built once per graph; each layer's attention only reads it, and takes S and the row count from
    its shape, so the per-layer shape arithmetic is identical across layers and ONNX Runtime merges
    it into one copy.
    """
    cols = torch.arange(past_rows + seq, device=device)[None, :]
    rows = torch.arange(seq, device=device)[:, None]
    seen = (cols >= NULL_ROWS) & (cols < past_length + NULL_ROWS)
    return seen | ((cols >= past_rows) & (cols <= rows + past_rows))


def cached_attention(
    q: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Causal attention of a new block over a time-major cache plus itself, without joining K/V.

    q:      [B, KVH, G, S, Dk]  (query head kvh*G + g reads kv head kvh: GQA without repeat_kv),
            already scaled by 1/sqrt(Dk) (fold the scale upstream, e.g. into a norm weight)
    past_k: [R, B, KVH, Dk]     past_v: [R, B, KVH, Dv]  (R past rows, those the mask hides included)
    new_k:  [S, B, KVH, Dk]     new_v:  [S, B, KVH, Dv]
    mask:   [S, R + S] from `attention_mask`
    returns [B, KVH, G, S, Dv]

    A boolean `where`, never an additive finfo.min mask (which overflows in fp16). Softmax runs in
    float32 over the joined scores, as the official eager path.

    The cache is only ever read through `permute`s that move its time axis next to the matrix
    dims, which ONNX Runtime fuses into FusedMatMul (transBatchB): the matmuls read the cache in
    place, with no transposed copy. Each kv head is one unit-size batch dim broadcast over the G
    query heads, so a decode step (S = 1) is a one-row product per head, and with no scale on the
    matmul MLAS runs those as GEMV kernels straight over the strided cache.
    """
    p = mask.shape[1] - mask.shape[0]
    # [T, B, KVH, D] -> [T, B, KVH, 1, D]: time-major, one kv head per broadcast batch entry.
    pk, pv, nk, nv = (t.unsqueeze(3) for t in (past_k, past_v, new_k, new_v))
    scores = torch.cat(
        (torch.matmul(q, pk.permute(1, 2, 3, 4, 0)), torch.matmul(q, nk.permute(1, 2, 3, 4, 0))), dim=-1
    )  # [B, KVH, G, S, N + P + S]
    scores = torch.where(mask, scores, torch.tensor(float("-inf"), dtype=scores.dtype))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs[..., :p], pv.permute(1, 2, 3, 0, 4)) + torch.matmul(
        probs[..., p:], nv.permute(1, 2, 3, 0, 4)
    )
