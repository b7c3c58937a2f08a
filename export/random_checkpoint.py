"""Random weights for a real-size VITA-QinYu, written in the released folder layout tensor by tensor.

`qinyu-edge export --random-weights qinyu-4b` lets a user check a machine, a pipeline or a device's
memory before downloading the real 8-16 GB. The folders are exactly what `load_qinyu` reads
(checkpoint/ with config.json, bf16 safetensors shards and model.safetensors.index.json; sensevoice/;
models/), so the export that follows runs the real loading path.

The LLM shards are never held in memory: key names and shapes come from the modules built on the
meta device, the shard layout is planned from those sizes, each shard's safetensors header is
written first and every tensor is then generated in row blocks of at most BLOCK_VALUES values and
appended. The SenseVoice encoder (0.9 GB in fp32), XY decoder (1.1 GB) and CAM++ are torch pickles
in their released form and are built in memory one at a time, each smaller than the 8B's
embedding matrix in fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import struct
import shutil
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from qinyu_edge.config import ModelConfig, preset, with_vocab
from qinyu_edge.errors import ConfigError, QinyuError
from qinyu_edge.fileio import atomic_path, atomic_write_text, check_free_space, replace_dir
from qinyu_edge.staging import staged_dir

from .models.backbone import build_backbone
from .models.projector import Projector
from .models.sensevoice import SenseVoiceEncoder
from .qinyu_checkpoint import INDEX, SENSEVOICE_PREFIX, write_checkpoint_text, write_models_folder, write_sensevoice_side
from .tiny_tokenizer import build_tiny_tokenizer, padded_vocab_size

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 3 * 2**30
BLOCK_VALUES = 1 << 23  # 8 M values: 32 MB of fp32 per generated block
BF16_BYTES = 2
# What the side folders take on disk beyond the shards, per parameter (fp32 torch pickles).
SIDE_BYTES_PER_VALUE = 4


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = BF16_BYTES
        for d in self.shape:
            n *= d
        return n


def random_config(preset_name: str, layers: int | None = None) -> ModelConfig:
    """The preset's config as a random checkpoint has it (tiny presets take the tiny tokenizer's
    vocabulary), optionally with fewer decoder layers (same widths)."""
    cfg = preset(preset_name)
    if cfg.tiny:
        cfg = with_vocab(cfg, padded_vocab_size(build_tiny_tokenizer()))
    if layers is not None:
        if not 1 <= layers <= cfg.backbone.num_layers:
            raise ConfigError(f"--layers {layers}: {preset_name} has 1 to {cfg.backbone.num_layers} decoder layers.")
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, num_layers=layers))
    return cfg


def _modules(cfg: ModelConfig) -> dict[str, torch.nn.Module]:
    return {
        SENSEVOICE_PREFIX: SenseVoiceEncoder(cfg.sensevoice, keep_query_rows=cfg.keep_query_rows),
        "model.audio_projection.": Projector(cfg.audio_projector),
        "model.speaker_projection.": Projector(cfg.speaker_projector),
        "model.": build_backbone(cfg.backbone),
    }


def checkpoint_plan(cfg: ModelConfig) -> list[PlannedTensor]:
    """Every tensor of the LLM shards, with its real key name and shape, sorted by name."""
    with torch.device("meta"):
        parts = _modules(cfg)
    plan = [PlannedTensor(prefix + k, tuple(v.shape)) for prefix, m in parts.items() for k, v in m.state_dict().items()]
    if not cfg.backbone.tie_word_embeddings:
        plan.append(PlannedTensor("lm_head.weight", (cfg.backbone.vocab_size, cfg.backbone.hidden_size)))
    return sorted(plan, key=lambda t: t.name)


def side_values(cfg: ModelConfig) -> int:
    """Parameters in the sensevoice/ and models/ folders (for the disk check)."""
    from .models.campplus import CAMPPlus
    from .models.xy_decoder import XYDecoder

    with torch.device("meta"):
        mods = (SenseVoiceEncoder(cfg.sensevoice, keep_query_rows=cfg.keep_query_rows), XYDecoder(cfg.xy),
                CAMPPlus(cfg.campplus))
    return sum(t.numel() for m in mods for t in m.state_dict().values())


def random_blocks(name: str, shape: tuple[int, ...], seed: int) -> Iterator[torch.Tensor]:
    """The tensor `name` as bf16 blocks of whole rows, the same for the same (name, shape, seed).

    Matrices get N(0, 1/fan_in); vectors named `weight` (norm gains) 1 + N(0, 0.01), so a misplaced
    norm shows in parity; other vectors (biases) N(0, 0.0025)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    rows, row_shape = (shape[0], shape[1:]) if shape else (1, ())
    row_values = 1
    for d in row_shape:
        row_values *= d
    step = max(1, BLOCK_VALUES // max(row_values, 1))
    for start in range(0, rows, step):
        block = torch.randn((min(step, rows - start), *row_shape) if shape else (), generator=g)
        if len(shape) >= 2:
            block /= row_values**0.5
        elif name.endswith("weight"):
            block = 1.0 + 0.1 * block
        else:
            block *= 0.05
        yield block.to(torch.bfloat16)


def plan_shards(plan: list[PlannedTensor], shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors packed into shards of at most `shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: list[PlannedTensor]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        entries[t.name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(text)) + text


def write_shard(path: Path, tensors: list[PlannedTensor], seed: int, progress: Progress | None = None,
                task: int | None = None) -> None:
    """One safetensors file, header first, then each tensor's blocks appended; atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_header(tensors))
        for t in tensors:
            for block in random_blocks(t.name, t.shape, seed):
                f.write(block.view(torch.int16).numpy())  # no extra copy of the block
                if progress is not None and task is not None:
                    progress.advance(task, block.numel() * BF16_BYTES)


def _fill(module: torch.nn.Module, prefix: str, seed: int) -> None:
    """The module's weights equal to the same tensors in the shards (bf16 values, kept in fp32)."""
    with torch.no_grad():
        for k, v in module.state_dict().items():
            v.copy_(torch.cat([b.reshape(-1) for b in random_blocks(prefix + k, tuple(v.shape), seed)]).view(v.shape))


def write_random_checkpoint(cfg: ModelConfig, root: str | os.PathLike, seed: int = 0,
                            shard_bytes: int = DEFAULT_SHARD_BYTES, console: Console | None = None) -> dict[str, Path]:
    """Write `checkpoint/`, `sensevoice/` and `models/` under `root` (replaced only when complete)."""
    root = Path(root)
    plan = checkpoint_plan(cfg)
    total = sum(t.nbytes for t in plan)
    check_free_space(root, total + SIDE_BYTES_PER_VALUE * side_values(cfg),
                     f"random {cfg.name} checkpoint ({total / 1e9:.2f} GB of bf16 shards plus the side folders)")
    shards = plan_shards(plan, shard_bytes)
    with staged_dir(root, force=True) as tmp:  # the caller refused an existing folder without --force
        ckpt, sv, models = tmp / "checkpoint", tmp / "sensevoice", tmp / "models"
        ckpt.mkdir()
        progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                            console=console or Console(stderr=True))
        weight_map: dict[str, str] = {}
        with progress:
            task = progress.add_task(f"random {cfg.name} shards", total=total)
            for i, tensors in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_shard(ckpt / name, tensors, seed, progress, task)
                weight_map.update({t.name: name for t in tensors})
        atomic_write_text(ckpt / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        write_checkpoint_text(cfg, build_tiny_tokenizer(), ckpt)
        # model.pt carries the same encoder weights as the shards, as in the released folders.
        encoder = SenseVoiceEncoder(cfg.sensevoice, keep_query_rows=cfg.keep_query_rows)
        _fill(encoder, SENSEVOICE_PREFIX, seed)
        g = np.random.default_rng(seed)
        write_sensevoice_side(cfg, encoder, sv, g)
        del encoder  # 0.9 GB at real size: freed before the XY decoder is built
        write_models_folder(cfg, models, seed, g)
        replace_dir(tmp, root)
    log.info("wrote a random %s checkpoint (%d shards, %.2f GB) under %s", cfg.name, len(shards), total / 1e9, root)
    return {"checkpoint": root / "checkpoint", "sensevoice": root / "sensevoice", "models": root / "models"}



@contextmanager
def random_folders(args: argparse.Namespace, console: Console) -> Iterator[dict[str, Path] | None]:
    """`qinyu-edge export --random-weights P`: the folders to export, written to a scratch folder
    beside --out and removed afterwards; with --checkpoint-only DIR, written there and None (stop)."""
    if (args.checkpoint_only is None) == (args.out is None):
        raise QinyuError("--random-weights needs exactly one of --out B (write and export) or --checkpoint-only DIR.")
    cfg = random_config(args.random_weights, args.layers)
    target = args.checkpoint_only or args.out
    if target.exists() and not args.force:
        raise QinyuError(f"{target} already exists. Choose another folder, or pass --force to replace it.")
    if args.checkpoint_only is not None:
        folders = write_random_checkpoint(cfg, args.checkpoint_only, seed=args.seed, console=console)
        console.print(f"random {cfg.name} checkpoint written; export it with: --checkpoint {folders['checkpoint']} "
                      f"--sensevoice {folders['sensevoice']} --xy {folders['models']}")
        yield None
        return
    scratch = args.out.parent / f".{args.out.name}.random-checkpoint"
    try:
        yield write_random_checkpoint(cfg, scratch, seed=args.seed, console=console)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
