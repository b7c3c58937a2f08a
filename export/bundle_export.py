"""Export a QinYuModel to a model bundle: one ONNX per component, bundle.json, parity report.

The bundle is assembled in a hidden temporary folder beside the target and renamed into place
only when every file is written and every parity check has run, so an interrupted or failed
export never leaves half a bundle under the requested name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from qinyu_edge.runtime.kv_cache import NULL_ROWS
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from safetensors.numpy import save_file as save_numpy

import qinyu_edge
from qinyu_edge.bundle import (
    HOST_FILE,
    SPEAKERS_FILE,
    TOKENIZER_FILE,
    FORMAT_VERSION,
    Bundle,
    ComponentSpec,
    TensorSpec,
    file_entries,
    write_manifest,
)
from qinyu_edge.engines.decode_graphs import check_decode, derive as derive_decode
from qinyu_edge.errors import QinyuError
from qinyu_edge.fileio import replace_dir
from qinyu_edge.side_file import with_data_files
from qinyu_edge.staging import refuse_existing, staged_dir
from qinyu_edge.validate import check_max_context

from .models.backbone import Qwen3Backbone
from .models.heads import HeadsGreedy, HeadsLogits
from .onnx_io import OPSET, compare, export_onnx, run_onnx
from .layer_parity import layer_parity
from .ort_backbone import ORT_BACKBONE_FILE, variant_parity, variant_spec, write_ort_backbone
from .qinyu_checkpoint import QinYuModel
from .weight_stream import WeightSource, export_streamed

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
HISTORY = 5  # codebook-0 ids of the last 5 frames feed the repetition penalty

Inputs = dict[str, torch.Tensor]


@dataclass
class Component:
    name: str
    module: torch.nn.Module
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    shape_ranges: dict[str, tuple[int, int, int]]
    trace_inputs: Inputs
    parity_inputs: list[Inputs]
    description: str
    ort_disabled_optimizers: tuple[str, ...] = ()
    # Exported with `export_streamed`; with `weights` set, the module is hollow and its weights
    # are read from there one tensor at a time (and parity runs layer by layer).
    streamed: bool = False
    weights: WeightSource | None = None


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def components(model: QinYuModel, max_context: int, seed: int = 1234) -> list[Component]:
    cfg = model.config
    b = cfg.backbone
    h, v = b.hidden_size, b.vocab_size
    g = torch.Generator().manual_seed(seed)
    n_query = 4 if cfg.keep_query_rows else 0
    sv_in = cfg.sensevoice.input_size
    enc_out = cfg.audio_projector.input_size
    max_prompt = min(2048, max_context)

    bb = model.backbone
    sig = bb.signature()
    cache_in = list(sig.input_names[2:])
    cache_out = list(sig.output_names[1:])

    def backbone_inputs(s: int, p: int, ahead: int = 0) -> Inputs:
        return {"inputs_embeds": _randn(g, 1, s, h), "past_length": torch.tensor([p]),
                **{n: _randn(g, *bb.cache_shape(p + ahead)) for n in cache_in}}

    cache_axes = {n: {0: "past"} for n in cache_in} | {n: {0: "seq"} for n in cache_out}

    a = model.layout.audio_start
    emb = model.heads.weight.detach()

    def greedy_inputs(token: int, history: list[int], noise: float) -> Inputs:
        # A hidden state aligned with one lm_head row makes that token the clear choice, so the
        # fused graph's text/audio branch and its penalty path are both exercised.
        hid = 3.0 * emb[token] / emb[token].norm() * h**0.5 + noise * _randn(g, h)
        hist = torch.full((1, HISTORY), -1, dtype=torch.int64)
        hist[0, : len(history)] = torch.tensor(history, dtype=torch.int64)
        return {"hidden": hid.unsqueeze(0), "history": hist}

    def codes(t: int) -> Inputs:
        return {"codes": torch.randint(0, cfg.xy.codebook_size, (1, cfg.n_codebooks, t), generator=g)}

    def ids(s: int, k: int) -> Inputs:
        return {"ids": torch.randint(0, v, (1, s, k), generator=g)}

    return [
        Component(
            "encoder", model.encoder, ["features"], ["encoder_out"],
            {"features": {1: "frames"}, "encoder_out": {1: "rows"}},
            {"frames": (1, 100, 500)},
            {"features": _randn(g, 1, 17, sv_in)},
            [{"features": _randn(g, 1, t, sv_in)} for t in (7, 23, 60)],
            f"SenseVoice SAN-M on CMVN'd LFR features; {n_query} query rows kept in front",
        ),
        Component(
            "audio_projector", model.audio_projector, ["encoder_out"], ["audio_embeds"],
            {"encoder_out": {1: "rows"}, "audio_embeds": {1: "rows"}},
            {"rows": (1, 100 + n_query, 500 + n_query)},
            {"encoder_out": _randn(g, 1, 21, enc_out)},
            [{"encoder_out": _randn(g, 1, t, enc_out)} for t in (5, 31)],
            "per-frame adapter into the LLM's embedding space",
        ),
        Component(
            "speaker_projector", model.speaker_projector, ["speaker"], ["speaker_embeds"],
            {"speaker": {0: "speakers"}, "speaker_embeds": {0: "speakers"}},
            {"speakers": (1, 2, 8)},
            {"speaker": _randn(g, 2, cfg.speaker_projector.input_size)},
            [{"speaker": _randn(g, n, cfg.speaker_projector.input_size)} for n in (1, 3)],
            "CAM++ 192-d vector into the embedding written at <|speaker|> / <|user_speaker|>",
        ),
        Component(
            "embedding", model.embedding, ["ids"], ["inputs_embeds"],
            {"ids": {1: "seq", 2: "ids_per_step"}, "inputs_embeds": {1: "seq"}},
            {"seq": (1, 256, max_prompt), "ids_per_step": (1, 8, 8)},
            ids(3, 8),
            [ids(1, 1), ids(9, 1), ids(1, 8), ids(3, 8)],
            "text step: one id; audio step: mean of the 8 codebook rows",
            streamed=True,
        ),
        Component(
            "backbone", model.backbone, ["inputs_embeds", "past_length", *cache_in], ["hidden", *cache_out],
            {"inputs_embeds": {1: "seq"}, **cache_axes},
            {"seq": (1, 256, max_prompt), "past": (NULL_ROWS, NULL_ROWS + 512, NULL_ROWS + max_context)},
            backbone_inputs(5, 3, 2),
            [backbone_inputs(s, p, a) for s, p, a in ((7, 0, 0), (7, 0, 5), (1, 7, 0), (1, 40, 24), (5, 13, 3))],
            "prefill (past_length 0) and decode (seq=1) over time-major per-layer caches: a masked null slot of "
            f"{NULL_ROWS} row(s), past_length positions, then masked rows of the host's window "
            f"(rows = {NULL_ROWS} + window); returns only the new positions"
            + ("; MLA caches the normed latent and the roped key" if b.is_mla else ""),
            streamed=True, weights=model.backbone_weights,
        ),
        Component(
            "heads_logits", HeadsLogits(model.heads), ["hidden"], ["logits"], {}, {},
            {"hidden": _randn(g, 1, h)}, [{"hidden": _randn(g, 1, h)} for _ in range(2)],
            "raw lm_head logits of the last position (for sampling on the host)",
            streamed=True,
        ),
        Component(
            "heads_greedy", HeadsGreedy(model.heads), ["hidden", "history"], ["ids"], {}, {},
            greedy_inputs(a + 7, [a + 7, a + 7], 0.0),
            [greedy_inputs(a + 7, [a + 7, a + 7, a + 3], 0.1), greedy_inputs(a + 2, [], 0.1),
             greedy_inputs(model.layout.im_end, [a + 1], 0.1), greedy_inputs(65, [a + 65], 0.5)],
            "official greedy step fused: masked text head, codebook-0 repetition penalty, 8 ids",
            streamed=True,
        ),
        Component(
            "xy_decoder", model.xy, ["codes"], ["wav"],
            {"codes": {2: "frames"}, "wav": {1: "samples"}},
            {"frames": (1, 40, 375)},
            codes(9), [codes(t) for t in (5, 12, 40)],
            f"codes of a chunk with its left context -> {cfg.xy.sample_rate} Hz audio",
        ),
        Component(
            "campplus", model.campplus, ["fbank"], ["embedding"],
            # One row per 10 s chunk of a clip (up to 90 s), embedded in one call.
            {"fbank": {0: "chunks", 1: "frames"}, "embedding": {0: "chunks"}},
            {"chunks": (1, 1, 9), "frames": (50, 998, 998)},
            {"fbank": _randn(g, 2, 200, cfg.campplus.feat_dim)},
            [{"fbank": _randn(g, n, t, cfg.campplus.feat_dim)} for n, t in ((1, 150), (3, 237), (1, 400))],
            "CAM++ on one 10 s chunk's mean-removed fbank",
        ),
    ]


def _spec(names: list[str], values: list[np.ndarray], axes: dict[str, dict[int, str]]) -> tuple[TensorSpec, ...]:
    out = []
    for n, val in zip(names, values):
        dyn = axes.get(n, {})
        out.append(TensorSpec(n, str(val.dtype), tuple(dyn.get(i, d) for i, d in enumerate(val.shape))))
    return tuple(out)


def _torch_outputs(comp: Component, feeds: Inputs) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = comp.module(*[feeds[n] for n in comp.inputs])
    if isinstance(out, torch.Tensor):
        out = (out,)
    return {n: t.detach().numpy() for n, t in zip(comp.outputs, out)}


def _dims_label(comp: Component, feeds: Inputs) -> str:
    """The values of the named dynamic axes, e.g. 'seq=1 past=40' (the rest of a shape is fixed)."""
    dims: dict[str, int] = {}
    for name, axes in comp.dynamic_axes.items():
        if name in feeds:
            dims.update({label: int(feeds[name].shape[i]) for i, label in axes.items()})
    return " ".join(f"{k}={v}" for k, v in dims.items()) or " ".join(
        f"{k}{list(t.shape)}" for k, t in feeds.items())


def _meta_outputs(comp: Component) -> dict[str, np.ndarray]:
    """A hollow module's outputs on the trace inputs as shapes and dtypes only (run on the meta
    device, so no weight is needed): zero-strided arrays of the right shape, for the spec."""
    module = copy.deepcopy(comp.module).to("meta")
    with torch.no_grad():
        out = module(*[comp.trace_inputs[n].to("meta") for n in comp.inputs])
    if isinstance(out, torch.Tensor):
        out = (out,)
    return {n: np.broadcast_to(np.zeros((), torch.empty(0, dtype=t.dtype).numpy().dtype), tuple(t.shape))
            for n, t in zip(comp.outputs, out)}


def parity(comp: Component, path: Path, progress: Callable[[int, int], None] | None = None) -> list[dict[str, object]]:
    if comp.weights is not None:
        return layer_parity(path, comp.module, comp.weights, comp.parity_inputs, PARITY_TOLERANCE, progress)
    rows = []
    for feeds in comp.parity_inputs:
        ref = _torch_outputs(comp, feeds)
        got = run_onnx(path, {k: t.numpy() for k, t in feeds.items()},
                       disabled_optimizers=comp.ort_disabled_optimizers)
        shape = _dims_label(comp, feeds)
        for err in compare(got, ref):
            rows.append({"component": comp.name, "inputs": shape, "output": err.name,
                         "max_abs": err.max_abs, "rel": err.rel, "ok": err.rel <= PARITY_TOLERANCE})
    return rows


def parity_table(rows: list[dict[str, object]]) -> Table:
    table = Table(title=f"ONNX Runtime (CPU) vs PyTorch fp32 - tolerance rel <= {PARITY_TOLERANCE:g}")
    for col in ("component", "shape", "output", "max abs", "rel", ""):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(str(r["component"]), str(r["inputs"]), str(r["output"]), f"{r['max_abs']:.2e}",
                      f"{r['rel']:.2e}", "ok" if r["ok"] else "[red]FAIL[/red]")
    return table


def _ort_variants(model: QinYuModel, comps: list[Component], folder: Path, max_context: int,
                  rows: list[dict[str, object]]) -> dict[str, ComponentSpec]:
    """The backbone's ONNX Runtime CPU graph where the architecture has one (Qwen3), checked against
    PyTorch like the components; its parity rows join `rows`."""
    variants = {}
    if model.backbone_weights is not None:
        log.info("no ONNX Runtime CPU variant for a backbone exported from the shards: runtimes use backbone.onnx")
    elif isinstance(model.backbone, Qwen3Backbone):
        backbone = next(c for c in comps if c.name == "backbone")
        path = folder / ORT_BACKBONE_FILE
        write_ort_backbone(model.backbone, path, folder / "backbone.onnx")
        spec = variant_spec(model.backbone, path.name, backbone.shape_ranges["seq"], max_context)
        rows += [{**r, "ok": float(r["rel"]) <= PARITY_TOLERANCE} for r in variant_parity(model.backbone, spec, path)]
        variants["backbone"] = spec
    return variants


def bundle_bytes(comps: list[Component]) -> int:
    """About what the bundle takes on disk: every component's weights in fp32, plus the decode
    graphs' copy of the largest matrix (the embedding table); the ORT variant shares its weights."""
    sizes = [sum(t.numel() * 4 for t in c.module.state_dict().values()) for c in comps]
    largest = max((t.numel() * 4 for c in comps for t in c.module.state_dict().values()), default=0)
    return sum(sizes) + largest


