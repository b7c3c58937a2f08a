"""Decode-step benchmark: our ONNX Runtime step against onnxruntime-genai, PyTorch and
transformers on the same random Qwen3 weights, at several past lengths.

    python -m qinyu_edge.export.bench_decode [--past 64,512,2048] [--steps N] [--threads 2]

Setup (once per shape, cached under the work folder): a random-weight Qwen3 checkpoint folder
written by transformers (safetensors, plus a small byte-level tokenizer, which is all the genai
builder needs from a tokenizer), the genai model built from it with
`python -m onnxruntime_genai.models.builder -i CKPT -o OUT -p fp32 -e cpu`, and our graphs
exported from the same weights (keys = the checkpoint's without `model.`), as the bundle export
traces them.

One decode step, for each contender (all fp32 on the CPU, `--threads` intra-op threads):
- ours: the runtime's step (`Generator.generate`): the next input row gathered on the host from the
  mapped embedding table, then one call of the fused decode graph (the backbone's ONNX Runtime CPU
  variant, the eight heads and the greedy choice) for one position over the head-major cache it
  updates in place. ours-split: the embedding, backbone and greedy-heads sessions, three calls;
  ours-portable: the same on the portable backbone graph.
- matmul: one fp32 MatMul over a weight of the step's bytes (see below).
- genai: `Generator.generate_next_token()`: its one graph (embedding, layers, lm_head) for one
  position over its shared past/present buffer, then greedy search on the host.
- genai graph: genai's model.onnx run by our session (`GenaiGraphRunner`): the same graph under
  the runtime's thread settings, greedy on the host.
- torch (ours): the same three modules in PyTorch with a preallocated cache (views, no concat).
- transformers: Qwen3ForCausalLM, eager attention, DynamicCache, argmax of the last logits.
`--spin-us N` adds our step once more with intra-op workers spinning N us between parallel
sections (the runtime's default is not to spin; see `runtime/session.py`).
Every contender first prefills `past` random positions (untimed) and keeps that state; each round
rewinds to `past` and times `--steps` steps, the first `WARMUP` of which are dropped. Rounds visit
the contenders in alternating order (ABBA), so load from other processes hits all alike; a figure
is the median over all kept steps of all rounds.

Bandwidth floor: the weight bytes one step must read (every layer, the final norm, the lm_head and
one embedding row; the KV cache is not counted) over the copy bandwidth, measured as the best of
several large numpy copies and counted as bytes read plus bytes written per second. Fraction of
floor = floor / step time. A read stream does not reach that copy rate, so contender "matmul" times
one fp32 MatMul over a weight of the step's bytes in the same rounds, and the caption gives its time
over each step's: how close a step comes to doing nothing but read its weights on these kernels.
Host overhead (ours) = step time minus the time inside the ONNX Runtime sessions
(`CopyStats.busy_ms`): the loop itself and the host gather of the step's embedding row(s).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.table import Table

from qinyu_edge.bundle import ComponentSpec, TensorSpec
from qinyu_edge.config import N_CODEBOOKS, BackboneConfig
from qinyu_edge.engines.decode_graphs import fuse_decode, write_host_embedding
from qinyu_edge.runtime.generate import PENALTY_WINDOW, Generator
from qinyu_edge.runtime.host_embedding import HostEmbedding
from qinyu_edge.runtime.kv_cache import NULL_ROWS, KVCache
from qinyu_edge.runtime.session import Session, open_session
from qinyu_edge.tokens import TokenLayout
from qinyu_edge.validate import COUNT, NON_NEGATIVE

log = logging.getLogger(__name__)

WARMUP = 2  # steps dropped at the start of every timed run (cold caches after a rewind)
GENAI_INSTALL = "pip install onnxruntime-genai==0.18.0 onnx-ir"


@dataclass(frozen=True)
class BenchShape:
    name: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6

    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(
            arch="qwen3", hidden_size=self.hidden, num_layers=self.layers, intermediate_size=self.ffn,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            vocab_size=self.vocab, rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=False,
        )

    def weight_bytes(self, itemsize: int = 4) -> int:
        """Bytes of weights one decode step reads: all layers, final norm, lm_head, one embedding row."""
        h, d = self.hidden, self.head_dim
        attn = h * d * (self.heads + 2 * self.kv_heads) + self.heads * d * h + 2 * d
        layer = attn + 3 * h * self.ffn + 2 * h
        return itemsize * (self.layers * layer + h + self.vocab * h + h)


SHAPES = {
    # The yardstick shape (an 8B-family Qwen3 backbone, scaled down).
    "qwen3-1024": BenchShape("qwen3-1024", 1024, 3072, 8, 16, 8, 64, 32000),
    # For tests: seconds to build, same code paths. The vocabulary fits the 8 x 1032 audio block.
    "tiny": BenchShape("tiny", 64, 160, 2, 4, 2, 16, 8448),
}


def bench_layout() -> TokenLayout:
    """A token layout for the heads graph of a plain LM vocabulary: the audio block sits after a few
    specials; `im_end` is -1, which no head returns, so every run decodes exactly its steps."""
    return TokenLayout(im_start=1, im_end=-1, begin_of_audio=2, end_of_audio=3, context_of_audio=4, audio=5,
                       end_of_conv=6, speaker=7, user_speaker=8, func_start=9, func_end=10, audio_start=16)


def _hf_config(shape: BenchShape, max_positions: int) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        vocab_size=shape.vocab, tie_word_embeddings=False, rms_norm_eps=shape.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def _bench_tokenizer() -> Any:
    """Byte-level BPE without merges plus three specials: any text encodes; the builder only saves it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _fresh_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))


