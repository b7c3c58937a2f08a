"""`qinyu-edge bench` (measure a bundle here) and `qinyu-edge bench compare A.json B.json`.

Only argparse is imported at parser-build time; the commands import what they need.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from qinyu_edge.errors import QinyuError
from qinyu_edge.validate import COUNT, NON_NEGATIVE, real


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def add_parsers(sub: Any) -> None:
    b = sub.add_parser("bench", help="measure a bundle here: per-component latency, time to first audio, memory, "
                                     "power, roofline; `bench compare A.json B.json` for regressions",
                       description="Measure a bundle on this machine and write bench.json, report.md and plots. "
                                   "`qinyu-edge bench compare A.json B.json` compares two runs.")
    b.add_argument("--bundle", type=Path, help="model bundle folder")
    b.add_argument("--out", type=Path, default=None, help="output folder (default: bench-NAME-TIME)")
    b.add_argument("--engines", type=Path, help="TensorRT engine folder from `qinyu-edge build` (with --backend trt)")
    b.add_argument("--backend", choices=["ort", "trt"], default="ort")
    b.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu", help="ONNX Runtime provider")
    b.add_argument("--portable", action="store_true",
                   help="time the portable graphs even where the bundle has a faster ONNX Runtime CPU variant")
    b.add_argument("--split", action="store_true",
                   help="time the embedding, backbone and greedy-heads sessions, three calls per step, instead of "
                        "the bundle's fused decode graph and host embedding table (to compare the two)")
    b.add_argument("--threads", type=COUNT, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    b.add_argument("--context", type=COUNT, default=None, help="KV cache positions (default: the bundle's maximum)")
    b.add_argument("--target", default=None,
                   help="roofline bandwidth from this registry target (`qinyu-edge targets`); default: the GPU found "
                        "here for a GPU provider, else the host's measured copy bandwidth")
    b.add_argument("--against", choices=["torch"], default=None,
                   help="also time the PyTorch reference on the same weights in this process (needs the export extra)")
    b.add_argument("--torch-device", default=None, help="device for --against torch (default: cuda for a GPU "
                                                        "provider when torch has CUDA, else cpu)")
    b.add_argument("--runs", type=COUNT, default=30, help="timed runs per component figure")
    b.add_argument("--warmup", type=NON_NEGATIVE, default=3, help="untimed runs before each component figure")
    b.add_argument("--audio-seconds", type=_floats, default=(1.0, 5.0, 15.0), help="audio lengths, e.g. 1,5,15")
    b.add_argument("--prompt-lengths", type=_ints, default=(32, 128, 512, 2048), help="prefill lengths")
    b.add_argument("--contexts", type=_ints, default=(16, 256, 1024, 2048, 4000), help="decode context lengths")
    b.add_argument("--schedule", action="append", default=None,
                   help="chunk schedule whose decoder calls are timed: official, low_latency or sizes such as "
                        "12,24,48 (repeatable; default official and low_latency)")
    b.add_argument("--first-chunks", type=_ints, default=(4, 8, 12, 16, 20, 24, 32),
                   help="first-chunk sizes (frames) for the time-to-first-audio sweep")
    b.add_argument("--e2e-runs", type=COUNT, default=3, help="replies per spoken question")
    b.add_argument("--ttfa-runs", type=COUNT, default=3, help="replies per first-chunk size")
    b.add_argument("--max-new-tokens", type=COUNT, default=400, help="step cap of the end-to-end replies")
    b.add_argument("--wav", type=Path, action="append", default=[], help="extra user speech (repeatable)")
    b.add_argument("--stop-after", type=NON_NEGATIVE, default=None, help=argparse.SUPPRESS)  # debug: Ctrl-C after N figures
    b.set_defaults(func=cmd_bench)

    bs = b.add_subparsers(dest="bench_command")
    c = bs.add_parser("compare", help="ratio per figure of two bench JSON files; exit 1 on a regression")
    c.add_argument("a", type=Path, help="baseline bench.json")
    c.add_argument("b", type=Path, help="new bench.json")
    c.add_argument("--threshold", type=real(0), default=0.1, help="flag changes for the worse beyond this fraction")
    c.set_defaults(func=cmd_compare)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=160)


def cmd_bench(args: argparse.Namespace) -> int:
    from qinyu_edge.runtime.engine import EngineOptions
    from qinyu_edge.runtime.streaming import ChunkSchedule
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .bench import Bench, BenchOptions
    from .bench_report import write_outputs

    if args.bundle is None:
        raise QinyuError("bench needs --bundle BUNDLE (or `bench compare A.json B.json`)")
    if args.backend == "trt" and args.engines is None:
        raise QinyuError("--backend trt needs --engines DIR (built by `qinyu-edge build`)")
    if args.backend == "ort" and args.engines is not None:
        raise QinyuError("--engines is for --backend trt; ONNX Runtime runs the bundle's ONNX files")
    try:
        options = BenchOptions(
            runs=args.runs, warmup=args.warmup, audio_seconds=args.audio_seconds, prompt_lengths=args.prompt_lengths,
            contexts=args.contexts, schedules=tuple(args.schedule or ("official", "low_latency")), e2e_runs=args.e2e_runs, max_new_tokens=args.max_new_tokens,
            first_chunks=args.first_chunks, ttfa_runs=args.ttfa_runs, wavs=tuple(args.wav), against=args.against,
            torch_device=args.torch_device, target=args.target, stop_after=args.stop_after)
        for name in options.schedules:
            ChunkSchedule.parse(name)
    except ValueError as e:
        raise QinyuError(str(e)) from e
    for w in args.wav:
        if not w.is_file():
            raise QinyuError(f"--wav {w}: no such file")
    bench = Bench(args.bundle, EngineOptions(backend=args.backend, provider=args.provider, threads=args.threads,
                                             context=args.context, engines=str(args.engines) if args.engines else None,
                                             ort_variants=not args.portable, fused=not args.split),
                  options)
    out = args.out or Path(f"bench-{bench.bundle.config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    err = _console(stderr=True)
    progress = Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err)
    with progress:
        doc = bench.run(progress)
    paths = write_outputs(doc, out)
    st = doc["status"]
    figs = doc["figures"]
    console = _console()
    for fid in ("e2e/time_to_first_audio", "e2e/reply_latency", "e2e/decode_steps_per_s", "e2e/audio_s_per_wall_s"):
        if fid in figs:
            f = figs[fid]
            console.print(f"{f['label']}: {f['value']:.2f} {f['unit']} (p50)")
    console.print(f"{st['figures_measured']} figures in {st['seconds']:.1f} s; {paths['json']}, {paths['report']} "
                  f"and {len(paths) - 2} plots")
    if not st["complete"]:
        print(f"interrupted during {st['interrupted_during']!r}; wrote what was measured so far", file=sys.stderr)
        return 130
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .bench_report import compare, load_doc, print_compare

    if args.threshold < 0:
        raise QinyuError("--threshold must be >= 0")
    a, b = load_doc(args.a), load_doc(args.b)
    rows = compare(a, b, args.threshold)
    print_compare(rows, str(args.a), str(args.b), args.threshold, _console())
    return 1 if any(r.regression for r in rows) else 0
