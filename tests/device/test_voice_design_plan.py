"""VoiceDesign's cost on the targets: its weights counted by the planner on request, its time a
roofline that follows the target's bandwidth."""

import dataclasses

from qinyu_edge.device.planner import PlanOptions, memory_items, model_for_variant, Recipe
from qinyu_edge.device.targets import get_target
from qinyu_edge.device.voice_design_plan import CONDITION_PARAMS, ESTIMATOR_PARAMS, STEPS, voice_design_cost


def test_cost_follows_bandwidth():
    nano, agx = get_target("orin-nano-8"), get_target("agx-orin-32")
    cost = voice_design_cost(nano)
    assert cost.weight_bytes == 2 * (CONDITION_PARAMS + ESTIMATOR_PARAMS)
    # Bandwidth-bound on the Orin Nano: the estimator's 36 MB read once per step.
    assert abs(cost.estimator_ms - STEPS * 2 * ESTIMATOR_PARAMS / 68e9 * 1e3) < 1e-6
    assert voice_design_cost(agx).total_ms < cost.total_ms / 2


def test_planner_counts_voice_design_when_asked():
    target, cfg, recipe = get_target("orin-nano-8"), model_for_variant("4b"), Recipe.uniform("fp16")
    without = memory_items(cfg, target, recipe, 2048)
    with_vd = memory_items(cfg, target, recipe, 2048, dataclasses.replace(PlanOptions(), voice_design=True))
    extra = [i for i in with_vd if i not in without]
    assert [i.name for i in extra] == ["VoiceDesign (start-up only)"]
    assert extra[0].bytes == voice_design_cost(target).weight_bytes


def test_plan_command_counts_voice_design(capsys):
    import json

    from qinyu_edge.cli import main

    def items(*extra):
        assert main(["plan", "--target", "agx-orin-64", "--variant", "4b", "--precision", "int4", "--json", *extra]) == 0
        return {i["name"]: i for i in json.loads(capsys.readouterr().out)["items"]}

    plain, designed = items(), items("--voice-design")
    assert set(designed) - set(plain) == {"VoiceDesign (start-up only)"}
    assert " ms)" in designed["VoiceDesign (start-up only)"]["note"]
