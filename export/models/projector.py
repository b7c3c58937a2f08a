"""Audio projector and speaker projector: norm -> Linear -> GELU -> Linear, no biases.

Key names follow the official modules (`pre_proj_layernorm`, `mlp.0`, `mlp.2`), so a checkpoint's
`model.audio_projection.*` / `model.speaker_projection.*` load one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from qinyu_edge.config import ProjectorConfig

from .layers import RMSNorm


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        if cfg.norm == "layer_norm":
            self.pre_proj_layernorm = nn.LayerNorm(cfg.input_size, eps=cfg.eps)
        else:
            # Same math as the official nn.RMSNorm; ours traces to plain ops at opset 17.
            self.pre_proj_layernorm = RMSNorm(cfg.input_size, eps=cfg.eps)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.input_size, cfg.hidden_size, bias=False),
            nn.GELU(),
            nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., input_size] -> [..., hidden_size], per frame."""
        return self.mlp(self.pre_proj_layernorm(x))
