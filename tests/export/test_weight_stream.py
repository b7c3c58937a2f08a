"""Streamed export (weights as inputs while tracing, then written one tensor at a time) and the
layer-by-layer parity of a backbone that is never built whole."""

import json

import numpy as np
import onnx
import pytest
import torch

from qinyu_edge.export import weight_stream
from qinyu_edge.export.bundle_export import PARITY_TOLERANCE, export_bundle
from qinyu_edge.export.layer_parity import layer_parity
from qinyu_edge.export.onnx_io import compare, export_onnx, run_onnx
from qinyu_edge.export.qinyu_checkpoint import SafetensorsFolder, cache_dir, load_preset, load_qinyu
from qinyu_edge.export.weight_stream import export_streamed
from qinyu_edge import side_file
from qinyu_edge.side_file import ALIGN


def _streamed_model(name: str):
    load_preset(name)
    root = cache_dir() / "presets" / f"{name}-seed0"
    return load_qinyu(root / "checkpoint", root / "sensevoice", root / "models", name=name, tiny=True,
                      stream_backbone=True)


@pytest.mark.parametrize("name", ["tiny-4b", "tiny-8b"])
def test_streamed_graph_equals_the_ordinary_export(name, tmp_path):
    """Same nodes, same folded constants, identical outputs; no weight is left as an input."""
    bb = load_preset(name).backbone
    sig = bb.signature()
    args = bb.example_inputs(5, 3, ahead=2)
    ordinary = export_onnx(bb, args, tmp_path / "a.onnx", sig.input_names, sig.output_names, sig.dynamic_axes)
    streamed = export_streamed(bb, args, tmp_path / "b.onnx", sig.input_names, sig.output_names, sig.dynamic_axes)
    a, b = onnx.load(str(ordinary)), onnx.load(str(streamed))
    assert [i.name for i in b.graph.input] == list(sig.input_names)
    assert sorted(n.op_type for n in a.graph.node) == sorted(n.op_type for n in b.graph.node)
    assert sorted(int(np.prod(t.dims)) for t in a.graph.initializer) == sorted(
        int(np.prod(t.dims)) for t in b.graph.initializer)
    feeds = {n: t.numpy() for n, t in zip(sig.input_names, bb.example_inputs(7, 4, ahead=3, seed=9))}
    assert max(e.max_abs for e in compare(run_onnx(streamed, feeds), run_onnx(ordinary, feeds))) == 0.0
    # The module keeps its own parameters afterwards.
    assert all(isinstance(p, torch.nn.Parameter) and not p.is_meta for p in bb.parameters())


def test_side_file_tensors_are_page_aligned_blockwise_and_read_back(tmp_path, monkeypatch):
    bb = load_preset("tiny-8b").backbone
    sig = bb.signature()
    args = bb.example_inputs(3, 2)
    monkeypatch.setattr(weight_stream, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(side_file, "BLOCK_BYTES", 256)  # transposes written a few rows at a time
    path = export_streamed(bb, args, tmp_path / "b.onnx", sig.input_names, sig.output_names, sig.dynamic_axes)
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and (tmp_path / "b.onnx.data").is_file()
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "b.onnx.data" and int(info["offset"]) % ALIGN == 0
    feeds = {n: t.numpy() for n, t in zip(sig.input_names, args)}
    with torch.no_grad():
        ref = bb(*args)
    got = run_onnx(path, feeds)
    assert compare(got, dict(zip(sig.output_names, (t.numpy() for t in ref))))[0].rel < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.onnx", "b.onnx.data"]  # no temporary left


def test_a_failing_weight_source_leaves_nothing(tmp_path):
    bb = load_preset("tiny-4b").backbone
    sig = bb.signature()

    def broken(name: str) -> np.ndarray:
        raise OSError(f"shard unreadable at {name}")

    with pytest.raises(OSError, match="shard unreadable"):
        export_streamed(bb, bb.example_inputs(3, 2), tmp_path / "b.onnx", sig.input_names, sig.output_names,
                        sig.dynamic_axes, weights=broken)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["tiny-4b", "tiny-8b"])
def test_hollow_backbone_bundle_matches_the_built_one(name, tmp_path):
    """A backbone streamed from the shards gives the same graph and spec as one built in memory,
    and its parity rows say they were run layer by layer."""
    model = _streamed_model(name)
    assert model.backbone_weights is not None
    assert all(p.is_meta for p in model.backbone.parameters())
    export_bundle(model, tmp_path / "s")
    export_bundle(load_preset(name), tmp_path / "m")
    s, m = (json.loads((tmp_path / k / "bundle.json").read_text()) for k in ("s", "m"))
    assert s["components"]["backbone"] == m["components"]["backbone"]
    assert s["components"]["decode"] == m["components"]["decode"]
    assert s["parity"]["ok"]
    rows = json.loads((tmp_path / "s" / "parity.json").read_text())["rows"]
    layered = [r for r in rows if r["component"] == "backbone"]
    assert layered and all("layer by layer" in r["inputs"] for r in layered)
    assert {r["output"] for r in layered} >= {"hidden (end to end)"}
    feeds = {n: t.numpy() for n, t in zip(model.backbone.signature().input_names,
                                          load_preset(name).backbone.example_inputs(4, 6, ahead=1, seed=2))}
    got = run_onnx(tmp_path / "s" / "backbone.onnx", feeds)
    ref = run_onnx(tmp_path / "m" / "backbone.onnx", feeds)
    assert max(e.max_abs for e in compare(got, ref)) == 0.0


