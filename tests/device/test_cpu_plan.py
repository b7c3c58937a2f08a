"""The CPU runtime's plan: fp32 everywhere, mapped table windows, and the rope tables of the CPU backbone."""

from __future__ import annotations

import pytest

from qinyu_edge.config import preset
from qinyu_edge.device.cpu_plan import FAULT_AROUND_BYTES, LARGE_FOLIO_BYTES, cpu_plan, mapped_bytes
from qinyu_edge.device.planner import Recipe, kv_bytes_per_token, weight_bytes_per_step


@pytest.mark.parametrize("name", ["qinyu-8b", "qinyu-4b"])
def test_real_sizes_are_the_fp16_figures_doubled(name):
    cfg = preset(name)
    p = cpu_plan(cfg, 1000, [])
    assert p.weight_bytes_per_step == 2 * weight_bytes_per_step(cfg, Recipe.uniform("fp16"))
    assert p.kv_bytes == 1000 * 2 * kv_bytes_per_token(cfg, "fp16")
    assert p.bytes_per_step == p.weight_bytes_per_step + p.rope_row_bytes + p.kv_bytes
    # Only Qwen3 (8B) runs ONNX Runtime's CPU backbone with its cos/sin tables: 2 x 40960 x 64 floats.
    assert p.item("decode graph: rope tables") == (2 * 40960 * 64 * 4 if name == "qinyu-8b" else 0)


def test_mapped_rows_count_whole_fault_around_windows():
    w = FAULT_AROUND_BYTES
    assert mapped_bytes([], 256, 10 * w) == 0
    assert mapped_bytes([0, 1, 255], 256, 10 * w) == w  # one window holds 256 rows of 256 B
    assert mapped_bytes([0, 256], 256, 10 * w) == 2 * w
    assert mapped_bytes([3], 16 * 1024, 10 * w) == w  # a 16 KiB row inside one window
    assert mapped_bytes([1], 48 * 1024, 10 * w) == 2 * w  # straddles two
    assert mapped_bytes([9], 10 * 1024, 100 * 1024) == 100 * 1024 - w  # the last window stops at the table's end


def test_large_folios_map_two_mib_at_a_time():
    row, table = 10 * 1024, 136544 * 10 * 1024  # the 4B's fp32 rows
    assert mapped_bytes([0, 203], row, table, LARGE_FOLIO_BYTES) == LARGE_FOLIO_BYTES  # rows 0-203 fill one folio
    assert mapped_bytes([0, 204], row, table, LARGE_FOLIO_BYTES) == 2 * LARGE_FOLIO_BYTES  # row 204 straddles