def _publish(tmp: Path, final: Path) -> Path:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def make_checkpoint(shape: BenchShape, folder: Path, seed: int = 0, max_positions: int = 8192) -> Path:
    """A random-weight Qwen3 checkpoint folder in the transformers layout (written once)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(_hf_config(shape, max_positions)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # trained norms are not all ones; random ones catch a norm on the wrong tensor
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    tmp = _fresh_dir(folder)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        _bench_tokenizer().save_pretrained(tmp)
        return _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_genai(checkpoint: Path, out: Path) -> Path:
    """onnxruntime-genai's model builder on the checkpoint folder (fp32, CPU), once."""
    if (out / "genai_config.json").is_file():
        return out
    tmp = _fresh_dir(out)
    try:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(tmp),
               "-p", "fp32", "-e", "cpu", "-c", str(tmp / "cache")]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the genai builder failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class OurModules:
    """Our PyTorch modules holding the checkpoint's weights."""

    embedding: Any
    backbone: Any
    heads: Any


def load_ours(shape: BenchShape, checkpoint: Path) -> OurModules:
    from safetensors.torch import load_file

    from qinyu_edge.export.models.backbone import build_backbone
    from qinyu_edge.export.models.heads import Embedding, Heads
    from qinyu_edge.export.state_dict import load_strict

    state = load_file(str(checkpoint / "model.safetensors"))
    backbone = build_backbone(shape.backbone_config()).eval()
    load_strict(backbone, {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")},
                str(checkpoint), "rebuild the benchmark checkpoint (delete the work folder)",
                ignore_prefixes=("lm_head.",))
    return OurModules(Embedding(state["model.embed_tokens.weight"]).eval(), backbone,
                      Heads(state["lm_head.weight"], bench_layout()).eval())


def _graph_fingerprint() -> str:
    """Hash of the modules our graphs are traced from, so a code change re-exports."""
    from qinyu_edge.engines import decode_graphs
    from qinyu_edge.export import ort_backbone
    from qinyu_edge.export.models import backbone, heads, layers, qwen3
    from qinyu_edge.runtime import kv_cache

    src = "".join(inspect.getsource(m) for m in (backbone, heads, layers, qwen3, kv_cache, ort_backbone, decode_graphs))
    return hashlib.sha256(src.encode()).hexdigest()[:12]


OUR_GRAPHS = ("embedding", "backbone", "backbone_ort", "heads_greedy", "heads_logits", "decode_ort")


def export_ours(mods: OurModules, out: Path) -> dict[str, Path]:
    """Our graphs, traced as the bundle export traces them (same names and dynamic axes)."""
    import torch

    from qinyu_edge.export.models.heads import HeadsGreedy, HeadsLogits
    from qinyu_edge.export.onnx_io import export_onnx
    from qinyu_edge.export.ort_backbone import write_ort_backbone

    paths = {n: out / f"{n}.onnx" for n in OUR_GRAPHS} | {"embedding_table": out / "embedding.onnx.data"}
    if all(p.is_file() for p in paths.values()):
        return paths
    bb, h = mods.backbone, mods.backbone.cfg.hidden_size
    sig = bb.signature()
    tmp = _fresh_dir(out)
    try:
        ids = torch.randint(0, bb.cfg.vocab_size, (1, 3, N_CODEBOOKS))
        export_onnx(mods.embedding, (ids,), tmp / "embedding.onnx", ["ids"], ["inputs_embeds"],
                    {"ids": {1: "seq", 2: "ids_per_step"}, "inputs_embeds": {1: "seq"}})
        axes = {"inputs_embeds": {1: "seq"}} | {n: {0: "past"} for n in sig.input_names[2:]}
        axes |= {n: {0: "seq"} for n in sig.output_names[1:]}
        export_onnx(bb, bb.example_inputs(5, 3), tmp / "backbone.onnx", sig.input_names, sig.output_names, axes)
        write_ort_backbone(bb, tmp / "backbone_ort.onnx", tmp / "backbone.onnx")
        hist = torch.full((1, PENALTY_WINDOW), -1, dtype=torch.int64)
        export_onnx(HeadsGreedy(mods.heads), (torch.randn(1, h), hist), tmp / "heads_greedy.onnx",
                    ["hidden", "history"], ["ids"])
        export_onnx(HeadsLogits(mods.heads), (torch.randn(1, h),), tmp / "heads_logits.onnx", ["hidden"], ["logits"])
        fuse_decode(tmp / "backbone_ort.onnx", tmp / "heads_greedy.onnx", tmp / "decode_ort.onnx")
        if write_host_embedding(tmp / "embedding.onnx") is None:
            raise RuntimeError("the benchmark's embedding graph is not a plain table lookup")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def backbone_spec(backbone: Any, fused: bool = True) -> ComponentSpec:
    """The backbone's ComponentSpec as the bundle export writes it (for `KVCache.for_backbone`): the
    ONNX Runtime CPU variant's, or with `fused=False` the portable graph's."""
    import torch

    if fused:
        from qinyu_edge.export.ort_backbone import variant_spec

        return variant_spec(backbone, "backbone_ort.onnx", (1, 1, 1), 1)

    sig = backbone.signature()
    args = backbone.example_inputs(1, 1)
    with torch.inference_mode():
        outs = backbone(*args)
    dyn = {n: {0: "past"} for n in sig.input_names[2:]} | {n: {0: "seq"} for n in sig.output_names[1:]}

    def specs(names: tuple[str, ...], tensors: Any) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(n, str(t.numpy().dtype), tuple(dyn.get(n, {}).get(i, d) for i, d in enumerate(t.shape)))
                     for n, t in zip(names, tensors))

    return ComponentSpec("backbone", "backbone.onnx", specs(sig.input_names, args), specs(sig.output_names, outs))


