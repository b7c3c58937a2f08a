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
    past = backbone.empty_cache()
    out = backbone.step(prompt_embeds, *past)
    hidden, past = out[0], tuple(torch.cat([p, n], dim=0) for p, n in zip(past, out[1:]))
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
        out = backbone.step(step, *past)
        hidden = out[0]
        past = tuple(torch.cat([p, n], dim=0) for p, n in zip(past, out[1:]))
    return ReferenceResult(tokens, text_tokens, frames, stop)


@dataclass
class ReferenceTurn:
    wav_16k: np.ndarray | None = None
    text: str = ""
    user_speaker: bool = True


def reference_conversation(model: QinYuModel, turns: list[ReferenceTurn], mode: str = "conversation",
                           voice: np.ndarray | None = None, role_description: str | None = None,
                           max_new_tokens: int = 1024, max_context: int = 4096) -> list[ReferenceResult]:
    """Several turns on the PyTorch modules: the same prompts (built by the runtime's prompt
    builder from this loop's own replies), embeddings and decisions computed in torch."""
    from qinyu_edge.runtime.frontend import FrontendConfig, SenseVoiceFrontend
    from qinyu_edge.runtime.prompt import Mode, PromptBuilder, Turn, reply_text

    from .speaker_checkpoint import campplus_embedding

    mode = Mode(mode)
    frontend = SenseVoiceFrontend(FrontendConfig.from_sensevoice(model.config.sensevoice), model.cmvn_shift,
                                  model.cmvn_scale)
    builder = PromptBuilder(model.tokenizer, model.layout, max_context)
    agent = voice if voice is not None else model.speakers.get(model.config.default_speaker)
    history: list = []
    clips: list[tuple[np.ndarray, np.ndarray | None]] = []  # (features, speaker vector)
    results = []
    for turn in turns:
        if turn.wav_16k is not None:
            speaker = None
            if turn.user_speaker and mode in (Mode.CONVERSATION, Mode.ROLEPLAY):
                speaker = campplus_embedding(model.campplus, turn.wav_16k)
            clips.append((frontend(turn.wav_16k), speaker))
            user = Turn.speech(turn.text, user_speaker=speaker is not None)
        else:
            user = Turn.question(turn.text)
        rows = [f.shape[0] + (4 if model.config.keep_query_rows else 0) for f, _ in clips]
        prompt = builder.build(mode, history, user, rows, role_description=role_description,
                               reply_reserve=max_new_tokens)
        speakers = [agent if who is None else clips[who][1] for who in prompt.speaker_clips]
        emb = prompt_embeddings(model, prompt.ids, prompt.audio_slots, [clips[i][0] for i in prompt.clip_indices],
                                prompt.speaker_slots, speakers)
        result = reference_generate(model, emb, max_new_tokens)
        results.append(result)
        history += [user, Turn.reply(reply_text(model.tokenizer, result.text_tokens))]
    return results
