"""The `qinyu-edge` command. Each subcommand imports what it needs, so the device-side commands
never import torch."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import QinyuError

log = logging.getLogger("qinyu_edge")


def cmd_export(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .export.bundle_export import export_bundle
    from .export.qinyu_checkpoint import load_preset, load_qinyu

    console = Console(stderr=True)
    if args.preset:
        console.print(f"building preset [bold]{args.preset}[/bold] (random weights, seed {args.seed}) in the real checkpoint layout")
        model = load_preset(args.preset, seed=args.seed)
    else:
        missing = [f for f in ("sensevoice", "xy") if getattr(args, f) is None]
        if missing:
            raise QinyuError(f"--checkpoint needs {' and '.join('--' + m for m in missing)} too "
                             "(the SenseVoiceSmall folder and the VITA-QinYu-Models folder).")
        model = load_qinyu(args.checkpoint, args.sensevoice, args.xy)
    bundle = export_bundle(model, args.out, force=args.force, max_context=args.max_context, console=console)
    console.print(f"bundle written to [bold]{bundle.root}[/bold]: {len(bundle.components)} components, "
                  f"worst parity rel error {bundle.parity['worst_rel']:.2e}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .bundle import load_bundle

    from .export.bundle_export import preset_bundle

    console = Console()
    console.print(f"the embedded default: [bold]{args.preset}[/bold] (exported once into the cache folder)")
    bundle = load_bundle(preset_bundle(args.preset, console=Console(stderr=True)))
    table = Table(title=f"bundle {bundle.root} ({bundle.config.name}; tiny preset, random weights)")
    for col in ("component", "inputs", "outputs", "bytes"):
        table.add_column(col)
    for c in bundle.components.values():
        table.add_row(c.name, ", ".join(f"{t.name}{list(t.shape)}" for t in c.inputs),
                      ", ".join(f"{t.name}{list(t.shape)}" for t in c.outputs), str(bundle.files[c.file].bytes))
    console.print(table)
    console.print(f"parity: worst relative error {bundle.parity['worst_rel']:.2e} "
                  f"(tolerance {bundle.parity['tolerance']:g}), all files verified by sha256.")
    console.print("The tiny model's weights are random: it demonstrates the pipeline, not the model's answers.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qinyu-edge", description="VITA-QinYu on edge GPUs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="checkpoint folders or a tiny preset -> model bundle (ONNX + bundle.json) with a parity report")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=["tiny-4b", "tiny-8b"], help="a tiny preset with random weights")
    src.add_argument("--checkpoint", type=Path, help="VITA-QinYu-8B or -4B model folder")
    e.add_argument("--sensevoice", type=Path, help="SenseVoiceSmall folder (model.pt, config.yaml, am.mvn)")
    e.add_argument("--xy", type=Path, help="VITA-QinYu-Models folder (xy_tokenizer.ckpt + yaml, campplus_cn_common.bin, spk2embeds_roleplay.pt)")
    e.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")
    e.add_argument("--max-context", type=int, default=None, help="longest context the shape ranges allow")
    e.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="the embedded default: export the tiny preset if needed and show the bundle")
    d.add_argument("--preset", choices=["tiny-4b", "tiny-8b"], default="tiny-4b")
    d.set_defaults(func=cmd_demo)

    from .device.cli import add_parsers as add_device_parsers

    add_device_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except QinyuError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
