"""Peak RSS and wall time of each stage of `qinyu-edge export` on random real-layout weights.

    python -m qinyu_edge.export.bench_export_memory qinyu-4b --layers 2 --work /tmp/bench

Stages: writing the random checkpoint, loading it (`load_qinyu`), then each stage of
`export_bundle` (every component's export and parity, the fused decode graphs). RSS is sampled
every 50 ms, so a peak shorter than that can be missed; the process's high-water mark is printed
too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

from qinyu_edge.device.telemetry import peak_rss_bytes, rss_bytes


class StageSampler:
    """Time and peak RSS per named stage; `enter(name)` starts the next one."""

    def __init__(self) -> None:
        self.report: dict[str, dict[str, float]] = {}
        self._name: str | None = None
        self._t0 = 0.0
        self._peak = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            with self._lock:
                self._peak = max(self._peak, rss_bytes() or 0)

    def enter(self, name: str | None) -> None:
        with self._lock:
            now = time.perf_counter()
            if self._name is not None:
                self.report[self._name] = {"seconds": round(now - self._t0, 1),
                                           "peak_rss_gb": round(max(self._peak, rss_bytes() or 0) / 1e9, 2)}
                print(self._name, self.report[self._name], flush=True)
            self._name, self._t0, self._peak = name, now, rss_bytes() or 0

    def close(self) -> None:
        if self._done.is_set():
            return
        self.enter(None)
        self._done.set()
        self._thread.join()


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
    stages = StageSampler()
    report: dict[str, object] = {"stages": stages.report}
    try:
        stages.enter("write random checkpoint")
        f = write_random_checkpoint(cfg, args.work / "folders")
        if not args.write_only:
            stages.enter("load_qinyu")
            model = load_qinyu(f["checkpoint"], f["sensevoice"], f["models"], name=cfg.name, tiny=cfg.tiny)
            bundle = export_bundle(model, args.work / "bundle", force=True, on_stage=stages.enter)
            report["bundle bytes"] = {name: e.bytes for name, e in bundle.files.items()}
    finally:
        stages.close()
        shutil.rmtree(args.work, ignore_errors=True)
    report["peak_rss_gb"] = round((peak_rss_bytes() or 0) / 1e9, 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
