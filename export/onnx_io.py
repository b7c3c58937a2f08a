"""Trace one PyTorch module to one ONNX file, and compare the file against the module.

The TorchScript-based exporter is used: it traces our small, explicit graphs in a fraction of a
second where the dynamo exporter takes seconds per graph, and our modules avoid the data-dependent
control flow that would need dynamo. Every graph passes `onnx.checker` with full shape inference.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import torch

from qinyu_edge.side_file import EXTERNAL_DATA_BYTES

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is native from 17; TensorRT 10.3 parses it


def export_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> Path:
    """Export `module(*args)` to `path`, check it, and return the path.

    Written to a temporary file beside the target and renamed, so a failed export leaves nothing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp:
        raw = Path(tmp) / path.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about python scalars are expected
            torch.onnx.export(
                module, args, str(raw), input_names=list(input_names), output_names=list(output_names),
                dynamic_axes=dict(dynamic_axes or {}), opset_version=OPSET, dynamo=False,
                do_constant_folding=True,
            )
        model = onnx.load(str(raw))
        if n_bytes > EXTERNAL_DATA_BYTES:
            onnx.save_model(model, str(raw), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
            onnx.checker.check_model(str(raw), full_check=True)
            os.replace(Path(tmp) / (path.name + ".data"), path.parent / (path.name + ".data"))
        else:
            onnx.checker.check_model(model, full_check=True)
        os.replace(raw, path)
    log.info("exported %s", path)
    return path


@dataclass(frozen=True)
class OutputError:
    name: str
    max_abs: float
    rel: float  # max |a-b| / max |b|: one number per output, robust to tiny entries


def compare(ours: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> list[OutputError]:
    """Relative error of each output: max |ours - ref| over max |ref|."""
    errors = []
    for name, ref in reference.items():
        got = np.asarray(ours[name])
        ref = np.asarray(ref)
        if got.shape != ref.shape:
            raise AssertionError(f"output {name}: shape {got.shape} != reference {ref.shape}")
        if np.issubdtype(ref.dtype, np.integer):
            diff = float(np.abs(got.astype(np.int64) - ref.astype(np.int64)).max(initial=0))
            errors.append(OutputError(name, diff, 0.0 if diff == 0 else float("inf")))
            continue
        diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max(initial=0.0))
        scale = float(np.abs(ref.astype(np.float64)).max(initial=0.0))
        errors.append(OutputError(name, diff, diff / scale if scale > 0 else diff))
    return errors


def run_onnx(path: str | os.PathLike, feeds: Mapping[str, np.ndarray], threads: int = 2,
             disabled_optimizers: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Run a file in ONNX Runtime on the CPU; outputs by name."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # A check runs a graph a few times: prepacked copies of its weights would only hold them twice
    # (2.6 GB more for the 8B's lm_head).
    opts.add_session_config_entry("session.disable_prepacking", "1")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds))))
