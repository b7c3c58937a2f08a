"""A conversation on one engine: user turns in (speech or text), text and streamed speech out.

Keeps what the next prompt needs: the turns (assistant replies as text only, as upstream), each
clip's projected encoder output (exact to cache: the encoder sees only its own clip) and its CAM++
vector. The official code re-prefills the whole prompt every turn; with `reuse_cache` only what
differs from the cached prompt runs (greedy tokens equal), and `prefill_ahead` puts the next
prompt's known start (the reply as text) into the cache while the reply is still playing.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .engine import Engine
from .generate import GenerationResult
from .delay import DelayUndo
from .prompt import Mode, Prompt, PromptBuilder, Turn, reply_text
from .sampling import SamplingConfig
from .streaming import ChunkSchedule, StreamingDecoder

log = logging.getLogger(__name__)

SAMPLE_RATE_OUT = 32000


@dataclass
class Clip:
    embeds: np.ndarray  # [rows, H] projected encoder output
    speaker: np.ndarray | None  # CAM++ vector, when the turn carries <|user_speaker|>
    seconds: float


@dataclass
class Timings:
    """Milliseconds from the start of `ask` (the end of user speech, for a live turn)."""

    frontend_ms: float = 0.0
    encoder_ms: float = 0.0
    speaker_ms: float = 0.0
    prompt_ms: float = 0.0
    prefill_ms: float = 0.0
    prefill_positions: int = 0  # the prompt's length
    reused_positions: int = 0  # of them, kept from the cache (not run)
    steps: int = 0
    ms_per_step: float = 0.0
    host_ms_per_step: float = 0.0  # step time outside the sessions and the streaming decode
    steps_to_first_audio: int | None = None  # decode steps until the first audio chunk was ready
    first_audio_ms: float | None = None  # time to first audio, from the start of the turn
    total_ms: float = 0.0
    audio_seconds: float = 0.0
    # Real-time factor: wall time of the turn over the seconds of speech it produced (< 1 is
    # faster than real time).
    rtf: float | None = None


@dataclass
class Reply:
    text: str
    tokens: list[int]
    text_tokens: list[int]
    # For each text token, how many audio frames were complete when it was chosen: its speech follows.
    text_frames: list[int]
    frames: np.ndarray  # [F, 8] codes, de-delayed
    audio: np.ndarray  # 32 kHz float32, all chunks joined
    chunks: list[np.ndarray]
    stop: str
    prompt: Prompt
    user: Turn
    clips: list[Clip]  # the conversation's clips including this turn's, for commit_turn
    timings: Timings = field(default_factory=Timings)


ChunkCallback = Callable[[np.ndarray], None]
TextCallback = Callable[[str], None]


class Conversation:
    def __init__(self, engine: Engine, mode: Mode | str = Mode.CONVERSATION, voice: str | np.ndarray | None = None,
                 role_description: str | None = None, num_history: int | None = None,
                 reply_reserve: int | None = None, max_new_tokens: int | None = None,
                 sampling: SamplingConfig | None = None, schedule: ChunkSchedule | None = None,
                 reuse_cache: bool = True):
        self.engine = engine
        self.mode = Mode(mode)
        cfg = engine.config
        self.max_new_tokens = max_new_tokens or cfg.max_new_tokens
        self.reply_reserve = self.max_new_tokens if reply_reserve is None else reply_reserve
        self.builder = PromptBuilder(engine.tokenizer, engine.layout, engine.cache.capacity)
        self.role_description = role_description
        self.num_history = num_history
        self.sampling = sampling
        self.schedule = schedule or ChunkSchedule.official()
        self.reuse_cache = reuse_cache
        uses_voice = self.mode in (Mode.CONVERSATION, Mode.ROLEPLAY)
        self.agent = engine.voice(voice if voice is not None else cfg.default_speaker) if uses_voice else None
        self.history: list[Turn] = []
        self.clips: list[Clip] = []

    def reset(self) -> None:
        self.history.clear()
        self.clips.clear()

    def _speakers(self, prompt: Prompt, clips: list[Clip]) -> list[np.ndarray]:
        out = []
        for who in prompt.speaker_clips:
            vec = self.agent if who is None else clips[who].speaker
            if vec is None:
                raise ValueError("a speaker position has no vector (agent voice or the clip's CAM++ vector)")
            out.append(vec)
        return out

    def ask(self, wav_16k: np.ndarray | None = None, text: str = "", user_speaker: bool = True,
            on_text: TextCallback | None = None, on_chunk: ChunkCallback | None = None,
            cancel: threading.Event | None = None, commit: bool = True) -> Reply:
        """One user turn -> the reply. With `commit` the turn and the reply text join the history;
        a barge-in caller passes commit=False and calls `commit_turn` with what was actually played."""
        eng = self.engine
        t0 = time.perf_counter()
        ms = lambda: (time.perf_counter() - t0) * 1e3  # noqa: E731
        timings = Timings()
        clips = list(self.clips)
        rows = [c.embeds.shape[0] for c in clips]
        if wav_16k is not None:
            feats = eng.features(wav_16k)
            timings.frontend_ms = ms()
            rows.append(eng.audio_rows(feats))
            with_speaker = user_speaker and self.mode in (Mode.CONVERSATION, Mode.ROLEPLAY)
            user = Turn.speech(text, user_speaker=with_speaker)
        else:
            user = Turn.question(text)
        # The prompt is laid out from the row counts before the encoder runs, so audio too long for
        # the context is refused before its encoder activations are allocated (GBs for minutes).
        t1 = ms()
        prompt = self.builder.build(self.mode, self.history, user, rows, role_description=self.role_description,
                                    reply_reserve=self.reply_reserve, num_history=self.num_history)
        build_ms = ms() - t1
        if wav_16k is not None:
            t1 = ms()
            embeds = eng.encode_audio(feats)
            timings.encoder_ms = ms() - t1
            speaker = None
            if with_speaker:
                t1 = ms()
                speaker = eng.speaker_vector(wav_16k)
                timings.speaker_ms = ms() - t1
            clips.append(Clip(embeds, speaker, len(wav_16k) / 16000))
        t1 = ms()
        emb = eng.prompt_embeds(prompt.ids, prompt.audio_slots, [clips[i].embeds for i in prompt.clip_indices],
                                prompt.speaker_slots, self._speakers(prompt, clips))
        timings.prompt_ms = build_ms + ms() - t1

        delay = DelayUndo()
        streamer = StreamingDecoder(eng.sessions["xy_decoder"], self.schedule)
        frames: list[np.ndarray] = []
        chunks: list[np.ndarray] = []
        step = [0]

        def emit(new: list[np.ndarray]) -> None:
            for chunk in new:
                if timings.first_audio_ms is None:
                    timings.first_audio_ms = ms()
                    timings.steps_to_first_audio = step[0]
                chunks.append(chunk)
                if on_chunk is not None:
                    on_chunk(chunk)

        def on_audio(row: np.ndarray) -> None:
            step[0] += 1
            frame = delay.push(row)
            if frame is not None:
                frames.append(frame)
                emit(streamer.push(frame))

        text_frames: list[int] = []

        def on_token(token: int) -> None:
            step[0] += 1
            text_frames.append(len(frames))
            if on_text is not None:
                on_text(eng.tokenizer.decode([token], skip_special_tokens=True))

        result: GenerationResult = eng.generator.generate(
            emb, self.max_new_tokens, on_text=on_token, on_audio=on_audio, cancel=cancel, sampling=self.sampling,
            reuse=self.reuse_cache)
        timings.prefill_positions = eng.generator.last_prefill.positions
        timings.reused_positions = eng.generator.last_prefill.reused
        if result.stop != "cancelled":
            emit(streamer.flush())
        reply_str = reply_text(eng.tokenizer, result.text_tokens)
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        times = result.times
        timings.prefill_ms = times.prefill_ms
        timings.steps = result.steps
        if times.step_ms:
            timings.ms_per_step = float(np.mean(times.step_ms))
            timings.host_ms_per_step = float(np.mean(times.host_ms()))
        timings.total_ms = ms()
        timings.audio_seconds = len(audio) / SAMPLE_RATE_OUT
        if timings.audio_seconds > 0:
            timings.rtf = timings.total_ms / 1e3 / timings.audio_seconds
        reply = Reply(reply_str, result.tokens, result.text_tokens, text_frames,
                      np.stack(frames) if frames else np.zeros((0, eng.layout.n_codebooks), np.int64),
                      audio, chunks, result.stop, prompt, user, clips, timings)
        if commit:
            self.commit_turn(reply)
        return reply

    def spoken_text(self, reply: Reply, played_seconds: float) -> str:
        """The reply text whose speech had started within the first `played_seconds` of playback."""
        played_frames = played_seconds * SAMPLE_RATE_OUT / self.engine.config.xy.samples_per_frame
        kept = [t for t, f in zip(reply.text_tokens, reply.text_frames) if f <= played_frames]
        return reply_text(self.engine.tokenizer, kept)

    def prefill_ahead(self, reply: Reply) -> None:
        """Idle time: prefill the start of the next prompt, as it will be if `reply` is committed whole
        (its text-only form, then the next user turn's opening), so the next turn runs only its new
        user audio. If the history turns out otherwise (a barge-in keeps part of the reply, the window
        drops a turn), the next prefill keeps only the prefix that still matches."""
        if reply.clips is self.clips:
            raise ValueError("prefill_ahead takes a reply that is not committed yet: ask(..., commit=False), "
                             "prefill_ahead(reply), then commit_turn(reply)")
        if not self.reuse_cache:
            return
        eng = self.engine
        history = [*self.history, reply.user, Turn.reply(reply.text)]
        # Any next user turn will do: the prompt is only kept up to where that turn's content starts.
        prompt = self.builder.build(self.mode, history, Turn.question("."), [c.embeds.shape[0] for c in reply.clips],
                                    role_description=self.role_description, reply_reserve=self.reply_reserve,
                                    num_history=self.num_history)
        emb = eng.prompt_embeds(prompt.ids, prompt.audio_slots, [reply.clips[i].embeds for i in prompt.clip_indices],
                                prompt.speaker_slots, self._speakers(prompt, reply.clips))
        eng.generator.prefill(emb, reuse=True)

    def commit_turn(self, reply: Reply, spoken_text: str | None = None) -> None:
        """Add the user turn and the reply (or only the part that was played) to the history."""
        self.clips = reply.clips
        self.history += [reply.user, Turn.reply(reply.text if spoken_text is None else spoken_text)]
        # Forget the turns (and their clips' embeddings) no later prompt can use, so a long
        # conversation holds bounded memory.
        forget = self.builder.forgettable_turns(self.history, [c.embeds.shape[0] for c in self.clips], self.num_history)
        if forget:
            self.clips = self.clips[sum(t.audio for t in self.history[:forget]):]
            self.history = self.history[forget:]
