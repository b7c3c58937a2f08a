"""VoiceDesign checkpoints: the released layouts, their loaders, a tiny preset, and the designer.

Layouts (as released):
- `voicedesign/voicedesign.pt`: the state dict of upstream's `Text2SpeakerEmbeddingFlow`, possibly
  wrapped under `state_dict` or `model`. Keys `decoder.estimator.*` (the DiT) and
  `decoder.text_encoder.projection.*` (Linear(1024, 192)); a copy of the frozen embedding model under
  `decoder.text_encoder.text_encoder.*` may be present and is skipped (the embedding folder is the
  source of those weights, and they are frozen, so both copies are equal).
- the embedding model folder (Qwen3-Embedding-0.6B): `config.json` (model_type qwen3),
  `model.safetensors` or sharded with `model.safetensors.index.json` (keys with or without the
  `model.` prefix), `tokenizer.json`.

The estimator's depth and ConvNeXt width are read from the checkpoint's shapes, so the real file and
the tiny preset go through the same loader.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import Qwen3Config, Qwen3Model

from qinyu_edge.errors import CheckpointError
from qinyu_edge.fileio import atomic_path, atomic_write_text
from qinyu_edge.role_text import check_role, normalise_role
from qinyu_edge.voice_sampling import REAL, TINY, VoiceDesignConfig, design_noise

from .models.voice_design import VoiceDesignHead
from .state_dict import atomic_torch_save, load_strict, torch_load

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "voicedesign.pt"
TEXT_ENCODER_DIR = "Qwen3-Embedding-0.6B"
_PREFIX_MAP = {"decoder.estimator.": "estimator.", "decoder.text_encoder.projection.": "projection."}
_FROZEN_COPY = "decoder.text_encoder.text_encoder."
_HEAD_FIX = ("use voicedesign/voicedesign.pt from VITA-QinYu-Models (merged to one file), or a file written by "
             "write_voicedesign().")


# --- the trained head: projection + DiT -----------------------------------------------------------

def _unwrap(raw: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(raw, Mapping):
        for key in ("state_dict", "model"):  # the wrappers upstream's loader accepts
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} is not a VoiceDesign state dict (name -> tensor). Fix: {_HEAD_FIX}")
    return dict(raw)


def _rename(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in _PREFIX_MAP.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def _config_from_state(state: Mapping[str, torch.Tensor]) -> VoiceDesignConfig:
    """Depth and ConvNeXt width from the shapes; everything else is the architecture's constant."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"estimator\.blocks\.(\d+)\.", k))}
    inner = state.get("estimator.time_mlp.layer.0.weight")
    if not blocks or inner is None:
        return REAL  # check_keys then names what is missing
    return replace(REAL, n_layers=max(blocks) + 1, filter_channels=int(inner.shape[0]))


def load_voicedesign(path: str | os.PathLike, text_dim: int) -> VoiceDesignHead:
    path = Path(path)
    state = _rename(_unwrap(torch_load(path), path))
    head = VoiceDesignHead(_config_from_state(state), text_dim)
    load_strict(head, state, str(path), _HEAD_FIX, ignore_prefixes=(_FROZEN_COPY,))
    return head.eval()


def write_voicedesign(head: VoiceDesignHead, path: str | os.PathLike) -> Path:
    """The released layout: upstream's flow state dict (head only), atomically."""
    inverse = {new: old for old, new in _PREFIX_MAP.items()}
    state = {}
    for key, value in head.state_dict().items():
        prefix = next(p for p in inverse if key.startswith(p))
        state[inverse[prefix] + key[len(prefix):]] = value.detach().clone()
    atomic_torch_save(state, path)
    return Path(path)


# --- the embedding model folder -------------------------------------------------------------------

def _folder_state(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    shards = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
              else ["model.safetensors"])
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise CheckpointError(f"{folder / shard} is missing: copy the whole Qwen3-Embedding-0.6B folder.")
        state.update(load_file(str(folder / shard)))
    # Saved from Qwen3Model (no prefix) or from a causal-LM wrapper (`model.` prefix, an lm_head we skip).
    return {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("lm_head.")}


