"""How far a quantized bundle is from its fp32 source, measured in ONNX Runtime on this CPU.

Two measures, both on held-out inputs (the five runtime parity cases of
tests/runtime/test_parity.py, never the calibration prompts):

- outputs: every quantized component is fed the inputs the runtime really gave it on the fp32
  bundle, once through the fp32 graph and once through the quantized one; the cosine similarity of
  each float output (integer outputs: the fraction of equal entries). The logits are scored twice
  more: through the fp32 heads on the quantized backbone's hidden states (the backbone's own
  effect), and through the quantized backbone and heads together (what the sampler sees).
- greedy tokens: each case run with `Conversation` on both bundles; the fraction of tokens identical
  up to the first divergence, and the fraction identical position by position.

Cosine is computed in float64 over the whole flattened output of one call.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qinyu_edge.bundle import Bundle, load_bundle
from qinyu_edge.runtime.engine import Engine, EngineOptions
from qinyu_edge.runtime.generate import PENALTY_WINDOW
from qinyu_edge.runtime.session import Session, open_session

from .calibration import (CalibrationSet, CaptureOptions, Case, Turn, capture, check_runs_here, render_cases,
                          run_cases)
from .quantize import QuantizationError, component_precision

log = logging.getLogger(__name__)

STEPS = 48  # tokens per reply, as the parity tests run
UTTERANCES = ("What is the weather like today?", "Tell me a short story.", "Thank you, goodbye.")

# The five runtime parity cases (tests/runtime/test_parity.py).
PARITY_CASES: tuple[Case, ...] = (
    Case("text question", (Turn(text="What can you do?"),)),
    Case("spoken question", (Turn(UTTERANCES[0], user_speaker=False),)),
    Case("speech + user speaker", (Turn(UTTERANCES[1], user_speaker=True),)),
    Case("role-play, agent voice", (Turn(UTTERANCES[2]),), mode="roleplay", voice="2619-王承恩",
         role="A calm old lighthouse keeper who speaks slowly."),
    Case("3 turns", tuple(Turn(u) for u in UTTERANCES)),
)

LOGITS_VIA_BACKBONE = "logits (fp32 heads on the quantized backbone)"
LOGITS_END_TO_END = "logits (quantized backbone and heads)"
NEXT_TOKEN = "next token (greedy heads, teacher-forced)"


@dataclass(frozen=True)
class OutputScore:
    """One component output (cache outputs of all layers pooled as `new_key_*` and so on)."""

    component: str
    precision: str
    output: str
    samples: int
    mean: float  # cosine, or the fraction of equal entries for integer outputs
    min: float
    kind: str = "cosine"  # or "equal"


@dataclass(frozen=True)
class CaseAgreement:
    case: str
    reference_tokens: int
    prefix: int  # tokens identical before the first divergence (over the turns joined)
    matches: int  # positions where both replies hold the same token
    positions: int  # sum over turns of the longer reply

    @property
    def prefix_fraction(self) -> float:
        return self.prefix / self.reference_tokens if self.reference_tokens else 1.0

    @property
    def overall(self) -> float:
        return self.matches / self.positions if self.positions else 1.0


@dataclass(frozen=True)
class AccuracyReport:
    reference: str
    quantized: str
    recipe: str | None
    outputs: tuple[OutputScore, ...]
    cases: tuple[CaseAgreement, ...]

    @property
    def prefix_fraction(self) -> float:
        """Over all cases: identical tokens before each case's first divergence / reference tokens."""
        ref = sum(c.reference_tokens for c in self.cases)
        return sum(c.prefix for c in self.cases) / ref if ref else 1.0

    @property
    def overall(self) -> float:
        pos = sum(c.positions for c in self.cases)
        return sum(c.matches for c in self.cases) / pos if pos else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference, "quantized": self.quantized, "recipe": self.recipe,
            "outputs": [asdict(o) for o in self.outputs],
            "cases": [{**asdict(c), "prefix_fraction": c.prefix_fraction, "overall": c.overall} for c in self.cases],
            "greedy_prefix_fraction": self.prefix_fraction, "greedy_overall": self.overall,
            "definitions": {
                "cosine": "cosine similarity of the flattened output of one call, quantized vs fp32, float64",
                "greedy_prefix_fraction": "tokens identical before the first divergence / fp32 tokens, turns joined",
                "greedy_overall": "positions holding the same token / sum over turns of the longer reply",
            },
        }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


_LAYER = re.compile(r"^(.*)_\d+$")


def _group(name: str) -> str:
    m = _LAYER.match(name)
    return f"{m.group(1)}_*" if m and name.startswith(("new_", "past_")) else name


def _session(bundle: Bundle, name: str) -> Session:
    return open_session(bundle.path(name), disabled_optimizers=bundle.components[name].ort_disabled_optimizers)