@dataclass
class Timed:
    step_ms: list[float]
    host_ms: list[float] | None = None  # step time outside the sessions (ours only)


class Runner(Protocol):
    name: str

    def prepare(self, past: int) -> None: ...

    def run(self, past: int, steps: int) -> Timed: ...


def _random_ids(n: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, n)


class OursRunner:
    """The runtime's decode loop over our graphs (IO binding into a KVCache), as the runtime runs a
    bundle: "one-call" = host embedding table + the fused decode graph on the backbone's ONNX
    Runtime CPU variant; "split" = the embedding, that variant and the greedy heads as three
    sessions; "portable" = the three sessions on the portable backbone graph."""

    NAMES = {"one-call": "ours", "split": "ours (3 calls)", "portable": "ours (portable)"}

    def __init__(self, paths: dict[str, Path], mods: OurModules, steps: int, threads: int, spin_us: int = 0,
                 graphs: str = "one-call"):
        self.name = self.NAMES[graphs]
        cfg = mods.backbone.cfg
        if graphs == "one-call":
            self.embedding: Session = HostEmbedding(paths["embedding_table"], cfg.vocab_size, cfg.hidden_size)
            self.sessions: dict[str, Session] = {"decode": open_session(paths["decode_ort"], threads=threads,
                                                                        spin_us=spin_us)}
        else:
            names = {"backbone": "backbone" if graphs == "portable" else "backbone_ort", "heads_greedy": "heads_greedy",
                     "embedding": "embedding"}
            self.sessions = {n: open_session(paths[g], threads=threads, spin_us=spin_us) for n, g in names.items()}
            self.embedding = self.sessions["embedding"]
        self.spec = backbone_spec(mods.backbone, graphs != "portable")
        self.hidden, self.steps = cfg.hidden_size, steps
        self.generators: dict[int, Generator] = {}

    def generator(self, capacity: int) -> Generator:
        s = self.sessions
        return Generator(self.embedding, s.get("backbone"), s.get("heads_greedy"), None, bench_layout(), self.hidden,
                         KVCache.for_backbone(self.spec, capacity), fused=s.get("decode"))

    def prepare(self, past: int) -> None:
        gen = self.generator(past + self.steps)
        embeds = np.random.default_rng(past).standard_normal((1, past, self.hidden), dtype=np.float32)
        gen.prefill(embeds)
        self.generators[past] = gen

    def run(self, past: int, steps: int) -> Timed:
        gen = self.generators[past]
        gen.cache.rewind(past)
        times = gen.generate(None, max_new_tokens=steps).times
        return Timed(times.step_ms, times.host_ms())


