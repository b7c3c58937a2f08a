"""Host-side sampling from the heads' logits: the optional alternative to the fused greedy graph.

The decision rule is the official one (text head with codebooks 1-7 masked, codebook-0 repetition
penalty when the choice is audio and earlier frames exist, codebooks 1-7 from their own slices);
only argmax is replaced by seeded temperature / top-k / top-p sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qinyu_edge.tokens import TokenLayout

MASKED = -1e10


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (use greedy decoding for temperature 0)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


def _pick(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    z = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < z.size:
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        z = np.where(z >= kth, z, -np.inf)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < cfg.top_p  # always keeps the most likely token
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def penalize(book0: np.ndarray, history: Sequence[int], start: int, penalty: float) -> np.ndarray:
    """Each codebook-0 id seen c times in `history` is divided (>= 0) or multiplied (< 0) by penalty^c."""
    out = book0.copy()
    for token in history:
        j = token - start
        out[j] = out[j] * penalty if out[j] < 0 else out[j] / penalty
    return out


def sample_step(logits: np.ndarray, history: Sequence[int], layout: TokenLayout, penalty: float,
                cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """logits [V] of one step -> the 8 token ids (absolute), as the fused greedy head returns them."""
    a, per, n = layout.audio_start, layout.ids_per_book, layout.n_codebooks
    masked = logits.copy()
    masked[a + per : a + n * per] = MASKED
    first = _pick(masked, cfg, rng)
    if layout.is_audio(first) and len(history) > 0:
        pool = np.concatenate([logits[:a], penalize(logits[a : a + per], history, a, penalty)])
        first = _pick(pool, cfg, rng)
    ids = [first] + [layout.book_start(k) + _pick(logits[layout.book_start(k) : layout.book_start(k) + per], cfg, rng)
                     for k in range(1, n)]
    return np.asarray(ids, dtype=np.int64)
