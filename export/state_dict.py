"""Strict state-dict loading with one error that lists every problem, and safe file reading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

from qinyu_edge.errors import CheckpointError
from qinyu_edge.fileio import atomic_path


def check_keys(expected: Mapping[str, torch.Size | tuple[int, ...]], got: Mapping[str, torch.Tensor],
               source: str, fix: str, ignore_prefixes: Iterable[str] = ()) -> None:
    """Raise one CheckpointError naming all missing, unexpected and mis-shaped keys."""
    ignore = tuple(ignore_prefixes)
    missing = sorted(k for k in expected if k not in got)
    unexpected = sorted(k for k in got if k not in expected and not k.startswith(ignore))
    misshaped = sorted(
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k])}"
        for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k])
    )
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source} does not match the architecture:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            lines.append(f"  {len(items)} {title} key(s): {shown}")
    lines.append(f"  Fix: {fix}")
    raise CheckpointError("\n".join(lines))


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, fix: str,
                ignore_prefixes: Iterable[str] = ()) -> None:
    """Copy `state` into `module` after checking every key and shape (dtype is converted)."""
    own = module.state_dict()
    check_keys({k: v.shape for k, v in own.items()}, state, source, fix, ignore_prefixes)
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))


def torch_load(path: str | os.PathLike) -> dict:
    """Load a torch checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist. Point to the checkpoint file that ships with the model.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CheckpointError(
            f"{path} cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {e}). "
            "It is corrupt or holds code objects; qinyu-edge never unpickles arbitrary objects. "
            "Re-download the file, or convert it to safetensors."
        ) from e


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
