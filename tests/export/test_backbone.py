"""Backbone graphs: ONNX export with dynamic seq/past/batch, cached decode == full pass, causality."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from qinyu_edge.config import QWEN3_8B, TINY_MLA, TINY_QWEN3, UTU_4B, BackboneConfig
from qinyu_edge.errors import ConfigError
from qinyu_edge.export.models.backbone import Backbone, build_backbone
from qinyu_edge.export.onnx_io import compare, export_onnx, run_onnx
from qinyu_edge.runtime.kv_cache import NULL_ROWS

TINY = {"qwen3": dataclasses.replace(TINY_QWEN3, vocab_size=512), "mla": dataclasses.replace(TINY_MLA, vocab_size=512)}


def tiny(name: str, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    model = build_backbone(TINY[name]).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-unit norms, as in a trained checkpoint
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    return model


def cache_views_reaching_concat(path, past_names: tuple[str, ...]) -> list[str]:
    """Concat nodes fed by the cache or by a pure view/copy of it (Shape outputs are only sizes)."""
    import onnx

    views = {"Gather", "Slice", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Identity"}
    graph = onnx.load(str(path)).graph
    derived, bad = set(past_names), []
    for node in graph.node:  # exported graphs are topologically sorted
        if not derived.intersection(node.input):
            continue
        if node.op_type == "Concat":
            bad.append(node.name)
        elif node.op_type in views:
            derived.update(node.output)
    return bad


def ort_cache_readers(path, out_path, past_names: tuple[str, ...]) -> set[str]:
    """Op types that read the cache in ONNX Runtime's optimized graph (default optimizations),
    looking through the ops that alias their input (no copy)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(out_path)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    readers: dict[str, list] = {}
    for node in onnx.load(str(out_path)).graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found, front = set(), list(past_names)
    while front:
        for node in readers.get(front.pop(), []):
            if node.op_type in ("Unsqueeze", "Reshape", "Squeeze"):
                front.extend(node.output)
            else:
                found.add(node.op_type)
    return found


