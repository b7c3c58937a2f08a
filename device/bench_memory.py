"""Bytes read per decode step and resident memory of a loaded CPU runtime, against the planner.

    python -m qinyu_edge.device.bench_memory                       # both tiny presets
    python -m qinyu_edge.device.bench_memory --bundle B [--bundle B2 ...] [--steps 100]

Each bundle is measured in a fresh interpreter:
- RSS (/proc/self/status VmRSS) with the runtime's modules imported (numpy, onnxruntime, tokenizers;
  no bundle: the baseline), after `Engine(bundle)`, and after a prefill and greedy decode steps;
  at both points also after glibc's malloc_trim, since loading parses each graph's protobuf on the
  heap (a real-width encoder or XY decoder is one inline GB) and malloc keeps much of what it frees
  (0.7 GB of a 4.4 GB load for the real-width 4B: `Engine` now trims after loading, so the two
  agree there); and the peak (VmHWM) the load reached;
- the tensors each loaded graph holds (initializers, external ones by their recorded length, and
  Constant-node tensors), read with onnx without loading any data;
- the bytes a decode step reads: the fused decode graph's tensors (of its rope tables one row per
  step, the rest whole) plus the KV cache up to the position;
- what of the memory-mapped embedding table is resident, and whether the page cache maps it in
  2 MiB folios (/proc/self/smaps), which sets the granule the planner counts it in.
The planner's prediction for the same config at fp32 (device/cpu_plan.py) stands beside each. The
planner predicts model memory only; RSS growth also holds the tokenizer and ONNX Runtime's own
session structures and arena, so its ratio says how far fixed costs dominate a small model.
"""

from __future__ import annotations

import argparse
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime  # noqa: F401  (the runtime imports it lazily; the baseline is meant to hold it)
from rich.console import Console
from rich.table import Table

from qinyu_edge.config import ModelConfig
from qinyu_edge.runtime.engine import DECODE, Engine
from qinyu_edge.runtime.heap import trim_heap
from qinyu_edge.validate import COUNT

from .cpu_plan import FAULT_AROUND_BYTES, LARGE_FOLIO_BYTES, CpuPlan, cpu_plan
from .telemetry import peak_rss_bytes, rss_bytes

PROMPT = ("<|im_start|>system\nYou are a helpful voice assistant.<|im_end|>\n<|im_start|>user\n"
          "Tell me about the sea, and why it is salty.<|im_end|>\n<|im_start|>assistant\n")
# Initializers of ONNX Runtime's CPU backbone (export/ort_backbone.py) indexed by position: a step
# reads one row of each.
ROPE_TABLES = ("cos_cache", "sin_cache")
MiB = 2**20


def _linux(value: int | None) -> int:
    if value is None:
        raise RuntimeError("no /proc/self/status to read memory from: the memory benchmark needs Linux")
    return value


@dataclass(frozen=True)
class Rss:
    held: int  # VmRSS as the process stands
    trimmed: int  # after malloc_trim hands the heap's free pages back (= held without glibc)


def rss_now() -> Rss:
    held = _linux(rss_bytes())
    if not trim_heap():  # not glibc: nothing to trim
        return Rss(held, held)
    return Rss(held, _linux(rss_bytes()))


@dataclass(frozen=True)
class Mapped:
    resident: int  # bytes of this process's mappings of the file that are resident
    large_folios: bool  # some of them mapped as 2 MiB page-cache folios (smaps FilePmdMapped)


def mapped(path: Path) -> Mapped:
    """What of `path` this process has resident through its mappings (/proc/self/smaps)."""
    target, inside, fields = str(path.resolve()), False, {"Rss": 0, "FilePmdMapped": 0}
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
            inside = len(head) == 6 and head[5] == target
        elif inside and head[0].rstrip(":") in fields:
            fields[head[0].rstrip(":")] += int(head[1]) * 1024
    return Mapped(fields["Rss"], fields["FilePmdMapped"] > 0)


@dataclass(frozen=True)
class GraphTensors:
    total: int  # bytes of every initializer and Constant-node tensor
    rope_tables: int  # of which the position-indexed rope tables
    rope_row: int  # what one step reads of those tables


