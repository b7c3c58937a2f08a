"""Streaming speech decode: de-delayed code frames in, 32 kHz audio chunks out while the reply is
still being generated (model-spec 4 "Streaming", 1.9).

The method is the official web demo's (`web_demo_stream.py`, `__run_infer_stream` + `decode_stream`):

- Frames are cut into chunks by a schedule; a chunk is decoded as soon as all its frames are
  complete. Upstream waits for `cached audio steps >= decoded + chunk + 7`; with frames counted
  after the delay is undone (`DelayUndo`) that is `completed frames >= decoded + chunk`, the same
  audio step.
- Each decode call runs the previous chunk's frames (left context) followed by the new chunk, with
  no look-ahead. Of the context's audio only its last `crossfade` samples are kept; they overlap the
  tail held back from the previous chunk and the two are crossfaded.
- The last `crossfade` samples of every chunk are held back for that crossfade, so chunk 0 emits
  `frames * 2560 - crossfade` samples and later chunks `frames * 2560`. At the end of the reply the
  remaining frames (possibly none) are decoded with their context and everything left is emitted:
  after `flush()` exactly `F * 2560` samples have come out, each once. As upstream, the end of
  the reply costs one decode call even when no frame is left: the held tail is crossfaded with
  the context's re-decoded last 0.2 s.

Deviations from upstream, all deliberate:

- Output is float32 at the decoder's own scale (nominally [-1, 1]) and is not clipped. Upstream
  multiplies by 32678 (a typo for 32768) and clamps to int16 inside the decode loop; scaling and
  clipping belong to playback / `audio_io.write_wav`.
- A reply shorter than the first chunk is decoded in one call and emitted whole. Upstream passes
  `past_wav=None` to its crossfade in that case and raises.
- Upstream's Hamming halves sum to about 1.08, not 1, across the overlap (0.54 + 0.54 - tiny), a
  +0.7 dB bump every chunk boundary. `crossfade_window="hamming"` keeps that for fidelity;
  `"complementary"` divides the same shape by the sum so the weights add to exactly 1.
- `left_context` may be set to a fixed number of frames instead of "the previous chunk", trading
  decode work for fewer boundary artefacts with small chunks.
- Frames are validated as codes 0..1023; upstream maps only ids > 1024 to 0 (see `runtime.delay`).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from qinyu_edge.config import CODES_PER_BOOK, N_CODEBOOKS

from .delay import audio_steps_for_frames

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = 2560  # 32 kHz, 12.5 Hz codes
CROSSFADE = 6400  # upstream `cache_wav_len`: 0.2 s
MAX_FRAMES_PER_CALL = 375  # the decoder's position table (model-spec 1.9)


class Decoder(Protocol):
    """What `runtime.session.open_session` returns for the `xy_decoder` component."""

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class ChunkSchedule:
    """Frames per chunk; the last size repeats for the rest of the reply."""

    name: str
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.sizes or any(int(s) != s or s < 1 for s in self.sizes):
            raise ValueError(f"chunk sizes must be positive integers; got {self.sizes!r}")

    def size(self, index: int) -> int:
        return self.sizes[min(index, len(self.sizes) - 1)]

    @classmethod
    def official(cls) -> ChunkSchedule:
        """Upstream's hard-coded sizes: #0 20, #1-2 16, #3-4 24, #5-6 36, then 48."""
        return cls("official", (20, 16, 16, 24, 24, 36, 36, 48))

    @classmethod
    def low_latency(cls) -> ChunkSchedule:
        """First audio after 8 frames instead of 20: 20 decode steps instead of 40.

        A chunk must be ready before the audio already emitted has played out, and chunk 0 emits only
        `frames * 80 ms - 200 ms` (the crossfade tail is held back). A tiny first chunk therefore
        starves playback unless generation runs far ahead of real time (field-notes C.10: a 1-frame
        first chunk starved where 20 frames did not); `4, 8, 12, ...` would need 5.3x real time.
        These sizes play every reply of up to 375 frames without a gap at >= 1.48x real time
        (`required_speedup`; upstream's need 1.19x), which the 4B int4 measurements in the field
        notes clear on Orin NX (1.56x) and AGX Orin (2.7x). They reach upstream's 48 by chunk 6.
        """
        return cls("low_latency", (8, 8, 12, 16, 24, 36, 48))

    @classmethod
    def fast_start(cls) -> ChunkSchedule:
        """First audio after 4 frames: 16 decode steps (`Interleave`), 120 ms of sound in chunk 0.

        Gapless only far above real time (`required_speedup`); on a slower device the loop delays the
        start of playback from the measured step rate (`playback_start_delay_s`) instead.
        """
        return cls("fast_start", (4, 8, 12, 16, 24, 36, 48))

    @classmethod
    def custom(cls, sizes: list[int] | tuple[int, ...], name: str = "custom") -> ChunkSchedule:
        return cls(name, tuple(int(s) for s in sizes))

    @classmethod
    def parse(cls, text: str) -> ChunkSchedule:
        """`official`, `low_latency`, `fast_start`, or comma-separated sizes such as `12,24,48`."""
        if text in ("official", "low_latency", "fast_start"):
            return getattr(cls, text)()
        try:
            return cls.custom([int(s) for s in text.split(",")], name=text)
        except ValueError:
            raise ValueError(f"schedule {text!r}: use official, low_latency, fast_start or comma-separated frame counts") from None


