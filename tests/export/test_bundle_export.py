"""`qinyu-edge export` end to end on both tiny presets: files, manifest, parity, refusal rules."""

import json

import numpy as np
import onnx
import pytest
import torch

from qinyu_edge.bundle import FORMAT_VERSION, MANIFEST, OLDEST_READABLE, load_bundle
from qinyu_edge.cli import main
from qinyu_edge.errors import BundleError
from qinyu_edge.export.bundle_export import export_bundle
from qinyu_edge.export.qinyu_checkpoint import load_preset
from qinyu_edge.runtime.kv_cache import NULL_ROWS

COMPONENTS = {"encoder", "audio_projector", "speaker_projector", "embedding", "backbone",
              "heads_logits", "heads_greedy", "xy_decoder", "campplus", "decode"}


@pytest.fixture(scope="module", params=["tiny-4b", "tiny-8b"])
def exported(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / request.param
    assert main(["export", "--preset", request.param, "--out", str(out)]) == 0
    return request.param, out


def test_bundle_has_every_component_and_passes_parity(exported):
    name, out = exported
    bundle = load_bundle(out)
    assert set(bundle.components) == COMPONENTS
    assert bundle.format_version == FORMAT_VERSION and bundle.config.name == name
    assert bundle.parity["ok"] and bundle.parity["worst_rel"] <= 1e-4
    rows = json.loads((out / "parity.json").read_text())["rows"]
    # The Qwen3 backbone also has its ONNX Runtime CPU graph, checked like the components, and the
    # fused decode graph one made from it.
    variants = {"backbone", "decode"} if name == "tiny-8b" else set()
    assert set(bundle.ort_variants) == variants
    assert {r["component"] for r in rows} == COMPONENTS | ({"backbone (ort cpu)"} if variants else set())
    for v in variants:
        spec = bundle.ort_variants[v]
        model = onnx.load(str(out / spec.file))
        assert {o.domain for o in model.opset_import} == {"", "com.microsoft"}
        assert [i.name for i in model.graph.input] == [t.name for t in spec.inputs]
        assert [o.name for o in model.graph.output] == [t.name for t in spec.outputs]
    assert all(r["rel"] <= 1e-4 for r in rows)
    for comp in bundle.components.values():
        model = onnx.load(str(out / comp.file))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == [t.name for t in comp.inputs]
        assert [o.name for o in model.graph.output] == [t.name for t in comp.outputs]
        for axis in {a for t in comp.inputs for a in t.shape if isinstance(a, str)}:
            lo, opt, hi = comp.shape_ranges[axis]
            assert lo <= opt <= hi


def test_backbone_cache_signature(exported):
    name, out = exported
    bundle = load_bundle(out)
    b = bundle.config.backbone
    spec = bundle.components["backbone"]
    shapes = {t.name: t.shape for t in spec.inputs + spec.outputs}
    kinds = ("latent",) if b.is_mla else ("key", "value")
    entry = (b.kv_lora_rank + b.qk_rope_head_dim,) if b.is_mla else (b.num_key_value_heads, b.head_dim)
    # One time-major tensor per layer and kind, in layer order, each with a new-positions output.
    past = [f"past_{k}_{i}" for i in range(b.num_layers) for k in kinds]
    assert [t.name for t in spec.inputs] == ["inputs_embeds", "past_length", *past]
    assert shapes["past_length"] == (1,) and next(t for t in spec.inputs if t.name == "past_length").dtype == "int64"
    for n in past:
        assert shapes[n] == ("past", 1, *entry)
        assert shapes["new_" + n.removeprefix("past_")] == ("seq", 1, *entry)
    assert shapes["hidden"] == (1, b.hidden_size)
    # Prefill runs the same graph with only the null row as its past.
    assert spec.shape_ranges["past"][0] == NULL_ROWS


def test_tampered_file_is_refused(exported, tmp_path, flip_byte):
    import shutil

    name, out = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    flip_byte(copy / "heads_logits.onnx")
    with pytest.raises(BundleError, match="heads_logits.onnx"):
        load_bundle(copy)
    (copy / "campplus.onnx").unlink()
    with pytest.raises(BundleError, match="campplus.onnx: missing"):
        load_bundle(copy)


def test_newer_format_is_refused(exported, tmp_path):
    import shutil

    name, out = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    d = json.loads((copy / MANIFEST).read_text())
    d["format_version"] = FORMAT_VERSION + 1
    (copy / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BundleError, match="Upgrade qinyu-edge"):
        load_bundle(copy)
    d["format_version"] = OLDEST_READABLE - 1
    (copy / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BundleError, match="Export the bundle again"):
        load_bundle(copy)
    # Format 3 differs only by lacking the optional ONNX Runtime variants: still read.
    d["format_version"] = 3
    del d["ort_variants"]
    (copy / MANIFEST).write_text(json.dumps(d))
    assert load_bundle(copy).ort_variants == {}


def test_existing_output_needs_force(exported, capsys):
    name, out = exported
    before = (out / MANIFEST).read_bytes()
    assert main(["export", "--preset", name, "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / MANIFEST).read_bytes() == before


def test_failed_export_leaves_nothing(tmp_path):
    model = load_preset("tiny-4b")

    class Broken(torch.nn.Module):
        def forward(self, codes):
            raise RuntimeError("simulated failure while tracing")

    model.xy = Broken()
    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated"):
        export_bundle(model, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_an_existing_bundle(tmp_path, capsys, assert_peak_line):
    out = tmp_path / "b"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["export", "--preset", "tiny-8b", "--out", str(out), "--force"]) == 0
    assert_peak_line(capsys.readouterr().err, "export")
    assert not (out / "stale.txt").exists()
    assert load_bundle(out).config.name == "tiny-8b"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_greedy_graph_agrees_with_logits_graph(exported):
    """The fused head's text choice equals argmax of the masked logits when no penalty applies."""
    import onnxruntime as ort

    name, out = exported
    bundle = load_bundle(out)
    lay = bundle.layout
    greedy = ort.InferenceSession(str(bundle.path("heads_greedy")), providers=["CPUExecutionProvider"])
    logits = ort.InferenceSession(str(bundle.path("heads_logits")), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for _ in range(5):
        hidden = rng.normal(size=(1, bundle.config.backbone.hidden_size)).astype(np.float32)
        ids = greedy.run(None, {"hidden": hidden, "history": -np.ones((1, 5), np.int64)})[0][0]
        lg = logits.run(None, {"hidden": hidden})[0][0]
        masked = lg.copy()
        masked[lay.book_start(1):lay.audio_end] = -1e10
        assert ids[0] == int(np.argmax(masked))
        for k in range(1, 8):
            s = lay.book_start(k)
            assert ids[k] == s + int(np.argmax(lg[s:s + lay.ids_per_book]))


def test_dtype_fp16_quantizes_the_export_and_removes_the_fp32_bundle(tmp_path, capsys, monkeypatch):
    out = tmp_path / "b16"
    assert main(["export", "--preset", "tiny-4b", "--out", str(out), "--dtype", "fp16"]) == 0
    printed = capsys.readouterr().err  # export's console, the quantize report included
    bundle = load_bundle(out)
    assert set(bundle.origin["precision"].values()) == {"fp16"}
    assert bundle.origin["quantization"]["recipe"] == "fp16" and bundle.origin["quantization"]["accuracy"]
    assert "greedy tokens vs fp32" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["b16"]
    # An existing --out is refused before anything is exported.
    before = (out / MANIFEST).read_bytes()
    assert main(["export", "--preset", "tiny-4b", "--out", str(out), "--dtype", "fp16"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / MANIFEST).read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["b16"]

    # A failed quantization keeps the fp32 bundle and says how to finish from it.
    from qinyu_edge.engines import quant_cli
    from qinyu_edge.engines.quantize import QuantizationError

    def fail(args, console):
        raise QuantizationError("simulated: the quantizer gave up")

    monkeypatch.setattr(quant_cli, "_quantize", fail)
    again = tmp_path / "again"
    assert main(["export", "--preset", "tiny-8b", "--out", str(again), "--dtype", "fp16"]) == 2
    captured = capsys.readouterr()
    assert "simulated" in captured.err
    # (rich folds long lines, paths included, wherever the width ends)
    finish = f"qinyu-edge quantize --bundle {again}.fp32 --out {again} --recipe fp16"
    assert "".join(finish.split()) in "".join(captured.err.split())
    assert load_bundle(tmp_path / "again.fp32").config.name == "tiny-8b" and not again.exists()
