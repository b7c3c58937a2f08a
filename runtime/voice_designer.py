"""VoiceDesign without torch: the two ONNX graphs of export/voice_design_onnx.py and the same sampler.

Runs once per design (at chat start in role-play), then `close()` drops both sessions so their memory
goes back before the conversation needs it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from qinyu_edge.bundle import Bundle
from qinyu_edge.role_text import check_role, normalise_role
from qinyu_edge.voice_sampling import REAL, VoiceDesignConfig, design_noise, time_grid

from .session import Session, open_session

log = logging.getLogger(__name__)

CONDITION_FILE = "voice_condition.onnx"
ESTIMATOR_FILE = "voice_estimator.onnx"
TOKENIZER_FILE = "voice_tokenizer.json"
DESIGNER_FILES = (CONDITION_FILE, ESTIMATOR_FILE, TOKENIZER_FILE)


@dataclass(frozen=True)
class DesignTimings:
    condition_ms: float
    estimator_ms: float  # all guidance steps
    estimator_calls: int  # one batched call (conditioned + zero-conditioned) per step


class OnnxVoiceDesigner:
    def __init__(self, folder: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                 cfg: VoiceDesignConfig = REAL):
        folder = Path(folder)
        self.cfg = cfg
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(cfg.max_tokens)
        self._condition: Session | None = open_session(folder / CONDITION_FILE, "ort", provider, threads)
        self._estimator: Session | None = open_session(folder / ESTIMATOR_FILE, "ort", provider, threads)
        self.timings: DesignTimings | None = None

    def design(self, role: str, seed: int = 0) -> np.ndarray:
        if self._condition is None or self._estimator is None:
            raise RuntimeError("this designer was closed; open a new one")
        t0 = time.perf_counter()
        ids = np.asarray([self.tokenizer.encode(normalise_role(check_role(role))).ids], np.int64)
        cond = self._condition.run({"input_ids": ids})["condition"].astype(np.float32)
        t1 = time.perf_counter()
        both = np.concatenate([cond, np.zeros_like(cond)])  # guidance against a zeroed condition
        x = (design_noise(seed, self.cfg.spk_dim) * np.float32(self.cfg.temperature))[None]
        grid = time_grid(self.cfg.n_steps)
        t, dt = grid[0], grid[1] - grid[0]
        rate = np.float32(self.cfg.cfg_rate)
        for step in range(1, self.cfg.n_steps + 1):
            v = self._estimator.run({"x": np.concatenate([x, x]), "t": np.asarray([t], np.float32),
                                     "cond": both})["velocity"]
            x = x + dt * ((1 + rate) * v[:1] - rate * v[1:])
            t = t + dt
            if step < self.cfg.n_steps:
                dt = grid[step + 1] - t
        t2 = time.perf_counter()
        self.timings = DesignTimings((t1 - t0) * 1e3, (t2 - t1) * 1e3, self.cfg.n_steps)
        log.info("designed a voice: condition %.1f ms, %d estimator calls %.1f ms", self.timings.condition_ms,
                 self.cfg.n_steps, self.timings.estimator_ms)
        return x[0].astype(np.float32)

    def close(self) -> None:
        self._condition = self._estimator = None


def bundle_has_designer(bundle: Bundle) -> bool:
    return all(name in bundle.files for name in DESIGNER_FILES)


def design_for_bundle(bundle: Bundle, role: str, seed: int = 0) -> np.ndarray | None:
    """A voice for `role` from the bundle's designer graphs (None where the bundle carries none); the
    graphs are closed before returning, so the conversation gets their memory back."""
    if not bundle_has_designer(bundle):
        return None
    designer = OnnxVoiceDesigner(bundle.root)
    try:
        vector = designer.design(role, seed)
    finally:
        designer.close()
    log.info("no --voice given: designed the agent's voice from the role description (seed %d, %.0f ms); "
             "keep it with `qinyu-edge voice design --name NAME`", seed,
             designer.timings.condition_ms + designer.timings.estimator_ms)
    return vector