@dataclass(frozen=True)
class ChunkInfo:
    """One emitted audio chunk: what was decoded for it and when it could be decoded."""

    index: int
    first_frame: int  # first new frame of this chunk
    frames: int  # new frames decoded
    context_frames: int  # frames decoded again in front as left context
    samples: int  # samples emitted (32 kHz)
    ready_at_frames: int  # completed frames when it became decodable (the reply length for the final chunk)
    final: bool
    decode_ms: float

    @property
    def ready_at_audio_step(self) -> int:
        """Audio steps (1-based count) the model had produced when this chunk became decodable."""
        return audio_steps_for_frames(self.ready_at_frames)


def crossfade_weights(length: int, kind: Literal["hamming", "complementary"] = "hamming"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(fade_in, fade_out) weights for the overlap: the rising and falling halves of a Hamming
    window of 2 x length, as upstream; `complementary` rescales them to sum to 1 sample by sample."""
    window = np.hamming(2 * length)
    fade_in, fade_out = window[:length], window[length:]
    if kind == "complementary":
        total = fade_in + fade_out
        fade_in, fade_out = fade_in / total, fade_out / total
    elif kind != "hamming":
        raise ValueError(f"crossfade window {kind!r}: choose hamming or complementary")
    return fade_in, fade_out


class StreamingDecoder:
    """Push de-delayed frames one at a time; get audio chunks as soon as a chunk can be decoded.

    `history` holds a `ChunkInfo` per emitted chunk, in emission order, for the current reply.
    """

    def __init__(self, session: Decoder, schedule: ChunkSchedule | None = None,
                 samples_per_frame: int = SAMPLES_PER_FRAME, crossfade: int = CROSSFADE,
                 left_context: int | None = None, crossfade_window: Literal["hamming", "complementary"] = "hamming",
                 max_frames_per_call: int = MAX_FRAMES_PER_CALL, max_frames: int = 4096,
                 n_codebooks: int = N_CODEBOOKS, codes_per_book: int = CODES_PER_BOOK) -> None:
        self.session = session
        self.schedule = schedule or ChunkSchedule.official()
        self.samples_per_frame = samples_per_frame
        self.crossfade = crossfade
        self.left_context = left_context
        self.codes_per_book = codes_per_book
        self._check(max_frames_per_call)
        self._fade_in, self._fade_out = crossfade_weights(crossfade, crossfade_window)
        self._frames = np.zeros((1, n_codebooks, max_frames), dtype=np.int64)
        self.reset()

    def _check(self, max_frames_per_call: int) -> None:
        # Every chunk's audio must cover the held tail, and as the next call's context its audio must
        # cover the crossfade, so no chunk (but the final remainder) may be shorter than this.
        least = math.ceil(self.crossfade / self.samples_per_frame)
        sizes = self.schedule.sizes
        problems = []
        if min(sizes) < least:
            problems.append(f"every chunk needs >= {least} frames to cover the {self.crossfade}-sample crossfade")
        if self.left_context is not None and self.left_context < least:
            problems.append(f"left_context needs >= {least} frames")
        if self.left_context is None:
            pairs = [*itertools.pairwise(sizes), (sizes[-1], sizes[-1])]
            widest = max(a + b for a, b in pairs)
        else:
            widest = self.left_context + max(sizes)
        if widest > max_frames_per_call:
            problems.append(f"a call would decode {widest} frames (context + chunk); the decoder takes {max_frames_per_call}")
        if problems:
            raise ValueError(f"schedule {self.schedule.sizes}: " + "; ".join(problems))

    def reset(self) -> None:
        """Drop everything of the current reply (barge-in)."""
        self._restart()
        self.history: list[ChunkInfo] = []

    def _restart(self) -> None:
        self.n_frames = 0
        self._decoded = 0
        self._last_chunk = 0
        self._held: np.ndarray | None = None

    def push(self, frame: np.ndarray) -> list[np.ndarray]:
        """One completed frame ([n_codebooks] codes 0..1023) -> audio chunks now ready (often none)."""
        frame = np.asarray(frame)
        if (frame.shape != self._frames.shape[1:2] or not np.issubdtype(frame.dtype, np.integer)
                or frame.min() < 0 or frame.max() >= self.codes_per_book):
            raise ValueError(f"a frame is {self._frames.shape[1]} integer codes in 0..{self.codes_per_book - 1}; "
                             f"got {frame!r}")
        if self.n_frames == 0:
            self.history = []  # a new reply; the previous one's records stayed readable until now
        if self.n_frames == self._frames.shape[2]:
            self._frames = np.concatenate([self._frames, np.zeros_like(self._frames)], axis=2)
        self._frames[0, :, self.n_frames] = frame
        self.n_frames += 1
        out = []
        while self.n_frames - self._decoded >= self.schedule.size(len(self.history)):
            out.append(self._decode(self.schedule.size(len(self.history)), final=False))
        return out

    def flush(self) -> list[np.ndarray]:
        """End of the reply: decode what is left and emit all remaining audio. The decoder is then
        ready for the next reply; `history` keeps this reply's records until its first push."""
        out = []
        if self.n_frames > self._decoded or self._held is not None:
            out.append(self._decode(self.n_frames - self._decoded, final=True))
        self._restart()
        return out

    def _decode(self, new: int, final: bool) -> np.ndarray:
        spf, cf = self.samples_per_frame, self.crossfade
        if self._decoded == 0:
            context = 0
        elif self.left_context is None:
            context = self._last_chunk
        else:
            context = min(self.left_context, self._decoded)
        start = self._decoded - context
        codes = self._frames[:, :, start:self._decoded + new]
        t0 = time.perf_counter()
        wav = self.session.run({"codes": np.ascontiguousarray(codes)})["wav"]
        ms = (time.perf_counter() - t0) * 1e3
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        if wav.size != codes.shape[2] * spf:
            raise ValueError(f"the decoder returned {wav.size} samples for {codes.shape[2]} frames; "
                             f"expected {spf} per frame")
        if context:
            wav = wav[context * spf - cf:]  # the context's last crossfade samples overlap the held tail
        wav = wav.copy()
        if self._held is not None:
            wav[:cf] = (wav[:cf] * self._fade_in + self._held * self._fade_out).astype(np.float32)
        if final:
            self._held = None
        else:
            self._held = wav[-cf:].copy()
            wav = wav[:-cf]
        info = ChunkInfo(index=len(self.history), first_frame=self._decoded, frames=new, context_frames=context,
                         samples=int(wav.size), ready_at_frames=self.n_frames, final=final, decode_ms=ms)
        self.history.append(info)
        log.debug("chunk %d: %d+%d frames -> %d samples in %.1f ms", info.index, context, new, wav.size, ms)
        self._decoded += new
        self._last_chunk = new
        return wav


def stream_reply(session: Decoder, codes: np.ndarray, schedule: ChunkSchedule | None = None,
                 **decoder_options) -> tuple[np.ndarray, list[ChunkInfo]]:
    """Stream a whole reply's frames ([n_codebooks, F]) through a `StreamingDecoder`; the
    concatenated audio and the per-chunk records."""
    dec = StreamingDecoder(session, schedule, **decoder_options)
    chunks = []
    for f in range(codes.shape[1]):
        chunks += dec.push(codes[:, f])
    chunks += dec.flush()
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return audio, dec.history


def decode_whole(session: Decoder, codes: np.ndarray) -> np.ndarray:
    """The whole reply in one decoder call (F <= 375 frames): the reference streaming approximates."""
    if codes.shape[1] > MAX_FRAMES_PER_CALL:
        raise ValueError(f"{codes.shape[1]} frames do not fit one decoder call ({MAX_FRAMES_PER_CALL} max)")
    return np.asarray(session.run({"codes": np.ascontiguousarray(codes[None], dtype=np.int64)})["wav"]).reshape(-1)


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - test|^2); inf when identical."""
    if reference.shape != test.shape:
        raise ValueError(f"lengths differ: {reference.shape} vs {test.shape}")
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - test.astype(np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def schedule_snr(session: Decoder, codes: np.ndarray, schedule: ChunkSchedule, **decoder_options) -> float:
    """SNR (dB) of the streamed reply against decoding the whole reply at once ([n_codebooks, F], F <= 375)."""
    streamed, _ = stream_reply(session, codes, schedule, **decoder_options)
    return snr_db(decode_whole(session, codes), streamed)


def required_speedup(schedule: ChunkSchedule, frames: int, samples_per_frame: int = SAMPLES_PER_FRAME,
                     crossfade: int = CROSSFADE) -> float:
    """Smallest generation speed (audio frames per frame of playback time) that plays a reply of
    `frames` frames without a gap, if decoding took no time.

    Playback starts when chunk 0 is emitted; chunk i is ready when its last frame completes (frames
    arrive at a constant rate, the 7 delay steps shift every chunk alike), and must be ready before
    the audio emitted so far has played out.
    """
    ready, emitted = _chunk_plan(schedule, frames, samples_per_frame, crossfade)
    need = 0.0
    for i in range(1, len(ready)):
        played = emitted[i - 1] / samples_per_frame  # in frames of audio
        need = max(need, (ready[i] - ready[0]) / played)
    return need


def _chunk_plan(schedule: ChunkSchedule, frames: int, samples_per_frame: int, crossfade: int) -> tuple[list[int], list[int]]:
    """For each chunk of a `frames`-frame reply: completed frames when it is ready, samples emitted by then."""
    ready, emitted = [], []
    done, index = 0, 0
    while frames - done >= schedule.size(index):
        done += schedule.size(index)
        ready.append(done)
        emitted.append(done * samples_per_frame - crossfade)
        index += 1
    if done < frames or not ready:
        ready.append(frames)
        emitted.append(frames * samples_per_frame)
    return ready, emitted


def playback_start_delay_s(schedule: ChunkSchedule, frames: int, speed: float,
                           samples_per_frame: int = SAMPLES_PER_FRAME, crossfade: int = CROSSFADE) -> float:
    """How long after chunk 0 is ready playback must start so that a reply of up to `frames` frames,
    generated at `speed` x real time, never runs dry: chunk i, ready (ready[i] - ready[0]) / speed
    frame-times after chunk 0, must come before the audio emitted up to chunk i-1 has played."""
    if speed <= 0:
        raise ValueError(f"generation speed must be > 0, got {speed}")
    ready, emitted = _chunk_plan(schedule, frames, samples_per_frame, crossfade)
    frame_s = samples_per_frame / 32000
    late = max((ready[i] - ready[0]) / speed * frame_s - emitted[i - 1] / 32000 for i in range(1, len(ready))) if len(ready) > 1 else 0.0
    return max(0.0, late)


@dataclass(frozen=True)
class Interleave:
    """The reply's text/audio step pattern as trained (model-spec 1.8): `first_text` text steps,
    `audio` audio steps, then `text` text and `audio` audio steps repeated."""

    first_text: int = 1
    text: int = 4
    audio: int = 8

    def steps_until_audio_step(self, n: int, text_tokens: int | None = None) -> int:
        """Decode steps (text and audio) up to and including the n-th audio step. `text_tokens`
        caps the reply's text; once it is used up the steps are all audio."""
        steps = produced = 0
        text_left = math.inf if text_tokens is None else text_tokens
        block_text = self.first_text
        while produced < n:
            t = min(block_text, text_left)
            steps += t
            text_left -= t
            a = min(self.audio, n - produced)
            steps += a
            produced += a
            block_text = self.text
        return int(steps)

    def steps_until_frames(self, frames: int, text_tokens: int | None = None) -> int:
        """Decode steps until `frames` de-delayed frames are complete."""
        return self.steps_until_audio_step(audio_steps_for_frames(frames), text_tokens)
