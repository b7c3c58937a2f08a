"""`qinyu-edge targets` and `qinyu-edge plan`: the target registry and the memory planner.

Only argparse is imported at parser-build time; the commands import what they need.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from qinyu_edge.errors import ConfigError
from qinyu_edge.validate import COUNT, real

DEFAULT_CONTEXT = 4096


def add_parsers(sub: Any) -> None:
    """Add the device subcommands to the top-level parser's subparsers."""
    t = sub.add_parser("targets", help="the GPUs qinyu-edge plans for, and the one found on this machine")
    t.add_argument("--json", action="store_true", help="print JSON instead of a table")
    t.set_defaults(func=cmd_targets)

    p = sub.add_parser("plan", help="does a variant fit a target: memory breakdown, longest context, decode steps/s")
    p.add_argument("--target", default="local", help="a target id from `qinyu-edge targets`; default: the GPU found here")
    p.add_argument("--variant", choices=["4b", "8b"], default="4b")
    p.add_argument("--precision", default="auto",
                   help="backbone weights: fp32, fp16, fp8, int8, fp4 or int4 (weight-only, group 128); auto (default): "
                        "the most accurate precisions that fit the context and decode in real time, with what each costs")
    p.add_argument("--context", type=COUNT, default=DEFAULT_CONTEXT, help="KV cache length in positions")
    p.add_argument("--lm-head", default=None, help="lm_head precision (default: fp16 for a quantized backbone)")
    p.add_argument("--embedding", default=None, help="embedding table precision (default: as --lm-head)")
    p.add_argument("--kv-cache", default=None, help="KV cache precision: fp16 (default), fp8, int8 or fp32")
    p.add_argument("--encoder", default=None,
                   help="SenseVoice encoder precision: fp16 (default) or int8 (weight-only on its Linear layers, "
                        "as `quantize --encoder int8` writes it)")
    p.add_argument("--embedding-graph", action="store_true",
                   help="count the embedding graph's whole table, as for a bundle without a memory-mapped table "
                        "(exported before bundle format 5, or quantized with --embedding int4)")
    p.add_argument("--shared-embedding", action="store_true",
                   help="with --embedding-graph, tied models: gather embedding rows from the lm_head weights instead "
                        "of a second copy")
    p.add_argument("--voice-design", action="store_true",
                   help="count VoiceDesign's graphs (a bundle given them by `voice export`, where chat --role without "
                        "--voice designs the voice at start): their start-up memory and predicted time per design")
    p.add_argument("--margin", type=real(0, 1), default=0.10, help="safety margin, a fraction of the usable memory")
    p.add_argument("--accuracy-from", type=Path, default=None, metavar="QUANTIZED_BUNDLE",
                   help="with --precision auto: the measured accuracy of this quantized bundle's precisions")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_plan)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    # Piped output keeps whole rows rather than wrapping at 80 columns.
    return console if console.is_terminal else Console(width=200)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f}"


def _opt(v: float | None, fmt: str = "{:g}") -> str:
    return "?" if v is None else fmt.format(v)