class TorchRunner:
    """The same modules in PyTorch: one step = greedy heads, embedding, backbone over cache views."""

    name = "torch (ours)"

    def __init__(self, mods: OurModules, steps: int, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch, self.mods, self.steps = torch, mods, steps
        self.layout = bench_layout()
        self.state: dict[int, tuple[tuple[Any, ...], Any]] = {}

    def prepare(self, past: int) -> None:
        torch, bb = self.torch, self.mods.backbone
        with torch.inference_mode():
            bufs = tuple(torch.zeros(bb.cache_shape(past + self.steps)) for _ in bb.cache_names)
            gen = torch.Generator().manual_seed(past)
            embeds = torch.randn(1, past, bb.cfg.hidden_size, generator=gen)
            out = bb.step(embeds, *(b[:NULL_ROWS] for b in bufs))
            for b, new in zip(bufs, out[1:]):
                b[NULL_ROWS : NULL_ROWS + past] = new
        self.state[past] = (bufs, out[0])

    def run(self, past: int, steps: int) -> Timed:
        torch, m, lay = self.torch, self.mods, self.layout
        bufs, hidden = self.state[past]
        history: deque[int] = deque(maxlen=PENALTY_WINDOW)
        hist = torch.full((1, PENALTY_WINDOW), -1, dtype=torch.int64)
        pos, times = past, []
        with torch.inference_mode():
            for _ in range(steps):
                t0 = time.perf_counter()
                hist.fill_(-1)
                if history:
                    hist[0, : len(history)] = torch.tensor(list(history))
                ids = m.heads.greedy(hidden, hist)[0]
                token = int(ids[0])
                if lay.is_audio(token):
                    history.append(token)
                    step = ids.view(1, 1, -1)
                else:
                    step = ids[:1].view(1, 1, 1)
                out = m.backbone.step(m.embedding(step), *(b[: NULL_ROWS + pos] for b in bufs))
                for b, new in zip(bufs, out[1:]):
                    b[NULL_ROWS + pos : NULL_ROWS + pos + 1] = new
                pos += 1
                hidden = out[0]
                times.append((time.perf_counter() - t0) * 1e3)
        return Timed(times)


class TransformersRunner:
    """transformers' Qwen3ForCausalLM, eager attention, DynamicCache (cropped back between rounds)."""

    name = "transformers eager"

    def __init__(self, checkpoint: Path, threads: int):
        import torch
        from transformers import Qwen3ForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = Qwen3ForCausalLM.from_pretrained(str(checkpoint), attn_implementation="eager",
                                                      dtype=torch.float32).eval()
        self.state: dict[int, tuple[Any, Any]] = {}

    def prepare(self, past: int) -> None:
        torch = self.torch
        ids = torch.from_numpy(_random_ids(past, self.model.config.vocab_size, past)).view(1, -1)
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True)
        self.state[past] = (out.past_key_values, out.logits[:, -1:].argmax(-1))

    def run(self, past: int, steps: int) -> Timed:
        torch = self.torch
        cache, token = self.state[past]
        cache.crop(past - cache.get_seq_length())  # negative: drop the positions of the last round
        times = []
        with torch.inference_mode():
            for _ in range(steps):
                t0 = time.perf_counter()
                out = self.model(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                times.append((time.perf_counter() - t0) * 1e3)
        return Timed(times)


class GenaiRunner:
    """onnxruntime-genai's Generator: prefill once, then per round rewind and time generate_next_token."""

    name = "onnxruntime-genai"

    def __init__(self, folder: Path, steps: int, threads: int):
        import onnxruntime_genai as og

        cfg = og.Config(str(folder))
        opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
        self.og, self.model, self.steps = og, og.Model(cfg), steps
        self.vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
        self.generators: dict[int, Any] = {}

    def prepare(self, past: int) -> None:
        og = self.og
        params = og.GeneratorParams(self.model)
        # min_length = max_length: its end-of-sequence token never stops a run early.
        length = past + self.steps + 2
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(_random_ids(past, self.vocab, past).astype(np.int32))
        self.generators[past] = gen

    def run(self, past: int, steps: int) -> Timed:
        gen = self.generators[past]
        # Back to past-1 positions, then one token through the model: the next call only samples
        # (no model run), and every call after it runs one position at past, past+1, ...
        gen.rewind_to(past - 1)
        gen.append_tokens(np.array([5], np.int32))
        gen.generate_next_token()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            gen.generate_next_token()
            times.append((time.perf_counter() - t0) * 1e3)
        return Timed(times)


class GenaiGraphRunner:
    """genai's model graph run by our session (`OrtSession`, the runtime's thread settings: workers do
    not spin) over a shared past/present buffer, greedy on the host: genai's graph against ours under
    the same execution policy, without its C++ loop and its spinning thread pool."""

    name = "genai graph, our session"

    def __init__(self, folder: Path, steps: int, threads: int):
        cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.session = open_session(folder / "model.onnx", threads=threads)
        self.layers, self.kv_heads, self.head = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_size"]
        self.vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
        self.steps = steps
        self.state: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}

    def _run(self, ids: np.ndarray, caches: dict[str, np.ndarray], pos: int, logits: np.ndarray | None) -> np.ndarray:
        mask = np.ones((1, pos + ids.shape[1]), np.int64)
        into = {n.replace("past_key_values", "present"): b for n, b in caches.items()}
        if logits is not None:
            into["logits"] = logits
        return self.session.run({"input_ids": ids, "attention_mask": mask, **caches}, into=into)["logits"]

    def prepare(self, past: int) -> None:
        shape = (1, self.kv_heads, past + self.steps + 1, self.head)
        caches = {f"past_key_values.{i}.{k}": np.zeros(shape, np.float32) for i in range(self.layers)
                  for k in ("key", "value")}
        self._run(_random_ids(past, self.vocab, past).reshape(1, -1), caches, 0, None)
        self.state[past] = (caches, np.zeros((1, 1, self.vocab), np.float32))

    def run(self, past: int, steps: int) -> Timed:
        caches, logits = self.state[past]
        token, times = np.array([[5]], np.int64), []
        for i in range(steps):
            t0 = time.perf_counter()
            self._run(token, caches, past + i, logits)
            token[0, 0] = int(logits[0, 0].argmax())
            times.append((time.perf_counter() - t0) * 1e3)
        return Timed(times)


