"""CAM++ module: checkpoint key layout, segment pooling, ONNX export with a dynamic frame count."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qinyu_edge.config import TINY_CAMPP, CamPPConfig
from qinyu_edge.export.models.campplus import CAMPPlus, segment_mean
from qinyu_edge.export.onnx_io import compare, export_onnx, run_onnx

log = logging.getLogger(__name__)

# Counted on 3D-Speaker's own CAMPPlus(feat_dim=80, embedding_size=192) (speakerlab/models/campplus/DTDNN.py).
UPSTREAM_PARAMS = 6_848_544
UPSTREAM_STATE_KEYS = 937


def randomize(module: CAMPPlus, seed: int = 0) -> CAMPPlus:
    """Non-trivial weights and BatchNorm statistics, so a wrong BN or pooling path shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return module.eval()


def _export(module: CAMPPlus, path, frames: int = 237):
    return export_onnx(
        module, (torch.randn(1, frames, module.cfg.feat_dim),), path, ["fbank"], ["embedding"],
        {"fbank": {0: "batch", 1: "frames"}, "embedding": {0: "batch"}},
    )


def test_real_layout_matches_upstream_counts():
    module = CAMPPlus(CamPPConfig())
    state = module.state_dict()
    assert len(state) == UPSTREAM_STATE_KEYS
    assert sum(p.numel() for p in module.parameters()) == UPSTREAM_PARAMS
    for i, n_layers in enumerate((12, 24, 16), start=1):
        assert f"xvector.block{i}.tdnnd{n_layers}.cam_layer.linear2.bias" in state
        assert f"xvector.block{i}.tdnnd{n_layers + 1}.linear1.weight" not in state
    # Only the first, frequency-strided residual block of each FCM stage has a projection shortcut.
    assert state["head.layer1.0.shortcut.0.weight"].shape == (32, 32, 1, 1)
    assert not any(k.startswith("head.layer1.1.shortcut") for k in state)
    # The final BatchNorm has running statistics but no affine parameters.
    assert "xvector.dense.nonlinear.batchnorm.running_var" in state
    assert "xvector.dense.nonlinear.batchnorm.weight" not in state
    assert state["xvector.dense.linear.weight"].shape == (192, 1024, 1)
    assert state["xvector.tdnn.linear.weight"].shape == (128, 320, 5)


@pytest.mark.parametrize("seg", [100, 7])
@pytest.mark.parametrize("length", [1, 6, 7, 75, 100, 119, 250])
def test_segment_mean_equals_ceil_mode_avg_pool(seg, length):
    x = torch.randn(2, 3, length)
    # Upstream's formulation: ceil-mode average pooling, each segment mean repeated over its frames.
    pooled = F.avg_pool1d(x, kernel_size=seg, stride=seg, ceil_mode=True)
    expected = pooled.repeat_interleave(seg, dim=-1)[..., :length]
    torch.testing.assert_close(segment_mean(x, seg), expected, rtol=1e-6, atol=1e-6)


def test_batch_rows_are_independent():
    module = randomize(CAMPPlus(TINY_CAMPP))
    x = torch.randn(3, 180, 80)
    with torch.no_grad():
        batched = module(x)
        single = torch.cat([module(x[i:i + 1]) for i in range(3)])
    assert batched.shape == (3, TINY_CAMPP.embedding_size)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_onnx_dynamic_frames(tmp_path):
    module = randomize(CAMPPlus(TINY_CAMPP))
    path = _export(module, tmp_path / "campplus.onnx", frames=237)
    # 150 -> 75 TDNN frames (one partial segment), 237 -> 119 (one full + one partial), 400 -> 200 (two full).
    for frames, batch in ((150, 1), (237, 2), (400, 3)):
        x = torch.randn(batch, frames, 80)
        with torch.no_grad():
            ref = module(x).numpy()
        assert np.abs(ref).max() > 1e-2
        (err,) = compare(run_onnx(path, {"fbank": x.numpy()}), {"embedding": ref})
        assert err.rel <= 1e-4, (frames, err)


@pytest.mark.slow
def test_real_config_export(tmp_path):
    module = randomize(CAMPPlus(CamPPConfig()))
    path = _export(module, tmp_path / "campplus.onnx", frames=998)
    x = torch.randn(1, 998, 80)  # one 10 s chunk
    with torch.no_grad():
        ref = module(x).numpy()
    (err,) = compare(run_onnx(path, {"fbank": x.numpy()}), {"embedding": ref})
    assert err.rel <= 1e-4, err
    x2 = torch.randn(2, 611, 80)
    with torch.no_grad():
        ref2 = module(x2).numpy()
    (err2,) = compare(run_onnx(path, {"fbank": x2.numpy()}), {"embedding": ref2})
    assert err2.rel <= 1e-4, err2

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"fbank": x.numpy()}
    sess.run(None, feed)
    t0 = time.perf_counter()
    runs = 3
    for _ in range(runs):
        sess.run(None, feed)
    ms = (time.perf_counter() - t0) / runs * 1000
    log.info("CAM++ real: %d params, ONNX %.1f MB, %.0f ms per 10 s chunk (CPU, 2 threads)",
             sum(p.numel() for p in module.parameters()), os.path.getsize(path) / 1e6, ms)