def load_text_encoder(folder: str | os.PathLike) -> tuple[Qwen3Model, Tokenizer]:
    folder = Path(folder)
    missing = [n for n in ("config.json", "tokenizer.json") if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{folder} lacks {', '.join(missing)}: point --text-encoder at the "
                              "Qwen3-Embedding-0.6B folder (config.json, model.safetensors, tokenizer.json).")
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") != "qwen3":
        raise CheckpointError(f"{folder}/config.json has model_type {raw.get('model_type')!r}, not 'qwen3': "
                              "VoiceDesign was trained on Qwen3-Embedding-0.6B; use that folder.")
    config = Qwen3Config.from_dict(raw)
    config._attn_implementation = "eager"  # plain ops: deterministic and exportable
    model = Qwen3Model(config)
    load_strict(model, _folder_state(folder), str(folder),
                "use the Qwen3-Embedding-0.6B folder VoiceDesign was trained with.")
    return model.float().eval(), Tokenizer.from_file(str(folder / "tokenizer.json"))


def write_text_encoder(model: Qwen3Model, tokenizer: Tokenizer, folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("_attn_implementation", None)
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


# --- the designer ---------------------------------------------------------------------------------

@dataclass
class VoiceDesigner:
    head: VoiceDesignHead
    encoder: Qwen3Model
    tokenizer: Tokenizer

    def token_ids(self, role: str) -> list[int]:
        tok = Tokenizer.from_str(self.tokenizer.to_str())  # a copy: truncation is tokenizer state
        tok.enable_truncation(self.head.cfg.max_tokens)
        return tok.encode(normalise_role(check_role(role))).ids

    @torch.inference_mode()
    def pooled(self, role: str) -> torch.Tensor:
        """The embedding model's last-position state [1, text_dim] (one unpadded text: last = last token)."""
        ids = torch.tensor([self.token_ids(role)], dtype=torch.long)
        return self.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, -1]

    @torch.inference_mode()
    def design(self, role: str, seed: int = 0) -> np.ndarray:
        cond = self.head.condition(self.pooled(role))
        noise = torch.from_numpy(design_noise(seed, self.head.cfg.spk_dim))[None]
        return self.head.sample(cond, noise)[0].numpy().astype(np.float32)


def load_voice_designer(folder: str | os.PathLike, text_encoder: str | os.PathLike | None = None) -> VoiceDesigner:
    """`folder` holds voicedesign.pt; the embedding model is `text_encoder` or folder/Qwen3-Embedding-0.6B."""
    folder = Path(folder)
    te = Path(text_encoder) if text_encoder is not None else folder / TEXT_ENCODER_DIR
    if text_encoder is None and not te.is_dir():
        raise CheckpointError(f"{folder} has no {TEXT_ENCODER_DIR} folder: pass the embedding model's folder "
                              "with --text-encoder.")
    encoder, tokenizer = load_text_encoder(te)
    head = load_voicedesign(folder / CHECKPOINT_FILE, encoder.config.hidden_size)
    log.info("VoiceDesign: %s (%d layers) with %s", folder / CHECKPOINT_FILE, head.cfg.n_layers, te)
    return VoiceDesigner(head, encoder, tokenizer)


# --- the tiny preset ------------------------------------------------------------------------------

def tiny_text_tokenizer() -> Tokenizer:
    """Byte-level (any text, Chinese included), with an end-of-text token appended to every text as the
    Qwen3-Embedding tokenizer's post-processor does, so last-token pooling reads that token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    tok.add_special_tokens([AddedToken(eos, special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, tok.token_to_id(eos))])
    return tok


def write_tiny_voicedesign(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Random weights of the real architecture (a narrow Qwen3, a one-layer DiT) in the released layouts."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = tiny_text_tokenizer()
    config = Qwen3Config(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         rope_theta=1_000_000.0, tie_word_embeddings=True)
    write_text_encoder(Qwen3Model(config), tokenizer, folder / TEXT_ENCODER_DIR)
    write_voicedesign(VoiceDesignHead(TINY, config.hidden_size), folder / CHECKPOINT_FILE)
    return folder


def tiny_voice_designer(seed: int = 0) -> VoiceDesigner:
    """The tiny preset, written once under the cache folder and loaded back through the real loaders."""
    from .qinyu_checkpoint import cache_dir

    root = cache_dir() / "presets" / f"voicedesign-tiny-seed{seed}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / CHECKPOINT_FILE).is_file():
            tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
            try:
                write_tiny_voicedesign(tmp, seed)
                shutil.rmtree(root, ignore_errors=True)  # a leftover from an interrupted write
                os.replace(tmp, root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return load_voice_designer(root)
