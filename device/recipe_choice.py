"""The planner's default answer: for a target and variant, the most accurate precisions that fit a
context with margin and decode fast enough for speech, and what each step away from fp16 costs.

Candidates are ordered by how much they give up, least first: every weight in fp16, then a lower
backbone precision (the bulk of the bytes), then an 8-bit and a 4-bit lm_head and embedding (the
lm_head is a quarter of the bytes a quantized step reads, but it also decides every token), then
an 8-bit KV cache, then an int8 encoder (weight-only on its Linear layers: half its memory, no
decode speed, so it is only ever chosen to fit). Only precisions `qinyu-edge quantize` writes are
proposed. The first candidate that fits the context and reaches the real-time goal at the
efficiency TensorRT Edge-LLM measures wins. Where none reaches it, the fastest one that fits is
proposed and the answer says plainly that real time is out of reach.

Accuracy: where the user names a quantized bundle, its accuracy report (written by
`qinyu-edge quantize`) gives the measured greedy-token agreement with fp32 for the precisions it
holds; otherwise the cost is stated as unmeasured, with the command that measures it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qinyu_edge.config import ModelConfig
from qinyu_edge.errors import ConfigError

from .planner import (
    ELEMENT_BYTES, MIN_USEFUL_CONTEXT, SPEECH_STEPS_PER_SECOND, Plan, PlanOptions, Recipe, bytes_per_param,
    fits, longest_context, make_plan,
)
from .targets import Target

# Real-time goal: decode steps per second over what one second of speech needs, at the share of
# the bandwidth roofline that Edge-LLM's measured decode reaches (field-notes A1: 73-88 %).
REALTIME_GOAL = 1.2
ROOFLINE_EFFICIENCY = 0.85

# Least accuracy given up first. fp8 and int8 (per-channel, Q/DQ) lose about the same; int4 and
# fp4 are block-scaled 4-bit weights.
BACKBONE_LADDER = ("fp16", "fp8", "int8", "int4", "fp4")
# The lm_head as `qinyu-edge quantize --lm-head` writes it. The embedding stays fp16: the runtime
# maps its table and gathers a few rows per step, so a narrower table saves neither memory that
# counts nor bandwidth (and a quantized table would load the embedding graph instead).
HEAD_LADDER = ("fp16", "int8", "int4")
KV_LADDER = ("fp16", "fp8")
# `qinyu-edge quantize --encoder int8`. The encoder runs once per turn, not per step.
ENCODER_LADDER = ("fp16", "int8")
LOSS_RANK = {"fp16": 0, "fp8": 1, "int8": 1, "int4": 2, "fp4": 2}


@dataclass(frozen=True)
class Measured:
    """Greedy-token agreement with fp32 from a quantized bundle's accuracy report."""

    bundle: str
    precisions: dict[str, str]  # component -> precision the report measured
    greedy_prefix: float  # tokens identical before the first divergence / fp32 tokens

    @classmethod
    def from_bundle(cls, root: str | Path) -> Measured:
        path = Path(root) / "bundle.json"
        try:
            origin = json.loads(path.read_text())["origin"]
            accuracy = origin["quantization"]["accuracy"]
            precisions = {str(k): str(v) for k, v in origin.get("precision", {}).items()}
        except FileNotFoundError:
            raise ConfigError(f"--accuracy-from {root}: no bundle.json there; name a bundle written by "
                              "`qinyu-edge quantize`") from None
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"--accuracy-from {root}: the bundle has no accuracy report; quantize it again "
                              "without --no-accuracy") from None
        return cls(str(root), precisions, float(accuracy["greedy_prefix_fraction"]))


@dataclass(frozen=True)
class Step:
    """One choice the answer made away from the most accurate setting."""

    part: str
    value: str
    accuracy: str
    speed: str


@dataclass(frozen=True)
class Choice:
    plan: Plan
    steps: tuple[Step, ...]
    realtime: bool  # reaches REALTIME_GOAL at ROOFLINE_EFFICIENCY
    context_shortened: bool  # no candidate fit the asked context; the plan has the longest that fits

    @property
    def expected_realtime(self) -> float | None:
        rt = self.plan.realtime_factor
        return None if rt is None else rt * ROOFLINE_EFFICIENCY

    def summary(self) -> str:
        p, r = self.plan, self.plan.recipe
        head = (f"default for qinyu-{p.variant} on {p.target.id}: backbone {r.backbone}, lm_head {r.lm_head}, "
                f"embedding {r.embedding}, KV cache {r.kv_cache}, encoder {r.encoder}, context {p.context}")
        if self.context_shortened:
            head += f" (the longest that fits; {MIN_USEFUL_CONTEXT}+ positions are usable)"
        rt = self.expected_realtime
        if rt is None:
            return head + "; decode speed unknown (no bandwidth figure for this GPU)"
        pace = (f"{rt:.2f}x real time expected ({p.steps_per_s * ROOFLINE_EFFICIENCY:.1f} steps/s at "
                f"{ROOFLINE_EFFICIENCY:.0%} of the roofline, {SPEECH_STEPS_PER_SECOND:g} needed)")
        if self.realtime:
            return f"{head}; {pace}"
        return (f"{head}; {pace}. This board cannot reach {REALTIME_GOAL}x real time with qinyu-{p.variant}: "
                "speech will stall between chunks; use the smaller variant or a faster board")

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "realtime": self.realtime, "expected_realtime": self.expected_realtime,
                "context_shortened": self.context_shortened, "steps": [dataclasses.asdict(s) for s in self.steps]}


