"""Time VoiceDesign's real-size estimator in ONNX Runtime on this CPU (random weights, real shapes).

    .venv/bin/python -m qinyu_edge.export.bench_voice_design [--threads N] [--designs N]

Prints the graph's parity against PyTorch, and milliseconds per design both as upstream runs it (two
calls of batch 1 per step, 40 calls) and as runtime/voice_designer.py does (one call of batch 2 per
step, 20 calls).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qinyu_edge.voice_sampling import REAL

from .models.voice_design import DiTEstimator
from .onnx_io import compare, export_onnx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--designs", type=int, default=5)
    args = p.parse_args(argv)
    import onnxruntime as ort

    from .voice_design_onnx import Velocity

    torch.manual_seed(0)
    module = Velocity(DiTEstimator(REAL)).eval()
    params = sum(t.numel() for t in module.parameters())
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        x, cond = (torch.from_numpy(rng.standard_normal((2, 192)).astype(np.float32)) for _ in range(2))
        t = torch.tensor([0.3])
        path = export_onnx(module, (x, t, cond), Path(tmp) / "voice_estimator.onnx", ["x", "t", "cond"], ["velocity"],
                           {"x": {0: "batch"}, "cond": {0: "batch"}, "velocity": {0: "batch"}})
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = module(x, t, cond).numpy()
        rel = compare({"v": sess.run(None, {"x": x.numpy(), "t": t.numpy(), "cond": cond.numpy()})[0]}, {"v": ref})[0].rel
        print(f"real-size estimator: {params / 1e6:.2f}M params, ONNX parity rel {rel:.1e}, {args.threads} threads")
        for batch, calls in ((1, 2 * REAL.n_steps), (2, REAL.n_steps)):
            feeds = {"x": x.numpy()[:batch], "t": t.numpy(), "cond": cond.numpy()[:batch]}
            sess.run(None, feeds)  # warm-up
            start = time.perf_counter()
            for _ in range(args.designs * calls):
                sess.run(None, feeds)
            per_design = (time.perf_counter() - start) * 1e3 / args.designs
            print(f"  batch {batch} x {calls} calls: {per_design:.1f} ms per design ({per_design / calls:.2f} ms per call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
