"""Benchmark streaming speech decode schedules: quality against a whole-reply decode, latency to
the first audio chunk, and decoder cost per chunk.

    python -m qinyu_edge.device.bench_streaming --bundle BUNDLE
    python -m qinyu_edge.device.bench_streaming --real-size      # real-size decoder, random weights

`--real-size` builds the real-size XY decoder from random weights and exports it once (this option
alone needs torch); the codes are random too, so its SNR says how much a random decoder's output
depends on chunking, not how a trained one sounds. Latency columns are exact for any decoder:

- first audio (frames): completed frames when chunk 0 can be decoded;
- audio steps: frame f completes at audio step f + 8 (the codebook delay);
- decode steps: text and audio steps, counted on the trained 1 text / 8 audio, then 4 text /
  8 audio pattern (`Interleave`), assuming the reply's text does not run out first;
- speedup: the generation speed (x real time) below which playback of this reply has a gap,
  if decoding took no time (`required_speedup`).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qinyu_edge.runtime.session import open_session
from qinyu_edge.runtime.streaming import (
    CROSSFADE,
    SAMPLES_PER_FRAME,
    ChunkSchedule,
    Decoder,
    Interleave,
    decode_whole,
    required_speedup,
    snr_db,
    stream_reply,
)
from rich.console import Console
from rich.table import Table

from qinyu_edge.bundle import load_bundle
from qinyu_edge.validate import COUNT, NON_NEGATIVE, whole

log = logging.getLogger(__name__)

SAMPLE_RATE = 32000


@dataclass(frozen=True)
class Row:
    label: str
    snr_db: float
    first_frames: int
    first_samples: int
    first_audio_steps: int
    first_decode_steps: int
    calls: int
    ms_mean: float
    ms_max: float
    work: float  # frames run through the decoder per reply frame
    speedup: float


def bench_schedule(session: Decoder, codes: np.ndarray, reference: np.ndarray, schedule: ChunkSchedule,
                   left_context: int | None, window: str, interleave: Interleave) -> Row:
    audio, history = stream_reply(session, codes, schedule, left_context=left_context, crossfade_window=window)
    first = history[0]
    ms = [c.decode_ms for c in history]
    label = schedule.name + ("" if left_context is None else f" ctx={left_context}")
    return Row(
        label=label, snr_db=snr_db(reference, audio), first_frames=first.ready_at_frames, first_samples=first.samples,
        first_audio_steps=first.ready_at_audio_step,
        first_decode_steps=interleave.steps_until_frames(first.ready_at_frames),
        calls=len(history), ms_mean=statistics.fmean(ms), ms_max=max(ms),
        work=sum(c.frames + c.context_frames for c in history) / codes.shape[1],
        speedup=required_speedup(schedule, codes.shape[1]),
    )


def table(rows: list[Row], frames: int, whole_ms: float, title: str) -> Table:
    t = Table(title=title)
    t.add_column("schedule", no_wrap=True)
    for name in ("SNR dB", "1st frames", "1st chunk audio ms", "1st audio steps", "1st decode steps", "calls",
                 "ms/chunk", "ms max", "work", "speedup"):
        t.add_column(name, justify="right")
    for r in rows:
        t.add_row(r.label, f"{r.snr_db:.2f}", str(r.first_frames), f"{1000 * r.first_samples / SAMPLE_RATE:.0f}",
                  str(r.first_audio_steps), str(r.first_decode_steps), str(r.calls), f"{r.ms_mean:.1f}",
                  f"{r.ms_max:.1f}", f"{r.work:.2f}", f"{r.speedup:.2f}x")
    t.caption = (f"{frames} frames ({frames * SAMPLES_PER_FRAME / SAMPLE_RATE:.1f} s); whole-reply decode "
                 f"{whole_ms:.1f} ms. SNR against that decode; ms = decoder wall time per chunk; work = frames "
                 "decoded per reply frame; speedup = generation speed (x real time) needed for gapless playback")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qinyu_edge.device.bench_streaming", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="a model bundle; its xy_decoder component is used")
    src.add_argument("--real-size", action="store_true", help="real-size XY decoder with random weights (needs torch)")
    p.add_argument("--real-size-dir", type=Path,
                   default=Path(os.environ.get("QINYU_EDGE_CACHE", Path.home() / ".cache" / "qinyu-edge")) / "bench",
                   help="where the real-size decoder ONNX is kept between runs")
    p.add_argument("--frames", type=whole(1, 375), default=240, help="reply length in frames (<= 375; 12.5 per second)")
    p.add_argument("--schedule", action="append",
                   help="official, low_latency, fast_start or sizes such as 12,24,48 (repeatable; default the three named)")
    p.add_argument("--left-context", type=NON_NEGATIVE, action="append", default=[],
                   help="also run each schedule with this many frames of left context (repeatable)")
    p.add_argument("--window", choices=("hamming", "complementary"), default="hamming")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt"))
    p.add_argument("--threads", type=COUNT, default=None)
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if not 1 <= args.frames <= 375:
        p.error("--frames must be 1..375: the whole-reply reference is one decoder call")
    if args.real_size:
        from qinyu_edge.export.random_models import export_real_size_xy  # needs torch (export extra)

        path, title = export_real_size_xy(args.real_size_dir, args.seed), "real-size XY decoder, random weights"
    else:
        path, title = load_bundle(args.bundle).path("xy_decoder"), f"xy_decoder of {args.bundle}"
    session = open_session(path, provider=args.provider, threads=args.threads)
    codes = np.random.default_rng(args.seed).integers(0, 1024, (8, args.frames))

    decode_whole(session, codes[:, :8])  # warm-up: first-run allocations are not per-chunk cost
    t0 = time.perf_counter()
    reference = decode_whole(session, codes)
    whole_ms = (time.perf_counter() - t0) * 1e3

    schedules = [ChunkSchedule.parse(s) for s in (args.schedule or ["official", "low_latency", "fast_start"])]
    interleave = Interleave()
    rows = [bench_schedule(session, codes, reference, s, ctx, args.window, interleave)
            for s in schedules for ctx in [None, *args.left_context]]
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log file: do not squeeze the columns to 80
    console.print(table(rows, args.frames, whole_ms, f"{title} ({args.window} crossfade, {CROSSFADE} samples)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
