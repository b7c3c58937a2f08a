"""Real-size components with random weights, for benchmarks that need the real shapes (no checkpoint)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from qinyu_edge.config import XYDecoderConfig

from .models.xy_decoder import XYDecoder
from .onnx_io import export_onnx

log = logging.getLogger(__name__)


def export_real_size_xy(folder: Path, seed: int) -> Path:
    """Export the real-size XY decoder with random weights once; reuse the file afterwards."""
    path = folder / f"xy_decoder_real_random_seed{seed}.onnx"
    if path.is_file():
        return path
    torch.manual_seed(seed)
    module = XYDecoder(XYDecoderConfig()).eval()
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name.endswith("codebook"):  # zeros until a checkpoint fills them
                buf.normal_()
    log.info("exporting the real-size XY decoder (random weights) to %s", path)
    codes = torch.randint(0, 1024, (1, 8, 24))
    return export_onnx(module, (codes,), path, ["codes"], ["wav"], {"codes": {2: "frames"}, "wav": {1: "samples"}})