def _candidates(target: Target) -> list[Recipe]:
    backbones = [p for p in BACKBONE_LADDER if target.supports(p)]
    heads = [p for p in HEAD_LADDER if target.supports(p)]
    kvs = [p for p in KV_LADDER if target.supports(p)]
    encoders = [p for p in ENCODER_LADDER if target.supports(p)]
    out = []
    for b, h, kv, enc in itertools.product(backbones, heads, kvs, encoders):
        if LOSS_RANK[h] > LOSS_RANK[b]:
            continue  # the heads are never quantized further than the layers
        out.append(Recipe(b, lm_head=h, embedding="fp16", kv_cache=kv, encoder=enc))
    # Least given up first; ties go to the more accurate backbone, then heads, then encoder.
    return sorted(out, key=lambda r: (LOSS_RANK[r.backbone] + LOSS_RANK[r.lm_head] + LOSS_RANK[r.kv_cache]
                                      + LOSS_RANK[r.encoder], LOSS_RANK[r.backbone], LOSS_RANK[r.lm_head],
                                      LOSS_RANK[r.encoder]))


def _realtime(plan: Plan) -> bool:
    rt = plan.realtime_factor
    return rt is not None and rt * ROOFLINE_EFFICIENCY >= REALTIME_GOAL


def choose(cfg: ModelConfig, target: Target, context: int, options: PlanOptions = PlanOptions(),
           measured: Measured | None = None) -> Choice:
    """The most accurate candidate that fits `context` and reaches real time; else the fastest that
    fits; else the longest usable context; ConfigError when not even that fits."""
    candidates = _candidates(target)
    fitting = [r for r in candidates if fits(cfg, target, r, context, options)]
    shortened = False
    if not fitting:
        longest = max((longest_context(cfg, target, r, options), -i, r) for i, r in enumerate(candidates))
        if longest[0] < MIN_USEFUL_CONTEXT:
            raise ConfigError(f"qinyu-{cfg.variant} does not fit {target.name} at any precision it supports with "
                              f"{MIN_USEFUL_CONTEXT} positions or more; use --variant 4b or a target with more memory")
        context, fitting, shortened = longest[0], [longest[2]], True
    plans = [make_plan(cfg, target, r, context, options) for r in fitting]
    good = [p for p in plans if _realtime(p)]
    plan = good[0] if good else max(plans, key=lambda p: p.realtime_factor or 0.0)
    return Choice(plan, _steps(cfg, plan, options, measured), bool(good), shortened)


def _steps(cfg: ModelConfig, plan: Plan, options: PlanOptions, measured: Measured | None) -> tuple[Step, ...]:
    """Each part set below fp16, in ladder order, with its accuracy cost and the decode roofline
    once it is applied on top of the steps before it."""
    r = plan.recipe
    current = Recipe("fp16", lm_head="fp16", embedding="fp16", kv_cache="fp16")
    before = make_plan(cfg, plan.target, current, plan.context, options)
    steps = []
    for part, value, change in (("backbone", r.backbone, {"backbone": r.backbone}),
                                ("lm_head", r.lm_head, {"lm_head": r.lm_head}),
                                ("KV cache", r.kv_cache, {"kv_cache": r.kv_cache}),
                                ("encoder", r.encoder, {"encoder": r.encoder})):
        if value == "fp16":
            continue
        current = dataclasses.replace(current, **change)
        after = make_plan(cfg, plan.target, current, plan.context, options)
        steps.append(Step(part, value, _accuracy(part, value, measured), _speed(part, value, before, after)))
        before = after
    return tuple(steps)


def _accuracy(part: str, value: str, measured: Measured | None) -> str:
    if measured is not None:
        key = {"backbone": "backbone", "lm_head": "heads_greedy", "encoder": "encoder"}.get(part)
        if key is not None and measured.precisions.get(key) == value:
            return (f"measured on {measured.bundle}: {measured.greedy_prefix:.1%} of fp32's greedy tokens "
                    "identical before the first divergence")
    what = {"backbone": "every layer's weights", "lm_head": "every token choice",
            "KV cache": "attention over the whole past", "encoder": "everything the model hears"}[part]
    return (f"{value} touches {what}; unmeasured for this bundle: `qinyu-edge quantize --recipe ...` reports "
            "greedy-token agreement with fp32, then `plan --accuracy-from QUANTIZED_BUNDLE`")


def _speed(part: str, value: str, before: Plan, after: Plan) -> str:
    ratio = bytes_per_param(value) / ELEMENT_BYTES["fp16"]
    if part == "encoder":
        saved = (before.total_bytes - after.total_bytes) / 1e9
        return (f"{ratio:.2f}x the fp16 bytes of its Linear weights, {saved:.2f} GB less memory; no decode cost "
                "(it runs once per turn, not per step)")
    what = f"{ratio:.2f}x the fp16 bytes of the {part}"
    if before.steps_per_s is None or after.steps_per_s is None:
        return what
    return f"{what}; decode roofline {before.steps_per_s:.1f} -> {after.steps_per_s:.1f} steps/s"


__all__ = ["REALTIME_GOAL", "ROOFLINE_EFFICIENCY", "Measured", "Step", "Choice", "choose"]
