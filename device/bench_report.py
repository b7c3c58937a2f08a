"""Bench output: the JSON document, a Markdown report with PNG plots (matplotlib, imported only
here), and `compare` of two bench JSON files.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qinyu_edge.errors import QinyuError
from qinyu_edge.fileio import atomic_write_bytes, atomic_write_text

from .bench import FORMAT, SAMPLES_OUT, to_json

log = logging.getLogger(__name__)

JSON_NAME = "bench.json"
REPORT_NAME = "report.md"
PLOTS = {
    "latency_by_context": "latency_by_context.png",
    "ttfa_by_first_chunk": "ttfa_by_first_chunk.png",
    "turn_waterfall": "turn_waterfall.png",
    "components": "components.png",
}


# --- writing ---------------------------------------------------------------------------------------

def write_outputs(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """bench.json, the plots that have data, and report.md, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": atomic_write_text(out_dir / JSON_NAME, to_json(doc))}
    plots = make_plots(doc, out_dir)
    paths.update(plots)
    paths["report"] = atomic_write_text(out_dir / REPORT_NAME, markdown(doc, {k: p.name for k, p in plots.items()}))
    return paths


def _figs(doc: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    return [f for k, f in doc["figures"].items() if k.startswith(prefix)]


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _title(doc: dict[str, Any]) -> str:
    env = doc.get("environment", {})
    b = env.get("bundle", {})
    s = doc.get("settings", {})
    where = (env.get("gpu") or {}).get("name") or env.get("machine", {}).get("cpu", "?")
    return f"{b.get('name', '?')} · {s.get('backend', '?')}/{s.get('provider', '?')} · {where}"


def make_plots(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    out: dict[str, Path] = {}
    for key, fn in (("latency_by_context", _plot_context), ("ttfa_by_first_chunk", _plot_ttfa),
                    ("turn_waterfall", _plot_waterfall), ("components", _plot_components)):
        fig = fn(doc, plt)
        if fig is not None:
            out[key] = _save(fig, out_dir / PLOTS[key])
    return out


def _series(figs: list[dict[str, Any]], param: str, lo: str = "min", hi: str = "p95"
            ) -> tuple[list[float], list[float], list[float], list[float]]:
    rows = sorted((f["params"][param], f["stats"]) for f in figs if f.get("stats"))
    return ([r[0] for r in rows], [r[1]["p50"] for r in rows], [r[1].get(lo, r[1]["min"]) for r in rows],
            [r[1].get(hi, r[1]["p95"]) for r in rows])


def _plot_context(doc: dict[str, Any], plt: Any) -> Any:
    lines = [("decode_step/ctx=", "decode step (heads + embedding + backbone)", "C0"),
             ("backbone_step/ctx=", "backbone only", "C1"),
             ("torch/backbone_step/ctx=", "PyTorch backbone (reference)", "C3")]
    if not _figs(doc, lines[0][0]) and not _figs(doc, lines[1][0]):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ticks: set[float] = set()
    p50s: list[float] = []
    for prefix, label, color in lines:
        # The interquartile band: a few runs slowed by other processes do not swamp it.
        x, p50, lo, hi = _series(_figs(doc, prefix), "context", "p25", "p75")
        if not x:
            continue
        ax.plot(x, p50, "o-", color=color, label=f"{label}, p50")
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
        ticks.update(x)
        p50s += p50
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [str(int(v)) for v in sorted(ticks)])
    ax.minorticks_off()
    if max(p50s) > 20 * min(p50s):
        ax.set_yscale("log")  # PyTorch and this runtime differ by orders of magnitude on small models
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel("context length (positions in the KV cache)")
    ax.set_ylabel("milliseconds per step")
    ax.set_title(f"Decode latency by context length\n{_title(doc)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", title="bands: 25th to 75th percentile", title_fontsize=8)
    return fig


def _plot_ttfa(doc: dict[str, Any], plt: Any) -> Any:
    figs = _figs(doc, "e2e/ttfa/first_chunk=")
    if not figs:
        return None
    x, p50, lo, p95 = _series(figs, "first_chunk")  # few turns per size: the band is min to p95
    steps = {f["params"]["first_chunk"]: f["params"]["steps_to_first_audio"] for f in figs}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(x, p50, "o-", color="C0", label="time to first audio, p50")
    ax.fill_between(x, lo, p95, color="C0", alpha=0.15, linewidth=0, label="min to p95")
    for xi, yi in zip(x, p50):
        s = [v for v in steps[xi] if v is not None]
        if s:
            ax.annotate(f"{int(sorted(s)[len(s) // 2])} steps", (xi, yi), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=7, color="0.3")
    names = {8: "low_latency", 20: "official"}
    ax.set_xticks(x, [f"{v}\n{names[v]}" if v in names else str(v) for v in x])
    ax.set_xlabel("first chunk size (frames of 80 ms)")
    ax.set_ylabel("time to first audio (ms)")
    ax.set_ylim(0, max(p95) * 1.2)
    ax.set_title(f"Time to first audio by first-chunk size (from the end of user speech)\n{_title(doc)}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.text(0.01, 0.98, "labels: decode steps to first audio (median)", transform=ax.transAxes, va="top",
            fontsize=8, color="0.4")
    return fig


def waterfall_stages(turn: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(stage, start ms, duration ms) of one turn, from its Reply.timings."""
    t = turn["timings"]
    stages = []
    at = 0.0
    for key, label in (("frontend_ms", "frontend"), ("encoder_ms", "encoder + projector"),
                       ("speaker_ms", "CAM++ speaker"), ("prompt_ms", "prompt + embedding"),
                       ("prefill_ms", "prefill")):
        if t[key] > 0:
            stages.append((label, at, t[key]))
        at += t[key]
    gen_end = at + t["steps"] * t["ms_per_step"]
    first = t["first_audio_ms"]
    if first is not None and at < first <= gen_end:
        stages.append((f"decode to first audio ({t['steps_to_first_audio']} steps)", at, first - at))
        stages.append(("decode + streaming audio", first, gen_end - first))
    else:
        stages.append((f"decode ({t['steps']} steps)", at, gen_end - at))
    if t["total_ms"] > gen_end:
        stages.append(("last chunk + wrap-up", gen_end, t["total_ms"] - gen_end))
    return stages


def _plot_waterfall(doc: dict[str, Any], plt: Any) -> Any:
    turn = doc.get("turn")
    if not turn:
        return None
    stages = waterfall_stages(turn)
    t = turn["timings"]
    total = t["total_ms"]
    chunks = turn.get("chunk_ms") or []
    rows = len(stages) + (1 if chunks else 0)
    fig, ax = plt.subplots(figsize=(8, 0.5 * rows + 1.8))
    colors = plt.cm.tab10.colors
    for i, (label, start, dur) in enumerate(stages):
        ax.barh(i, dur, left=start, color=colors[i % 10], height=0.6)
        inside = dur > 0.12 * total
        ax.text(start + dur / 2 if inside else start + dur + total * 0.01, i, f"{dur:.1f} ms", va="center",
                ha="center" if inside else "left", fontsize=8, color="white" if inside else "0.2")
    labels = [s[0] for s in stages]
    if chunks:
        ax.plot(chunks, [len(stages)] * len(chunks), "v", color="k", markersize=7)
        labels.append(f"audio chunks ready ({len(chunks)})")
    ax.set_yticks(range(rows), labels)
    if t["first_audio_ms"] is not None:
        ax.axvline(t["first_audio_ms"], color="C3", linestyle="--", linewidth=1)
        ax.text(t["first_audio_ms"], -0.45, f" first audio {t['first_audio_ms']:.0f} ms", color="C3", fontsize=8,
                va="top")
    ax.set_xlim(0, total * 1.12)
    ax.set_ylim(rows - 0.5, -0.7)
    ax.set_xlabel("milliseconds from the end of user speech (start of Conversation.ask)")
    ax.grid(axis="y", visible=False)
    ax.set_title(f"One turn ({turn.get('clip_s', 0):.1f} s question, {t['steps']} steps, "
                 f"{t['audio_seconds']:.1f} s of reply audio, stop: {turn.get('stop')})\n{_title(doc)}", fontsize=10)
    return fig


def _plot_components(doc: dict[str, Any], plt: Any) -> Any:
    prefixes = ("frontend/", "encoder/", "audio_projector/", "campplus/", "speaker_projector/", "prefill/",
                "decode_step/", "xy_decoder/")
    figs = [f for p in prefixes for f in sorted(_figs(doc, p), key=lambda f: f["value"]) if f.get("stats")]
    if not figs:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(figs) + 1.5))
    y = range(len(figs))
    p50 = [f["stats"]["p50"] for f in figs]
    err = [[0] * len(figs), [f["stats"]["p95"] - f["stats"]["p50"] for f in figs]]
    family = {p: i for i, p in enumerate(prefixes)}
    colors = [plt.cm.tab10.colors[family[f["id"].split("/")[0] + "/"] % 10] for f in figs]
    ax.barh(list(y), p50, xerr=err, color=colors, height=0.7, error_kw={"elinewidth": 0.8, "ecolor": "0.3"})
    ax.set_yticks(list(y), [f["id"] for f in figs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (p50; whisker to p95), log scale")
    ax.grid(axis="y", visible=False)
    ax.set_title(f"Per-component latency\n{_title(doc)}", fontsize=10)
    return fig


# --- Markdown ------------------------------------------------------------------------------------------

def _fmt(v: float | None, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if unit == "bytes":
        return f"{v / 2**20:,.1f} MiB"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _table(figs: list[dict[str, Any]]) -> list[str]:
    rows = ["| figure | what | p50 / value | p95 | p99 | min | n | unit |", "|---|---|--:|--:|--:|--:|--:|---|"]
    for f in figs:
        s = f.get("stats") or {}
        rows.append(f"| `{f['id']}` | {f['label']} | {_fmt(f['value'], f['unit'])} | {_fmt(s.get('p95'), f['unit'])} "
                    f"| {_fmt(s.get('p99'), f['unit'])} | {_fmt(s.get('min'), f['unit'])} | {s.get('n', 1)} "
                    f"| {'MiB' if f['unit'] == 'bytes' else f['unit']} |")
    return rows


def markdown(doc: dict[str, Any], plots: dict[str, str]) -> str:
    env, st, sec = doc.get("environment", {}), doc["status"], doc["sections"]
    b = env.get("bundle", {})
    s = doc["settings"]
    lines = [f"# qinyu-edge bench: {b.get('name', '?')}", ""]
    if not st["complete"]:
        lines += [f"**Interrupted during “{st['interrupted_during']}”**: this report holds the "
                  f"{st['figures_measured']} figures measured before the interruption.", ""]
    lines += [f"{doc['created']}, {st['seconds']:.1f} s. `{doc.get('command', '')}`", ""]
    load, cpus = st.get("load_average_1min") or {}, st.get("logical_cpus")
    busy = [v for v in load.values() if v is not None and cpus and v > cpus]
    if busy:
        lines += [f"**The machine was busy**: 1-minute load average {load.get('start')} at the start and "
                  f"{load.get('end')} at the end on {cpus} logical CPUs; other work shared them, so latencies are "
                  "high and noisy.", ""]
    lines += ["## Environment", "", "| | |", "|---|---|"]
    gpu = env.get("gpu") or {}
    rows = [
        ("machine", f"{env.get('machine', {}).get('cpu', '?')}, {env.get('machine', {}).get('logical_cpus', '?')} "
                    f"logical CPUs, {env.get('machine', {}).get('platform', '?')}"),
        ("GPU", gpu.get("name") or env.get("gpu_note", "?")),
        ("GPU monitor", env.get("gpu_monitor", "?")),
        ("clocks", ", ".join(f"{k} {v}" for k, v in (env.get("clocks") or {}).items() if v is not None) or "not readable"),
        ("power mode", (env.get("power_mode") or "not reported").replace("\n", "; ")),
        ("versions", ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())),
        ("bundle", f"`{b.get('path', '?')}` ({b.get('variant', '?')}, preset {b.get('preset')}), "
                   f"bundle.json sha256 `{str(b.get('sha256', '?'))[:16]}…`"),
        ("run", f"backend {s['backend']}, provider {s['provider']}, threads {s['threads'] or 'default'}, "
                f"{s['runs']} timed runs after {s['warmup']} warm-up, KV capacity {s['context']}"),
        ("precisions", "; ".join(f"{k}: {v}" for k, v in env.get("precisions", {}).items())),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "Section status: " + ", ".join(f"{k} — {v['status']}" for k, v in sec.items()), ""]

    figs = doc["figures"]
    by_section: dict[str, list[dict[str, Any]]] = {}
    for f in figs.values():
        by_section.setdefault(f["section"], []).append(f)

    lines += ["## Components", ""]
    if "components" in plots:
        lines += [f"![per-component latency]({plots['components']})", ""]
    if "latency_by_context" in plots:
        lines += [f"![decode latency by context length]({plots['latency_by_context']})", ""]
    lines += _table(by_section.get("components", [])) + [""]
    for note in sec.get("components", {}).get("skipped", []):
        lines.append(f"- skipped: {note}")

    lines += ["", "## End to end", "", doc.get("speech", {}).get("note", ""), ""]
    e2e = sec.get("end_to_end", {})
    if e2e.get("note"):
        lines += [e2e["note"], ""]
    if "turn_waterfall" in plots:
        lines += [f"![one turn]({plots['turn_waterfall']})", ""]
    if "ttfa_by_first_chunk" in plots:
        lines += [f"![time to first audio by first-chunk size]({plots['ttfa_by_first_chunk']})", ""]
    lines += _table(by_section.get("end_to_end", [])) + [""]
    if e2e.get("stops"):
        lines += [f"Replies stopped by: {', '.join(f'{k} ×{v}' for k, v in e2e['stops'].items())} "
                  f"(step cap {s['max_new_tokens']}).", ""]
    d = doc["definitions"]
    lines += [f"- **time to first audio**: {d['time_to_first_audio_ms']}.",
              f"- **reply latency**: {d['reply_latency_ms']}.",
              f"- **decode steps/s**: {d['decode_steps_per_s']}.",
              f"- **audio seconds per wall second**: {d['audio_s_per_wall_s']}.", ""]

    lines += ["## Memory", ""] + _table(by_section.get("memory", [])) + [""]
    gpu_mem = (doc.get("memory") or {}).get("gpu", {})
    lines += [f"GPU memory: {gpu_mem.get('status', 'n/a')}" + (f" ({gpu_mem['process_note']})"
                                                                 if gpu_mem.get("process_note") else ""), ""]

    lines += ["## Power", ""]
    pw = sec.get("power", {})
    if by_section.get("power"):
        lines += _table(by_section["power"]) + [""]
        p0 = by_section["power"][0]["params"]
        lines += [f"Measured with {p0.get('method')} ({p0.get('monitor')})." + (f" {p0['note']}." if p0.get("note")
                                                                                   else ""), ""]
    else:
        lines += [f"{pw.get('status', 'not reported on this platform')}: {pw.get('note', '')}", ""]

    lines += ["## Roofline", ""]
    roof = doc.get("roofline") or {}
    if roof.get("per_context"):
        lines += [f"Bandwidth: {_fmt(roof['bandwidth_gbs'])} GB/s — {roof['bandwidth_source']}.",
                  f"Weight bytes per decode step: {roof['weight_bytes_per_step']:,} "
                  f"({', '.join(f'{k} {v:,}' for k, v in roof['weight_bytes_breakdown'].items())}); "
                  f"{roof['method']}. {roof['note']}", "",
                  "| context | step p50 ms | weights GB/s | fraction | weights+KV GB/s | fraction |",
                  "|--:|--:|--:|--:|--:|--:|"]
        lines += [f"| {r['context']} | {_fmt(r['step_ms'])} | {_fmt(r['weights_gbs'])} | {r['weights_fraction']:.2%} "
                  f"| {_fmt(r['weights_kv_gbs'])} | {r['weights_kv_fraction']:.2%} |" for r in roof["per_context"]]
        lines.append("")
    else:
        lines += ["not measured (no decode step figures)", ""]

    lines += ["## Against PyTorch", ""]
    ag = doc.get("against") or {}
    if ag.get("ratios"):
        ref = ag.get("reference", {})
        lines += [f"Reference: {ref.get('source')}, on {ref.get('device')}, torch {ref.get('torch')} "
                  f"({ref.get('threads')} threads). Parity of the bundle against it (max relative error): "
                  + ", ".join(f"{k} {v:.1e}" for k, v in ag.get("parity_rel", {}).items()) + ".",
                  f"Ratio = {d['ratio_vs_torch']}.", "",
                  "| component | ours p50 ms | PyTorch p50 ms | ratio |", "|---|--:|--:|--:|"]
        lines += [f"| `{r['figure']}` | {_fmt(r['ours_ms'])} | {_fmt(r['torch_ms'])} | {r['ratio']:.2f}x |"
                  for r in ag["ratios"]]
        lines.append("")
    else:
        lines += [f"{sec.get('against', {}).get('status')}: {sec.get('against', {}).get('note', '')}", ""]
    lines += [f"Percentiles: {d['percentiles']}. Audio out is {SAMPLES_OUT} Hz.", ""]
    return "\n".join(lines)


# --- compare -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompareRow:
    id: str
    unit: str
    a: float | None
    b: float | None
    ratio: float | None  # b / a
    better: str | None
    regression: bool
    alike: bool = True  # both files describe the figure the same way (else not flagged: it measures another thing)


def load_doc(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise QinyuError(f"{path}: not a readable bench JSON ({e})") from e
    if doc.get("format") != FORMAT or "figures" not in doc:
        raise QinyuError(f"{path} is not a `qinyu-edge bench` result (format {doc.get('format')!r})")
    return doc


def compare(a: dict[str, Any], b: dict[str, Any], threshold: float = 0.1) -> list[CompareRow]:
    """One row per figure in either file. A regression: a lower-is-better figure grew by more than
    `threshold` (b/a > 1 + threshold), or a higher-is-better one shrank by as much (a/b > 1 + threshold).
    A figure whose label differs between the files (`backbone_step` times the backbone and the heads
    through a fused decode graph, the backbone alone with `--split`) is shown, never flagged."""
    fa, fb = a["figures"], b["figures"]
    rows = []
    for fid in list(fa) + [k for k in fb if k not in fa]:
        x, y = fa.get(fid), fb.get(fid)
        va = None if x is None else x.get("value")
        vb = None if y is None else y.get("value")
        ref = x or y
        better = ref.get("better")
        ratio = vb / va if va and vb is not None else None
        regression = False
        alike = x is None or y is None or x.get("label") == y.get("label")
        if ratio is not None and vb and alike:
            if better == "lower":
                regression = ratio > 1 + threshold
            elif better == "higher":
                regression = 1 / ratio > 1 + threshold
        rows.append(CompareRow(fid, ref.get("unit", ""), va, vb, ratio, better, regression, alike))
    return rows


def print_compare(rows: list[CompareRow], a_name: str, b_name: str, threshold: float, console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"{b_name} vs {a_name} (ratio = B / A; regression beyond {threshold:.0%})")
    for col in ("figure", "unit", "A", "B", "B / A", "better", ""):
        t.add_column(col, justify="right" if col in ("A", "B", "B / A") else "left")
    for r in rows:
        flag = ("[red]REGRESSION[/red]" if r.regression else "only in one" if r.ratio is None
                else "" if r.alike else "labels differ: not the same measure")
        t.add_row(r.id, "MiB" if r.unit == "bytes" else r.unit, _fmt(r.a, r.unit), _fmt(r.b, r.unit),
                  "n/a" if r.ratio is None else f"{r.ratio:.3f}", r.better or "-", flag)
    console.print(t)
    bad = [r.id for r in rows if r.regression]
    console.print(f"{len(bad)} regression(s) beyond {threshold:.0%}" + (": " + ", ".join(bad) if bad else "")
                  + f" over {sum(r.ratio is not None for r in rows)} figures in both files.")


__all__ = [
    "JSON_NAME",
    "PLOTS",
    "REPORT_NAME",
    "CompareRow",
    "compare",
    "load_doc",
    "make_plots",
    "markdown",
    "print_compare",
    "waterfall_stages",
    "write_outputs",
]