def torch_outputs(model: Backbone, args: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outs = model(*args)
    return {n: o.numpy() for n, o in zip(model.signature().output_names, outs)}


@pytest.mark.parametrize("name", ["qwen3", "mla"])
def test_onnx_dynamic_shapes_and_incremental_decode(name: str, tmp_path):
    model = tiny(name)
    sig = model.signature()
    path = export_onnx(
        model, model.example_inputs(3, 4), tmp_path / "backbone.onnx", sig.input_names, sig.output_names,
        sig.dynamic_axes,
    )
    caches_in = sig.input_names[2:]
    # The past is scored in place, never joined with the new block.
    assert cache_views_reaching_concat(path, caches_in) == []
    # ONNX Runtime fuses the time-major permutes into its matmuls: no transposed or sliced copy.
    assert ort_cache_readers(path, tmp_path / "optimized.onnx", caches_in) <= {"FusedMatMul", "Shape"}
    # Shapes other than the traced (S=3, P=4): prefill without past, decode over short and long pasts,
    # batch 2, and windows with random rows after the past (masked): each against torch on exactly the past.
    for seq, past, batch, ahead in [(1, 0, 1, 0), (7, 0, 1, 0), (7, 0, 1, 9), (1, 5, 1, 0), (1, 5, 1, 59),
                                    (1, 40, 1, 0), (1, 40, 1, 24), (5, 11, 2, 3)]:
        args = model.example_inputs(seq, past, batch, seed=seq * 100 + past, ahead=ahead)
        feeds = {n: a.numpy() for n, a in zip(sig.input_names, args)}
        got = run_onnx(path, feeds)
        exact = (*args[:2], *(c[: NULL_ROWS + past] for c in args[2:]))
        for err in compare(got, torch_outputs(model, exact)):
            assert err.rel <= 1e-4, (seq, past, batch, ahead, err)

    # A whole conversation in ONNX Runtime: prefill 6, then 10 single steps, appending each step's
    # new cache rows to a growing numpy cache, against one full torch pass over all 16 positions.
    embeds = torch.randn(1, 16, model.cfg.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full_hidden = model.forward_full(embeds).numpy()
        full_cache = model.step(embeds, *model.example_inputs(1, 0)[2:])[1:]
    caches = [np.zeros(model.cache_shape(0), np.float32) for _ in model.cache_names]
    for start, stop in [(0, 6)] + [(t, t + 1) for t in range(6, 16)]:
        feeds = dict(zip(sig.input_names, [embeds[:, start:stop].numpy(), np.array([start]), *caches]))
        out = run_onnx(path, feeds)
        (err,) = compare({"h": out["hidden"]}, {"h": full_hidden[:, stop - 1]})
        assert err.rel <= 1e-4, (stop, err)
        caches = [np.concatenate((c, out[f"new_{n}"]), axis=0) for c, n in zip(caches, model.cache_names)]
    for n, c, ref in zip(model.cache_names, caches, full_cache):
        (err,) = compare({n: c[NULL_ROWS:]}, {n: ref.numpy()})
        assert err.rel <= 1e-4, err


@pytest.mark.parametrize("name", ["qwen3", "mla"])
def test_incremental_equals_full(name: str):
    model = tiny(name, seed=2)
    embeds = torch.randn(2, 13, model.cfg.hidden_size)
    with torch.no_grad():
        full = model.forward_full(embeds)
        caches = model.example_inputs(1, 0, batch=2)[2:]
        for start, stop in [(0, 3), (3, 4), (4, 9), (9, 10), (10, 13)]:  # mixed block sizes, not only S=1
            hidden, *news = model.step(embeds[:, start:stop], *caches)
            assert torch.allclose(hidden, full[:, stop - 1], rtol=0, atol=1e-5 * float(full.abs().max()))
            caches = tuple(torch.cat((c, n), dim=0) for c, n in zip(caches, news))
    assert caches[0].shape == model.cache_shape(13, batch=2)


@pytest.mark.parametrize("name", ["qwen3", "mla"])
def test_causal(name: str):
    model = tiny(name, seed=5)
    embeds = torch.randn(1, 10, model.cfg.hidden_size)
    changed = embeds.clone()
    changed[:, 6] += 1.0
    with torch.no_grad():
        a, b = model.forward_full(embeds), model.forward_full(changed)
    assert torch.equal(a[:, :6], b[:, :6])  # nothing before the change may see it
    assert (a[:, 6:] - b[:, 6:]).abs().amax(dim=-1).min() > 1e-3  # everything from it on does


@pytest.mark.parametrize("name", ["qwen3", "mla"])
def test_past_is_attended(name: str):
    """A different past must change the result: the graph really reads the cache."""
    model = tiny(name, seed=6)
    args = model.example_inputs(1, 8, seed=1)
    other = model.example_inputs(1, 8, seed=2)
    with torch.no_grad():
        h1 = model(args[0], *args[1:])[0]
        h2 = model(args[0], *other[1:])[0]
    assert (h1 - h2).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", [QWEN3_8B, UTU_4B], ids=["qwen3-8b", "utu-4b"])
def test_real_sizes_param_count(cfg: BackboneConfig):
    with torch.device("meta"):
        model = build_backbone(cfg)
    n = sum(p.numel() for p in model.parameters())
    lm_head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size  # owned by the heads
    assert n + lm_head == cfg.param_count()
    keys = set(model.state_dict())
    assert f"layers.{cfg.num_layers - 1}.mlp.down_proj.weight" in keys and "norm.weight" in keys
    assert not any("rotary" in k or "inv_freq" in k for k in keys)


def test_bad_config_rejected():
    with pytest.raises(ConfigError):
        build_backbone(dataclasses.replace(TINY["qwen3"], num_key_value_heads=3))
    with pytest.raises(ConfigError):
        build_backbone(dataclasses.replace(TINY["mla"], q_lora_rank=0))


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [QWEN3_8B, UTU_4B], ids=["qwen3-8b", "utu-4b"])
def test_real_width_one_layer_onnx(cfg: BackboneConfig, tmp_path):
    """Real head counts and widths (one layer, tiny vocab): ONNX decode parity, and for MLA the
    absorbed graph against the expanded reference."""
    cfg = dataclasses.replace(cfg, num_layers=1, vocab_size=8)
    torch.manual_seed(0)
    model = build_backbone(cfg).eval()
    sig = model.signature()
    path = export_onnx(model, model.example_inputs(2, 3), tmp_path / "layer.onnx", sig.input_names,
                       sig.output_names, sig.dynamic_axes)
    args = model.example_inputs(1, 64, seed=1)
    got = run_onnx(path, {n: a.numpy() for n, a in zip(sig.input_names, args)})
    ref = torch_outputs(model, args)
    for err in compare(got, ref):
        assert err.rel <= 1e-4, err
    if cfg.is_mla:
        expanded = build_backbone(cfg, absorbed=False).eval()
        expanded.load_state_dict(model.state_dict())
        for err in compare(torch_outputs(expanded, args), ref):
            assert err.rel <= 1e-5, err
