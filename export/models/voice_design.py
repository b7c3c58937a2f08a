"""VoiceDesign, the text-to-timbre module of VITA-QinYu role-play (model-spec.md §2).

A role description -> Qwen3-Embedding (last-token pooling, L2 norm) -> Linear(text_dim, 192), the
condition c. A flow-matching sampler then integrates a DiT velocity field from seeded noise to one
192-d CAM++-space vector: Euler steps on a cosine time grid, classifier-free guidance against a zeroed
condition (two estimator calls per step).

Module and parameter names follow the official `VoiceDesign/models/flow/dit_estimator.py` so the
released `voicedesign.pt` loads key for key (see export/voice_design.py for the prefixes). Facts taken
from that code where the spec is silent:
- the estimator's input is [x; c] stacked on channels, so its width is 2 x 192 = 384;
- the attention block's conv FFN is as wide as the hidden size (the wrapper passes the hidden size as
  its filter width), while the three ConvNeXt blocks use `filter_channels` (512);
- the time embedding is sinusoidal with a scale of 1000, then Linear-SiLU-Linear;
- the Euler loop advances t by accumulating dt, then re-reads dt from the grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qinyu_edge.voice_sampling import VoiceDesignConfig, time_grid


class SinusoidalTime(nn.Module):
    def __init__(self, dim: int, scale: float = 1000.0):
        super().__init__()
        self.dim, self.scale = dim, scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).float()
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
        arg = self.scale * t[:, None] * freqs[None]
        return torch.cat((arg.sin(), arg.cos()), dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(dim, inner), nn.SiLU(), nn.Linear(inner, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.layer(t)


class FiLM(nn.Module):
    """x * gamma(t) + beta(t)."""

    def __init__(self, channels: int, cond: int):
        super().__init__()
        self.film = nn.Conv1d(cond, 2 * channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(t.unsqueeze(2)).chunk(2, dim=1)
        return gamma * x + beta


class StyleAdaptiveNorm(nn.Module):
    """LayerNorm without affine, scaled and shifted by a projection of the condition."""

    def __init__(self, channels: int, cond: int):
        super().__init__()
        self.saln = nn.Linear(cond, 2 * channels)
        self.norm = nn.LayerNorm(channels, elementwise_affine=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.saln(c.unsqueeze(1)).chunk(2, dim=-1)
        return gamma * self.norm(x) + beta


class ConvNeXt(nn.Module):
    def __init__(self, channels: int, inner: int, cond: int):
        super().__init__()
        self.dwconv = nn.Conv1d(channels, channels, kernel_size=7, padding=3, groups=channels)
        self.norm = StyleAdaptiveNorm(channels, cond)
        self.pwconv = nn.Sequential(nn.Linear(channels, inner), nn.GELU(), nn.Linear(inner, channels))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x) * mask
        h = self.pwconv(self.norm(h.transpose(1, 2), c)).transpose(1, 2)
        return (x + h) * mask


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C]
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, c))


class ConvFFN(nn.Module):
    def __init__(self, channels: int, inner: int, kernel: int):
        super().__init__()
        self.conv_1 = nn.Conv1d(channels, inner, kernel, padding=kernel // 2)
        self.conv_2 = nn.Conv1d(inner, channels, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv_1(x * mask), approximate="tanh")
        return self.conv_2(h * mask) * mask


class AdaLNZeroBlock(nn.Module):
    """Attention and conv FFN, each pre-normed, modulated and gated by the condition (adaLN-zero)."""

    def __init__(self, channels: int, heads: int, kernel: int, cond: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(channels, heads)
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.mlp = ConvFFN(channels, channels, kernel)
        self.adaLN_modulation = nn.Sequential(
            nn.Linear(cond, channels) if cond != channels else nn.Identity(), nn.SiLU(), nn.Linear(channels, 6 * channels))

    @staticmethod
    def _normed(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return norm(x.transpose(1, 2)).transpose(1, 2) * (1 + scale) + shift

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x * mask
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.adaLN_modulation(c).unsqueeze(2).chunk(6, dim=1)
        h = self.attn(self._normed(self.norm1, x, shift_a, scale_a).transpose(1, 2)).transpose(1, 2)
        x = x + gate_a * h * mask
        return x + gate_f * self.mlp(self._normed(self.norm2, x, shift_f, scale_f), mask)


class DiTLayer(nn.Module):
    """FiLM on time, three ConvNeXt blocks with style-adaptive norm, one adaLN-zero attention block."""

    def __init__(self, cfg: VoiceDesignConfig):
        super().__init__()
        h = cfg.hidden
        self.time_fusion = FiLM(h, h)
        self.conv1 = ConvNeXt(h, cfg.filter_channels, cfg.spk_dim)
        self.conv2 = ConvNeXt(h, cfg.filter_channels, cfg.spk_dim)
        self.conv3 = ConvNeXt(h, cfg.filter_channels, cfg.spk_dim)
        self.block = AdaLNZeroBlock(h, cfg.n_heads, cfg.kernel_size, cfg.spk_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.time_fusion(x, t) * mask
        for conv in (self.conv1, self.conv2, self.conv3):
            x = conv(x, c, mask)
        return self.block(x, c, mask)


class DiTEstimator(nn.Module):
    """The velocity field v(x, t | c): x [B, 192, 1], mask [B, 1, 1], t [1] or [B], cond [B, 192]."""

    def __init__(self, cfg: VoiceDesignConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embeddings = SinusoidalTime(cfg.hidden)
        self.time_mlp = TimestepMLP(cfg.hidden, cfg.filter_channels)
        self.blocks = nn.ModuleList(DiTLayer(cfg) for _ in range(cfg.n_layers))
        self.final_proj = nn.Conv1d(cfg.hidden, cfg.spk_dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, cond.unsqueeze(-1).expand(-1, -1, x.shape[-1])], dim=1)
        temb = self.time_mlp(self.time_embeddings(t))
        for block in self.blocks:
            h = block(h, cond, temb, mask)
        return self.final_proj(h * mask) * mask


class VoiceDesignHead(nn.Module):
    """The trained part of VoiceDesign: the condition projection and the estimator."""

    def __init__(self, cfg: VoiceDesignConfig, text_dim: int):
        super().__init__()
        self.cfg = cfg
        self.projection = nn.Linear(text_dim, cfg.spk_dim)
        self.estimator = DiTEstimator(cfg)

    def condition(self, pooled: torch.Tensor) -> torch.Tensor:
        """L2-normalised sentence embedding [B, text_dim] -> condition [B, 192]."""
        return self.projection(F.normalize(pooled, p=2, dim=1))

    @torch.inference_mode()
    def sample(self, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Euler integration with classifier-free guidance; cond [B, 192], noise [B, 192] -> [B, 192]."""
        cfg = self.cfg
        x = (noise * cfg.temperature).unsqueeze(-1)
        mask = torch.ones(x.shape[0], 1, 1)
        grid = torch.from_numpy(time_grid(cfg.n_steps))
        unconditioned = torch.zeros_like(cond)
        t, dt = grid[0], grid[1] - grid[0]
        for step in range(1, cfg.n_steps + 1):
            v = self.estimator(x, mask, t, cond)
            v_free = self.estimator(x, mask, t, unconditioned)
            x = x + dt * ((1.0 + cfg.cfg_rate) * v - cfg.cfg_rate * v_free)
            t = t + dt
            if step < cfg.n_steps:
                dt = grid[step + 1] - t
        return x.squeeze(-1)
