"""Streaming speech decode: the upstream method step for step, exact sample accounting, crossfade
placement, latency arithmetic, and quality against a whole-reply decode."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from qinyu_edge.export.onnx_io import export_onnx
from qinyu_edge.runtime.delay import DelayUndo
from test_delay import delayed_reply  # the same well-formed delayed reply the delay tests use
from qinyu_edge.runtime.session import open_session
from qinyu_edge.runtime.streaming import (
    ChunkSchedule,
    Interleave,
    StreamingDecoder,
    crossfade_weights,
    decode_whole,
    playback_start_delay_s,
    required_speedup,
    schedule_snr,
    snr_db,
    stream_reply,
)
from torch import nn
from torch.nn import functional as F

SPF = 2560
CF = 6400
AXES = {"codes": {2: "frames"}, "wav": {1: "samples"}}


@pytest.fixture(scope="module")
def tiny_xy(tmp_path_factory):
    """The tiny preset's XY decoder as ONNX (the component a bundle ships as `xy_decoder`)."""
    from qinyu_edge.export.qinyu_checkpoint import load_preset

    path = tmp_path_factory.mktemp("xy") / "xy_decoder.onnx"
    export_onnx(load_preset("tiny-4b").xy, (torch.randint(0, 1024, (1, 8, 12)),), path, ["codes"], ["wav"], AXES)
    return open_session(path)


