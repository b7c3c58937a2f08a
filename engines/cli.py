"""`qinyu-edge build`: a bundle to a TensorRT engine set for a target, rebuilding only stale plans.

Without TensorRT installed it still makes and writes the build plans (what the device would
build), then says that TensorRT is missing and how to get it on that platform.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from qinyu_edge.device.targets import PRECISIONS, Target, get_target
from qinyu_edge.engine_manifest import rebuild_command
from qinyu_edge.errors import ConfigError
from qinyu_edge.validate import COUNT, whole

from .plan import HARDWARE_LEVELS, PLAN_FILE, BuildOptions, BuildPlan, default_engine_dir, make_build_plans, write_plans

log = logging.getLogger(__name__)


def add_parsers(sub: Any) -> None:
    b = sub.add_parser("build", help="bundle -> TensorRT engine set for a target; rebuilds only stale plans")
    b.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    b.add_argument("--target", default=None,
                   help="a target id from `qinyu-edge targets` (default: the GPU found here)")
    b.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the precision the bundle must hold (the precision lives in the ONNX; default: what it holds)")
    b.add_argument("--fallback-bundle", type=Path, action="append", default=[],
                   help="a wider (e.g. fp16) bundle of the same model for components whose Q/DQ graphs the target's "
                        "TensorRT rejects (repeatable; the fp32 source of a quantized bundle is used when present)")
    b.add_argument("--out", type=Path, default=None, help="engine set folder (default: BUNDLE/engines/TARGET)")
    b.add_argument("--force", action="store_true", help="rebuild every component, stale or not")
    b.add_argument("--plan-only", action="store_true", help="write the build plans (JSON) and build nothing")
    b.add_argument("--trt-version", default=None,
                   help="plan for this TensorRT version (default: the installed one, else the target's usual one)")
    b.add_argument("--opt-level", type=whole(0, 5), default=None, help="builder optimization level 0..5")
    b.add_argument("--workspace-mib", type=COUNT, default=None, help="builder workspace limit in MiB")
    b.add_argument("--hardware-compat", choices=list(HARDWARE_LEVELS), default="none",
                   help="hardware-compatible plans (not on Jetson; slower kernels)")
    b.add_argument("--version-compatible", action="store_true",
                   help="plans that also run on newer TensorRT of the same major version (not on Jetson)")
    b.set_defaults(func=cmd_build)


def _target(target_id: str | None) -> Target:
    if target_id is not None:
        return get_target(target_id)
    from qinyu_edge.device.detect import detect

    found = detect()
    if found is None:
        raise ConfigError("no NVIDIA GPU was found here (NVML or the Jetson model file; NVML needs nvidia-ml-py, "
                          "`pip install qinyu-edge[gpu]`). Pass --target with one of the ids `qinyu-edge targets` lists.")
    return get_target("local" if found.target_id is None else found.target_id, found)


def _plan_table(plans: list[BuildPlan], bundle_root: str) -> Any:
    from rich.table import Table

    t = plans[0]
    table = Table(title=f"build plan: {t.target_name} (SM {t.compute_capability}), TensorRT {t.trt_version}")
    for col in ("component", "onnx", "precision", "profiles", "fallback", "notes"):
        table.add_column(col)
    for p in plans:
        profiles = "; ".join(f"{pr.name}: " + ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in pr.shapes.items())
                             for pr in p.profiles) or "static"
        fallback = f"{p.fallback.precision} ({Path(p.fallback.bundle).name}/{p.fallback.onnx_file})" if p.fallback else ""
        onnx = p.onnx_file if p.bundle == bundle_root else f"{p.bundle}/{p.onnx_file}"
        table.add_row(p.component, onnx, p.precision, profiles, fallback, "\n".join(p.notes))
    return table


def cmd_build(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qinyu_edge.bundle import load_bundle
    from qinyu_edge.runtime.trt_session import TensorRTMissing, installed_trt_version, tensorrt_install_hint

    console = Console(stderr=True)
    bundle = load_bundle(args.bundle)
    target = _target(args.target)
    installed = installed_trt_version()
    if installed is not None and args.trt_version is not None and args.trt_version != installed and not args.plan_only:
        raise ConfigError(f"TensorRT {installed} is installed here; plans for {args.trt_version} can only be "
                          "written (--plan-only), not built")
    options = BuildOptions(
        precision=args.precision, trt_version=args.trt_version or installed,
        fallback_bundles=tuple(load_bundle(b) for b in args.fallback_bundle),
        hardware_compatibility=args.hardware_compat, version_compatible=args.version_compatible,
        workspace_bytes=None if args.workspace_mib is None else args.workspace_mib << 20,
        optimization_level=args.opt_level,
    )
    plans = make_build_plans(bundle, target, options)
    out = args.out or default_engine_dir(bundle.root, target.id)
    plan_path = write_plans(Path(out) / PLAN_FILE, plans)
    console.print(_plan_table(plans, str(Path(bundle.root).resolve())))
    console.print(f"build plan written to [bold]{plan_path}[/bold]")
    if args.plan_only:
        return 0
    if installed is None:
        raise TensorRTMissing(
            f"TensorRT is not installed here, so nothing was built (the plan is in {plan_path}). "
            + tensorrt_install_hint(None if target.family == "local" else target.family == "jetson")
            + " Then run the same command again."
        )
    from rich.table import Table

    from .builder import build_all

    root = str(Path(bundle.root).resolve())
    rebuild = rebuild_command(root, target.id, plans[0].requested_precision,
                              None if args.out is None else str(Path(args.out).resolve()),
                              [str(Path(b).resolve()) for b in args.fallback_bundle])
    results = build_all(plans, out, root, rebuild, force=args.force, console=console)
    table = Table(title=f"engine set {out} ({target.name}, TensorRT {installed})")
    for col in ("component", "action", "why", "precision", "seconds", "MB"):
        table.add_column(col)
    for r in results:
        e = r.entry
        table.add_row(r.component, r.action, r.reason, e.precision if e else "", f"{r.seconds:.1f}" if r.seconds else "",
                      f"{e.plan_bytes / 1e6:.1f}" if e else "")
    Console().print(table)
    built = sum(r.action != "up to date" for r in results)
    console.print(f"{built} plan(s) built, {len(results) - built} up to date; manifest: {Path(out) / 'manifest.json'}")
    return 0


__all__ = ["add_parsers", "cmd_build"]
