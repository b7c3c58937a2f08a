"""`qinyu-edge quantize`: an fp32 bundle -> a quantized bundle, with its accuracy table.

Only argparse is imported at parser-build time; ModelOpt, torch and ONNX Runtime load when the
command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from qinyu_edge.device.telemetry import peak_line
from qinyu_edge.validate import COUNT


def add_parsers(sub: Any) -> None:
    from .quantize import RECIPES

    q = sub.add_parser("quantize", help="fp32 bundle -> fp16 / int8 / fp8 / int4-awq bundle (NVIDIA ModelOpt), "
                                        "with an accuracy report against fp32 in ONNX Runtime")
    q.add_argument("--bundle", type=Path, required=True, help="the fp32 bundle from `qinyu-edge export`")
    q.add_argument("--out", type=Path, required=True, help="quantized bundle folder to create")
    q.add_argument("--recipe", required=True, choices=list(RECIPES),
                   help="; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()))
    q.add_argument("--lm-head", choices=["fp16", "int8", "int4"], default=None,
                   help="the lm_head (heads components): int8 per-channel or int4 group-128 weight-only "
                        "(default fp16, as every recipe keeps it)")
    q.add_argument("--embedding", choices=["fp16", "int4"], default=None,
                   help="the embedding table: int4 group-128 weight-only (default fp16)")
    q.add_argument("--encoder", choices=["fp16", "int8"], default=None,
                   help="the SenseVoice encoder: int8 per-channel weight-only on its Linear layers, half its "
                        "memory (default: the recipe's, fp16 except in int8 and fp8)")
    q.add_argument("--components", nargs="+", metavar="NAME",
                   help="apply the recipe to these components only (the rest stay fp32)")
    q.add_argument("--target", help="refuse precisions this target's TensorRT lacks (ids: `qinyu-edge targets`); "
                                    "fp8 needs one")
    q.add_argument("--calibration", type=Path, help="a calibration set saved with --save-calibration "
                                                    "(default: capture one from the bundle with espeak-ng speech)")
    q.add_argument("--save-calibration", type=Path, help="also write the captured calibration set here")
    q.add_argument("--no-accuracy", action="store_true", help="skip the accuracy report")
    q.add_argument("--steps", type=COUNT, default=None, help="tokens per reply in the greedy agreement (default 48)")
    q.add_argument("--threads", type=COUNT, default=None, help="ONNX Runtime threads")
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=cmd_quantize)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def size_table(source: Any, bundle: Any) -> Any:
    """Bytes of each component's files, fp32 against quantized."""
    from rich.table import Table

    def size(b: Any, name: str) -> int:
        f = b.components[name].file
        return sum(b.files[n].bytes for n in (f, f + ".data") if n in b.files)

    t = Table(title=f"{bundle.origin['quantization']['recipe']} bundle")
    for col in ("component", "precision", "fp32 bytes", "bytes", "ratio"):
        t.add_column(col, justify="left" if col in ("component", "precision") else "right")
    for name in bundle.components:
        before, after = size(source, name), size(bundle, name)
        t.add_row(name, bundle.origin["precision"][name], f"{before:,}", f"{after:,}", f"{after / before:.2f}")
    return t


def accuracy_table(report: Any) -> list[Any]:
    """The report as two rich tables: output cosines, then greedy token agreement per case."""
    from rich.table import Table

    out = Table(title=f"outputs vs fp32 on held-out inputs ({report.recipe or 'quantized'})")
    for col in ("component", "precision", "output", "calls", "mean", "min"):
        out.add_column(col, justify="right" if col in ("calls", "mean", "min") else "left")
    for o in report.outputs:
        label = o.output if o.kind == "cosine" else f"{o.output} (equal)"
        out.add_row(o.component, o.precision, label, str(o.samples), f"{o.mean:.6f}", f"{o.min:.6f}")
    cases = Table(title="greedy tokens vs fp32 (the five runtime parity cases)")
    for col in ("case", "fp32 tokens", "identical prefix", "prefix fraction", "same position"):
        cases.add_column(col, justify="left" if col == "case" else "right")
    for c in report.cases:
        cases.add_row(c.case, str(c.reference_tokens), str(c.prefix), f"{c.prefix_fraction:.2f}", f"{c.overall:.2f}")
    cases.add_row("all", str(sum(c.reference_tokens for c in report.cases)), str(sum(c.prefix for c in report.cases)),
                  f"{report.prefix_fraction:.2f}", f"{report.overall:.2f}", style="bold")
    return [out, cases]


