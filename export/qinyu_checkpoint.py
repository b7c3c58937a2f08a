"""Load a whole VITA-QinYu model from its real folders, and write tiny presets in that same layout.

The folders, as released:
- the LLM checkpoint (`VITA-MLLM/VITA-QinYu-8B` or `-4B`): `config.json`, safetensors shards with
  `model.safetensors.index.json`, `tokenizer.json`; keys `model.*` (backbone, `audio_model.model.*`
  SenseVoice weights, `audio_projection.*`, `speaker_projection.*`) and `lm_head.weight` (8B; tied in 4B).
- the SenseVoiceSmall folder: `model.pt`, `config.yaml`, `am.mvn` (CMVN is only there).
- the models folder (`VITA-MLLM/VITA-QinYu-Models`): `xy_tokenizer.ckpt` + `xy_tokenizer_config.yaml`,
  `campplus_cn_common.bin`, `spk2embeds_roleplay.pt`.

A tiny preset is written as exactly these folders (random weights, fixed seed) and read back through
the same functions, so every test runs the real loading path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from qinyu_edge.config import (
    SPEAKER_DIM, BackboneConfig, CamPPConfig, ModelConfig, ProjectorConfig, preset, with_vocab,
)
from qinyu_edge.errors import CheckpointError, ConfigError
from qinyu_edge.fileio import atomic_path, atomic_write_text
from qinyu_edge.tokens import TokenLayout

from .checkpoint_checks import FP16_MAX, check_dtypes, fp16_overflow, read_header
from .models.backbone import build_backbone, hollow_backbone
from .models.campplus import CAMPPlus
from .models.heads import Embedding, Heads
from .models.projector import Projector
from .models.sensevoice import SenseVoiceEncoder
from .models.xy_decoder import XYDecoder
from .sensevoice_checkpoint import (
    load_sensevoice_config, load_sensevoice_state, read_am_mvn, unwrap_state_dict, write_sensevoice_folder,
)
from .speaker_checkpoint import load_campplus, load_speaker_presets, write_campplus, write_official_speaker_dict
from .state_dict import check_keys, load_strict, torch_load
from .tiny_tokenizer import build_tiny_tokenizer, padded_vocab_size
from .xy_checkpoint import load_xy_decoder, write_xy_checkpoint

log = logging.getLogger(__name__)

MODEL_TYPES = {"qwen3_sensevoice_xy": "8b", "vita_utu_v1": "4b"}
SENSEVOICE_PREFIX = "model.audio_model.model."
XY_CKPT = "xy_tokenizer.ckpt"
CAMPPLUS_BIN = "campplus_cn_common.bin"
SPEAKERS_PT = "spk2embeds_roleplay.pt"
INDEX = "model.safetensors.index.json"
# A backbone above this (float32) is exported from the shards tensor by tensor, never built whole.
STREAM_BACKBONE_BYTES = 2 << 30


@dataclass
class QinYuModel:
    """Every neural part of one VITA-QinYu variant, in PyTorch, plus what the host needs."""

    config: ModelConfig
    tokenizer: Tokenizer
    layout: TokenLayout
    encoder: SenseVoiceEncoder
    cmvn_shift: np.ndarray
    cmvn_scale: np.ndarray
    audio_projector: Projector
    speaker_projector: Projector
    backbone: torch.nn.Module
    embedding: Embedding
    heads: Heads
    xy: XYDecoder
    campplus: CAMPPlus
    speakers: dict[str, np.ndarray]
    origin: dict[str, Any] = field(default_factory=dict)
    # Set when `backbone` is hollow (parameters on the meta device): its weights by module name.
    backbone_weights: Callable[[str], np.ndarray] | None = None

    def eval(self) -> "QinYuModel":
        for m in (self.encoder, self.audio_projector, self.speaker_projector, self.backbone,
                  self.embedding, self.heads, self.xy, self.campplus):
            m.eval()
        return self


# --- reading ---------------------------------------------------------------------------------

def read_backbone_config(folder: Path) -> tuple[str, BackboneConfig, dict[str, Any]]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json: point --checkpoint at a VITA-QinYu-8B/-4B model folder.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}). Re-download the checkpoint's config.json.") from e
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{path}: model_type {model_type!r} is not a VITA-QinYu architecture; qinyu-edge knows "
            f"{', '.join(MODEL_TYPES)} (VITA-QinYu-8B on Qwen3, VITA-QinYu-4B on Youtu-LLM)."
        )
    variant = MODEL_TYPES[model_type]
    try:
        common = dict(
            hidden_size=raw["hidden_size"], num_layers=raw["num_hidden_layers"],
            intermediate_size=raw["intermediate_size"], num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw["num_key_value_heads"], head_dim=raw.get("head_dim", 0),
            vocab_size=raw["vocab_size"], rope_theta=float(raw["rope_theta"]),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6), tie_word_embeddings=raw.get("tie_word_embeddings", False),
            max_position_embeddings=raw.get("max_position_embeddings", 40960),
            use_audio_heads=raw.get("use_audio_heads", False),
        )
        if variant == "4b":
            cfg = BackboneConfig(
                arch="utu_mla", q_lora_rank=raw["q_lora_rank"], kv_lora_rank=raw["kv_lora_rank"],
                qk_nope_head_dim=raw["qk_nope_head_dim"], qk_rope_head_dim=raw["qk_rope_head_dim"],
                v_head_dim=raw["v_head_dim"], rope_interleave=raw.get("rope_interleave", True), **common,
            )
        else:
            cfg = BackboneConfig(arch="qwen3", **common)
    except KeyError as e:
        raise CheckpointError(f"{path} lacks the field {e.args[0]!r} that a {model_type} config must have.") from e
    if raw.get("codebook_size", 1032) != 1032 or raw.get("num_codebook", 8) != 8:
        raise ConfigError(f"{path}: expected 8 codebooks of 1032 ids, got {raw.get('num_codebook')} x {raw.get('codebook_size')}.")
    return variant, cfg, raw


class SafetensorsFolder(Mapping[str, torch.Tensor]):
    """The tensors of a sharded (index + shards) or single-file safetensors checkpoint, read one
    at a time when asked for: a real-size model is never held whole. Every shard's header is
    read (and checked) when the folder is opened."""

    def __init__(self, folder: Path) -> None:
        index = folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
            absent = [s for s in shards if not (folder / s).is_file()]
            if absent:
                raise CheckpointError(
                    f"{folder}: {INDEX} names {len(absent)} shard(s) that are not there: {', '.join(absent)}. "
                    "The download is incomplete; fetch the missing shards."
                )
        else:
            shards = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_map = None
            if not shards:
                raise CheckpointError(f"{folder} has no safetensors weights (no {INDEX}, no *.safetensors).")
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for shard in shards:
            path = folder / shard
            start, header = read_header(path)
            try:
                with safe_open(str(path), framework="pt"):
                    pass  # the library's own validation of the header and offsets
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
                raise CheckpointError(f"{path} is not a readable safetensors file ({e}). Re-download it.") from e
            self._where.update({k: (path, start, v) for k, v in header.items() if k != "__metadata__"})
        if weight_map is not None:
            lost = sorted(k for k in weight_map if k not in self._where)
            if lost:
                raise CheckpointError(f"{folder}: {len(lost)} key(s) listed in {INDEX} are in no shard: {lost[:10]}.")
        self.folder = folder

    def __getitem__(self, key: str) -> torch.Tensor:
        # Read, not memory-mapped: mapped shard pages would count as this process's resident
        # memory long after each tensor is used, up to the whole checkpoint.
        path, start, info = self._where[key]
        lo, hi = info["data_offsets"]
        buf = bytearray(hi - lo)
        with open(path, "rb") as f:
            f.seek(start + lo)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{path}: tensor {key} is cut short. Re-download the shard.")
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key} has dtype {info['dtype']}, which no VITA-QinYu checkpoint uses.")
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor's shape and dtype, read from the headers (meta tensors: no data)."""
        return {k: torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES.get(info["dtype"], torch.uint8), device="meta")
                for k, (_, _, info) in self._where.items()}


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def read_tokenizer(folder: Path) -> tuple[Tokenizer, TokenLayout]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json: the checkpoint folder must carry its tokenizer.")
    tok = Tokenizer.from_file(str(path))
    return tok, TokenLayout.from_tokenizer(tok)


