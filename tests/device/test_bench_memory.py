"""The memory benchmark's measurements against the CPU planner on tiny-8b: structure, not timing."""

from __future__ import annotations

import pytest
from rich.console import Console

from qinyu_edge.device.bench_memory import measure, table
from qinyu_edge.export.bundle_export import preset_bundle


@pytest.fixture(scope="module")
def measured():
    return measure(preset_bundle("tiny-8b"), steps=30)


def test_predicted_bytes_per_step_match_the_decode_graph(measured):
    m, p = measured, measured.plan()
    assert m.steps > 0 and m.position > m.steps
    assert p.bytes_per_step == pytest.approx(m.bytes_per_step, rel=0.10)
    assert p.decode_graph_bytes == pytest.approx(m.decode_graph.total, rel=0.10)
    assert p.loaded_bytes == pytest.approx(m.loaded_graph_bytes, rel=0.10)
    # The runtime's fp32 buffers, position by position, are exactly the planner's cache.
    assert m.kv_bytes == p.kv_bytes
    # Qwen3 runs ONNX Runtime's CPU graph, whose rope tables a step reads one row of.
    assert m.decode_graph.rope_tables > 0 and m.decode_graph.rope_row * 1000 < m.decode_graph.rope_tables


def test_rss_is_measured_and_reported(measured):
    m = measured
    assert 0 < m.rss_baseline < m.rss_loaded.trimmed <= m.rss_loaded.held <= m.rss_peak_load
    assert 0 < m.rss_decoded.trimmed <= m.rss_decoded.held
    assert m.table.resident > 0
    console = Console(record=True, width=160)
    console.print(table(m))
    text = console.export_text()
    for label in ("RSS baseline", "RSS growth: Engine(bundle)", "RSS growth: + prefill and decode", "malloc_trim",
                  "VmHWM", "bytes read per decode step"):
        assert label in text
