"""VoiceDesign's sampling constants and schedule, shared by the PyTorch modules and the torch-free
designer: the estimator's shape, the cosine time grid, and the seeded starting noise."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SPEAKER_DIM = 192


@dataclass(frozen=True)
class VoiceDesignConfig:
    spk_dim: int = SPEAKER_DIM
    filter_channels: int = 512  # ConvNeXt inner width
    n_layers: int = 4
    n_heads: int = 4
    kernel_size: int = 3  # the attention block's conv FFN
    n_steps: int = 20
    cfg_rate: float = 0.7
    temperature: float = 1.0
    max_tokens: int = 512  # the tokenizer truncates the role text here, as upstream

    @property
    def hidden(self) -> int:
        return 2 * self.spk_dim  # x and the condition stacked on channels


REAL = VoiceDesignConfig()
TINY = VoiceDesignConfig(filter_channels=64, n_layers=1)


def time_grid(n_steps: int) -> np.ndarray:
    """The official cosine schedule: t = 1 - cos(pi/2 * linspace(0, 1, n+1)), float32."""
    lin = np.linspace(0.0, 1.0, n_steps + 1, dtype=np.float32)
    return (1.0 - np.cos(lin * np.float32(0.5 * math.pi))).astype(np.float32)


def design_noise(seed: int, spk_dim: int = SPEAKER_DIM) -> np.ndarray:
    """The sampler's starting point, drawn with numpy so the torch and the torch-free designers share it."""
    return np.random.default_rng(seed).standard_normal(spk_dim).astype(np.float32)