def test_layer_parity_names_the_layer_whose_weights_differ(tmp_path):
    model = _streamed_model("tiny-8b")
    bb = model.backbone
    sig = bb.signature()
    path = export_streamed(bb, bb.example_inputs(3, 2), tmp_path / "b.onnx", sig.input_names, sig.output_names,
                           sig.dynamic_axes, weights=model.backbone_weights)
    cases = [dict(zip(sig.input_names, load_preset("tiny-8b").backbone.example_inputs(5, 3, ahead=2, seed=1)))]
    rows = layer_parity(path, bb, model.backbone_weights, cases, PARITY_TOLERANCE)
    assert all(r["ok"] for r in rows), rows

    def off_in_layer_1(name: str) -> np.ndarray:
        w = model.backbone_weights(name)
        return w * 1.01 if name == "layers.1.mlp.down_proj.weight" else w

    rows = layer_parity(path, bb, off_in_layer_1, cases, PARITY_TOLERANCE)
    bad = {r["output"] for r in rows if not r["ok"]}
    assert "hidden of each layer (worst: 1)" in bad and "hidden (end to end)" in bad


def test_checkpoint_folder_reads_tensors_on_demand_as_safetensors_does(tmp_path):
    from safetensors.torch import load_file

    load_preset("tiny-4b")
    ckpt = cache_dir() / "presets" / "tiny-4b-seed0" / "checkpoint"
    folder = SafetensorsFolder(ckpt)
    every = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        every.update(load_file(str(shard)))
    assert set(folder) == set(every) and len(folder) == len(every)
    meta = folder.meta()
    for key, t in every.items():
        assert meta[key].shape == t.shape and meta[key].dtype == t.dtype and meta[key].is_meta
        assert torch.equal(folder[key], t)


def test_bench_export_memory_times_every_stage_and_cleans_up(tmp_path):
    import subprocess
    import sys

    work = tmp_path / "work"
    out = subprocess.run([sys.executable, "-m", "qinyu_edge.export.bench_export_memory", "tiny-4b", "--work", str(work)],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    report = json.loads(out[out.index("\n{") + 1:])
    stages = report["stages"]
    names = ["encoder", "audio_projector", "speaker_projector", "embedding", "backbone", "heads_logits",
             "heads_greedy", "xy_decoder", "campplus"]
    assert list(stages) == ["write random checkpoint", "load_qinyu",
                            *(f"{k} {n}" for n in names for k in ("export", "parity")),
                            "export backbone (ort cpu)", "fused decode graphs"]
    assert all(s["peak_rss_gb"] > 0.05 and s["seconds"] >= 0 for s in stages.values())
    assert report["peak_rss_gb"] >= max(s["peak_rss_gb"] for s in stages.values()) - 0.01
    assert report["bundle bytes"]["backbone.onnx"] > 0 and not work.exists()


@pytest.mark.parametrize("external", [True, False])
def test_host_table_is_the_embedding_graphs_side_file(tmp_path, monkeypatch, external):
    """The runtime's memory-mapped table and the embedding graph's table are one file: the table is
    moved, block by block, from the graph (inline, tiny) or its side file (real size) into a .npy
    whose data starts on a page, and the graph points there. Done twice, it changes nothing."""
    import onnxruntime as ort

    from qinyu_edge.engines.decode_graphs import write_host_embedding

    emb = load_preset("tiny-4b").embedding
    if external:
        monkeypatch.setattr(weight_stream, "EXTERNAL_DATA_BYTES", 0)
    ids = torch.zeros(1, 3, 8, dtype=torch.int64)
    path = export_streamed(emb, (ids,), tmp_path / "embedding.onnx", ["ids"], ["inputs_embeds"],
                           {"ids": {1: "seq", 2: "k"}})
    side = tmp_path / "embedding.onnx.data"
    assert side.is_file() == external
    assert write_host_embedding(path) == side.name
    table = np.load(side, mmap_mode="r")
    assert table.dtype == np.float32 and np.array_equal(table, emb.weight.numpy())
    assert table.offset == ALIGN and side.stat().st_size == ALIGN + table.nbytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedding.onnx", "embedding.onnx.data"]
    feeds = {"ids": np.array([[[1, 2, 3, 4, 5, 6, 7, 8]]], np.int64)}
    want = emb(torch.from_numpy(feeds["ids"])).detach().numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    before = side.stat().st_mtime_ns, path.read_bytes()
    assert write_host_embedding(path) == side.name
    assert (side.stat().st_mtime_ns, path.read_bytes()) == before


def test_a_cut_side_file_is_refused_and_the_graph_left_alone(tmp_path, monkeypatch):
    from qinyu_edge.engines.decode_graphs import write_host_embedding

    emb = load_preset("tiny-4b").embedding
    monkeypatch.setattr(weight_stream, "EXTERNAL_DATA_BYTES", 0)
    path = export_streamed(emb, (torch.zeros(1, 3, 8, dtype=torch.int64),), tmp_path / "embedding.onnx", ["ids"],
                           ["inputs_embeds"], {"ids": {1: "seq", 2: "k"}})
    side = tmp_path / "embedding.onnx.data"
    side.write_bytes(side.read_bytes()[:1000])
    graph = path.read_bytes()
    with pytest.raises(ValueError, match="embedding.onnx.data ends inside a tensor"):
        write_host_embedding(path)
    assert path.read_bytes() == graph and side.stat().st_size == 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedding.onnx", "embedding.onnx.data"]
