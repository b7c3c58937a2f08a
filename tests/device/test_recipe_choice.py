"""`qinyu-edge plan` without --precision: the most accurate precisions that fit and decode in real
time on every Jetson, what each choice costs, and the measured accuracy of a quantized bundle."""

from __future__ import annotations

import json
import re

import pytest

from qinyu_edge.cli import main
from qinyu_edge.device.planner import MIN_USEFUL_CONTEXT, PlanOptions, Recipe, fits, make_plan, model_for_variant
from qinyu_edge.device.recipe_choice import (
    REALTIME_GOAL, ROOFLINE_EFFICIENCY, Measured, _candidates, _realtime, choose,
)
from qinyu_edge.device.targets import TARGETS
from qinyu_edge.errors import ConfigError

JETSONS = [t for t in TARGETS.values() if t.family == "jetson"]


@pytest.mark.parametrize("target", JETSONS, ids=lambda t: t.id)
@pytest.mark.parametrize("variant", ["4b", "8b"])
def test_the_default_fits_and_is_the_most_accurate_that_does(target, variant):
    cfg = model_for_variant(variant)
    try:
        choice = choose(cfg, target, 4096)
    except ConfigError as e:
        # Only when no candidate fits even the shortest useful context.
        assert "does not fit" in str(e)
        assert all(not fits(cfg, target, r, MIN_USEFUL_CONTEXT) for r in _candidates(target))
        return
    plan = choice.plan
    assert plan.fits and plan.context >= MIN_USEFUL_CONTEXT
    assert choice.realtime == (plan.realtime_factor * ROOFLINE_EFFICIENCY >= REALTIME_GOAL)
    candidates = _candidates(target)
    index = candidates.index(plan.recipe)
    better = [r for r in candidates[:index] if fits(cfg, target, r, plan.context)]
    if choice.realtime:  # nothing less lossy also fits and keeps up
        assert not any(_realtime(make_plan(cfg, target, r, plan.context)) for r in better)
    else:  # nothing fits and keeps up; this is the fastest that fits, and the summary says so plainly
        fitting = [r for r in candidates if fits(cfg, target, r, plan.context)]
        assert not any(_realtime(make_plan(cfg, target, r, plan.context)) for r in fitting)
        assert plan.realtime_factor == max(make_plan(cfg, target, r, plan.context).realtime_factor for r in fitting)
        assert f"cannot reach {REALTIME_GOAL}x real time" in choice.summary()


def test_orin_nano_8_fits_the_4b_at_4096_with_an_int8_encoder_and_says_it_is_short_of_real_time():
    """Counting the absorbed MLA matrices at fp16, as quantize writes them, the 4B's int4 layers and
    lm_head leave an Orin Nano 8 GB short of 4096 positions; halving the encoder's Linear weights
    (0.22 GB, no decode cost) gets there. 1.2x real time stays out of reach, and the answer says so."""
    cfg, t = model_for_variant("4b"), TARGETS["orin-nano-8"]
    assert not fits(cfg, t, Recipe("int4", lm_head="int4", embedding="fp16", kv_cache="fp16"), 4096)
    choice = choose(cfg, t, 4096)
    r = choice.plan.recipe
    assert choice.plan.fits and not choice.context_shortened and choice.plan.context == 4096
    assert (r.backbone, r.lm_head, r.encoder) == ("int4", "int4", "int8")
    assert not choice.realtime and "cannot reach 1.2x real time" in choice.summary()
    assert "encoder int8" in choice.summary()
    # it had to give up precision to get there, and says what each step costs
    steps = {s.part: s for s in choice.steps}
    assert set(steps) == {"backbone", "lm_head", "encoder"}
    assert all("unmeasured" in s.accuracy for s in choice.steps)
    assert all("steps/s" in steps[p].speed for p in ("backbone", "lm_head"))
    assert "0.22 GB less memory" in steps["encoder"].speed and "no decode cost" in steps["encoder"].speed


def test_the_encoder_stays_fp16_where_it_fits():
    for tid in ("orin-nx-16", "agx-orin-64", "rtx-4090"):
        assert choose(model_for_variant("4b"), TARGETS[tid], 4096).plan.recipe.encoder == "fp16", tid


