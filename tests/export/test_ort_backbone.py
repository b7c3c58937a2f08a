"""The backbone's ONNX Runtime CPU graph (fused contrib ops, cache updated in place) against the
PyTorch backbone, and its weights shared with the portable graph's side file."""

import numpy as np
import onnx
import pytest
import torch

from qinyu_edge.config import BackboneConfig
from qinyu_edge.export import onnx_io
from qinyu_edge.export.models.backbone import build_backbone
from qinyu_edge.export.ort_backbone import (
    ORT_BACKBONE_FILE,
    ort_backbone_model,
    variant_parity,
    variant_spec,
    write_ort_backbone,
)

CFG = BackboneConfig(arch="qwen3", hidden_size=64, num_layers=2, intermediate_size=160, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=100, rope_theta=1e6, max_position_embeddings=256)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(3)
    bb = build_backbone(CFG).eval()
    with torch.no_grad():  # norms away from one, so a norm weight on the wrong tensor shows
        for name, p in bb.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape))
    return bb


def _portable(backbone, folder):
    sig = backbone.signature()
    axes = {"inputs_embeds": {1: "seq"}} | {n: {0: "past"} for n in sig.input_names[2:]}
    axes |= {n: {0: "seq"} for n in sig.output_names[1:]}
    return onnx_io.export_onnx(backbone, backbone.example_inputs(5, 3), folder / "backbone.onnx", sig.input_names,
                               sig.output_names, axes)


def test_graph_matches_pytorch_over_prefill_steps_and_a_later_prompt(backbone, tmp_path):
    path = tmp_path / ORT_BACKBONE_FILE
    assert write_ort_backbone(backbone, path, _portable(backbone, tmp_path)) == [path]
    rows = variant_parity(backbone, variant_spec(backbone, path.name, (1, 8, 64), 64), path)
    assert {r["inputs"] for r in rows} == {"seq=7 past=0", "seq=1 past=7", "seq=4 past=8", "cache rows 0..11"}
    assert all(r["rel"] < 1e-5 for r in rows), rows
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("GroupQueryAttention") == CFG.num_layers
    # The point of the graph: few nodes per layer.
    assert len(ops) <= 16 * CFG.num_layers + 10


def test_a_wrong_weight_is_caught_by_the_parity_check(backbone, tmp_path):
    path = tmp_path / ORT_BACKBONE_FILE
    model = ort_backbone_model(backbone)
    w = next(t for t in model.graph.initializer if t.name == "layers.1.qk_norm.weight")
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[-1] *= 1.5  # the last k head's norm
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save_model(model, str(path))
    rows = variant_parity(backbone, variant_spec(backbone, path.name, (1, 8, 64), 64), path)
    assert max(r["rel"] for r in rows) > 1e-3


def test_large_weights_point_into_the_portable_side_file(backbone, tmp_path, monkeypatch):
    """Above the side-file threshold the variant holds no second copy of the projections: they are
    read from the portable graph's .data file; only what the portable graph lacks (the RoPE tables)
    goes to a file of its own."""
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 0)
    portable = _portable(backbone, tmp_path)
    assert (tmp_path / "backbone.onnx.data").is_file()
    path = tmp_path / ORT_BACKBONE_FILE
    written = write_ort_backbone(backbone, path, portable)
    assert written == [path, tmp_path / (ORT_BACKBONE_FILE + ".data")]
    model = onnx.load(str(path), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data}.get("location") for t in model.graph.initializer}
    projections = [n for n in where if n.endswith(("qkv.weight", "o_proj.weight", "gate_up.weight", "down_proj.weight"))]
    assert len(projections) == 4 * CFG.num_layers
    assert all(where[n] == "backbone.onnx.data" for n in projections)
    assert where["cos_cache"] == where["sin_cache"] == ORT_BACKBONE_FILE + ".data"
    table = CFG.max_position_embeddings * CFG.head_dim // 2 * 4
    assert (tmp_path / (ORT_BACKBONE_FILE + ".data")).stat().st_size == 2 * table
    rows = variant_parity(backbone, variant_spec(backbone, path.name, (1, 8, 64), 64), path)
    assert all(r["rel"] < 1e-5 for r in rows), rows


def test_cache_is_updated_in_place_and_positions_past_the_length_are_ignored(backbone, tmp_path):
    """Rows beyond `past_length` (a rewound or never-written tail) do not change the result."""
    from qinyu_edge.runtime.kv_cache import KVCache
    from qinyu_edge.runtime.session import OrtSession

    path = tmp_path / ORT_BACKBONE_FILE
    write_ort_backbone(backbone, path, _portable(backbone, tmp_path))
    spec = variant_spec(backbone, path.name, (1, 8, 64), 64)
    session = OrtSession(path, threads=1)
    x = np.random.default_rng(0).standard_normal((1, 6, CFG.hidden_size)).astype(np.float32)
    hidden = np.zeros((1, CFG.hidden_size), np.float32)
    results = []
    for tail in (0.0, 1e3):
        cache = KVCache.for_backbone(spec, 16)
        assert cache.in_place and cache.capacity == 16
        for b in cache.buffers:
            b[..., 5:, :] = tail
        session.run({"inputs_embeds": x[:, :5], **cache.past()}, into={**cache.slot(5), "hidden": hidden})
        cache.advance(5)
        session.run({"inputs_embeds": x[:, 5:], **cache.past()}, into={**cache.slot(1), "hidden": hidden})
        results.append(hidden.copy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