class ParityError(QinyuError):
    pass


def export_bundle(model: QinYuModel, out: str | os.PathLike, force: bool = False,
                  max_context: int | None = None, console: Console | None = None,
                  on_stage: Callable[[str], None] | None = None) -> Bundle:
    """Write the bundle for `model` at `out`; refuse an existing folder unless `force`.
    `on_stage` hears the name of each stage as it starts (`bench_export_memory` times them)."""
    out = Path(out)
    console = console or Console(stderr=True)
    refuse_existing(out, force)
    cfg = model.config
    max_context = (min(cfg.backbone.max_position_embeddings, 8192) if max_context is None
                   else check_max_context(max_context, cfg.backbone.max_position_embeddings))
    comps = components(model, max_context)
    with staged_dir(out, force, need_bytes=bundle_bytes(comps)) as tmp:
        specs: dict[str, ComponentSpec] = {}
        rows: list[dict[str, object]] = []
        timings: dict[str, float] = {}
        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
        with progress:
            task = progress.add_task("exporting", total=2 * len(comps) + 2)

            def stage(name: str) -> None:
                progress.update(task, description=name)
                if on_stage:
                    on_stage(name)
            for comp in comps:
                def step(what: str) -> Callable[[int, int], None]:
                    return lambda k, n: progress.update(task, description=f"{what} ({k}/{n})")

                stage(f"export {comp.name}")
                t0 = time.perf_counter()
                args = tuple(comp.trace_inputs[n] for n in comp.inputs)
                if comp.streamed:
                    path = export_streamed(comp.module, args, tmp / f"{comp.name}.onnx", comp.inputs, comp.outputs,
                                           comp.dynamic_axes, comp.weights, step(f"export {comp.name}: weights"))
                else:
                    path = export_onnx(comp.module, args, tmp / f"{comp.name}.onnx", comp.inputs, comp.outputs,
                                       comp.dynamic_axes)
                timings[comp.name] = time.perf_counter() - t0
                progress.advance(task)
                stage(f"parity {comp.name}")
                rows += parity(comp, path, step(f"parity {comp.name}: pieces"))
                progress.advance(task)
                ref = _meta_outputs(comp) if comp.weights is not None else _torch_outputs(comp, comp.trace_inputs)
                specs[comp.name] = ComponentSpec(
                    name=comp.name, file=path.name,
                    inputs=_spec(comp.inputs, [comp.trace_inputs[n].numpy() for n in comp.inputs], comp.dynamic_axes),
                    outputs=_spec(comp.outputs, [ref[n] for n in comp.outputs], comp.dynamic_axes),
                    shape_ranges=comp.shape_ranges, description=comp.description,
                    ort_disabled_optimizers=comp.ort_disabled_optimizers,
                )
            stage("export backbone (ort cpu)")
            variants = _ort_variants(model, comps, tmp, max_context, rows)
            progress.advance(task)
            stage("fused decode graphs")
            specs, variants, host_embedding = derive_decode(tmp, specs, variants)
            if model.backbone_weights is None:
                rows += check_decode(tmp, specs)
            else:
                # Running it would hold the whole backbone; it joins two graphs checked above.
                log.info("fused decode graph not run: the backbone was checked layer by layer")
            progress.advance(task)
        console.print(parity_table(rows))

        model.tokenizer.save(str(tmp / TOKENIZER_FILE))
        save_numpy({"cmvn_shift": model.cmvn_shift.astype(np.float32), "cmvn_scale": model.cmvn_scale.astype(np.float32)},
                   str(tmp / HOST_FILE))
        if model.speakers:
            save_numpy({k: np.asarray(v, np.float32) for k, v in model.speakers.items()}, str(tmp / SPEAKERS_FILE))
        worst = max((float(r["rel"]) for r in rows), default=0.0)
        parity_summary = {"tolerance": PARITY_TOLERANCE, "worst_rel": worst, "ok": all(bool(r["ok"]) for r in rows),
                          "rows": rows, "export_seconds": timings}
        (tmp / "parity.json").write_text(json.dumps(parity_summary, indent=2))
        files = [p.name for p in tmp.iterdir() if p.is_file() and not p.name.startswith(".")]
        bundle = Bundle(
            root=out, format_version=FORMAT_VERSION, qinyu_edge_version=qinyu_edge.__version__,
            config=cfg, layout=model.layout, components=with_data_files(tmp, specs), files=file_entries(tmp, files),
            origin={**model.origin, "preset": cfg.name if cfg.tiny else None, "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            opset=OPSET, parity={k: v for k, v in parity_summary.items() if k != "rows"}, ort_variants=with_data_files(tmp, variants),
            host_embedding=host_embedding,
        )
        write_manifest(dataclasses.replace(bundle, root=tmp))
        if not parity_summary["ok"]:
            failed = sorted({str(r["component"]) for r in rows if not r["ok"]})
            raise ParityError(
                f"ONNX parity failed for {', '.join(failed)} (worst rel {worst:.2e} > {PARITY_TOLERANCE:g}); "
                "the bundle was not written. This is a bug in the export: please report it with parity.json."
            )
        replace_dir(tmp, out)
        return bundle


def preset_bundle(preset_name: str, seed: int = 0, console: Console | None = None) -> Path:
    """The bundle of a tiny preset under the cache folder, exported once (safe across processes)."""
    import fcntl

    from .qinyu_checkpoint import cache_dir, load_preset

    out = cache_dir() / "bundles" / f"{preset_name}-seed{seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = out / "bundle.json"
        if not manifest.is_file() or json.loads(manifest.read_text()).get("format_version") != FORMAT_VERSION:
            export_bundle(load_preset(preset_name, seed), out, force=True, console=console)
    return out
