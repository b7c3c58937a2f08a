"""What designing a voice on the device costs: VoiceDesign's memory and its predicted time per target.

Both graphs (runtime/voice_designer.py) are loaded for one design at chat start and closed before the
conversation, so their memory is a start-up peak. The time is a roofline bound: each graph's weights
read once per call at the target's bandwidth, or its FLOPs at the dense FP16 rate, whichever is larger.
"""

from __future__ import annotations

from dataclasses import dataclass

from .planner import bytes_per_param
from .targets import Target

ESTIMATOR_PARAMS = 17_947_712  # our DiT estimator at the released shapes (upstream's module, counted)
CONDITION_PARAMS = 595_841_024 + 1024 * 192 + 192  # Qwen3-Embedding-0.6B without lm_head, plus the projection
ROLE_TOKENS = 64  # a few sentences of role description
STEPS = 20  # one batched estimator call (conditioned + zero-conditioned) per Euler step


@dataclass(frozen=True)
class VoiceDesignCost:
    target: str
    precision: str
    weight_bytes: int
    condition_ms: float
    estimator_ms: float  # all STEPS calls

    @property
    def total_ms(self) -> float:
        return self.condition_ms + self.estimator_ms


def _call_ms(target: Target, params: int, rows: int, nbytes: float) -> float:
    memory = nbytes / (target.bandwidth_gbs * 1e9) if target.bandwidth_gbs else 0.0
    compute = 2 * params * rows / (target.fp16_tflops * 1e12) if target.fp16_tflops else 0.0
    return 1e3 * max(memory, compute)


def voice_design_cost(target: Target, precision: str = "fp16") -> VoiceDesignCost:
    per = bytes_per_param(precision)
    cond_bytes, est_bytes = CONDITION_PARAMS * per, ESTIMATOR_PARAMS * per
    return VoiceDesignCost(
        target.id, precision, int(cond_bytes + est_bytes),
        _call_ms(target, CONDITION_PARAMS, ROLE_TOKENS, cond_bytes),
        STEPS * _call_ms(target, ESTIMATOR_PARAMS, 2, est_bytes),
    )
