"""Checks on a checkpoint's tensors beyond keys and shapes: shard integrity, dtype, fp16 range."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping

import torch

from qinyu_edge.errors import CheckpointError

FP16_MAX = float(torch.finfo(torch.float16).max)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def read_header(path: Path) -> tuple[int, dict]:
    """A safetensors file's data offset and header (`name -> dtype, shape, data_offsets`), or a
    CheckpointError saying why the file cannot be one (too short, no header, truncated)."""
    size = path.stat().st_size
    fix = "Re-download it."
    if size < 8:
        raise CheckpointError(f"{path} has {size} bytes, less than the 8-byte header length. {fix}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise CheckpointError(f"{path} has {size} bytes but its header alone claims {8 + n}. {fix}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has no valid safetensors header ({e}). {fix}") from e
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    want = 8 + n + max(ends, default=0)
    if size < want:
        raise CheckpointError(f"{path} is not a readable safetensors file (it is truncated: {size} bytes of the "
                              f"{want} its header describes). {fix}")
    return 8 + n, header


def check_dtypes(state: Mapping[str, torch.Tensor], declared: str | None, source: str) -> None:
    """Every tensor in the dtype config.json declares (torch_dtype), or one error naming the others."""
    want = _DTYPES.get(declared or "bfloat16")
    if want is None:
        raise CheckpointError(f"{source}: config.json declares torch_dtype {declared!r}; expected one of {', '.join(_DTYPES)}.")
    wrong = sorted(f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state.items() if v.dtype != want)
    if wrong:
        shown = ", ".join(wrong[:10]) + (f", ... ({len(wrong) - 10} more)" if len(wrong) > 10 else "")
        raise CheckpointError(
            f"{source}: {len(wrong)} tensor(s) are not {declared or 'bfloat16'} as config.json declares: {shown}. "
            "The shards were modified or come from another conversion; use the unmodified release."
        )


def fp16_overflow(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Tensor name -> how many of its values lie beyond fp16's range (they become inf in fp16)."""
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.dtype != torch.float16:
            n = int((v.abs() > FP16_MAX).sum())
            if n:
                out[k] = n
    return out
