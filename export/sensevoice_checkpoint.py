"""Read and write a SenseVoiceSmall folder as FunASR ships it: model.pt, config.yaml, am.mvn.

`model.pt` is a torch state dict of the whole `SenseVoiceSmall` (encoder, query embedding and the
CTC head QinYu does not use); `config.yaml` carries the encoder shape in `encoder_conf` and the LFR
stacking in `frontend_conf`; `am.mvn` is a Kaldi nnet text file whose `<AddShift>` and `<Rescale>`
vectors give the CMVN applied after LFR: (x + shift) * scale.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import yaml

from qinyu_edge.config import SenseVoiceConfig
from qinyu_edge.errors import CheckpointError
from qinyu_edge.fileio import atomic_path

from .models.sensevoice import SenseVoiceEncoder

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
MVN_FILE = "am.mvn"
# Where the same encoder sits inside the VITA-QinYu LLM shards (model.audio_model.model = SenseVoiceSmall).
QINYU_SHARD_PREFIX = "model.audio_model.model."
# Present in every real SenseVoiceSmall state dict; QinYu never runs it.
CTC_PREFIX = "ctc.ctc_lo."
ENCODER_CLASS = "SenseVoiceEncoderSmall"

# SenseVoiceConfig field <- config.yaml encoder_conf key (FunASR spells the shift "sanm_shfit").
_ENCODER_FIELDS = {
    "output_size": "output_size",
    "attention_heads": "attention_heads",
    "linear_units": "linear_units",
    "num_blocks": "num_blocks",
    "tp_blocks": "tp_blocks",
    "kernel_size": "kernel_size",
    "sanm_shift": "sanm_shfit",
}
_FRONTEND_FIELDS = ("lfr_m", "lfr_n", "n_mels")
# Containers FunASR's own loader looks through, outermost first.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model")
_FIX = "Use the unmodified SenseVoiceSmall folder (FunAudioLLM/SenseVoiceSmall or iic/SenseVoiceSmall)."


def load_sensevoice_config(folder: str | os.PathLike) -> SenseVoiceConfig:
    """SenseVoiceConfig from `folder/config.yaml`; fields the file does not set keep their defaults."""
    path = Path(folder) / CONFIG_FILE
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing. {_FIX}") from None
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML ({e}). {_FIX}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("encoder_conf"), dict):
        raise CheckpointError(f"{path} has no encoder_conf mapping. {_FIX}")
    encoder = doc.get("encoder", ENCODER_CLASS)
    if encoder != ENCODER_CLASS:
        raise CheckpointError(f"{path} names encoder {encoder!r}; only {ENCODER_CLASS} is supported. {_FIX}")
    enc, frontend = doc["encoder_conf"], doc.get("frontend_conf") or {}
    # The module implements only the released layer form: pre-LN, no concat, SAN-M attention.
    for key, want in (("normalize_before", True), ("concat_after", False), ("selfattention_layer_type", "sanm")):
        if key in enc and enc[key] != want:
            raise CheckpointError(f"{path}: encoder_conf.{key} is {enc[key]!r}; only {want!r} is supported. {_FIX}")

    values: dict[str, Any] = {}
    bad = []
    for field, key in _ENCODER_FIELDS.items():
        if key in enc:
            values[field] = enc[key]
    for key in _FRONTEND_FIELDS:
        if key in frontend:
            values[key] = frontend[key]
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            bad.append(f"{name}={value!r}")
    if bad:
        raise CheckpointError(f"{path}: these settings must be non-negative integers: {', '.join(bad)}. {_FIX}")
    cfg = dataclasses.replace(SenseVoiceConfig(), **values)
    return dataclasses.replace(cfg, input_size=cfg.n_mels * cfg.lfr_m)


def read_am_mvn(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) float32 vectors from a Kaldi nnet `am.mvn`; CMVN is (x + shift) * scale."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the CMVN statistics are needed. {_FIX}") from None
    shift = _mvn_block(text, "<AddShift>", path)
    scale = _mvn_block(text, "<Rescale>", path)
    if shift.shape != scale.shape:
        raise CheckpointError(f"{path}: <AddShift> has {shift.size} values but <Rescale> has {scale.size}. {_FIX}")
    return shift, scale


def _mvn_block(text: str, tag: str, path: Path) -> np.ndarray:
    # "<Tag> rows cols\n<LearnRateCoef> 0 [ v1 v2 ... ]": the vector is the first bracket after the tag.
    match = re.search(re.escape(tag) + r"[^\[]*?<LearnRateCoef>[^\[]*\[([^\]]*)\]", text, flags=re.S)
    if match is None:
        raise CheckpointError(f"{path}: no {tag} block with a bracketed vector. {_FIX}")
    try:
        values = np.array([float(v) for v in match.group(1).split()], dtype=np.float32)
    except ValueError as e:
        raise CheckpointError(f"{path}: {tag} holds a non-number ({e}). {_FIX}") from None
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise CheckpointError(f"{path}: {tag} vector is empty or not finite. {_FIX}")
    return values


def unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a FunASR checkpoint (possibly nested, possibly `module.`-prefixed)."""
    for key in _NESTING_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source} does not hold a state dict of tensors. {_FIX}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def load_sensevoice_state(
    module: SenseVoiceEncoder, state_dict: Mapping[str, torch.Tensor], prefix: str = "", source: str = "state dict"
) -> list[str]:
    """Copy weights into `module`, strictly; returns the CTC keys that were present and dropped.

    With `prefix` (e.g. QINYU_SHARD_PREFIX) only keys under it are considered, so a full LLM shard
    dict can be passed. Missing, unexpected and mis-shaped keys raise one CheckpointError naming all.
    """
    own = module.state_dict()
    theirs = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not theirs:
        raise CheckpointError(f"{source} has no SenseVoice weights (no key starts with {prefix!r}). {_FIX}")
    dropped = sorted(k for k in theirs if k.startswith(CTC_PREFIX))
    missing = sorted(k for k in own if k not in theirs)
    unexpected = sorted(k for k in theirs if k not in own and not k.startswith(CTC_PREFIX))
    misshaped = sorted(
        f"{prefix}{k}: {tuple(theirs[k].shape)} != expected {tuple(v.shape)}"
        for k, v in own.items()
        if k in theirs and theirs[k].shape != v.shape
    )
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(prefix + k for k in missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(prefix + k for k in unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {'; '.join(misshaped)}")
        raise CheckpointError(
            f"SenseVoice weights in {source} do not match the encoder config "
            f"({module.cfg.num_blocks}+{module.cfg.tp_blocks} blocks, width {module.cfg.output_size}): "
            + " | ".join(parts)
            + f". Check that the config belongs to these weights. {_FIX}"
        )
    non_float = sorted(prefix + k for k in own if not theirs[k].is_floating_point())
    if non_float:
        raise CheckpointError(f"SenseVoice weights in {source} are not floating point: {', '.join(non_float)}. {_FIX}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(theirs[k])
    return dropped


def load_sensevoice(
    folder: str | os.PathLike, keep_query_rows: bool
) -> tuple[SenseVoiceEncoder, np.ndarray, np.ndarray]:
    """Encoder (eval mode, fp32) and CMVN (shift, scale) from a SenseVoiceSmall folder."""
    folder = Path(folder)
    absent = [n for n in (CONFIG_FILE, MODEL_FILE, MVN_FILE) if not (folder / n).is_file()]
    if absent:
        raise CheckpointError(f"{folder} lacks {', '.join(absent)}. {_FIX}")
    cfg = load_sensevoice_config(folder)
    try:
        raw = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{folder / MODEL_FILE} cannot be read as a weights-only torch file ({e}). {_FIX}"
        ) from None
    state = unwrap_state_dict(raw, str(folder / MODEL_FILE))
    ctc = state.get(CTC_PREFIX + "weight")
    if ctc is not None and ctc.dim() == 2:
        cfg = dataclasses.replace(cfg, ctc_vocab=int(ctc.shape[0]))
    module = SenseVoiceEncoder(cfg, keep_query_rows)
    dropped = load_sensevoice_state(module, state, source=str(folder / MODEL_FILE))
    if dropped:
        log.info("SenseVoice: dropped the unused CTC head (%s)", ", ".join(dropped))
    shift, scale = read_am_mvn(folder / MVN_FILE)
    if shift.size != cfg.input_size:
        raise CheckpointError(
            f"{folder / MVN_FILE} has {shift.size} values per block but the encoder takes {cfg.input_size} "
            f"(n_mels {cfg.n_mels} x lfr_m {cfg.lfr_m}). {_FIX}"
        )
    return module.eval(), shift, scale


def write_sensevoice_folder(
    module: SenseVoiceEncoder, cfg: SenseVoiceConfig, shift: np.ndarray, scale: np.ndarray, folder: str | os.PathLike
) -> Path:
    """Write `module` as a FunASR SenseVoiceSmall folder (model.pt, config.yaml, am.mvn); each file atomically.

    The CTC head is written as zeros of the real shape [ctc_vocab, D] so the folder has every key a
    real one has; nothing here reads it.
    """
    folder = Path(folder)
    shift = np.asarray(shift, dtype=np.float32).reshape(-1)
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    if shift.size != cfg.input_size or scale.size != cfg.input_size:
        raise ValueError(f"CMVN vectors must have {cfg.input_size} values, got {shift.size} and {scale.size}")
    if module.cfg != cfg:
        raise ValueError("cfg differs from the module's own config; the written folder would not load back")
    folder.mkdir(parents=True, exist_ok=True)

    state = {k: v.detach().to(torch.float32).clone().contiguous() for k, v in module.state_dict().items()}
    state[CTC_PREFIX + "weight"] = torch.zeros(cfg.ctc_vocab, cfg.output_size)
    state[CTC_PREFIX + "bias"] = torch.zeros(cfg.ctc_vocab)
    _atomic_write(folder / MODEL_FILE, lambda f: torch.save(state, f))
    config_text = yaml.safe_dump(_funasr_config(cfg), sort_keys=False, default_flow_style=False)
    _atomic_write(folder / CONFIG_FILE, lambda f: f.write(config_text.encode("utf-8")))
    _atomic_write(folder / MVN_FILE, lambda f: f.write(_am_mvn_text(shift, scale).encode("utf-8")))
    return folder


def _funasr_config(cfg: SenseVoiceConfig) -> dict[str, Any]:
    # The keys FunASR's SenseVoiceSmall config.yaml carries for the model and its frontend.
    return {
        "encoder": ENCODER_CLASS,
        "encoder_conf": {
            "output_size": cfg.output_size,
            "attention_heads": cfg.attention_heads,
            "linear_units": cfg.linear_units,
            "num_blocks": cfg.num_blocks,
            "tp_blocks": cfg.tp_blocks,
            "dropout_rate": 0.1,
            "positional_dropout_rate": 0.1,
            "attention_dropout_rate": 0.1,
            "input_layer": "pe",
            "pos_enc_class": "SinusoidalPositionEncoder",
            "normalize_before": True,
            "kernel_size": cfg.kernel_size,
            "sanm_shfit": cfg.sanm_shift,
            "selfattention_layer_type": "sanm",
        },
        "model": "SenseVoiceSmall",
        "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1},
        "tokenizer": "SentencepiecesTokenizer",
        "tokenizer_conf": {"bpemodel": None, "unk_symbol": "<unk>", "split_with_space": True},
        "frontend": "WavFrontend",
        "frontend_conf": {
            "fs": 16000,
            "window": "hamming",
            "n_mels": cfg.n_mels,
            "frame_length": 25,
            "frame_shift": 10,
            "lfr_m": cfg.lfr_m,
            "lfr_n": cfg.lfr_n,
            "cmvn_file": None,
        },
    }


def _am_mvn_text(shift: np.ndarray, scale: np.ndarray) -> str:
    def vector(v: np.ndarray) -> str:
        # 9 significant digits round-trip any float32 exactly.
        return " ".join(f"{x:.9g}" for x in v.tolist())

    n = shift.size
    return (
        f"<Nnet> \n<Splice> {n} {n}\n[ 0 ]\n"
        f"<AddShift> {n} {n} \n<LearnRateCoef> 0 [ {vector(shift)} ]\n"
        f"<Rescale> {n} {n} \n<LearnRateCoef> 0 [ {vector(scale)} ]\n"
        "</Nnet> \n"
    )


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


__all__ = [
    "QINYU_SHARD_PREFIX",
    "load_sensevoice_config",
    "read_am_mvn",
    "unwrap_state_dict",
    "load_sensevoice_state",
    "load_sensevoice",
    "write_sensevoice_folder",
]