def test_a_big_board_keeps_more_precision_than_a_small_one():
    cfg = model_for_variant("4b")
    small = choose(cfg, TARGETS["orin-nano-8"], 4096).plan.recipe
    big = choose(cfg, TARGETS["agx-orin-64"], 4096).plan.recipe
    rank = {"fp16": 0, "fp8": 1, "int8": 1, "int4": 2, "fp4": 2}
    assert rank[big.backbone] <= rank[small.backbone] and rank[big.lm_head] <= rank[small.lm_head]
    assert big != small


def test_a_context_too_long_for_the_board_gets_the_longest_that_fits():
    cfg, target = model_for_variant("4b"), TARGETS["orin-nano-8"]
    choice = choose(cfg, target, 100_000)
    assert choice.context_shortened and MIN_USEFUL_CONTEXT <= choice.plan.context < 100_000 and choice.plan.fits
    assert "the longest that fits" in choice.summary()
    with pytest.raises(ConfigError, match="does not fit Jetson Orin Nano 8GB at any precision"):
        choose(model_for_variant("8b"), target, 4096)


def _quantized_bundle(tmp_path, precisions, prefix):
    root = tmp_path / "q"
    root.mkdir()
    origin = {"precision": precisions,
              "quantization": {"recipe": "int4-awq", "accuracy": {"greedy_prefix_fraction": prefix}}}
    (root / "bundle.json").write_text(json.dumps({"origin": origin}))
    return root


def test_measured_accuracy_annotates_the_precisions_it_measured(tmp_path):
    root = _quantized_bundle(tmp_path, {"backbone": "int4", "heads_greedy": "fp16"}, 0.9375)
    choice = choose(model_for_variant("4b"), TARGETS["orin-nano-8"], 4096, PlanOptions(), Measured.from_bundle(root))
    by_part = {s.part: s for s in choice.steps}
    assert choice.plan.recipe.backbone == "int4"
    assert "measured on" in by_part["backbone"].accuracy and "93.8%" in by_part["backbone"].accuracy
    # the report measured fp16 heads; the choice's int4 heads stay unmeasured
    assert "unmeasured" in by_part["lm_head"].accuracy


def test_cli_default_plan_and_its_errors(tmp_path, capsys):
    assert main(["plan", "--target", "orin-nano-8", "--variant", "4b"]) == 0
    out = capsys.readouterr().out
    assert "default for qinyu-4b on orin-nano-8" in out and "what each choice" in out
    assert "encoder int8, context 4096;" in " ".join(out.split())
    assert main(["plan", "--target", "orin-nano-8", "--variant", "4b", "--context", "8192"]) == 0
    assert re.search(r"context \d+ \(the longest that fits", " ".join(capsys.readouterr().out.split()))
    assert main(["plan", "--target", "orin-nx-16", "--variant", "8b", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] and doc["choice"]["realtime"] is False and "cannot reach" in doc["choice"]["summary"]
    for argv, needle in ((["--lm-head", "int4"], "--lm-head needs --precision"),
                         (["--precision", "int4", "--accuracy-from", str(tmp_path)], "goes with --precision auto"),
                         (["--accuracy-from", str(tmp_path / "none")], "no bundle.json there"),
                         (["--accuracy-from", str(_quantized_bundle(tmp_path, {}, 1.0).parent)], "no bundle.json")):
        assert main(["plan", "--target", "orin-nano-8", *argv]) == 2
        assert needle in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bundle.json").write_text('{"origin": {}}')
    assert main(["plan", "--target", "orin-nano-8", "--accuracy-from", str(broken)]) == 2
    assert "no accuracy report" in capsys.readouterr().err


def test_cli_plans_a_bundle_with_its_embedding_graph_loaded(capsys):
    """--embedding-graph counts the whole table (older bundles, an int4 table): the 4B no longer fits
    an Orin Nano at the recipe that fits with the mapped table."""
    argv = ["plan", "--target", "orin-nano-8", "--variant", "4b", "--precision", "int4", "--lm-head", "int4",
            "--context", "2048", "--json"]
    assert main(argv) == 0
    mapped = json.loads(capsys.readouterr().out)
    assert main([*argv, "--embedding-graph"]) == 2
    graph = json.loads(capsys.readouterr().out)
    assert graph["total_bytes"] - mapped["total_bytes"] > 0.6e9 and not graph["fits"]