def _sub(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, read (only those), keyed without it."""
    return {k[len(prefix):]: state[k] for k in state if k.startswith(prefix)}


def load_qinyu(checkpoint: str | os.PathLike, sensevoice: str | os.PathLike, models: str | os.PathLike,
               *, name: str | None = None, campplus_config: CamPPConfig | None = None,
               projector_eps: float | None = None, tiny: bool = False,
               stream_backbone: bool | None = None) -> QinYuModel:
    """Build a QinYuModel from the three real folders (see the module docstring).

    `stream_backbone` leaves the backbone's layers hollow and reads their weights from the shards
    only when export writes them (`QinYuModel.backbone_weights`); by default, when the backbone's
    float32 weights exceed `STREAM_BACKBONE_BYTES`."""
    ckpt, sv_dir, models_dir = Path(checkpoint), Path(sensevoice), Path(models)
    for label, p in (("--checkpoint", ckpt), ("--sensevoice", sv_dir), ("--xy", models_dir)):
        if not p.is_dir():
            raise CheckpointError(f"{label} {p} is not a folder.")
    variant, backbone_cfg, raw = read_backbone_config(ckpt)
    tokenizer, layout = read_tokenizer(ckpt)
    if tokenizer.get_vocab_size(with_added_tokens=True) > backbone_cfg.vocab_size:
        raise CheckpointError(
            f"{ckpt}: the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens but the model "
            f"only {backbone_cfg.vocab_size} embedding rows; the tokenizer belongs to another checkpoint."
        )
    sv_cfg = load_sensevoice_config(sv_dir)
    shift, scale = read_am_mvn(sv_dir / "am.mvn")
    xy = load_xy_decoder(models_dir / XY_CKPT)
    base = preset(f"{'tiny' if tiny else 'qinyu'}-{variant}")
    norm = "layer_norm" if raw.get("audio_projection_norm_type", "layer_norm") == "layer_norm" else "rms_norm"
    eps = projector_eps if projector_eps is not None else base.audio_projector.eps
    h = backbone_cfg.hidden_size
    cfg = dataclasses.replace(
        base, name=name or ckpt.name, backbone=backbone_cfg, sensevoice=sv_cfg, xy=xy.cfg,
        campplus=campplus_config or base.campplus,
        audio_projector=ProjectorConfig(base.audio_projector.input_size if tiny else 512, h, norm, eps),
        speaker_projector=ProjectorConfig(raw.get("speaker_embedding_size", SPEAKER_DIM), h, norm, eps),
    )

    state = SafetensorsFolder(ckpt)
    shapes = state.meta()
    overflow = fp16_overflow(state)
    if overflow:
        # Not an error: the fp32 export keeps them; an fp16 engine would turn them into inf.
        log.warning("%d tensor(s) hold values beyond fp16's range (+-%g): %s", len(overflow), FP16_MAX,
                    ", ".join(f"{k}: {n} value(s)" for k, n in sorted(overflow.items())))
    fix = "use the unmodified VITA-QinYu checkpoint folder that matches its config.json"
    encoder = SenseVoiceEncoder(sv_cfg, keep_query_rows=cfg.keep_query_rows)
    sv_state = _sub(state, SENSEVOICE_PREFIX)
    if sv_state:
        load_sensevoice_state(encoder, sv_state)
        sv_source = "checkpoint shards"
    else:
        # The official loader builds the encoder from the SenseVoiceSmall folder first; shards
        # without model.audio_model.* leave those weights in place.
        load_sensevoice_state(encoder, unwrap_state_dict(torch_load(sv_dir / "model.pt"), str(sv_dir / "model.pt")))
        sv_source = "SenseVoiceSmall model.pt"
    del sv_state
    log.info("SenseVoice weights from %s", sv_source)

    audio_projector = Projector(cfg.audio_projector)
    speaker_projector = Projector(cfg.speaker_projector)
    backbone = hollow_backbone(backbone_cfg)
    rest = {k: v for k, v in shapes.items() if not k.startswith("model.audio_model.")}
    expected: dict[str, Any] = {}
    parts = {"model.audio_projection.": audio_projector, "model.speaker_projection.": speaker_projector, "model.": backbone}
    for prefix, module in parts.items():
        expected.update({prefix + k: v.shape for k, v in module.state_dict().items()})
    vocab, hidden = backbone_cfg.vocab_size, backbone_cfg.hidden_size
    has_head = "lm_head.weight" in rest
    if not backbone_cfg.tie_word_embeddings or has_head:
        expected["lm_head.weight"] = (vocab, hidden)
    if backbone_cfg.use_audio_heads:
        for i in range(cfg.n_codebooks - 1):
            expected[f"audio_heads.{i}.weight"] = (cfg.ids_per_book, hidden)
    # fused_audio_head (4B, use_audio_heads) is a concatenation of audio_heads: redundant.
    check_keys(expected, rest, f"checkpoint {ckpt}", fix, ignore_prefixes=("fused_audio_head.",))
    check_dtypes(shapes, raw.get("torch_dtype"), f"checkpoint {ckpt}")
    load_strict(audio_projector, _sub(state, "model.audio_projection."), str(ckpt), fix)
    load_strict(speaker_projector, _sub(state, "model.speaker_projection."), str(ckpt), fix)
    backbone_keys = [k for k in backbone.state_dict()]
    if stream_backbone is None:
        stream_backbone = sum(shapes["model." + k].numel() for k in backbone_keys) * 4 > STREAM_BACKBONE_BYTES
    backbone_weights = None
    if stream_backbone:
        # The layers stay hollow: export reads each weight from the shards when it writes it.
        def backbone_weights(name: str) -> np.ndarray:
            return state["model." + name].float().numpy()
        log.info("backbone weights stay in the checkpoint until export streams them")
    else:
        backbone = build_backbone(backbone_cfg)
        load_strict(backbone, {k: state["model." + k] for k in backbone_keys}, str(ckpt), fix)
    embed = state["model.embed_tokens.weight"].float()
    lm_head = state["lm_head.weight"].float() if has_head else embed
    audio_heads = None
    if backbone_cfg.use_audio_heads:
        audio_heads = torch.stack([state[f"audio_heads.{i}.weight"].float() for i in range(cfg.n_codebooks - 1)])

    campplus = load_campplus(models_dir / CAMPPLUS_BIN, cfg.campplus)
    speakers = load_speaker_presets(models_dir / SPEAKERS_PT) if (models_dir / SPEAKERS_PT).is_file() else {}
    if not speakers:
        log.warning("%s has no %s: role-play needs a speaker file passed at run time", models_dir, SPEAKERS_PT)
    model = QinYuModel(
        config=cfg, tokenizer=tokenizer, layout=layout, encoder=encoder.float(), cmvn_shift=shift, cmvn_scale=scale,
        audio_projector=audio_projector.float(), speaker_projector=speaker_projector.float(),
        backbone=backbone.float() if backbone_weights is None else backbone, backbone_weights=backbone_weights,
        embedding=Embedding(embed), heads=Heads(lm_head, layout, cfg.repetition_penalty, audio_heads),
        xy=xy.float(), campplus=campplus.float(), speakers=speakers,
        origin={"checkpoint": str(ckpt.resolve()), "sensevoice": str(sv_dir.resolve()), "models": str(models_dir.resolve()),
                "sensevoice_weights": sv_source, "fp16_overflow": overflow},
    )
    return model.eval()


# --- tiny presets in the real layout ------------------------------------------------------------

def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights, per tensor name, independent of construction order.

    Norm gains get 1 + noise (not exactly 1) so a wrong norm placement shows in parity tests.
    Buffers are left as each module builds them (position tables, windows), except the ones that
    are weights in the real checkpoints (codebooks, BatchNorm statistics).
    """
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            is_param = any(t is p for p in module.parameters())
            leaf = name.rsplit(".", 1)[-1]
            if not is_param and not leaf.endswith(("codebook", "running_mean", "running_var")):
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if leaf == "running_var":
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() >= 2:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) / fan_in**0.5)
            elif leaf == "weight":
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.05 * torch.randn(t.shape, generator=g))


