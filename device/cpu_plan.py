"""What the CPU runtime holds and reads per decode step, predicted from the config (and, for the
mapped embedding table, from the rows a conversation gathers).

The CPU runtime is ONNX Runtime at fp32: the bundle's graphs are fp32, and runtime/kv_cache.py
allocates the cache as float32. `Engine` loads the encoder, both projectors, the XY decoder, CAM++
and the fused decode graph (backbone + heads); the embedding graph is replaced by the bundle's
memory-mapped table, of which only what a conversation gathers becomes resident, in whole aligned
granules of the file: Linux maps the 64 KiB around each page a read faults in (`fault_around_bytes`,
its default) when the file is in the page cache, as the bundle check's hashing leaves it; where the
page cache holds the file in 2 MiB folios (Linux 6.x file systems with large folios, and
transparent huge pages), a fault maps the whole folio. A granule holds many rows (a tiny table's
whole 2 MiB; 200 rows of the 4B's 10 KiB at 2 MiB), so gathered rows bring their neighbours
along. The KV cache is allocated for the whole context with zeroed pages, which the kernel maps on
first write: resident are the positions written so far.

Only model memory is predicted: the interpreter and its libraries, the tokenizer and ONNX Runtime's
own per-session structures are not (bench_memory.py measures RSS from a baseline taken with the
runtime's modules imported, and prints the difference). Compare `planner.memory_items`, which plans
a GPU target's whole budget.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from qinyu_edge.config import ModelConfig

from .planner import (
    ELEMENT_BYTES, MemoryItem, Recipe, backbone_params, kv_bytes_per_token, projector_params, weight_bytes_per_step,
)

# The backbone, lm_head and KV cache at fp32 (Recipe.resolved), as the bundle stores them and ONNX
# Runtime on the CPU runs them; the other components are counted at fp32 below.
CPU_RECIPE = Recipe("fp32")
FP32 = ELEMENT_BYTES["fp32"]
DECODE_GRAPH_ITEMS = ("decode graph: backbone layers", "decode graph: lm_head", "decode graph: rope tables")
EMBEDDING_ROWS = "embedding rows (mapped)"
FAULT_AROUND_BYTES = 64 * 1024  # Linux's default fault_around_bytes
LARGE_FOLIO_BYTES = 2 * 2**20  # a PMD-mapped page-cache folio (x86-64 and arm64 with 4 KiB pages)


def rope_table_floats(cfg: ModelConfig) -> int:
    """ONNX Runtime's CPU backbone (export/ort_backbone.py, Qwen3 only) carries cos and sin tables of
    head_dim/2 for every position up to max_position_embeddings; the portable graphs compute them."""
    b = cfg.backbone
    return 0 if b.is_mla else 2 * b.max_position_embeddings * (b.head_dim // 2)


def rope_row_floats(cfg: ModelConfig) -> int:
    """What one decode step reads of those tables: one row of each."""
    b = cfg.backbone
    return 0 if b.is_mla else 2 * (b.head_dim // 2)


def mapped_bytes(rows: Collection[int], row_bytes: int, table_bytes: int, granule: int = FAULT_AROUND_BYTES) -> int:
    """Resident bytes of a mapped table after reading `rows`: every aligned granule a row touches
    (the .npy header of about a hundred bytes is left out)."""
    granules = {g for r in rows for g in range(r * row_bytes // granule, ((r + 1) * row_bytes - 1) // granule + 1)}
    return sum(min(granule, table_bytes - g * granule) for g in granules)


@dataclass(frozen=True)
class CpuPlan:
    items: tuple[MemoryItem, ...]
    position: int  # positions in the KV cache
    kv_bytes_per_token: int
    weight_bytes_per_step: int  # layers and lm_head, every step
    rope_row_bytes: int

    def item(self, name: str) -> int:
        return sum(i.bytes for i in self.items if i.name == name)

    @property
    def decode_graph_bytes(self) -> int:
        """Tensors the fused decode graph holds (what loading it makes resident)."""
        return sum(self.item(n) for n in DECODE_GRAPH_ITEMS)

    @property
    def loaded_bytes(self) -> int:
        """Tensors of every graph `Engine` loads: resident from the load on."""
        return sum(i.bytes for i in self.items if i.group == "weights" and i.name != EMBEDDING_ROWS)

    @property
    def kv_bytes(self) -> int:
        return self.position * self.kv_bytes_per_token

    @property
    def bytes_per_step(self) -> int:
        """Bytes the decode step at `position` reads: all weights, one row of the rope tables, the cache."""
        return self.weight_bytes_per_step + self.rope_row_bytes + self.kv_bytes

    @property
    def total_bytes(self) -> int:
        return sum(i.bytes for i in self.items)


def cpu_plan(cfg: ModelConfig, position: int, touched_rows: Collection[int],
             map_granule: int = FAULT_AROUND_BYTES) -> CpuPlan:
    """The CPU runtime of `cfg` with `position` positions cached and the embedding rows
    `touched_rows` (distinct ids) gathered; `map_granule` is what a fault on the mapped table makes
    resident (FAULT_AROUND_BYTES, or LARGE_FOLIO_BYTES where the page cache holds large folios)."""
    b = cfg.backbone
    bp = backbone_params(cfg)
    per_token = kv_bytes_per_token(cfg, "fp32")
    items: list[MemoryItem] = []

    def add(group: str, name: str, nbytes: float, note: str) -> None:
        items.append(MemoryItem(group, name, int(nbytes), False, note))  # type: ignore[arg-type]

    layers = bp.linear + bp.norms + bp.batched
    add("weights", DECODE_GRAPH_ITEMS[0], layers * FP32, f"{layers / 1e6:.2f}M params")
    add("weights", DECODE_GRAPH_ITEMS[1], bp.vocab_matrix * FP32,
        f"{b.vocab_size} x {b.hidden_size}" + (" (tied: the embedding reads the mapped table)" if bp.tied else ""))
    rope = rope_table_floats(cfg)
    if rope:
        add("weights", DECODE_GRAPH_ITEMS[2], rope * FP32,
            f"cos and sin, {b.max_position_embeddings} x {b.head_dim // 2}")
    encoder = cfg.sensevoice.param_count()
    add("weights", "SenseVoice encoder", encoder * FP32, f"{encoder / 1e6:.2f}M params")
    proj = projector_params(cfg.audio_projector) + projector_params(cfg.speaker_projector)
    add("weights", "audio + speaker projectors", proj * FP32, f"{proj / 1e6:.2f}M params")
    xy, tables = cfg.xy.param_count(), cfg.xy.table_count()
    add("weights", "XY decoder", (xy + tables) * FP32,
        f"{xy / 1e6:.2f}M params + {tables / 1e6:.2f}M codebook, position and ISTFT table entries")
    campp = cfg.campplus.param_count()
    add("weights", "CAM++", campp * FP32, f"{campp / 1e6:.3f}M params")
    row = int(b.hidden_size * FP32)
    add("weights", EMBEDDING_ROWS, mapped_bytes(touched_rows, row, b.vocab_size * row, map_granule),
        f"{len(touched_rows)} distinct rows gathered, of {b.vocab_size}, in {map_granule // 1024} KiB granules")
    add("kv cache", "KV cache (written positions)", position * per_token,
        f"{position} positions x {per_token} B; the rest of the allocation is zero pages not yet mapped")
    return CpuPlan(tuple(items), position, per_token, weight_bytes_per_step(cfg, CPU_RECIPE),
                   int(rope_row_floats(cfg) * FP32))


__all__ = ["CPU_RECIPE", "FAULT_AROUND_BYTES", "LARGE_FOLIO_BYTES", "CpuPlan", "cpu_plan", "mapped_bytes",
           "rope_table_floats", "rope_row_floats"]
