"""Peak RSS and wall time of each stage of `qinyu-edge export` on random real-layout weights.

    python -m qinyu_edge.export.bench_export_memory qinyu-4b --layers 2 --work /tmp/bench

Stages: writing the random checkpoint, loading it (`load_qinyu`), exporting with parity
(`export_bundle`; its per-component export seconds are in parity.json). RSS is sampled every
50 ms from /proc/self/status, so a peak shorter than that can be missed; ru_maxrss is printed too.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def stage(name: str, report: dict[str, dict[str, float]]) -> Iterator[None]:
    peak = [_rss()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _rss())

    thread = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        report[name] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(max(peak[0], _rss()) / 1e9, 2)}
        print(name, report[name], flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", choices=["qinyu-4b", "qinyu-8b", "tiny-4b", "tiny-8b"])
    p.add_argument("--layers", type=int)
    p.add_argument("--work", type=Path, required=True, help="scratch folder (removed at the end)")
    p.add_argument("--write-only", action="store_true", help="measure only the random checkpoint writer")
    args = p.parse_args()

    from .bundle_export import export_bundle
    from .qinyu_checkpoint import load_qinyu
    from .random_checkpoint import random_config, write_random_checkpoint

    cfg = random_config(args.preset, args.layers)
    report: dict[str, dict[str, float]] = {}
    try:
        with stage("write random checkpoint", report):
            f = write_random_checkpoint(cfg, args.work / "folders")
        if not args.write_only:
            with stage("load_qinyu", report):
                model = load_qinyu(f["checkpoint"], f["sensevoice"], f["models"], name=cfg.name, tiny=cfg.tiny)
            with stage("export_bundle (export + parity)", report):
                bundle = export_bundle(model, args.work / "bundle", force=True)
            report["export seconds per component"] = bundle.parity["export_seconds"]
            report["bundle bytes"] = {name: e.bytes for name, e in bundle.files.items()}
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    report["ru_maxrss_gb"] = {"all": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