def _official_config_json(cfg: ModelConfig, layout: TokenLayout) -> dict[str, Any]:
    b = cfg.backbone
    d: dict[str, Any] = {
        "hidden_size": b.hidden_size, "num_hidden_layers": b.num_layers, "intermediate_size": b.intermediate_size,
        "num_attention_heads": b.num_attention_heads, "num_key_value_heads": b.num_key_value_heads,
        "head_dim": b.head_dim, "vocab_size": b.vocab_size, "rope_theta": b.rope_theta, "rms_norm_eps": b.rms_norm_eps,
        "tie_word_embeddings": b.tie_word_embeddings, "max_position_embeddings": b.max_position_embeddings,
        "codebook_size": cfg.ids_per_book, "num_codebook": cfg.n_codebooks, "use_audio_heads": False,
        "use_speaker_embedding": True, "speaker_embedding_size": SPEAKER_DIM, "num_nextn_predict_layers": 0,
        "audio_projection_norm_type": cfg.audio_projector.norm, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "attention_bias": False, "rope_scaling": None,
    }
    if b.is_mla:
        d.update(model_type="vita_utu_v1", architectures=["VITAUTUV1ForCausalLM"], q_lora_rank=b.q_lora_rank,
                 kv_lora_rank=b.kv_lora_rank, qk_nope_head_dim=b.qk_nope_head_dim, qk_rope_head_dim=b.qk_rope_head_dim,
                 qk_head_dim=b.qk_head_dim, v_head_dim=b.v_head_dim, rope_interleave=b.rope_interleave,
                 first_k_dense_replace=b.num_layers)
    else:
        d.update(model_type="qwen3_sensevoice_xy", architectures=["Qwen3MTPSenseVoiceForCausalLM"])
    return d