def output_scores(reference: Bundle, quantized: Bundle, heldout: CalibrationSet) -> list[OutputScore]:
    """Cosine per output of every component whose precision differs from the reference's."""
    scores: list[OutputScore] = []
    hidden_pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for name in quantized.components:
        precision = component_precision(quantized, name)
        if precision == component_precision(reference, name):
            continue
        if not heldout.samples.get(name):
            log.warning("no held-out inputs reached %s (replies too short?); its outputs are not scored", name)
            continue
        ref_s, q_s = _session(reference, name), _session(quantized, name)
        per_output: dict[str, list[float]] = {}
        kinds: dict[str, str] = {}
        for feeds in heldout[name]:
            r, q = ref_s.run(feeds), q_s.run(feeds)
            for out, ref in r.items():
                g = _group(out)
                if ref.dtype.kind == "f":
                    per_output.setdefault(g, []).append(cosine(q[out], ref))
                    kinds[g] = "cosine"
                else:
                    per_output.setdefault(g, []).append(float(np.mean(q[out] == ref)) if ref.size else 1.0)
                    kinds[g] = "equal"
            if name == "backbone":
                hidden_pairs.append((r["hidden"], q["hidden"]))
        for g, vals in per_output.items():
            scores.append(OutputScore(name, precision, g, len(vals), float(np.mean(vals)), float(np.min(vals)),
                                      kinds[g]))
    if hidden_pairs and "heads_logits" in quantized.components:
        ref_h, q_h = _session(reference, "heads_logits"), _session(quantized, "heads_logits")
        ref_g, q_g = _session(reference, "heads_greedy"), _session(quantized, "heads_greedy")
        no_history = {"history": np.full((1, PENALTY_WINDOW), -1, np.int64)}
        via, e2e, top1 = [], [], []
        for r, q in hidden_pairs:
            ref_logits = ref_h.run({"hidden": r})["logits"]
            via.append(cosine(ref_h.run({"hidden": q})["logits"], ref_logits))
            e2e.append(cosine(q_h.run({"hidden": q})["logits"], ref_logits))
            q_id = q_g.run({"hidden": q, **no_history})["ids"][0, 0]
            top1.append(float(q_id == ref_g.run({"hidden": r, **no_history})["ids"][0, 0]))
        precision = component_precision(quantized, "backbone")
        both = f"{precision}+{component_precision(quantized, 'heads_logits')}"
        scores.append(OutputScore("backbone", precision, LOGITS_VIA_BACKBONE, len(via), float(np.mean(via)),
                                  float(np.min(via))))
        scores.append(OutputScore("backbone+heads", both, LOGITS_END_TO_END, len(e2e), float(np.mean(e2e)),
                                  float(np.min(e2e))))
        # Teacher-forced: the same fp32 context every time, unlike the free-running greedy cases.
        scores.append(OutputScore("backbone+heads", both, NEXT_TOKEN, len(top1), float(np.mean(top1)),
                                  float(np.min(top1)), "equal"))
    return scores


def _agreement(case: str, ref: Sequence[Sequence[int]], got: Sequence[Sequence[int]]) -> CaseAgreement:
    ref_all = [t for turn in ref for t in turn]
    got_all = [t for turn in got for t in turn]
    prefix = 0
    for a, b in zip(ref_all, got_all, strict=False):  # replies may differ in length
        if a != b:
            break
        prefix += 1
    turns = list(zip(ref, got, strict=True))
    matches = sum(sum(a == b for a, b in zip(r, g, strict=False)) for r, g in turns)
    positions = sum(max(len(r), len(g)) for r, g in turns)
    return CaseAgreement(case, len(ref_all), prefix, matches, positions)


def greedy_agreement(reference: str | os.PathLike, quantized: str | os.PathLike,
                     cases: Sequence[Case] = PARITY_CASES, steps: int = STEPS, threads: int | None = None,
                     speech: Mapping[str, np.ndarray] | None = None) -> list[CaseAgreement]:
    """Run every case with greedy decoding on both bundles and compare the token sequences."""
    speech = speech or render_cases(cases)
    runs = [run_cases(Engine(b, EngineOptions(threads=threads)), cases, steps, speech) for b in (reference, quantized)]
    return [_agreement(c.name, [r.tokens for r in runs[0][c.name]], [r.tokens for r in runs[1][c.name]])
            for c in cases]


def accuracy_report(reference: str | os.PathLike, quantized: str | os.PathLike,
                    cases: Sequence[Case] = PARITY_CASES, steps: int = STEPS, threads: int | None = None,
                    heldout: CalibrationSet | None = None) -> AccuracyReport:
    """Both measures for `quantized` against the fp32 bundle `reference`."""
    ref_b, q_b = load_bundle(reference), load_bundle(quantized)
    source = q_b.origin.get("quantization", {}).get("source", {}).get("files", {})
    differ = sorted(n for n, e in source.items() if n not in ref_b.files or ref_b.files[n].sha256 != e["sha256"])
    if differ:
        raise QuantizationError(f"{q_b.root} was not quantized from {ref_b.root} ({', '.join(differ)} differ); "
                                "compare it with the fp32 bundle it came from")
    # Both bundles run whole, one after the other: the fp32 one is the larger.
    check_runs_here(ref_b.root, "the accuracy report", "The quantized bundle is complete without it; quantizing on a "
                    "machine with that much memory gives the report too (`--no-accuracy` skips this check).")
    speech = render_cases(cases)
    if heldout is None:
        heldout = capture(ref_b.root, cases, CaptureOptions(max_new_tokens=steps), threads=threads, speech=speech)
    outputs = output_scores(ref_b, q_b, heldout)
    agreement = greedy_agreement(ref_b.root, q_b.root, cases, steps, threads, speech)
    recipe = q_b.origin.get("quantization", {}).get("recipe")
    return AccuracyReport(str(ref_b.root), str(q_b.root), recipe, tuple(outputs), tuple(agreement))


__all__ = [
    "LOGITS_END_TO_END",
    "LOGITS_VIA_BACKBONE",
    "NEXT_TOKEN",
    "PARITY_CASES",
    "STEPS",
    "AccuracyReport",
    "CaseAgreement",
    "OutputScore",
    "accuracy_report",
    "cosine",
    "greedy_agreement",
    "output_scores",
]