class MatmulRunner:
    """One fp32 MatMul, [1, 1024] x [1024, N], whose weight has the bytes one decode step reads, in a
    session with the runtime's settings: a step that were nothing but its matmuls, on these kernels
    and this memory. Timed in the same rounds as the contenders, so it sees the same machine load;
    each contender's fraction of it says how much of a step is anything but reading weights."""

    name = "MatMul alone"

    def __init__(self, weight_bytes: int, threads: int):
        from onnx import TensorProto, helper, numpy_helper

        self.n = weight_bytes // 4 // 1024
        w = np.random.default_rng(0).standard_normal((1024, self.n), dtype=np.float32)
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])
        y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, self.n])
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv", [x_info], [y_info],
                                  [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        del w
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "gemv.onnx"
            path.write_bytes(model.SerializeToString())
            del model
            self.session = open_session(path, threads=threads)
        self.x, self.y = np.ones((1, 1024), np.float32), np.empty((1, self.n), np.float32)

    def prepare(self, past: int) -> None:
        pass

    def run(self, past: int, steps: int) -> Timed:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.session.run({"x": self.x}, into={"y": self.y})
            times.append((time.perf_counter() - t0) * 1e3)
        return Timed(times)


def copy_bandwidth(threads: int, nbytes: int = 1 << 29, repeats: int = 7) -> float:
    """GB/s of a large numpy copy split over `threads` threads (numpy copies without the GIL),
    counting bytes read plus bytes written; the best of `repeats`."""
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    parts = list(zip(np.array_split(dst, threads), np.array_split(src, threads)))
    with ThreadPoolExecutor(threads) as pool:

        def copy() -> float:
            t0 = time.perf_counter()
            list(pool.map(lambda ds: np.copyto(*ds), parts))
            return time.perf_counter() - t0

        copy()
        best = min(copy() for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


@dataclass
class BenchOptions:
    shape: BenchShape = SHAPES["qwen3-1024"]
    pasts: tuple[int, ...] = (64, 512, 2048)
    steps: int = 24
    rounds: int = 3
    threads: int = 2
    work: Path = Path(os.environ.get("QINYU_EDGE_CACHE", Path.home() / ".cache" / "qinyu-edge")) / "bench_decode"
    contenders: tuple[str, ...] = ("genai", "genai-graph", "matmul", "ours", "ours-split", "ours-portable", "torch",
                                   "transformers")
    spin_us: int = 0  # for an extra "ours (spin N us)" contender: intra-op workers spin between sections


@dataclass
class BenchResult:
    options: BenchOptions
    weight_bytes: int
    bandwidth_gbs: float
    ms: dict[str, dict[int, float]] = field(default_factory=dict)  # contender -> past -> p50 ms/step
    host_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # ours (each config) -> past -> p50
    parity: dict[str, float] = field(default_factory=dict)

    @property
    def floor_ms(self) -> float:
        return self.weight_bytes / (self.bandwidth_gbs * 1e9) * 1e3

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["options"] = {**dataclasses.asdict(self.options), "work": str(self.options.work)}
        d["floor_ms"] = self.floor_ms
        return d


def step_parity(mods: OurModules, paths: dict[str, Path], past: int = 9, steps: int = 3) -> dict[str, float]:
    """Our ONNX graphs as "ours" runs them (host embedding table, the fused decode graph on the
    backbone's ONNX Runtime CPU variant) against our torch modules on one prompt and a few steps:
    relative error of the last hidden state and of the logits, and whether the greedy ids agree."""
    import torch

    from qinyu_edge.export.onnx_io import compare

    bb, lay = mods.backbone, bench_layout()
    runner = OursRunner(paths, mods, steps, threads=1)
    gen = runner.generator(past + steps)
    logits = open_session(paths["heads_logits"], threads=1)
    ids = _random_ids(past, bb.cfg.vocab_size, 0).reshape(1, -1, 1)
    res = gen.generate(gen.embed(ids), max_new_tokens=steps)
    onnx_logits = logits.run({"hidden": gen.hidden})["logits"]
    with torch.inference_mode():
        caches = bb.empty_cache()
        step = mods.embedding(torch.from_numpy(ids))
        chosen = []
        for _ in range(steps + 1):
            out = bb.step(step, *caches)
            caches = tuple(torch.cat((c, n)) for c, n in zip(caches, out[1:]))
            recent = [t for t in chosen if lay.is_audio(t)][-PENALTY_WINDOW:]
            hist = torch.full((1, PENALTY_WINDOW), -1, dtype=torch.int64)
            hist[0, : len(recent)] = torch.tensor(recent, dtype=torch.int64)
            ids_t = mods.heads.greedy(out[0], hist)[0]
            chosen.append(int(ids_t[0]))
            step = mods.embedding(ids_t.view(1, 1, -1) if lay.is_audio(chosen[-1]) else ids_t[:1].view(1, 1, 1))
        ref_hidden, ref_logits = out[0].numpy(), mods.heads.logits(out[0]).numpy()
    (h_err,) = compare({"h": gen.hidden}, {"h": ref_hidden})
    (l_err,) = compare({"l": onnx_logits}, {"l": ref_logits})
    return {"hidden_rel": h_err.rel, "logits_rel": l_err.rel, "same_tokens": float(res.tokens == chosen[:steps])}


def run_bench(options: BenchOptions, console: Console | None = None) -> BenchResult:
    console = console or Console(stderr=True)
    shape = options.shape
    work = options.work / shape.name
    max_past = max(options.pasts)
    ckpt = make_checkpoint(shape, work / "checkpoint", max_positions=max(8192, max_past + options.steps + 64))
    mods = load_ours(shape, ckpt)
    paths = export_ours(mods, work / f"ours-{_graph_fingerprint()}")
    result = BenchResult(options, shape.weight_bytes(), copy_bandwidth(options.threads))
    result.parity = step_parity(mods, paths)
    runners: list[Runner] = []
    for c in options.contenders:
        if c in ("genai", "genai-graph"):
            try:
                import onnxruntime_genai  # noqa: F401
            except ImportError:
                console.print(f"[yellow]onnxruntime-genai is not installed ({GENAI_INSTALL}); skipping it[/]")
                continue
            runner = GenaiRunner if c == "genai" else GenaiGraphRunner
            runners.append(runner(build_genai(ckpt, work / "genai"), options.steps, options.threads))
        elif c == "ours":
            runners.append(OursRunner(paths, mods, options.steps, options.threads))
            if options.spin_us:
                spinning = OursRunner(paths, mods, options.steps, options.threads, options.spin_us)
                spinning.name = f"ours (spin {options.spin_us} us)"
                runners.append(spinning)
        elif c == "matmul":
            runners.append(MatmulRunner(shape.weight_bytes(), options.threads))
        elif c == "ours-split":
            runners.append(OursRunner(paths, mods, options.steps, options.threads, graphs="split"))
        elif c == "ours-portable":
            runners.append(OursRunner(paths, mods, options.steps, options.threads, graphs="portable"))
        elif c == "torch":
            runners.append(TorchRunner(mods, options.steps, options.threads))
        elif c == "transformers":
            runners.append(TransformersRunner(ckpt, options.threads))
        else:
            raise ValueError(f"unknown contender {c!r}; choose from {', '.join(BenchOptions.contenders)}")
    for past in options.pasts:
        for r in runners:
            t0 = time.perf_counter()
            r.prepare(past)
            log.info("%s: prefilled %d positions in %.1f s", r.name, past, time.perf_counter() - t0)
    samples: dict[str, dict[int, list[float]]] = {r.name: {p: [] for p in options.pasts} for r in runners}
    host: dict[str, dict[int, list[float]]] = {r.name: {p: [] for p in options.pasts} for r in runners}
    for rnd in range(options.rounds):
        order = runners if rnd % 2 == 0 else runners[::-1]
        for past in options.pasts:
            for r in order:
                timed = r.run(past, options.steps)
                samples[r.name][past] += timed.step_ms[WARMUP:]
                if timed.host_ms is not None:
                    host[r.name][past] += timed.host_ms[WARMUP:]
        console.print(f"round {rnd + 1}/{options.rounds} done")
    result.ms = {name: {p: statistics.median(v) for p, v in per.items()} for name, per in samples.items()}
    result.host_ms = {name: {p: statistics.median(v) for p, v in per.items()}
                      for name, per in host.items() if all(per.values())}
    return result


def render(result: BenchResult) -> Table:
    o, ms = result.options, result.ms
    s = o.shape
    title = (f"decode step, ms p50 - {s.name}: hidden {s.hidden}, FFN {s.ffn}, {s.layers} layers, "
             f"{s.heads}/{s.kv_heads} heads, head_dim {s.head_dim}, vocab {s.vocab}, fp32, {o.threads} threads")
    table = Table(title=title)
    genai, torch_ref = "onnxruntime-genai", "torch (ours)"
    cols = list(ms)
    ours = [n for n in cols if n.startswith("ours")]
    extra = []
    for n in ours:
        tag = n.removeprefix("ours").strip(" ()")
        suffix = f" ({tag})" if tag else ""
        if genai in ms:
            extra.append((f"ours{suffix} / genai", lambda p, n=n: f"{ms[n][p] / ms[genai][p]:.2f}"))
        if not tag and GenaiGraphRunner.name in ms:
            extra.append(("ours / genai graph", lambda p, n=n: f"{ms[n][p] / ms[GenaiGraphRunner.name][p]:.2f}"))
        if not tag and torch_ref in ms:
            extra.append(("ours / torch", lambda p, n=n: f"{ms[n][p] / ms[torch_ref][p]:.2f}"))
        if not tag:
            extra.append(("floor frac ours", lambda p, n=n: f"{result.floor_ms / ms[n][p]:.2f}"))
        if n in result.host_ms:
            extra.append((f"host ms ours{suffix}", lambda p, n=n: f"{result.host_ms[n][p]:.3f}"))
    if genai in ms:
        extra.append(("floor frac genai", lambda p: f"{result.floor_ms / ms[genai][p]:.2f}"))
    for c in ["past", *cols, *(label for label, _ in extra)]:
        table.add_column(c, justify="right")
    for p in o.pasts:
        table.add_row(str(p), *(f"{ms[c][p]:.2f}" for c in cols), *(f(p) for _, f in extra))
    lo, hi = min(o.pasts), max(o.pasts)
    growth = "  ".join(f"{c} {ms[c][hi] / ms[c][lo]:.2f}x" for c in cols)
    lines = [f"growth {hi}/{lo}: {growth}",
             f"weights read per step {result.weight_bytes / 1e6:.1f} MB, copy bandwidth {result.bandwidth_gbs:.1f} GB/s "
             f"(read+write), floor {result.floor_ms:.2f} ms"]
    alone = MatmulRunner.name
    if alone in ms:
        fractions = "  ".join(f"{c} " + "/".join(f"{ms[alone][p] / ms[c][p]:.2f}" for p in o.pasts) for c in cols if c != alone)
        lines.append(f"{alone}: one MatMul over the same bytes, timed in the same rounds; its time over each step's: {fractions}")
    lines.append(f"ours vs torch, same weights: hidden rel {result.parity['hidden_rel']:.1e}, logits rel "
                 f"{result.parity['logits_rel']:.1e}, greedy tokens {'equal' if result.parity['same_tokens'] else 'DIFFER'}")
    table.caption = "\n".join(lines)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qinyu_edge.export.bench_decode", description=__doc__.split("\n")[0])
    p.add_argument("--past", default="64,512,2048", help="comma-separated past lengths")
    p.add_argument("--steps", type=COUNT, default=24, help="timed steps per contender, past length and round")
    p.add_argument("--rounds", type=COUNT, default=3)
    p.add_argument("--threads", type=COUNT, default=2)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-1024")
    p.add_argument("--only", default=",".join(BenchOptions.contenders), help="contenders to run")
    p.add_argument("--work", type=Path, default=BenchOptions.work, help="cache for checkpoint and graphs")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--spin-us", type=NON_NEGATIVE, default=0,
                   help="also time our step with intra-op workers spinning this long (the runtime default: 0)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pasts = tuple(int(x) for x in args.past.split(","))
    if min(pasts) < 1 or args.steps <= WARMUP:
        p.error(f"past lengths must be >= 1 and --steps > {WARMUP}")
    options = BenchOptions(SHAPES[args.shape], pasts, args.steps, args.rounds, args.threads, args.work,
                           tuple(c.strip() for c in args.only.split(",") if c.strip()), args.spin_us)
    console = Console(width=max(Console().width, 150))
    result = run_bench(options, Console(stderr=True))
    console.print(render(result))
    if args.json:
        from qinyu_edge.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