class LocalDecoder(nn.Module):
    """A decoder whose frame t depends only on the codes of frames t-back .. t+ahead (zero-padded at
    the ends of each call), so what chunked decoding must reproduce is known exactly."""

    def __init__(self, back: int, ahead: int, width: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(back * 10 + ahead)
        self.back, self.ahead = back, ahead
        self.table = nn.Parameter(torch.randn(8 * 1024, width, generator=g))
        self.conv = nn.Conv1d(width, width, back + ahead + 1)
        self.out = nn.Linear(width, SPF)
        self.register_buffer("offsets", (torch.arange(8) * 1024).view(1, 8, 1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = F.embedding(codes + self.offsets, self.table).sum(1).transpose(1, 2)
        h = torch.tanh(self.conv(F.pad(x, (self.back, self.ahead))))
        return 0.3 * torch.tanh(self.out(h.transpose(1, 2))).reshape(codes.shape[0], -1)


def local_decoder(tmp_path, back: int, ahead: int):
    torch.manual_seed(0)
    path = tmp_path / f"local_{back}_{ahead}.onnx"
    export_onnx(LocalDecoder(back, ahead), (torch.randint(0, 1024, (1, 8, 10)),), path, ["codes"], ["wav"], AXES)
    return open_session(path)


def codes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1024, (8, n))


# --- the upstream method, written from web_demo_stream.py, on delayed audio steps -------------

def upstream_sizes(index: int) -> int:
    return 20 if index < 1 else 16 if index < 3 else 24 if index < 5 else 36 if index < 7 else 48


def upstream_stream(session, steps: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(audio steps cached when decoded, emitted audio) per chunk, as upstream produces them from its
    cache of delayed steps, before the int16 scaling. Assumes the reply outlasts the first chunk."""
    window = np.hamming(2 * CF)
    cache: list[np.ndarray] = []
    state = {"decoded": 0, "past": None, "tail": None}
    out = []

    def decode(size: int, last: bool) -> np.ndarray:
        d = state["decoded"]
        n = min(size, len(cache) - d - 7)
        new = np.array([[cache[d + j + k][k] for j in range(n)] for k in range(8)], dtype=np.int64).reshape(8, n)
        new[new > 1024] = 0
        past = state["past"]
        inp = new if past is None else np.concatenate([past, new], axis=1)
        wav = session.run({"codes": inp[None]})["wav"][0].copy()
        if past is not None:
            wav = wav[past.shape[1] * SPF - CF:]
        state["past"] = new
        if state["tail"] is not None:
            wav[:CF] = wav[:CF] * window[:CF] + state["tail"] * window[CF:]
        if not last:
            state["tail"] = wav[-CF:].copy()
            wav = wav[:-CF]
        return wav

    for row in steps:
        cache.append(row)
        size = upstream_sizes(len(out))
        if len(cache) >= state["decoded"] + size + 7:
            out.append((len(cache), decode(size, last=False)))
            state["decoded"] += size
    out.append((len(cache), decode(upstream_sizes(len(out)), last=True)))
    return out


@pytest.mark.parametrize("n_frames", [150, 136, 21])  # a remainder; none left (136 = 20+16+16+24+24+36); 1 frame
def test_matches_upstream_chunk_for_chunk(tiny_xy, n_frames):
    """Fed through DelayUndo, the decoder emits the same audio as upstream, chunk for chunk, at the
    same audio step: counting completed frames is upstream's `cached >= decoded + chunk + 7`."""
    steps = delayed_reply(codes(n_frames, seed=n_frames))
    expected = upstream_stream(tiny_xy, steps)
    undo, dec = DelayUndo(), StreamingDecoder(tiny_xy, ChunkSchedule.official())
    got = []
    for i, row in enumerate(steps, start=1):
        frame = undo.push(row)
        if frame is not None:
            got += [(i, a) for a in dec.push(frame)]
    got += [(len(steps), a) for a in dec.flush()]
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


# --- sample accounting ---------------------------------------------------------------------

@pytest.mark.parametrize("n_frames", [0, 1, 2, 19, 20, 21, 36, 37, 150])
@pytest.mark.parametrize("schedule", [ChunkSchedule.official(), ChunkSchedule.low_latency(), ChunkSchedule.custom([3])])
def test_every_sample_emitted_once(tiny_xy, n_frames, schedule):
    audio, history = stream_reply(tiny_xy, codes(n_frames), schedule)
    assert audio.size == n_frames * SPF
    assert sum(c.samples for c in history) == audio.size
    assert sum(c.frames for c in history) == n_frames
    assert sum(c.final for c in history) == (1 if n_frames else 0)


def test_chunk_records_follow_the_official_schedule(tiny_xy):
    _, history = stream_reply(tiny_xy, codes(200), ChunkSchedule.official())
    sizes = [20, 16, 16, 24, 24, 36, 36, 28]  # 172 frames in full chunks, then the 28-frame remainder
    assert [c.frames for c in history] == sizes
    assert [c.context_frames for c in history] == [0] + sizes[:-1]
    assert [c.first_frame for c in history] == list(np.cumsum([0] + sizes[:-1]))
    assert [c.ready_at_frames for c in history] == list(np.cumsum(sizes[:-1])) + [200]
    assert history[0].samples == 20 * SPF - CF
    assert [c.samples for c in history[1:-1]] == [s * SPF for s in sizes[1:-1]]
    assert history[-1].samples == 28 * SPF + CF
    assert history[0].ready_at_audio_step == 27


def test_one_call_covering_the_reply_equals_whole_decode(tiny_xy):
    c = codes(150)
    audio, history = stream_reply(tiny_xy, c, ChunkSchedule.custom([200, 100]))
    assert len(history) == 1 and history[0].final
    np.testing.assert_array_equal(audio, decode_whole(tiny_xy, c))
    assert schedule_snr(tiny_xy, c, ChunkSchedule.custom([200, 100])) == math.inf


def test_decoder_is_reusable_after_flush_and_reset(tiny_xy):
    a, b = codes(60, seed=1), codes(45, seed=2)
    fresh, _ = stream_reply(tiny_xy, b, ChunkSchedule.official())
    dec = StreamingDecoder(tiny_xy, ChunkSchedule.official())
    for f in range(30):
        dec.push(a[:, f])
    dec.reset()  # barge-in
    for f in range(60):
        dec.push(a[:, f])
    dec.flush()
    out = [x for f in range(45) for x in dec.push(b[:, f])] + dec.flush()
    np.testing.assert_array_equal(np.concatenate(out), fresh)
    assert [c.index for c in dec.history] == [0, 1, 2]


# --- crossfade -------------------------------------------------------------------------------

def test_crossfade_weights():
    fade_in, fade_out = crossfade_weights(CF, "complementary")
    np.testing.assert_allclose(fade_in + fade_out, 1.0, atol=1e-12)
    assert fade_in[0] < 0.1 and fade_in[-1] > 0.9 and np.all(np.diff(fade_in) > 0)
    # Upstream's Hamming halves: 0.54 - 0.46 cos(.) twice, the cosines nearly cancelling -> ~1.08.
    fade_in, fade_out = crossfade_weights(CF, "hamming")
    np.testing.assert_allclose(fade_in + fade_out, 1.08, atol=1e-3)
    np.testing.assert_array_equal(np.concatenate([fade_in, fade_out]), np.hamming(2 * CF))


@pytest.mark.parametrize("window", ["hamming", "complementary"])
def test_crossfade_lands_on_the_overlap(tmp_path, window):
    """With a causal decoder whose memory fits in every call's context, each call reproduces the
    whole-reply decode, so streaming differs from it only by the weights' sum over the overlaps."""
    session = local_decoder(tmp_path, back=2, ahead=0)
    c = codes(150)
    whole = decode_whole(session, c)
    audio, history = stream_reply(session, c, ChunkSchedule.official(), crossfade_window=window)
    fade_in, fade_out = crossfade_weights(CF, window)
    gain = np.ones_like(whole, dtype=np.float64)
    for chunk in history[1:]:
        start = chunk.first_frame * SPF - CF
        gain[start:start + CF] = fade_in + fade_out
    np.testing.assert_allclose(audio, whole * gain, rtol=1e-5, atol=1e-6)
    if window == "complementary":
        assert schedule_snr(session, c, ChunkSchedule.official(), crossfade_window=window) > 100


# --- quality ---------------------------------------------------------------------------------

def test_snr_rises_with_chunk_size_when_the_decoder_looks_ahead(tmp_path):
    """Without look-ahead, the last frames of every chunk miss their right context, so errors come
    per chunk boundary: fewer, larger chunks give a higher SNR. (On the tiny XY decoder with random
    weights this does not hold: its output depends on every frame of a call through attention and
    absolute positions, and streamed SNR is about 0 dB for any chunking.)"""
    session = local_decoder(tmp_path, back=3, ahead=3)
    c = codes(192)
    snrs = [schedule_snr(session, c, ChunkSchedule.custom([n])) for n in (6, 12, 24, 48)]
    assert all(math.isfinite(s) for s in snrs)
    assert snrs == sorted(snrs) and snrs[-1] - snrs[0] > 3, snrs


def test_snr_is_finite_on_the_xy_decoder(tiny_xy):
    c = codes(120)
    for schedule in (ChunkSchedule.official(), ChunkSchedule.low_latency()):
        assert math.isfinite(schedule_snr(tiny_xy, c, schedule))


def test_snr_db():
    ref = np.array([1.0, -1.0, 1.0, -1.0], dtype=np.float32)
    assert snr_db(ref, ref) == math.inf
    assert snr_db(ref, ref * 0.9) == pytest.approx(20.0)


# --- schedules, latency arithmetic, validation ----------------------------------------------

def test_schedules():
    assert [ChunkSchedule.official().size(i) for i in range(11)] == [upstream_sizes(i) for i in range(11)]
    low = ChunkSchedule.low_latency()
    assert low.sizes[0] < 20 and list(low.sizes) == sorted(low.sizes) and low.size(99) == 48
    assert ChunkSchedule.parse("12,24,48").sizes == (12, 24, 48)
    assert ChunkSchedule.parse("official") == ChunkSchedule.official()
    assert ChunkSchedule.parse("fast_start") == ChunkSchedule.fast_start()
    for bad in ("", "4,x", "0,8"):
        with pytest.raises(ValueError):
            ChunkSchedule.parse(bad)


def test_decode_steps_to_first_audio():
    """Counted on the token sequence itself: 1 text, 8 audio, then 4 text, 8 audio, ..."""
    sequence = "T" + "A" * 8 + ("TTTT" + "A" * 8) * 20
    position_of_audio = [i + 1 for i, t in enumerate(sequence) if t == "A"]
    il = Interleave()
    for n in (1, 8, 9, 27, 15, 100):
        assert il.steps_until_audio_step(n) == position_of_audio[n - 1]
    assert il.steps_until_frames(20) == 40  # official first chunk: model-spec 4, "about 40 decode steps"
    assert il.steps_until_frames(ChunkSchedule.low_latency().sizes[0]) == 20
    assert il.steps_until_frames(ChunkSchedule.fast_start().sizes[0]) == 16  # issue 11: first audio <= 16 steps
    assert il.steps_until_audio_step(27, text_tokens=3) == 27 + 3


def gap_free(schedule: ChunkSchedule, frames: int, speed: float, delay_frames: float = 0.0) -> bool:
    """Simulate playback: frames arrive `speed` per frame-time, chunks are emitted when complete,
    playback starts `delay_frames` frame-times after chunk 0."""
    dec_ready, emitted, done, i = [], [], 0, 0
    while frames - done >= schedule.size(i):
        done += schedule.size(i)
        dec_ready.append(done / speed)
        emitted.append(schedule.size(i) * SPF - (CF if i == 0 else 0))
        i += 1
    dec_ready.append(frames / speed)
    emitted.append((frames - done) * SPF + (CF if i else 0))
    clock = dec_ready[0] + delay_frames  # playback starts after chunk 0; clock = when the queue runs dry
    for ready, n in zip(dec_ready, emitted):
        if ready > clock + 1e-9:
            return False
        clock += n / SPF
    return True


def test_speedup_needed_by_each_schedule():
    """The figures `low_latency` is chosen by: worst case over every reply length the decoder takes."""
    def worst(schedule):
        return max(required_speedup(schedule, f) for f in range(1, 376))

    assert worst(ChunkSchedule.official()) == pytest.approx(1.19, abs=0.005)
    assert worst(ChunkSchedule.low_latency()) < 1.5
    assert worst(ChunkSchedule.custom([4, 8, 12, 16, 24, 36, 48])) > 5


@pytest.mark.parametrize("schedule", [ChunkSchedule.official(), ChunkSchedule.low_latency()])
@pytest.mark.parametrize("frames", [60, 150, 375])
def test_required_speedup_is_the_gap_free_threshold(schedule, frames):
    need = required_speedup(schedule, frames)
    assert gap_free(schedule, frames, need * 1.001)
    assert not gap_free(schedule, frames, need * 0.99)


def test_rejects_schedules_the_method_cannot_run(tiny_xy):
    with pytest.raises(ValueError, match="crossfade"):
        StreamingDecoder(tiny_xy, ChunkSchedule.custom([2, 8]))
    with pytest.raises(ValueError, match="375"):
        StreamingDecoder(tiny_xy, ChunkSchedule.custom([200]))
    with pytest.raises(ValueError, match="left_context"):
        StreamingDecoder(tiny_xy, ChunkSchedule.official(), left_context=2)
    dec = StreamingDecoder(tiny_xy)
    for bad in (np.zeros(7, dtype=np.int64), np.full(8, 1024), np.zeros(8) + 0.5):
        with pytest.raises(ValueError):
            dec.push(bad)


def test_left_context_is_capped_by_what_was_decoded(tiny_xy):
    _, history = stream_reply(tiny_xy, codes(100), ChunkSchedule.low_latency(), left_context=24)
    assert [c.context_frames for c in history] == [0, 8, 16, 24, 24, 24]


def test_imports_without_torch():
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers'):\n"
        "    sys.modules[name] = None\n"
        "import qinyu_edge.runtime.streaming, qinyu_edge.runtime.delay, qinyu_edge.device.bench_streaming\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- benchmark script ------------------------------------------------------------------------

def test_bench_row_and_table(tiny_xy):
    from qinyu_edge.device.bench_streaming import bench_schedule, table
    from rich.console import Console

    c = codes(100)  # official: 20+16+16+24+24 = 100, then a flush that re-decodes the last 24 as context
    row = bench_schedule(tiny_xy, c, decode_whole(tiny_xy, c), ChunkSchedule.official(), None, "hamming", Interleave())
    assert (row.first_frames, row.first_audio_steps, row.first_decode_steps) == (20, 27, 40)
    assert row.first_samples == 20 * SPF - CF
    assert row.calls == 6
    assert row.work == pytest.approx((100 + 20 + 16 + 16 + 24 + 24) / 100)
    assert math.isfinite(row.snr_db) and row.ms_max >= row.ms_mean > 0
    console = Console(record=True, width=200)
    console.print(table([row], 100, 1.0, "tiny"))
    assert "official" in console.export_text()


@pytest.mark.slow
def test_bench_real_size_random_weights(tmp_path, capsys):
    from qinyu_edge.device.bench_streaming import main

    assert main(["--real-size", "--real-size-dir", str(tmp_path), "--frames", "60"]) == 0
    out = capsys.readouterr().out
    assert "official" in out and "low_latency" in out


@pytest.mark.parametrize("schedule", [ChunkSchedule.fast_start(), ChunkSchedule.official()])
@pytest.mark.parametrize("speed", [0.8, 1.0, 1.2, 3.0])
def test_playback_start_delay_is_just_enough(schedule, speed):
    """Delayed by `playback_start_delay_s`, playback of any reply up to the horizon never runs dry; a
    frame-time less and the longest one does (where a delay is needed at all)."""
    horizon = 300
    delay = playback_start_delay_s(schedule, horizon, speed) / (SPF / 32000)  # in frame-times
    for frames in (20, 100, horizon):
        assert gap_free(schedule, frames, speed, delay + 1e-6)
    needs = required_speedup(schedule, horizon) > speed
    assert (delay > 0) == needs
    if needs:
        assert not gap_free(schedule, horizon, speed, delay - 1)
    with pytest.raises(ValueError, match="speed"):
        playback_start_delay_s(schedule, horizon, 0.0)
