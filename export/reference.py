"""The reference generation loop in PyTorch, written from the spec (model-spec sections 1.5-1.8, 4).

It decides exactly as the official `generate` does, on our PyTorch modules, so the torch-free
runtime loop over the ONNX bundle can be checked against it token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .qinyu_checkpoint import QinYuModel

WINDOW = 5


@dataclass
class ReferenceResult:
    tokens: list[int]
    text_tokens: list[int]
    audio_rows: list[list[int]]
    stop: str


@torch.no_grad()
def prompt_embeddings(model: QinYuModel, ids: np.ndarray, audio_slots: list[tuple[int, int]],
                      features: list[np.ndarray], speaker_slots: list[int], speakers: list[np.ndarray]) -> torch.Tensor:
    """Embed the prompt, then overwrite the audio placeholders with the projected encoder output of
    each clip and the speaker positions with the projected speaker vectors, in sequence order."""
    emb = model.embedding(torch.as_tensor(ids, dtype=torch.long).view(1, -1, 1)).clone()
    for (start, rows), feats in zip(audio_slots, features):
        enc = model.encoder(torch.as_tensor(feats, dtype=torch.float32).unsqueeze(0))
        proj = model.audio_projector(enc)[0]
        if proj.shape[0] != rows:
            raise ValueError(f"clip gives {proj.shape[0]} rows but the prompt has {rows} placeholders")
        emb[0, start : start + rows] = proj
    if speakers:
        vecs = model.speaker_projector(torch.as_tensor(np.stack(speakers), dtype=torch.float32))
        for pos, v in zip(speaker_slots, vecs):
            emb[0, pos] = v
    return emb


@torch.no_grad()
def reference_generate(model: QinYuModel, prompt_embeds: torch.Tensor, max_new_tokens: int = 1024) -> ReferenceResult:
    lay = model.layout
    backbone, heads = model.backbone, model.heads
    n_cache = 1 if model.config.backbone.is_mla else 2
    past = tuple(torch.zeros(backbone.cache_shape(0)) for _ in range(n_cache))
    out = backbone(prompt_embeds, *past)
    hidden, past = out[0], tuple(out[1:])
    tokens: list[int] = []
    text_tokens: list[int] = []
    frames: list[list[int]] = []
    history: list[int] = []
    stop = "max_new_tokens"
    for _ in range(max_new_tokens):
        hist = torch.full((1, WINDOW), -1, dtype=torch.long)
        recent = history[-WINDOW:]
        if recent:
            hist[0, : len(recent)] = torch.tensor(recent)
        ids = heads.greedy(hidden, hist)[0]
        token = int(ids[0])
        tokens.append(token)
        if token == lay.im_end:
            stop = "im_end"
            break
        if lay.audio_start <= token < lay.audio_end:
            step = model.embedding(ids.view(1, 1, -1))
            frames.append([int(ids[k]) - lay.book_start(k) for k in range(lay.n_codebooks)])
            history.append(token)
        else:
            step = model.embedding(ids[:1].view(1, 1, 1))
            text_tokens.append(token)
        out = backbone(step, *past)
        hidden = out[0]
        past = tuple(torch.cat([p, n], dim=0) for p, n in zip(past, out[1:]))
    return ReferenceResult(tokens, text_tokens, frames, stop)
