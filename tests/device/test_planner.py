"""The memory planner and decode roofline against model-spec section 7, the field notes' measured
decode rates, and its own invariants; `qinyu-edge plan` and its errors."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from qinyu_edge.cli import main
from qinyu_edge.config import BackboneConfig, preset
from qinyu_edge.device.planner import (
    ELEMENT_BYTES, MIN_USEFUL_CONTEXT, PlanOptions, Recipe, backbone_params, budget_bytes, bytes_per_param, check_recipe,
    decode_bytes_per_step, fits,
    kv_bytes_per_token, longest_context, make_plan, memory_items, plan_for, roofline_steps_per_s, total_bytes,
    weight_bytes_per_step,
)
from qinyu_edge.device.targets import TARGETS
from qinyu_edge.errors import ConfigError

Q8, Q4 = preset("qinyu-8b"), preset("qinyu-4b")
JETSONS = [t for t in TARGETS.values() if t.family == "jetson"]


def gb(n: float) -> float:
    return round(n / 1e9, 2)


# --- model-spec section 7 ------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, precision, spec_gb", [
    (Q8, "fp16", 15.20), (Q8, "int8", 7.60), (Q8, "int4", 3.80),
    (Q4, "fp16", 9.04), (Q4, "int8", 4.52), (Q4, "int4", 2.26),
])
def test_per_step_weight_bytes_reproduce_model_spec(cfg, precision, spec_gb):
    # The spec's convention: all layers plus the full lm_head, one precision, no scales. The 4B's
    # absorbed MLA matrices (0.168B params) stay fp16 under every recipe, as quantize leaves them.
    kept = backbone_params(cfg).batched * (ELEMENT_BYTES["fp16"] - bytes_per_param(precision))
    assert (kept > 0) == (cfg is Q4 and precision != "fp16")
    assert gb(weight_bytes_per_step(cfg, Recipe.uniform(precision)) - kept) == spec_gb


@pytest.mark.parametrize("cfg, precision, spec_gb", [
    (Q8, "fp16", 16.51), (Q8, "int8", 8.26), (Q8, "int4", 4.13), (Q4, "int8", 4.52), (Q4, "int4", 2.26),
])
def test_whole_backbone_weights_reproduce_model_spec(cfg, precision, spec_gb):
    items = memory_items(cfg, TARGETS["agx-thor"], Recipe.uniform(precision), 1,
                         PlanOptions(host_embedding=False, separate_embedding=False))
    backbone = sum(i.bytes for i in items if i.name in ("backbone layers", "lm_head", "embedding table"))
    kept = backbone_params(cfg).batched * (ELEMENT_BYTES["fp16"] - bytes_per_param(precision))
    assert gb(backbone - kept) == spec_gb


def test_int4_4b_backbone_is_the_size_quantize_writes():
    """`quantize --recipe int4-awq` on the real-size 4B (random weights in the real layout) wrote a
    backbone.onnx.data of 2,403,175,820 bytes: 2-D weights INT4 with fp16 group scales, the absorbed
    MLA matrices and norms fp16."""
    layers = next(i for i in memory_items(Q4, TARGETS["orin-nano-8"], Recipe("int4"), 1) if i.name == "backbone layers")
    assert layers.bytes == pytest.approx(2_403_175_820, rel=0.005)
    assert "0.168B absorbed per-head params at fp16" in layers.note


def test_int4_group_scales_add_one_fp16_per_128_weights():
    bp = backbone_params(Q4)
    fp16 = (bp.norms + bp.batched) * ELEMENT_BYTES["fp16"]  # no scales on what stays fp16
    plain = weight_bytes_per_step(Q4, Recipe.uniform("int4")) - fp16
    scaled = weight_bytes_per_step(Q4, Recipe("int4", lm_head="int4")) - fp16
    assert scaled / plain == pytest.approx((0.5 + 2 / 128) / 0.5, rel=1e-3)


def test_default_recipes_keep_lm_head_and_embedding_fp16():
    for p in ("int4", "int8", "fp8"):
        r = Recipe(p).resolved()
        assert (r.backbone, r.lm_head, r.embedding, r.kv_cache) == (p, "fp16", "fp16", "fp16")
    assert Recipe("fp32").resolved().kv_cache == "fp32" and Recipe("fp32").resolved().lm_head == "fp32"
    # With lm_head kept fp16, an 8B int8 step reads layers at 1 byte and the 0.655B-row head at 2.
    bp = backbone_params(Q8)
    expected = bp.linear + 2 * bp.norms + 2 * bp.vocab_matrix
    assert weight_bytes_per_step(Q8, Recipe("int8")) == expected


def test_kv_bytes_per_token_reproduce_model_spec():
    assert kv_bytes_per_token(Q8) == 144 * 1024
    assert kv_bytes_per_token(Q4) == 45 * 1024  # the MLA latent (512) plus the rope key (64)
    # The spec's 800 KiB for the 4B "as HF caches it": per-head K (192) and V (128) for 32 heads.
    b = Q4.backbone
    expanded = b.num_layers * b.num_attention_heads * (b.qk_head_dim + b.v_head_dim) * 2
    assert expanded == 800 * 1024 and expanded / kv_bytes_per_token(Q4) > 17
    assert kv_bytes_per_token(Q8, "fp8") == kv_bytes_per_token(Q8) // 2


# --- roofline --------------------------------------------------------------------------------------

def test_roofline_is_bandwidth_over_bytes_per_step():
    for t in JETSONS:
        p = plan_for(t.id, "8b", "int4", 2048)
        assert p.bytes_per_step == weight_bytes_per_step(Q8, p.recipe) + 2048 * kv_bytes_per_token(Q8)
        assert p.steps_per_s == pytest.approx(t.bandwidth_gbs * 1e9 / p.bytes_per_step, rel=1e-12)
        assert p.steps_per_s_empty == pytest.approx(t.bandwidth_gbs * 1e9 / p.weight_bytes_per_step, rel=1e-12)
        assert p.realtime_factor == pytest.approx(p.steps_per_s / 18.75)


def qwen3(hidden: int, layers: int, inter: int, vocab: int, tied: bool):
    bb = BackboneConfig(arch="qwen3", hidden_size=hidden, num_layers=layers, intermediate_size=inter,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=vocab,
                        rope_theta=1e6, tie_word_embeddings=tied)
    return dataclasses.replace(Q8, backbone=bb)


# TensorRT Edge-LLM v0.10.0, Qwen3 INT4-AWQ, batch 1, past KV 2048 (field-notes A1), tokens/s.
EDGE_LLM = {
    "qwen3-8b": (qwen3(4096, 36, 12288, 151936, False), {"agx-thor": 46.4, "agx-orin-64": 30.6, "orin-nx-16": 17.5}),
    "qwen3-4b": (qwen3(2560, 36, 9728, 151936, True), {"agx-thor": 76.5, "agx-orin-64": 50.7, "orin-nx-16": 29.2}),
}


@pytest.mark.parametrize("model", list(EDGE_LLM))
def test_measured_edge_llm_decode_sits_just_under_the_roofline(model):
    cfg, measured = EDGE_LLM[model]
    for tid, tok_s in measured.items():
        roof = roofline_steps_per_s(TARGETS[tid].bandwidth_gbs, decode_bytes_per_step(cfg, Recipe("int4"), 2048))
        assert 0.7 * roof < tok_s < roof, (model, tid, roof)


# --- fits / longest context ----------------------------------------------------------------------

@pytest.mark.parametrize("target", JETSONS, ids=lambda t: t.id)
@pytest.mark.parametrize("variant", ["4b", "8b"])
@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_every_jetson_gets_an_answer(target, variant, precision):
    p = plan_for(target.id, variant, precision, 4096)
    assert p.fits == (p.total_bytes <= p.budget_bytes)
    assert p.total_bytes == sum(i.bytes for i in p.items)  # unified memory counts the host side too
    assert p.budget_bytes == int((target.memory_bytes - target.system_reserved_bytes) * 0.9)
    assert p.fits == (p.longest_context >= 4096)
    if p.fits:
        assert p.verdict().startswith("fits") and p.shortfall_bytes == 0
    else:
        assert f"short by {p.shortfall_bytes / 1e9:.2f} GB" in p.verdict() and p.alternatives


def test_more_memory_or_fewer_bits_never_fits_less():
    for variant in ("4b", "8b"):
        cfg = preset(f"qinyu-{variant}")
        by_mem = sorted(JETSONS, key=lambda t: (t.memory_bytes, t.id))
        for precision in ("int4", "int8"):
            longest = [longest_context(cfg, t, Recipe(precision)) for t in by_mem]
            assert longest == sorted(longest), (variant, precision)
        for t in JETSONS:
            assert longest_context(cfg, t, Recipe("int4")) >= longest_context(cfg, t, Recipe("int8"))


@pytest.mark.parametrize("tid, variant, precision", [("orin-nx-16", "8b", "int8"), ("orin-nx-16", "4b", "int4"),
                                                     ("orin-nano-8", "4b", "int4"), ("rtx-3090", "8b", "fp16")])
def test_longest_context_is_the_fits_boundary(tid, variant, precision):
    cfg, t, r = preset(f"qinyu-{variant}"), TARGETS[tid], Recipe(precision)
    n = longest_context(cfg, t, r)
    top = cfg.backbone.max_position_embeddings
    if n == 0:
        assert not fits(cfg, t, r, 1)
    else:
        assert fits(cfg, t, r, n)
        assert n == top or not fits(cfg, t, r, n + 1)
        for c in (1, n // 3, n // 2, n - 1):
            assert fits(cfg, t, r, max(c, 1))
    for c in (n + 2, n + 100, 2 * n + 7):
        if c <= top:
            assert not fits(cfg, t, r, c)
    # Memory grows with context.
    totals = [total_bytes(cfg, t, r, c) for c in (1, 512, 513, 4096, 20000)]
    assert totals == sorted(totals)


def test_margin_and_reserve_shrink_the_budget():
    t = TARGETS["orin-nx-16"]
    assert budget_bytes(t, PlanOptions(margin=0.2)) < budget_bytes(t)
    assert budget_bytes(t, PlanOptions(margin=0.0)) == t.memory_bytes - t.system_reserved_bytes
    assert longest_context(Q8, t, Recipe("int8"), PlanOptions(margin=0.2)) < longest_context(Q8, t, Recipe("int8"))


def test_a_card_counts_only_device_memory():
    t = TARGETS["rtx-4090"]
    items = memory_items(Q8, t, Recipe("fp8"), 4096)
    host = [i for i in items if not i.on_device]
    assert {i.group for i in host} == {"voice loop", "weights"}
    assert [i.name for i in host if i.group == "weights"] == ["embedding rows (mapped)"]
    assert total_bytes(Q8, t, Recipe("fp8"), 4096) == sum(i.bytes for i in items if i.on_device)
    jetson = TARGETS["agx-orin-64"]
    with_loop = total_bytes(Q8, jetson, Recipe("int4"), 4096)
    without = total_bytes(Q8, jetson, Recipe("int4"), 4096, PlanOptions(voice_loop=False))
    assert with_loop - without == sum(i.bytes for i in memory_items(Q8, jetson, Recipe("int4"), 4096) if i.group == "voice loop")


def test_tied_matrix_copies_and_fused_attention():
    t = TARGETS["agx-orin-64"]
    graph = PlanOptions(host_embedding=False)  # a bundle whose embedding graph is loaded
    two = total_bytes(Q4, t, Recipe("int4"), 4096, graph)
    one = total_bytes(Q4, t, Recipe("int4"), 4096, PlanOptions(host_embedding=False, separate_embedding=False))
    assert two - one == backbone_params(Q4).vocab_matrix * 2  # the fp16 embedding copy
    # The 8B is untied: it always has both matrices.
    assert total_bytes(Q8, t, Recipe("int4"), 4096, graph) == total_bytes(
        Q8, t, Recipe("int4"), 4096, PlanOptions(host_embedding=False, separate_embedding=False))
    # The mapped table (bundle format 5): every audio row and 4096 text rows resident, whatever the vocabulary.
    for cfg in (Q4, Q8):
        mapped = next(i for i in memory_items(cfg, t, Recipe("int4"), 4096) if i.name == "embedding rows (mapped)")
        assert mapped.bytes == (4096 + 8 * 1032) * cfg.backbone.hidden_size * 2 and not mapped.on_device
    assert two - total_bytes(Q4, t, Recipe("int4"), 4096) == backbone_params(Q4).vocab_matrix * 2 - (
        4096 + 8 * 1032) * Q4.backbone.hidden_size * 2
    fused = total_bytes(Q8, t, Recipe("int4"), 4096, PlanOptions(fused_attention=True))
    b = Q8.backbone
    assert total_bytes(Q8, t, Recipe("int4"), 4096) - fused == 2 * 2 * b.num_attention_heads * 512 * 4096


@pytest.mark.parametrize("cfg", [Q4, Q8])
def test_engines_that_never_run_together_count_their_largest_scratch(cfg):
    t = TARGETS["orin-nano-8"]
    own = memory_items(cfg, t, Recipe("int4"), 4096, PlanOptions(shared_scratch=False))
    shared = memory_items(cfg, t, Recipe("int4"), 4096)
    each = {i.name: i.bytes for i in own if i.group == "activations" and i.name in ("encoder", "XY decoder", "CAM++")}
    assert len(each) == 3 and all(n > 0 for n in each.values())
    one = [i for i in shared if i.name == "shared scratch"]
    assert len(one) == 1 and one[0].bytes == max(each.values()) and one[0].group == "activations"
    assert not {i.name for i in shared if i.group == "activations"} & set(each)
    scratch = {label: next(i.bytes for i in items if i.name == "engine scratch") for label, items in (("own", own), ("shared", shared))}
    assert scratch["own"] - scratch["shared"] == 4 * 32 * 2**20  # five contexts' memories become one
    saved = sum(i.bytes for i in own) - sum(i.bytes for i in shared)
    assert saved == sum(each.values()) - max(each.values()) + 4 * 32 * 2**20


def test_alternatives_are_true():
    """Every 'fits up to N' the planner suggests is checked by planning it."""
    p = plan_for("orin-nx-16", "8b", "int8", 16384)
    assert not p.fits and p.shortfall_bytes > 0
    text = "; ".join(p.alternatives)
    assert "--context" in text and "--precision int4" in text and "--variant 4b" in text
    t = TARGETS["orin-nx-16"]
    for alt in p.alternatives:
        m = re.search(r"(?:--context |fits up to )(\d+)", alt)
        n = int(m.group(1))
        assert n >= MIN_USEFUL_CONTEXT
        if alt.startswith("--context"):
            assert fits(Q8, t, Recipe("int8"), n) and not fits(Q8, t, Recipe("int8"), n + 1)
        elif alt.startswith("--precision int4"):
            assert fits(Q8, t, Recipe("int4"), n) and not fits(Q8, t, Recipe("int4"), n + 1)
        elif alt.startswith("--variant 4b"):
            assert fits(Q4, t, Recipe("int8"), n)
        elif alt.startswith("--lm-head int8"):
            assert fits(Q8, t, Recipe("int8", lm_head="int8"), n)
        elif alt.startswith("--encoder int8"):
            assert fits(Q8, t, Recipe("int8", encoder="int8"), n)
            assert not fits(Q8, t, Recipe("int8", encoder="int8"), n + 1)
        else:
            pytest.fail(f"unchecked suggestion {alt!r}")


def test_when_no_single_change_fits_a_combination_or_bigger_target_is_named():
    p = plan_for("orin-nano-8", "8b", "int8", 4096)
    assert not p.fits and len(p.alternatives) == 1
    alt = p.alternatives[0]
    assert "--variant 4b" in alt and "--precision int4" in alt and "--encoder int8" in alt
    n = int(re.search(r"fits up to (\d+)", alt).group(1))
    assert fits(Q4, TARGETS["orin-nano-8"], Recipe("int4", lm_head="int4", encoder="int8"), n)
    # With half the memory set aside as margin nothing of the model fits an 8 GB board: name bigger ones.
    opts = PlanOptions(margin=0.5)
    none = plan_for("orin-nano-8", "8b", "int8", 4096, opts)
    (alt,) = none.alternatives
    assert alt.startswith("a target with more memory: ")
    named = alt.split(": ")[1].split(", ")
    assert "orin-nx-8" not in named and "agx-orin-64" in named
    for tid in named:
        assert fits(Q8, TARGETS[tid], Recipe("int8"), 4096, opts)


# --- bad input -------------------------------------------------------------------------------------

def test_unknown_target_precision_variant_and_context():
    with pytest.raises(ConfigError, match="known targets: orin-nano-8, .*agx-thor.*rtx-5090"):
        plan_for("orin-pico", "4b", "int4", 4096)
    with pytest.raises(ConfigError, match=r"agx-orin-64 \(SM 8.7\) has no fp8.*supports fp32, fp16, int8, int4"):
        plan_for("agx-orin-64", "4b", "fp8", 4096)
    with pytest.raises(ConfigError, match="rtx-4090 .*no fp4"):
        plan_for("rtx-4090", "8b", "fp4", 4096)
    with pytest.raises(ConfigError, match="no fp8 for the KV cache"):
        plan_for("orin-nx-16", "8b", "int4", 4096, kv_cache="fp8")
    with pytest.raises(ConfigError, match="unknown precision 'int3'.*fp32, fp16, fp8, int8, fp4, int4"):
        plan_for("agx-thor", "8b", "int3", 4096)
    with pytest.raises(ConfigError, match="choose 4b or 8b"):
        plan_for("agx-thor", "2b", "int4", 4096)
    with pytest.raises(ConfigError, match="1 to 40960"):
        plan_for("agx-thor", "8b", "int4", 50000)
    with pytest.raises(ConfigError, match="out of range"):
        plan_for("agx-thor", "4b", "int4", 0)
    with pytest.raises(ConfigError, match="margin"):
        make_plan(Q4, TARGETS["agx-thor"], Recipe("int4"), 10, PlanOptions(margin=1.5))


# --- CLI -------------------------------------------------------------------------------------------

def test_cli_plan_fits(capsys):
    assert main(["plan", "--target", "agx-orin-64", "--variant", "4b", "--precision", "int4"]) == 0
    out = capsys.readouterr().out
    p = plan_for("agx-orin-64", "4b", "int4", 4096)
    for text in ("fits", "KV cache (MLA latent)", "backbone layers", "Smart Turn", f"{p.total_bytes / 1e9:.2f}",
                 f"longest context that fits: {p.longest_context}", f"{p.steps_per_s:.1f} steps/s"):
        assert text in out


def test_cli_plan_json(capsys):
    assert main(["plan", "--target", "rtx-4090", "--variant", "8b", "--precision", "fp8", "--context", "8192",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    p = plan_for("rtx-4090", "8b", "fp8", 8192)
    assert doc["fits"] is True and doc["total_bytes"] == p.total_bytes and doc["context"] == 8192
    assert doc["steps_per_s"] == pytest.approx(p.steps_per_s) and doc["recipe"]["lm_head"] == "fp16"
    assert doc["target"]["id"] == "rtx-4090" and len(doc["items"]) == len(p.items)


def test_cli_plan_recipe_flags(capsys):
    assert main(["plan", "--target", "orin-nano-8", "--variant", "4b", "--precision", "int4", "--context", "2048",
                 "--lm-head", "int4", "--embedding", "int4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] is True and doc["recipe"]["lm_head"] == "int4"
    # the 4B on an Orin Nano at 4096 positions: short with an fp16 encoder, fits with an int8 one
    argv = ["plan", "--target", "orin-nano-8", "--variant", "4b", "--precision", "int4", "--lm-head", "int4", "--json"]
    assert main(argv) == 2
    short = json.loads(capsys.readouterr().out)
    assert "--encoder int8" in " ".join(short["alternatives"])
    assert main([*argv, "--encoder", "int8"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] and doc["context"] == 4096 and doc["recipe"]["encoder"] == "int8"
    assert 0.2e9 < short["total_bytes"] - doc["total_bytes"] < 0.25e9


@pytest.mark.parametrize("argv, needles", [
    (["plan", "--target", "orin-pico"], ["unknown target 'orin-pico'", "agx-orin-64", "rtx-5090"]),
    (["plan", "--target", "agx-orin-64", "--precision", "fp8"], ["has no fp8", "fp32, fp16, int8, int4"]),
    (["plan", "--target", "orin-nano-8", "--variant", "8b", "--precision", "int8"],
     ["does not fit", "short by 6.", "What would fit", "--variant 4b"]),
    (["plan", "--target", "agx-thor", "--context", "0"], ["out of range"]),
])
def test_cli_plan_bad_input_exits_2_with_a_clear_message(capsys, argv, needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for n in needles:
        assert n in err


def test_an_int8_encoder_narrows_only_its_linear_weights():
    """`quantize --encoder int8` is weight-only on the encoder's Linear layers: those bytes halve, the
    query rows, FSMN kernels, biases and norms stay fp16; nothing else in the plan moves."""
    t = TARGETS["orin-nano-8"]
    sv = Q4.sensevoice
    items = {r.encoder: {i.name: i for i in memory_items(Q4, t, r, 4096)}
             for r in (Recipe("int4", lm_head="int4"), Recipe("int4", lm_head="int4", encoder="int8"))}
    wide, narrow = items["fp16"], items["int8"]
    assert wide["SenseVoice encoder"].bytes == int(sv.param_count() * 2)
    assert narrow["SenseVoice encoder"].bytes == int(sv.matrix_param_count() + (sv.param_count() - sv.matrix_param_count()) * 2)
    assert "Linear weights at int8" in narrow["SenseVoice encoder"].note
    assert {k: v.bytes for k, v in wide.items() if k != "SenseVoice encoder"} == \
        {k: v.bytes for k, v in narrow.items() if k != "SenseVoice encoder"}
    # a target without int8 refuses it, naming the part
    with pytest.raises(ConfigError, match="asked for the encoder"):
        check_recipe(Recipe("fp16", encoder="fp8"), t)
