"""CAM++ weights, speaker-embedding files, and the reference CAM++ embedding procedure.

Files:
- `campplus_cn_common.bin`: a plain `CAMPPlus` state dict (torch pickle), loaded strictly.
- `spk2embeds_roleplay.pt`: the official agent voices, a dict name -> 192-d tensor.
- `asset/*_speaker.pt`: one cached user embedding, a float32 (192,) tensor.
- Our runtime form: a `.safetensors` file of name -> float32 [192], readable without torch.

Embedding procedure (VITA-QinYu `vita_qinyu/tokenizer_sensevoice_xyspk.py`,
`extract_speaker_embedding` + `chunk_wav`, with 3D-Speaker `speakerlab/process/processor.py` FBank):
keep the first 90 s of the 16 kHz mono waveform (float, [-1, 1], no 32768 scaling); tile the whole
clip cyclically up to a whole number of 10 s chunks; per chunk take an 80-bin Kaldi fbank with
dither 0 and torchaudio's defaults, minus its own mean over time; embed all chunks as one batch;
average the chunk embeddings.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from qinyu_edge.config import SPEAKER_DIM, CamPPConfig
from qinyu_edge.errors import CheckpointError
from qinyu_edge.export.models.campplus import CAMPPlus
from qinyu_edge.export.state_dict import atomic_torch_save, load_strict, torch_load
from qinyu_edge.fileio import atomic_write_bytes
from qinyu_edge.runtime.frontend import campplus_chunks, campplus_fbank

log = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_PRESET_FIX = (
    "Use the official spk2embeds_roleplay.pt (a dict name -> 192-d tensor), a .safetensors file of "
    "name -> float32[192], or one 192-d CAM++ vector (.pt or .npy); compute new vectors with "
    "campplus_embedding()."
)


# --- CAM++ weights -------------------------------------------------------------------------------

def load_campplus(path: str | os.PathLike, cfg: CamPPConfig = CamPPConfig()) -> CAMPPlus:
    """Build `CAMPPlus(cfg)` and fill it from a state-dict file (torch pickle or safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist. Point to campplus_cn_common.bin from VITA-QinYu-Models.")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({e}). Re-download or re-convert it."
            ) from e
    else:
        state = torch_load(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} is not a plain CAM++ state dict (name -> tensor). "
            "Use campplus_cn_common.bin from VITA-QinYu-Models, or a file written by write_campplus()."
        )
    module = CAMPPlus(cfg)
    load_strict(
        module, state, str(path),
        "use campplus_cn_common.bin from VITA-QinYu-Models (3D-Speaker CAMPPlus, feat_dim 80, embedding 192) "
        "with the real CamPPConfig, or a file written by write_campplus() for this config.",
    )
    log.info("loaded CAM++ from %s", path)
    return module.eval()


def write_campplus(module: CAMPPlus, path: str | os.PathLike) -> Path:
    """Save in the released layout: a plain state dict of CPU tensors, atomically."""
    path = Path(path)
    # Clones, so the pickle holds no views into larger storages.
    atomic_torch_save({k: v.detach().cpu().clone() for k, v in module.state_dict().items()}, path)
    return path


# --- speaker-embedding files ---------------------------------------------------------------------

def _check_presets(raw: Mapping[object, object], source: str) -> dict[str, np.ndarray]:
    """Convert to name -> float32[192]; raise one CheckpointError naming every bad entry."""
    if not raw:
        raise CheckpointError(f"{source} holds no speaker embeddings. {_PRESET_FIX}")
    out: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for name, value in raw.items():
        if not isinstance(name, str) or not name:
            problems.append(f"name {name!r} is not a non-empty string")
            continue
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point():
                problems.append(f"{name!r}: dtype {value.dtype} is not floating point")
                continue
            arr = value.detach().cpu().float().numpy()
        elif isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
            arr = value.astype(np.float32)
        else:
            problems.append(f"{name!r}: {type(value).__name__} is not a float tensor")
            continue
        # A (1, 192) row is what a batched CAM++ call returns: the same vector, so accept it.
        if arr.shape not in ((SPEAKER_DIM,), (1, SPEAKER_DIM)):
            problems.append(f"{name!r}: shape {arr.shape}, expected ({SPEAKER_DIM},)")
            continue
        if not np.isfinite(arr).all():
            problems.append(f"{name!r}: contains NaN or inf")
            continue
        out[name] = np.ascontiguousarray(arr.reshape(SPEAKER_DIM))
    if problems:
        listed = "\n  ".join(problems)
        raise CheckpointError(f"{source} has bad speaker embeddings:\n  {listed}\n  Fix: {_PRESET_FIX}")
    return out


def load_speaker_presets(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read speaker embeddings as name -> float32[192].

    A file with a single vector (`.npy`, or a `.pt` holding one tensor) is returned under its file
    stem, e.g. `asset/foo_speaker.pt` -> {"foo_speaker": ...}.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist. {_PRESET_FIX}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            raw: object = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}). {_PRESET_FIX}") from e
    elif suffix == ".npy":
        try:
            raw = {path.stem: np.load(path, allow_pickle=False)}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a plain numpy array file ({e}). {_PRESET_FIX}") from e
    elif suffix in _TORCH_SUFFIXES:
        raw = torch_load(path)
        if isinstance(raw, torch.Tensor):
            raw = {path.stem: raw}
    else:
        raise CheckpointError(f"{path}: unknown speaker file type {suffix!r}. {_PRESET_FIX}")
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not name -> embedding. {_PRESET_FIX}")
    return _check_presets(raw, str(path))


def write_speaker_presets(presets: Mapping[str, np.ndarray | torch.Tensor], path: str | os.PathLike) -> Path:
    """Write the torch-free runtime form: `.safetensors`, name -> float32[192], atomically."""
    from safetensors.numpy import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: speaker presets are written as .safetensors")
    checked = _check_presets(presets, "the speaker presets to write")
    return atomic_write_bytes(path, save(checked))


def write_official_speaker_dict(presets: Mapping[str, np.ndarray | torch.Tensor], path: str | os.PathLike) -> Path:
    """Write the official `spk2embeds_roleplay.pt` layout: a torch dict name -> float32 (192,) tensor."""
    path = Path(path)
    checked = _check_presets(presets, "the speaker presets to write")
    atomic_torch_save({k: torch.from_numpy(v.copy()) for k, v in checked.items()}, path)
    return path


# --- embedding procedure -------------------------------------------------------------------------

def campplus_embedding(module: CAMPPlus, wav_16k: np.ndarray) -> np.ndarray:
    """One float32[192] speaker vector for a 16 kHz mono clip (mean of its chunk embeddings)."""
    chunks = campplus_chunks(wav_16k, module.cfg.chunk_seconds, module.cfg.max_seconds)
    feats = torch.from_numpy(np.stack([campplus_fbank(c, module.cfg.feat_dim) for c in chunks]))
    with torch.no_grad():
        emb = module.eval()(feats)
    return emb.mean(0).numpy().astype(np.float32)
