"""`qinyu-edge lint` (ONNX lint for TensorRT) and `qinyu-edge doctor` (what works on this machine).

Only argparse is touched at parser-build time; each command imports what it needs, so `doctor`
runs on a device without onnx and `lint` without TensorRT.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_STATUS_STYLE = {"ok": "[green]ok[/]", "info": "[dim]info[/]", "warning": "[yellow]warning[/]", "error": "[red]ERROR[/]"}


def add_parsers(sub: Any) -> None:
    """Add `lint` and `doctor` to the top-level parser's subparsers."""
    lint = sub.add_parser("lint", help="check a bundle's ONNX graphs against what each TensorRT version parses",
                          description="Exit code 0: no errors (warnings allowed unless --strict); 1: errors.")
    lint.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    lint.add_argument("--trt", action="append", metavar="VERSION",
                      help="TensorRT version to check (repeatable; default: every version our targets run, "
                           "TRT_FAMILIES in engines/onnx_lint.py)")
    lint.add_argument("--component", action="append", help="only this component (repeatable)")
    lint.add_argument("--strict", action="store_true", help="warnings fail too")
    lint.add_argument("--json", action="store_true", help="print JSON instead of tables")
    lint.set_defaults(func=cmd_lint)

    doc = sub.add_parser("doctor", help="what this machine has, what will not work here, and the fix for each",
                         description="Exit code 0 when nothing asked for is broken: ONNX Runtime always, the bundle "
                                     "with --bundle, every engine plan with --engines, and each --require item. "
                                     "Other gaps (no GPU, no sound devices) are warnings. 1 otherwise.")
    doc.add_argument("--bundle", type=Path, help="also verify this bundle (and lint it for the local TensorRT)")
    doc.add_argument("--engines", type=Path, help="an engine set folder, or a folder of them: check each plan matches here")
    doc.add_argument("--require", action="append", choices=["gpu", "tensorrt", "audio"], default=[],
                     help="treat this as needed: missing becomes an error (repeatable)")
    doc.add_argument("--json", action="store_true", help="print JSON instead of a table")
    doc.set_defaults(func=cmd_doctor)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    # Piped output keeps whole rows rather than wrapping at 80 columns.
    return console if console.is_terminal else Console(width=200)


def cmd_lint(args: argparse.Namespace) -> int:
    from .onnx_lint import TRT_FAMILIES, known_trt_version, lint_bundle

    for version in args.trt or ():
        known_trt_version(version)
    report = lint_bundle(args.bundle, args.trt or TRT_FAMILIES, args.component)
    failed = report.errors > 0 or (args.strict and report.warnings > 0)
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        return 1 if failed else 0

    from rich.table import Table

    console = _console()
    summary = Table(title=f"TensorRT lint of {args.bundle}")
    summary.add_column("component")
    versions = list(report.results)
    for v in versions:
        summary.add_column(f"TensorRT {v}", justify="center")
    for comp in next(iter(report.results.values()), {}):
        cells = []
        for v in versions:
            fs = report.results[v][comp]
            e = sum(f.severity == "error" for f in fs)
            w = len(fs) - e
            cells.append((f"[red]{e} errors[/]" if e else "[green]ok[/]") + (f", {w} warning{'s' if w > 1 else ''}" if w else ""))
        summary.add_row(comp, *cells)
    console.print(summary)

    # A finding usually holds for several versions: list it once with the versions it applies to.
    merged: dict[tuple[str, str, str, str], list[str]] = {}
    fixes: dict[tuple[str, str, str, str], tuple[str, str, str]] = {}
    for v, comp, f in report.findings():
        key = (comp, f.node, f.rule, f.message)
        merged.setdefault(key, []).append(v)
        fixes[key] = (f.severity, f.op, f.fix)
    if merged:
        details = Table(title="findings")
        for col in ("component", "severity", "node", "op", "TensorRT", "message", "fix"):
            details.add_column(col, overflow="fold")
        for key in sorted(merged, key=lambda k: (fixes[k][0] != "error", k)):
            comp, node, _, message = key
            sev, op, fix = fixes[key]
            details.add_row(comp, _STATUS_STYLE[sev], node, op, " ".join(merged[key]), message, fix)
        console.print(details)
    verdict = "[red]fails[/]" if failed else "[green]passes[/]"
    console.print(f"{verdict}: {report.errors} errors, {report.warnings} warnings over {len(versions)} TensorRT "
                  f"version(s). Sources for every rule: engines/onnx_lint.py.")
    return 1 if failed else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    report = run_doctor(args.bundle, args.engines, args.require)
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        return report.exit_code

    from rich.table import Table

    table = Table(title="qinyu-edge doctor")
    for col in ("area", "item", "status", "found", "fix"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        table.add_row(c.area, c.item, _STATUS_STYLE[c.status], c.found, c.fix)
    console = _console()
    console.print(table)
    if report.errors:
        console.print(f"[red]{len(report.errors)} problem(s)[/] with what was asked for; {len(report.warnings)} "
                      "warning(s). Exit code 1.")
    else:
        console.print(f"[green]nothing asked for is broken[/]; {len(report.warnings)} warning(s) name what will not "
                      "work here. Exit code 0.")
    return report.exit_code