def graph_tensors(path: Path) -> GraphTensors:
    """Tensor bytes a graph holds, from its protobuf alone (external data is not read)."""
    import onnx
    from onnx import helper

    def nbytes(t: "onnx.TensorProto") -> int:
        length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        if length is not None:
            return length
        if t.raw_data:
            return len(t.raw_data)
        return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    model = onnx.load(str(path), load_external_data=False)
    inits = list(model.graph.initializer)
    consts = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t")]
    tables = [t for t in inits if t.name in ROPE_TABLES]
    return GraphTensors(sum(nbytes(t) for t in inits + consts), sum(nbytes(t) for t in tables),
                        sum(nbytes(t) // t.dims[0] for t in tables))


@dataclass(frozen=True)
class MemoryMeasurement:
    bundle: str
    config: ModelConfig
    steps: int  # greedy steps decoded
    position: int  # positions in the cache at the end
    touched_rows: frozenset[int]  # embedding rows gathered (prompt and fed-back choices)
    decode_graph: GraphTensors
    loaded_graph_bytes: int  # tensors of every graph Engine opened
    kv_bytes: int  # the runtime's cache buffers, bytes per position x positions
    table: Mapped  # the memory-mapped embedding table, after decoding
    rss_baseline: int
    rss_peak_load: int  # VmHWM right after the load: the load's peak in a fresh interpreter
    rss_loaded: Rss
    rss_decoded: Rss

    @property
    def bytes_per_step(self) -> int:
        g = self.decode_graph
        return g.total - g.rope_tables + g.rope_row + self.kv_bytes

    def plan(self) -> CpuPlan:
        granule = LARGE_FOLIO_BYTES if self.table.large_folios else FAULT_AROUND_BYTES
        return cpu_plan(self.config, self.position, self.touched_rows, granule)


def measure(bundle: str | Path, steps: int = 100) -> MemoryMeasurement:
    """Load `bundle` on the CPU, prefill PROMPT and decode up to `steps` greedy steps, measuring as
    the module docstring says. The RSS baseline is this process's RSS on entry."""
    baseline = rss_now().trimmed
    engine = Engine(bundle)
    peak = _linux(peak_rss_bytes())
    loaded = rss_now()
    ids = np.asarray(engine.tokenizer.encode(PROMPT).ids, np.int64)
    reply = engine.generator.generate(engine.prompt_embeds(ids, [], [], [], []), max_new_tokens=steps)
    decoded = rss_now()
    lay = engine.layout
    starts = np.array([lay.book_start(k) for k in range(lay.n_codebooks)], np.int64)
    audio = [row + starts for row in reply.audio_rows]
    rows = set(ids.tolist()) | set(reply.text_tokens) | set(np.concatenate(audio).tolist() if audio else [])
    table = engine.bundle.file(engine.bundle.host_embedding) if engine.host_embedding is not None else None
    cache = engine.cache
    return MemoryMeasurement(
        str(bundle), engine.config, reply.steps, cache.pos, frozenset(rows),
        graph_tensors(engine.bundle.file(engine.spec(DECODE).file)),
        sum(graph_tensors(engine.bundle.file(engine.spec(name).file)).total for name in engine.sessions),
        cache.bytes_per_position * cache.pos,
        mapped(table) if table is not None else Mapped(0, False),
        baseline, peak, loaded, decoded)


def measure_fresh(bundle: str | Path, steps: int) -> MemoryMeasurement:
    """`measure` in a new interpreter, so the baseline and the growth are this bundle's alone."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, str(bundle), steps).result()


def table(m: MemoryMeasurement) -> Table:
    p = m.plan()
    t = Table(title=f"{m.config.name} at fp32 on the CPU: {Path(m.bundle).name}, {m.steps} greedy steps, "
                    f"{m.position} positions cached, {len(m.touched_rows)} embedding rows gathered")
    for col in ("", "measured MiB", "planner MiB", "planner / measured"):
        t.add_column(col, justify="left" if not col else "right")

    def row(name: str, measured: int, predicted: int | None) -> None:
        ratio = f"{predicted / measured:.3f}" if predicted is not None and measured else "-"
        t.add_row(name, f"{measured / MiB:.3f}", "-" if predicted is None else f"{predicted / MiB:.3f}", ratio)

    g = m.decode_graph
    row("decode graph tensors (resident)", g.total, p.decode_graph_bytes)
    row(f"bytes read per decode step at position {m.position}", m.bytes_per_step, p.bytes_per_step)
    row("  of which KV cache", m.kv_bytes, p.kv_bytes)
    row("tensors of every loaded graph", m.loaded_graph_bytes, p.loaded_bytes)
    granule = "2 MiB folios" if m.table.large_folios else "64 KiB fault-around"
    row(f"embedding table resident (mapped, {granule})", m.table.resident, p.item("embedding rows (mapped)"))
    row("RSS baseline: runtime modules imported", m.rss_baseline, None)
    row("RSS growth: Engine(bundle)", m.rss_loaded.held - m.rss_baseline, p.loaded_bytes)
    row("  after malloc_trim", m.rss_loaded.trimmed - m.rss_baseline, p.loaded_bytes)
    row("  peak during the load (VmHWM)", m.rss_peak_load - m.rss_baseline, None)
    row("RSS growth: + prefill and decode", m.rss_decoded.held - m.rss_baseline, p.total_bytes)
    row("  after malloc_trim", m.rss_decoded.trimmed - m.rss_baseline, p.total_bytes)
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", action="append", type=Path, help="a bundle folder (repeat; default: both tiny presets)")
    p.add_argument("--steps", type=COUNT, default=100, help="greedy decode steps after the prefill")
    args = p.parse_args(argv)
    bundles = args.bundle
    if not bundles:
        from qinyu_edge.export.bundle_export import preset_bundle

        bundles = [preset_bundle(name) for name in ("tiny-4b", "tiny-8b")]
    console = Console()
    for bundle in bundles:
        console.print(table(measure_fresh(bundle, args.steps)))
    console.print("RSS growth is measured from the baseline (interpreter, numpy, onnxruntime and the runtime's modules "
                  "imported, no bundle). The planner counts model memory only: the graphs' tensors, the mapped granules "
                  "of the gathered embedding rows and the written KV positions; not the tokenizer, nor ONNX Runtime's "
                  "own start-up (its first session) and per-session structures.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