def cmd_targets(args: argparse.Namespace) -> int:
    from .detect import detect
    from .targets import TARGETS, local_target

    detected = detect()
    local = local_target(detected) if detected is not None else None
    if args.json:
        doc = {"targets": [t.to_dict() for t in TARGETS.values()],
               "local": None if detected is None else {
                   "detected": dataclasses.asdict(detected),
                   "target": local.to_dict() if local else None}}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0

    from rich.table import Table

    table = Table(title="qinyu-edge targets")
    for col in ("id", "GPU", "SM", "memory GB", "GB/s", "fp16 TFLOPS", "int8 TOPS", "TensorRT precisions",
                "usual JetPack / TensorRT"):
        table.add_column(col, overflow="fold")
    rows = list(TARGETS.values())
    for t in rows:
        mem = f"{t.memory_bytes / 2**30:.0f} GiB " + ("shared" if t.unified_memory else "VRAM")
        table.add_row(t.id, t.name, t.sm, mem, _opt(t.bandwidth_gbs), _opt(t.fp16_tflops), _opt(t.int8_tops),
                      " ".join(t.precisions), "\n".join(t.software))
    if local is not None and detected is not None:
        what = detected.name + (f" = {local.id}" if local.id != "local" else "")
        table.add_row("local", what, local.sm, f"{local.memory_bytes / 1e9:.1f} GB " + ("shared" if local.unified_memory else "VRAM"),
                      _opt(local.bandwidth_gbs, "{:.0f}"), _opt(local.fp16_tflops), _opt(local.int8_tops),
                      " ".join(local.precisions), detected.software or "")
    console = _console()
    console.print(table)
    if detected is None:
        console.print("local: no NVIDIA GPU found on this machine (no NVML device, no Jetson model file).")
    console.print("int4 = weight-only, group 128. Sources for every figure: device/targets.py.")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .planner import PlanOptions, model_for_variant, plan_for
    from .recipe_choice import Measured, choose
    from .targets import get_target

    options = PlanOptions(margin=args.margin, host_embedding=not args.embedding_graph,
                          separate_embedding=not args.shared_embedding, voice_design=args.voice_design)
    choice = None
    if args.precision == "auto":
        fixed = [f for f in ("lm_head", "embedding", "kv_cache", "encoder") if getattr(args, f) is not None]
        if fixed:
            raise ConfigError(f"--{fixed[0].replace('_', '-')} needs --precision too; --precision auto picks "
                              "every precision itself")
        measured = Measured.from_bundle(args.accuracy_from) if args.accuracy_from else None
        choice = choose(model_for_variant(args.variant), get_target(args.target), args.context, options, measured)
        plan = choice.plan
    else:
        if args.accuracy_from is not None:
            raise ConfigError("--accuracy-from goes with --precision auto (it annotates the choices auto makes)")
        plan = plan_for(args.target, args.variant, args.precision, args.context, options,
                        lm_head=args.lm_head, embedding=args.embedding, kv_cache=args.kv_cache,
                        encoder=args.encoder or "fp16")
    if args.json:
        doc = plan.to_dict()
        if choice is not None:
            doc["choice"] = choice.to_dict()
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        _print_plan(plan)
        if choice is not None:
            _print_choice(choice)
    if not plan.fits:
        raise ConfigError(plan.verdict())
    return 0


def _print_choice(choice: Any) -> None:
    from rich.table import Table

    console = _console()
    console.print(choice.summary())
    if choice.steps:
        table = Table(title="what each choice below fp16 costs")
        for col in ("part", "precision", "accuracy", "speed"):
            table.add_column(col)
        for s in choice.steps:
            table.add_row(s.part, s.value, s.accuracy, s.speed)
        console.print(table)


def _print_plan(plan: Any) -> None:
    from rich.table import Table

    t, r = plan.target, plan.recipe
    title = (f"qinyu-{plan.variant} on {t.name} ({t.id}): {r.backbone} layers, lm_head {r.lm_head}, "
             f"embedding {r.embedding}, KV {r.kv_cache}, encoder {r.encoder}, context {plan.context}")
    table = Table(title=title)
    for col in ("group", "item", "GB", "where", "note"):
        table.add_column(col, justify="right" if col == "GB" else "left")
    for i in plan.items:
        counted = i.on_device or t.unified_memory
        where = "shared" if t.unified_memory else ("GPU" if i.on_device else "host, not counted")
        table.add_row(i.group, i.name, _gb(i.bytes) if counted else f"({_gb(i.bytes)})", where, i.note)
    table.add_section()
    table.add_row("total", "", _gb(plan.total_bytes), "", "")
    table.add_row("budget", "", _gb(plan.budget_bytes), "",
                  f"{_gb(t.memory_bytes)} GB − {_gb(plan.reserved_bytes)} GB system, − {plan.options.margin:.0%} margin")
    console = _console()
    console.print(table)
    status = "[green]fits[/]" if plan.fits else f"[red]does not fit[/] (short by {_gb(plan.shortfall_bytes)} GB)"
    console.print(f"{status}: {_gb(plan.total_bytes)} GB of {_gb(plan.budget_bytes)} GB usable; "
                  f"longest context that fits: {plan.longest_context}")
    if plan.steps_per_s is not None:
        console.print(f"decode roofline: {plan.steps_per_s:.1f} steps/s at position {plan.context} "
                      f"({plan.steps_per_s_empty:.1f} with an empty cache), {_gb(plan.bytes_per_step)} GB read per step "
                      f"at {t.bandwidth_gbs:g} GB/s; {plan.realtime_factor:.2f}x the steps real-time speech needs. "
                      "Edge-LLM's measured Qwen3 decode reaches 73-88% of its roofline.")
    else:
        console.print("decode roofline: unknown (this GPU did not report its memory bandwidth)")
