"""The output side: the token embedding as a graph input stage, and the eight heads.

VITA-QinYu has one `lm_head` over the whole vocabulary (model-spec 1.5). Head 0 is the text head: full
logits with the codebook 1-7 ranges masked, which yields text, a special token or a codebook-0 id.
Heads 1-7 are the 1032-row slices of the same matrix. When a checkpoint carries separate
`audio_heads.{0..6}` (use_audio_heads), those replace the slices for codebooks 1-7.
"""

from __future__ import annotations

import torch
from torch import nn

from qinyu_edge.tokens import TokenLayout

MASKED = -1e10  # the official code's value for the masked codebook ranges


class Embedding(nn.Module):
    """ids [B, S, K] -> mean of the K embedding rows [B, S, H].

    K = 1 is a text step; K = 8 is an audio step (one id per codebook), averaged as in training.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        # Shares `weight`'s memory (never written): a tied matrix is then held once with the heads.
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).mean(dim=2)


class Heads(nn.Module):
    """Logits of all eight heads from the last hidden state.

    `logits(hidden [B,H]) -> [B, V]` is the raw lm_head output (the host can sample from it);
    `greedy(hidden, history)` is the official greedy decision fused into the graph.
    """

    def __init__(self, lm_head: torch.Tensor, layout: TokenLayout, penalty: float = 1.1,
                 audio_heads: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(lm_head.detach(), requires_grad=False)
        # Separate heads for codebooks 1..7, [7, 1032, H], only when the checkpoint has them.
        self.audio_heads = None if audio_heads is None else nn.Parameter(audio_heads.detach(), requires_grad=False)
        self.a = layout.audio_start
        self.n = layout.n_codebooks
        self.per = layout.ids_per_book
        self.penalty = penalty

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.t()

    def book_logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Codebooks 1..7 logits [B, 7, 1032]."""
        if self.audio_heads is not None:
            return torch.einsum("bh,kvh->bkv", hidden, self.audio_heads)
        lo, hi = self.a + self.per, self.a + self.n * self.per
        return logits[:, lo:hi].reshape(hidden.shape[0], self.n - 1, self.per)

    def greedy(self, hidden: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """hidden [B, H], history [B, W] codebook-0 token ids of the last W audio frames (-1 = none)
        -> ids [B, 8] absolute token ids: the text head's choice, then codebooks 1..7.

        As the official `next_token`: argmax over the logits with codebooks 1-7 masked; if that is an
        audio id and earlier frames exist, each codebook-0 id seen c times in the window has its
        logit divided (if >= 0) or multiplied (if < 0) by penalty^c, and the argmax is taken again
        over [0, A + 1032). Codebooks 1-7 are argmax within their slices of the unpenalised logits.
        """
        logits = self.logits(hidden)
        a, per, n = self.a, self.per, self.n
        masked = torch.cat(
            [logits[:, : a + per], torch.full_like(logits[:, a + per : a + n * per], MASKED), logits[:, a + n * per :]],
            dim=1,
        )
        first = torch.argmax(masked, dim=1)
        book0 = torch.arange(a, a + per, device=hidden.device)
        # Counted in float: an int64 reduction is slow on TensorRT and gains nothing here.
        counts = (history.unsqueeze(2) == book0.view(1, 1, -1)).to(logits.dtype).sum(dim=1)  # [B, 1032]
        factor = torch.pow(torch.full_like(counts, self.penalty), counts)
        cb0 = logits[:, a : a + per]
        cb0 = torch.where(cb0 < 0, cb0 * factor, cb0 / factor)
        second = torch.argmax(torch.cat([logits[:, :a], cb0], dim=1), dim=1)
        is_audio = (first >= a) & (first < a + n * per)
        has_history = (history >= 0).any(dim=1)
        head0 = torch.where(is_audio & has_history, second, first)
        offsets = a + per * torch.arange(1, n, device=hidden.device)
        books = torch.argmax(self.book_logits(hidden, logits), dim=2) + offsets.view(1, -1)
        return torch.cat([head0.unsqueeze(1), books], dim=1)


class HeadsLogits(nn.Module):
    """ONNX wrapper: hidden -> logits."""

    def __init__(self, heads: Heads):
        super().__init__()
        self.heads = heads

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.heads.logits(hidden)


class HeadsGreedy(nn.Module):
    """ONNX wrapper: (hidden, history) -> the 8 greedy ids."""

    def __init__(self, heads: Heads):
        super().__init__()
        self.heads = heads

    def forward(self, hidden: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return self.heads.greedy(hidden, history)