def cmd_quantize(args: argparse.Namespace) -> int:
    console = _console()
    t0 = time.perf_counter()
    rc = _quantize(args, console)
    console.print(peak_line("quantize", time.perf_counter() - t0))
    return rc


def quantize_exported(bundle: Path, out: Path, recipe: str, force: bool, console: Any) -> int:
    """`quantize --bundle BUNDLE --out OUT --recipe RECIPE [--force]`, every other option at its
    default, with the same report: `export --dtype` finishes with it."""
    parser = argparse.ArgumentParser(prog="qinyu-edge")
    add_parsers(parser.add_subparsers())
    args = parser.parse_args(["quantize", "--bundle", str(bundle), "--out", str(out), "--recipe", recipe,
                              *(["--force"] if force else [])])
    return _quantize(args, console)


def _quantize(args: argparse.Namespace, console: Any) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from qinyu_edge.bundle import load_bundle, write_manifest

    from .calibration import BundleTooLargeError, CalibrationSet
    from .quantize import check_target, get_recipe, plan_components, quantize_bundle

    recipe = get_recipe(args.recipe, lm_head=args.lm_head, embedding=args.embedding, encoder=args.encoder)
    target = None
    if args.target:
        from qinyu_edge.device.targets import get_target

        target = get_target(args.target)
    source = load_bundle(args.bundle)
    # Refuse a request the target cannot build before spending time on calibration.
    check_target(plan_components(source, recipe, args.components), target)
    calibration = CalibrationSet.load(args.calibration) if args.calibration else None

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    task = bar.add_task("quantize", total=None)

    def progress(name: str, i: int, n: int, detail: str) -> None:
        # One step per component, then one for the fused decode graphs and the manifest.
        what = {"manifest": "fused decode graphs and manifest", "calibration": "calibration inputs"}.get(
            name, f"{name}: {recipe.for_component(name).method}")
        bar.update(task, total=n + 1, completed=i, description=f"quantize {what}" + (f" ({detail})" if detail else ""))

    with bar:
        bundle = quantize_bundle(args.bundle, args.out, recipe, components=args.components, target=target,
                                 calibration=calibration, force=args.force, progress=progress,
                                 save_calibration=args.save_calibration, threads=args.threads)
        bar.update(task, completed=bar.tasks[0].total, description="quantized")
    captured = bundle.origin["quantization"]["calibration"]
    if captured is None:
        console.print("no calibration was needed: the components were rewritten one weight at a time (streamed)")
    elif captured.get("captured_on"):
        console.print(f"calibration inputs captured on {captured['captured_on']}")
    if args.save_calibration and captured is not None:
        console.print(f"calibration set written to [bold]{args.save_calibration}[/bold]")
    console.print(size_table(source, bundle))
    console.print(f"quantized bundle written to [bold]{bundle.root}[/bold]")
    if args.no_accuracy:
        return 0
    from .accuracy import STEPS, accuracy_report

    console.print("accuracy: the five parity cases on the fp32 and the quantized bundle (ONNX Runtime, CPU)")
    try:
        report = accuracy_report(args.bundle, bundle.root, steps=args.steps or STEPS, threads=args.threads)
    except BundleTooLargeError as e:
        console.print(f"[yellow]accuracy report skipped[/yellow]: {e}")
        return 0
    for table in accuracy_table(report):
        console.print(table)
    # The report travels with the bundle: build plans and doctor read it from the manifest.
    b = load_bundle(bundle.root)
    origin = {**b.origin, "quantization": {**b.origin["quantization"], "accuracy": report.to_dict()}}
    write_manifest(dataclasses.replace(b, origin=origin))
    return 0
