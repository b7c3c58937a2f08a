"""VoiceDesign as two ONNX graphs for the torch-free designer (runtime/voice_designer.py).

- `voice_condition.onnx`: token ids [1, tokens] -> condition [1, 192] (embedding model, last-token
  pooling, L2 norm, projection): one call per design.
- `voice_estimator.onnx`: x [B, 192], t [1], cond [B, 192] -> velocity [B, 192]. The target has
  length 1, so upstream's mask is all ones and is folded away; B = 2 carries the conditioned and the
  zero-conditioned branch of one guidance step in one call (every op is per row, so this equals two
  calls).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qinyu_edge.runtime.voice_designer import CONDITION_FILE, ESTIMATOR_FILE, TOKENIZER_FILE

from .onnx_io import compare, export_onnx, run_onnx
from .voice_design import VoiceDesigner

log = logging.getLogger(__name__)



class _Condition(nn.Module):
    def __init__(self, designer: VoiceDesigner):
        super().__init__()
        self.encoder, self.head = designer.encoder, designer.head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state
        return self.head.condition(hidden[:, -1])


class Velocity(nn.Module):
    """The estimator with its all-ones mask folded away, on [B, 192] rows."""

    def __init__(self, estimator: nn.Module):
        super().__init__()
        self.estimator = estimator

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(-1)
        return self.estimator(x, torch.ones_like(x[:, :1]), t, cond).squeeze(-1)


@dataclass(frozen=True)
class VoiceGraphs:
    condition: Path
    estimator: Path
    tokenizer: Path
    parity: dict[str, float]  # graph -> relative error against PyTorch


def export_voice_design(designer: VoiceDesigner, out: str | Path, role: str = "该角色是一个中年男性，温和") -> VoiceGraphs:
    out = Path(out)
    ids = torch.tensor([designer.token_ids(role)], dtype=torch.long)
    condition = export_onnx(_Condition(designer).eval(), (ids,), out / CONDITION_FILE, ["input_ids"], ["condition"],
                            {"input_ids": {1: "tokens"}})
    g = torch.Generator().manual_seed(0)
    x, cond, t = torch.randn(2, 192, generator=g), torch.randn(2, 192, generator=g), torch.tensor([0.3])
    estimator = export_onnx(Velocity(designer.head.estimator).eval(), (x, t, cond), out / ESTIMATOR_FILE, ["x", "t", "cond"],
                            ["velocity"], {"x": {0: "batch"}, "cond": {0: "batch"}, "velocity": {0: "batch"}})
    tokenizer = out / TOKENIZER_FILE
    designer.tokenizer.save(str(tokenizer))
    with torch.no_grad():
        other = torch.tensor([designer.token_ids(role + "，说话慢")], dtype=torch.long)
        parity = {
            CONDITION_FILE: max(compare(run_onnx(condition, {"input_ids": i.numpy()}),
                                        {"condition": _Condition(designer)(i).numpy()})[0].rel for i in (ids, other)),
            ESTIMATOR_FILE: compare(run_onnx(estimator, {"x": x.numpy(), "t": t.numpy(), "cond": cond.numpy()}),
                                    {"velocity": Velocity(designer.head.estimator)(x, t, cond).numpy()})[0].rel,
        }
    log.info("VoiceDesign graphs in %s, parity %s", out, parity)
    return VoiceGraphs(condition, estimator, tokenizer, parity)