def _save_shards(state: dict[str, torch.Tensor], folder: Path, n_shards: int = 2) -> None:
    keys = sorted(state)
    per = -(-len(keys) // n_shards)
    weight_map, total = {}, 0
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    atomic_write_text(folder / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_checkpoint_text(cfg: ModelConfig, tok: Tokenizer, ckpt: Path) -> None:
    """config.json, tokenizer.json and tokenizer_config.json of a VITA-QinYu checkpoint folder."""
    layout = TokenLayout.from_tokenizer(tok)
    atomic_write_text(ckpt / "config.json", json.dumps(_official_config_json(cfg, layout), indent=2))
    with atomic_path(ckpt / "tokenizer.json", suffix=".json") as tmp:
        tok.save(str(tmp))
    atomic_write_text(ckpt / "tokenizer_config.json", json.dumps(
        {"model_max_length": cfg.backbone.max_position_embeddings, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))


def write_side_folders(cfg: ModelConfig, encoder: SenseVoiceEncoder, sv: Path, models: Path, seed: int) -> None:
    """The SenseVoiceSmall folder (from `encoder`, random CMVN) and the models folder (random XY
    decoder, CAM++ and three voices), each in its released layout."""
    g = np.random.default_rng(seed)
    write_sensevoice_side(cfg, encoder, sv, g)
    write_models_folder(cfg, models, seed, g)


def write_sensevoice_side(cfg: ModelConfig, encoder: SenseVoiceEncoder, sv: Path, g: np.random.Generator) -> None:
    shift = (-g.normal(0, 1, cfg.sensevoice.input_size) - 10).astype(np.float32)
    scale = (1.0 / g.uniform(2.0, 4.0, cfg.sensevoice.input_size)).astype(np.float32)
    write_sensevoice_folder(encoder, cfg.sensevoice, shift, scale, sv)


def write_models_folder(cfg: ModelConfig, models: Path, seed: int, g: np.random.Generator) -> None:
    models.mkdir(parents=True, exist_ok=True)
    xy = XYDecoder(cfg.xy)
    _randomize(xy, seed)
    write_xy_checkpoint(xy, cfg.xy, models / XY_CKPT)
    del xy  # the real-size decoder is 1 GB in fp32: free it before CAM++ is built
    campplus = CAMPPlus(cfg.campplus)
    _randomize(campplus, seed)
    write_campplus(campplus, models / CAMPPLUS_BIN)
    voices = {name: g.normal(0, 1, SPEAKER_DIM).astype(np.float32) for name in ("tian", "2619-王承恩", "narrator")}
    write_official_speaker_dict(voices, models / SPEAKERS_PT)


def write_tiny_folders(preset_name: str, root: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write `checkpoint/`, `sensevoice/` and `models/` for a tiny preset, in the real layouts."""
    base = preset(preset_name)
    if not base.tiny:
        raise ConfigError(f"{preset_name} is a real-size config: its weights come from a checkpoint, not a preset.")
    root = Path(root)
    tok = build_tiny_tokenizer()
    cfg = with_vocab(base, padded_vocab_size(tok))
    torch.manual_seed(seed)
    encoder = SenseVoiceEncoder(cfg.sensevoice, keep_query_rows=cfg.keep_query_rows)
    parts = {
        "model.audio_model.model.": encoder,
        "model.audio_projection.": Projector(cfg.audio_projector),
        "model.speaker_projection.": Projector(cfg.speaker_projector),
        "model.": build_backbone(cfg.backbone),
    }
    state: dict[str, torch.Tensor] = {}
    for prefix, module in parts.items():
        _randomize(module, seed)
        state.update({prefix + k: v.detach().to(torch.bfloat16) for k, v in module.state_dict().items()})
    if not cfg.backbone.tie_word_embeddings:
        g = torch.Generator().manual_seed(seed + 17)
        head = torch.randn(cfg.backbone.vocab_size, cfg.backbone.hidden_size, generator=g) / cfg.backbone.hidden_size**0.5
        state["lm_head.weight"] = head.to(torch.bfloat16)
    # The round trip through bf16 is the released dtype; the modules are then read back in fp32.
    for prefix, module in parts.items():
        module.load_state_dict({k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}, strict=False)

    ckpt, sv, models = root / "checkpoint", root / "sensevoice", root / "models"
    ckpt.mkdir(parents=True, exist_ok=True)
    _save_shards(state, ckpt)
    write_checkpoint_text(cfg, tok, ckpt)
    write_side_folders(cfg, encoder, sv, models, seed)
    return {"checkpoint": ckpt, "sensevoice": sv, "models": models}


def cache_dir() -> Path:
    return Path(os.environ.get("QINYU_EDGE_CACHE", Path.home() / ".cache" / "qinyu-edge"))


def load_preset(preset_name: str, seed: int = 0) -> QinYuModel:
    """A tiny preset: written once in the real layout under the cache folder, then loaded from it."""
    root = cache_dir() / "presets" / f"{preset_name}-seed{seed}"
    if not (root / "complete").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
        try:
            write_tiny_folders(preset_name, tmp, seed)
            (tmp / "complete").write_text("ok\n")
            if root.exists() and not (root / "complete").is_file():
                shutil.rmtree(root)  # a leftover from an interrupted write
            try:
                os.replace(tmp, root)
            except OSError:
                # Another process finished the same preset first; its copy is identical.
                if not (root / "complete").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    base = preset(preset_name)
    return load_qinyu(root / "checkpoint", root / "sensevoice", root / "models", name=preset_name,
                      campplus_config=base.campplus, tiny=True)
