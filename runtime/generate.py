"""The hybrid text/audio decoding loop over a bundle's sessions, with no torch.

Per step: the heads choose text or audio (one id, or 8 codebook ids); the next input embedding is
that text row or the mean of the 8 codebook rows; the backbone runs one position with the cache
past bound as a view and the new position bound to its slot. The model picks the modality itself.
With a fused decode graph (engines/decode_graphs.py) the backbone and the greedy heads are one
call: the position's forward returns the next choice, so a greedy step is a host-side embedding
gather and one session call.
Stops at `<|im_end|>`, at the step cap, or when cancelled (checked between any two steps).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from qinyu_edge.config import PREFILL_CHUNK
from qinyu_edge.tokens import TokenLayout

from .host_embedding import HostEmbedding
from .kv_cache import KVCache
from .sampling import SamplingConfig, sample_step
from .session import Session

log = logging.getLogger(__name__)

PENALTY_WINDOW = 5  # the official penalty looks at codebook-0 ids of the last 5 audio frames


@dataclass
class StepTimes:
    prefill_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    # Time inside the generator's sessions, and inside the caller's callbacks (streaming decode runs
    # there), per step; the rest of a step is the loop's own host overhead.
    session_ms: list[float] = field(default_factory=list)
    callback_ms: list[float] = field(default_factory=list)

    def host_ms(self) -> list[float]:
        return [t - s - c for t, s, c in zip(self.step_ms, self.session_ms, self.callback_ms)]


@dataclass(frozen=True)
class PrefillStats:
    positions: int  # the prompt's length
    reused: int  # leading positions kept from the cache (the rest ran)
    ms: float

    @property
    def ran(self) -> int:
        return self.positions - self.reused


@dataclass
class GenerationResult:
    tokens: list[int]  # the head-0 choice of every step (text, special or codebook-0 id)
    text_tokens: list[int]
    audio_rows: list[np.ndarray]  # per audio step: 8 within-book ids (still delayed)
    stop: str  # "im_end", "max_new_tokens", "cancelled", "context_full"
    times: StepTimes
    prompt_length: int

    @property
    def steps(self) -> int:
        return len(self.tokens)


TextCallback = Callable[[int], None]
AudioCallback = Callable[[np.ndarray], None]


class Generator:
    """Owns the KV cache and the per-step buffers; one reply at a time (batch 1)."""

    def __init__(self, embedding: Session, backbone: Session | None, heads_greedy: Session | None,
                 open_heads_logits: Callable[[], Session] | None, layout: TokenLayout, hidden_size: int,
                 cache: KVCache, penalty: float = 1.1, prefill_chunk: int = PREFILL_CHUNK,
                 fused: Session | None = None):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 position, got {prefill_chunk}")
        if fused is None and (backbone is None or heads_greedy is None):
            raise ValueError("give the fused decode session, or the backbone and heads_greedy sessions")
        self.embedding, self.backbone, self.greedy = embedding, backbone, heads_greedy
        # backbone + heads_greedy in one graph; its `ids` output is the next greedy choice.
        self.fused = fused
        self._chosen = False  # the last forward ran `fused`, so _choice holds the next choice
        self.prefill_chunk = prefill_chunk
        # The logits head only serves sampling: it is opened the first time a sampled reply starts.
        self._open_logits = open_heads_logits
        self.logits: Session | None = None
        self.layout = layout
        self.cache = cache
        self.penalty = penalty
        self.hidden = np.zeros((1, hidden_size), np.float32)
        self._ids = np.zeros((1, 1, layout.n_codebooks), np.int64)
        self._text_id = np.zeros((1, 1, 1), np.int64)
        self._embeds = np.zeros((1, 1, hidden_size), np.float32)
        self._choice = np.zeros((1, layout.n_codebooks), np.int64)
        self._history = np.full((1, PENALTY_WINDOW), -1, np.int64)
        self._history_ids: tuple[int, ...] = ()  # what `_history` holds
        self._book_starts = np.array([layout.book_start(k) for k in range(layout.n_codebooks)], np.int64)
        # The prompt rows at cache positions [0, len): what a reusing prefill compares against.
        self._rows = np.zeros((0, hidden_size), np.float32)
        self.last_prefill = PrefillStats(0, 0, 0.0)
        # One user of the cache at a time: a reply, or the idle-time prefill of the next prompt's start.
        self.lock = threading.Lock()

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """ids [1, S, K] -> [1, S, H]."""
        return self.embedding.run({"ids": ids})["inputs_embeds"]

    def _set_history(self, history: deque | None) -> None:
        ids = tuple(history or ())
        if ids == self._history_ids:  # text steps leave it as it was: no numpy work
            return
        self._history_ids = ids
        self._history.fill(-1)
        self._history[0, : len(ids)] = ids

    def _forward(self, embeds: np.ndarray, history: deque | None = None) -> None:
        """Run positions through the backbone, at most `prefill_chunk` per call, each chunk over the
        cache the ones before it wrote; `hidden` ends as the last position's. Through the fused
        graph, `_choice` ends as the greedy choice after it, made with `history`."""
        if self.fused is not None:
            self._set_history(history)
        step = self.prefill_chunk
        # A decode step passes its own buffer whole: the same array every step stays bound.
        chunks = (embeds,) if embeds.shape[1] <= step else (embeds[:, s:s + step] for s in range(0, embeds.shape[1], step))
        for chunk in chunks:
            n = chunk.shape[1]
            into = {**self.cache.slot(n), "hidden": self.hidden}
            if self.fused is not None:
                self.fused.run({"inputs_embeds": chunk, **self.cache.past(), "history": self._history},
                               into={**into, "ids": self._choice})
            else:
                self.backbone.run({"inputs_embeds": chunk, **self.cache.past()}, into=into)
            self.cache.advance(n)
        self._chosen = self.fused is not None

    def prefill(self, embeds: np.ndarray, reuse: bool = False) -> float:
        """Run the prompt [1, S, H] into the cache; returns milliseconds. With `reuse`, the leading rows
        already in the cache (the previous prefill's, compared exactly) are kept and only the rest run;
        at least the last row always runs, its hidden state starts decoding. `last_prefill` says how
        many positions ran and how many were kept."""
        with self.lock:
            return self._prefill(embeds, reuse)

    def _prefill(self, embeds: np.ndarray, reuse: bool) -> float:
        t0 = time.perf_counter()
        embeds = np.ascontiguousarray(embeds, np.float32)
        keep = self._shared_rows(embeds[0]) if reuse else 0
        self.cache.rewind(keep) if keep else self.cache.reset()
        self._forward(embeds[:, keep:])
        self._rows = embeds[0].copy()
        ms = (time.perf_counter() - t0) * 1e3
        self.last_prefill = PrefillStats(embeds.shape[1], keep, ms)
        return ms

    def _shared_rows(self, rows: np.ndarray) -> int:
        cached = self._rows
        n = min(cached.shape[0], rows.shape[0] - 1, self.cache.pos)
        same = np.all(cached[:n] == rows[:n], axis=1)
        keep = n if same.all() else int(np.argmin(same))
        # Diverging where the new user turn starts is the normal case. Earlier means more re-prefill:
        # the window dropped old turns (the prompt changes right after the system prompt), or a
        # barge-in kept only part of the reply the idle-time prefill assumed.
        log.debug("KV reuse: %d of %d prompt positions kept from the cache, %d to run (the cached prompt of %d "
                  "positions diverges there)", keep, rows.shape[0], rows.shape[0] - keep, cached.shape[0])
        return keep

    def _choose(self, history: deque, sampling: SamplingConfig | None, rng: np.random.Generator | None) -> np.ndarray:
        if sampling is None:
            if self._chosen:
                return self._choice[0]
            assert self.greedy is not None  # without the fused graph the generator has heads_greedy
            self._set_history(history)
            return self.greedy.run({"hidden": self.hidden, "history": self._history}, into={"ids": self._choice})["ids"][0]
        assert self.logits is not None  # opened by generate()
        logits = self.logits.run({"hidden": self.hidden})["logits"][0]
        return sample_step(logits, list(history), self.layout, self.penalty, sampling, rng)

    def generate(self, prompt_embeds: np.ndarray | None, max_new_tokens: int = 1024,
                 on_text: TextCallback | None = None, on_audio: AudioCallback | None = None,
                 cancel: threading.Event | None = None, sampling: SamplingConfig | None = None,
                 reuse: bool = False) -> GenerationResult:
        """Prefill `prompt_embeds` [1, S, H] (keeping the cached prefix it shares, with `reuse`) and
        decode; `None` decodes on from the cache and the last hidden state as they stand (e.g. to time
        steps at a chosen past length)."""
        with self.lock:
            return self._generate(prompt_embeds, max_new_tokens, on_text, on_audio, cancel, sampling, reuse)

    def _generate(self, prompt_embeds, max_new_tokens, on_text, on_audio, cancel, sampling, reuse) -> GenerationResult:
        lay = self.layout
        prompt_length = self.cache.pos if prompt_embeds is None else prompt_embeds.shape[1]
        times = StepTimes(prefill_ms=0.0 if prompt_embeds is None else self._prefill(prompt_embeds, reuse))
        rng = np.random.default_rng(sampling.seed) if sampling else None
        history: deque[int] = deque(maxlen=PENALTY_WINDOW)
        tokens: list[int] = []
        text_tokens: list[int] = []
        audio_rows: list[np.ndarray] = []
        stop = "max_new_tokens"
        if sampling is not None and self.logits is None:
            if self._open_logits is None:
                raise ValueError("sampling needs the heads_logits session, and this bundle has none")
            self.logits = self._open_logits()
        # Time in inference sessions; the host gather of a HostEmbedding is the loop's own work.
        sessions = tuple(s for s in (self.embedding, self.backbone, self.greedy, self.fused, self.logits)
                         if s is not None and not isinstance(s, HostEmbedding))
        for _ in range(max_new_tokens):
            if cancel is not None and cancel.is_set():
                stop = "cancelled"
                break
            t0 = time.perf_counter()
            busy0 = sum(s.stats.busy_ms for s in sessions)
            callback = 0.0
            ids = self._choose(history, sampling, rng)
            token = int(ids[0])
            tokens.append(token)
            if token == lay.im_end:
                stop = "im_end"
                times.step_ms.append((time.perf_counter() - t0) * 1e3)
                times.session_ms.append(sum(s.stats.busy_ms for s in sessions) - busy0)
                times.callback_ms.append(callback)
                break
            if lay.is_audio(token):
                self._ids[0, 0, :] = ids
                step_ids = self._ids
                row = ids - self._book_starts
                audio_rows.append(row)
                history.append(token)
                if on_audio is not None:
                    c0 = time.perf_counter()
                    on_audio(row)
                    callback = (time.perf_counter() - c0) * 1e3
            else:
                self._text_id[0, 0, 0] = token
                step_ids = self._text_id
                text_tokens.append(token)
                if on_text is not None:
                    c0 = time.perf_counter()
                    on_text(token)
                    callback = (time.perf_counter() - c0) * 1e3
            if self.cache.free() == 0:
                # The reply so far is kept; the prompt policy leaves room, so this is a long reply.
                stop = "context_full"
                times.step_ms.append((time.perf_counter() - t0) * 1e3)
                times.session_ms.append(sum(s.stats.busy_ms for s in sessions) - busy0)
                times.callback_ms.append(callback)
                break
            self.embedding.run({"ids": step_ids}, into={"inputs_embeds": self._embeds})
            self._forward(self._embeds, history)
            times.step_ms.append((time.perf_counter() - t0) * 1e3)
            times.session_ms.append(sum(s.stats.busy_ms for s in sessions) - busy0)
            times.callback_ms.append(callback)
        return GenerationResult(tokens, text_tokens, audio_rows, stop, times, prompt_length=prompt_length)
