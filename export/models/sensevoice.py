"""SenseVoiceSmall SAN-M encoder as VITA-QinYu runs it (model-spec 1.2, 10.5, 10.6).

The parameter names follow the SenseVoiceSmall `model.pt` (`embed.weight`, `encoder.encoders0.0.*`,
`encoder.encoders.{i}.*`, `encoder.tp_encoders.{i}.*`, `encoder.after_norm.*`, `encoder.tp_norm.*`), so
a checkpoint maps 1:1; only the unused CTC head `ctc.ctc_lo.*` has no counterpart here.

The graph takes one unpadded utterance per batch row. The official padding mask is then all ones, so
every multiplication by it is the identity and is left out; what the mask shapes structurally stays:
the memory block is conv(v) + v, and the first layer (560 -> D) has no residual around attention.
"""

from __future__ import annotations

import torch
from torch import nn

from qinyu_edge.config import SenseVoiceConfig
from qinyu_edge.errors import ConfigError

# Base of the sinusoid's geometric frequency ladder, as in FunASR's SinusoidalPositionEncoder.
_TIMESCALE_BASE = 10000.0


class _FeedForward(nn.Module):
    def __init__(self, size: int, units: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(size, units)
        self.w_2 = nn.Linear(units, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(torch.relu(self.w_1(x)))


class _SANMAttention(nn.Module):
    """Self-attention plus an FSMN memory: a depthwise conv over V, added back to V."""

    def __init__(self, in_size: int, size: int, heads: int, kernel_size: int, shift: int) -> None:
        super().__init__()
        if size % heads:
            raise ConfigError(f"SenseVoice output_size {size} is not divisible by attention_heads {heads}")
        self.heads = heads
        self.head_dim = size // heads
        self.size = size
        self.linear_out = nn.Linear(size, size)
        self.linear_q_k_v = nn.Linear(in_size, 3 * size)
        self.fsmn_block = nn.Conv1d(size, size, kernel_size, groups=size, bias=False)
        # A positive shift moves the window into the past; shift 0 (the release) centres it,
        # which makes the memory look ahead (kernel_size - 1) // 2 frames.
        left = (kernel_size - 1) // 2 + max(shift, 0)
        right = kernel_size - 1 - left
        if right < 0:
            raise ConfigError(f"SenseVoice sanm_shift {shift} is too large for kernel_size {kernel_size}")
        self.pad = (left, right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = self.linear_q_k_v(x).split(self.size, dim=-1)

        memory = nn.functional.pad(v.transpose(1, 2), self.pad)
        memory = self.fsmn_block(memory).transpose(1, 2) + v

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, -1, self.heads, self.head_dim).transpose(1, 2)

        scores = torch.matmul(heads(q) * self.head_dim**-0.5, heads(k).transpose(-2, -1))
        context = torch.matmul(torch.softmax(scores, dim=-1), heads(v))
        context = context.transpose(1, 2).reshape(b, -1, self.size)
        return self.linear_out(context) + memory


class _SANMLayer(nn.Module):
    """Pre-LN SAN-M layer. When the width changes (560 -> D) attention has no residual."""

    def __init__(self, in_size: int, cfg: SenseVoiceConfig) -> None:
        super().__init__()
        size = cfg.output_size
        self.self_attn = _SANMAttention(in_size, size, cfg.attention_heads, cfg.kernel_size, cfg.sanm_shift)
        self.feed_forward = _FeedForward(size, cfg.linear_units)
        self.norm1 = nn.LayerNorm(in_size)
        self.norm2 = nn.LayerNorm(size)
        self.attn_residual = in_size == size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.norm1(x))
        x = x + h if self.attn_residual else h
        return x + self.feed_forward(self.norm2(x))


class _SANMStack(nn.Module):
    """`SenseVoiceEncoderSmall`: scale, sinusoid, encoders0 + encoders, after_norm, tp_encoders, tp_norm."""

    def __init__(self, cfg: SenseVoiceConfig) -> None:
        super().__init__()
        if cfg.num_blocks < 1:
            raise ConfigError(f"SenseVoice num_blocks must be >= 1 (it counts encoders0), got {cfg.num_blocks}")
        if cfg.input_size % 2:
            raise ConfigError(f"SenseVoice input_size {cfg.input_size} must be even for the sinusoid")
        self.encoders0 = nn.ModuleList([_SANMLayer(cfg.input_size, cfg)])
        self.encoders = nn.ModuleList([_SANMLayer(cfg.output_size, cfg) for _ in range(cfg.num_blocks - 1)])
        self.tp_encoders = nn.ModuleList([_SANMLayer(cfg.output_size, cfg) for _ in range(cfg.tp_blocks)])
        self.after_norm = nn.LayerNorm(cfg.output_size)
        self.tp_norm = nn.LayerNorm(cfg.output_size)
        # The official encoder scales by its *output* width although the input is 560 wide.
        self.input_scale = float(cfg.output_size) ** 0.5
        # Same fp32 ops as the official encoder, so the frequencies agree bit for bit.
        half = cfg.input_size // 2
        increment = torch.log(torch.tensor([_TIMESCALE_BASE])) / (half - 1)
        inv_timescales = torch.exp(torch.arange(half, dtype=torch.float32) * -increment)
        self.register_buffer("inv_timescales", inv_timescales, persistent=False)

    def position_encoding(self, length: int | torch.Tensor) -> torch.Tensor:
        """[length, input_size]: sin then cos halves, positions counted from 1."""
        positions = torch.arange(1, length + 1, dtype=torch.float32, device=self.inv_timescales.device)
        angles = positions[:, None] * self.inv_timescales[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.input_scale + self.position_encoding(x.shape[1])
        for layer in self.encoders0:
            x = layer(x)
        for layer in self.encoders:
            x = layer(x)
        x = self.after_norm(x)
        for layer in self.tp_encoders:
            x = layer(x)
        return self.tp_norm(x)


class SenseVoiceEncoder(nn.Module):
    """CMVN'd LFR features [B, T, 560] -> encoder states [B, T+4, D] (8B) or [B, T, D] (4B).

    The query rows (language, event, emotion, text-norm embeddings) go in front of the features;
    the 8B keeps their outputs, the 4B drops them.
    """

    def __init__(self, cfg: SenseVoiceConfig, keep_query_rows: bool) -> None:
        super().__init__()
        if any(not 0 <= i < cfg.embed_rows for i in cfg.query_ids):
            raise ConfigError(f"SenseVoice query_ids {cfg.query_ids} must lie in [0, {cfg.embed_rows})")
        self.cfg = cfg
        self.keep_query_rows = keep_query_rows
        self.embed = nn.Embedding(cfg.embed_rows, cfg.input_size)
        self.encoder = _SANMStack(cfg)
        self.register_buffer("query_ids", torch.tensor(cfg.query_ids, dtype=torch.long), persistent=False)

    @property
    def n_query(self) -> int:
        return len(self.cfg.query_ids)

    def output_frames(self, n_lfr_frames: int) -> int:
        """Rows this module returns for `n_lfr_frames` input frames (= audio placeholders in the prompt)."""
        return n_lfr_frames + (self.n_query if self.keep_query_rows else 0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.cfg.round_features_bf16:
            # The official wrapper casts the padded features to bf16 before the encoder; the query
            # rows join afterwards and stay fp32 (torch.cat promotes).
            features = features.to(torch.bfloat16).to(torch.float32)
        queries = self.embed(self.query_ids).unsqueeze(0).expand(features.shape[0], -1, -1)
        x = self.encoder(torch.cat([queries, features], dim=1))
        return x if self.keep_query_rows else x[:, self.n_query :]


__all__ = ["SenseVoiceEncoder"]
