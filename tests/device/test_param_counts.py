"""The planner's parameter counts, derived from the configs, against the torch modules the exporter
builds from the same configs (real sizes on the meta device: shapes only, no memory)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qinyu_edge.config import preset, with_vocab  # noqa: E402
from qinyu_edge.device.planner import backbone_params, projector_params  # noqa: E402
from qinyu_edge.export.models.backbone import build_backbone  # noqa: E402
from qinyu_edge.export.models.campplus import CAMPPlus  # noqa: E402
from qinyu_edge.export.models.projector import Projector  # noqa: E402
from qinyu_edge.export.models.sensevoice import SenseVoiceEncoder  # noqa: E402
from qinyu_edge.export.models.xy_decoder import XYDecoder  # noqa: E402

TINY_VOCAB = 8544  # any size does: the tiny presets take theirs from the tokenizer


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["tiny-8b", "tiny-4b", "qinyu-8b", "qinyu-4b"])
def test_counts_equal_the_modules(name):
    cfg = preset(name)
    if cfg.tiny:
        cfg = with_vocab(cfg, TINY_VOCAB)
    with torch.device("meta"):
        encoder = SenseVoiceEncoder(cfg.sensevoice, cfg.keep_query_rows)
        xy = XYDecoder(cfg.xy)
        campp = CAMPPlus(cfg.campplus)
        backbone = build_backbone(cfg.backbone)
        projectors = Projector(cfg.audio_projector), Projector(cfg.speaker_projector)
    assert cfg.sensevoice.param_count() == numel(encoder)
    # What `quantize --encoder int8` narrows: the Linear layers' weight matrices.
    linear = [m.weight.numel() for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert cfg.sensevoice.matrix_param_count() == sum(linear)
    assert cfg.xy.param_count() == numel(xy)
    # Codebooks, position tables, window and ISTFT basis: the buffers the graph carries as constants.
    assert cfg.xy.table_count() == sum(b.numel() for b in xy.buffers())
    assert cfg.campplus.param_count() == numel(campp)
    b = backbone_params(cfg)
    # The module holds the embedding table; the lm_head lives in the heads unless tied.
    assert cfg.backbone.param_count() == numel(backbone) + (0 if b.tied else b.vocab_matrix)
    assert b.linear + b.norms + b.batched + b.vocab_matrix == numel(backbone)
    # MLA's kv_b_proj: the weights every recipe keeps in the activation dtype (3-D once absorbed).
    mla = [m.kv_b_proj.weight.numel() for m in backbone.modules() if hasattr(m, "kv_b_proj")]
    assert b.batched == sum(mla) and bool(mla) == cfg.backbone.is_mla
    assert [projector_params(p) for p in (cfg.audio_projector, cfg.speaker_projector)] == [numel(p) for p in projectors]


def test_real_counts_are_model_spec_section_7():
    cfg = preset("qinyu-8b")
    assert round(cfg.sensevoice.param_count() / 1e6, 1) == 221.1  # without the unused CTC head
    assert round(cfg.xy.param_count() / 1e6, 1) == 258.2
    assert round(cfg.campplus.param_count() / 1e6, 2) == 6.85
