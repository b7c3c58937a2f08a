"""The decode benchmark's pieces on a tiny shape: they run, give finite numbers, and our ONNX step,
our torch step and transformers agree on the same weights (no timing assertions)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from qinyu_edge.export.bench_decode import (
    SHAPES,
    BenchOptions,
    OursRunner,
    TorchRunner,
    backbone_spec,
    copy_bandwidth,
    export_ours,
    load_ours,
    make_checkpoint,
    render,
    run_bench,
    step_parity,
)
from qinyu_edge.export.onnx_io import compare
from qinyu_edge.runtime.session import open_session

transformers = pytest.importorskip("transformers")

TINY = SHAPES["tiny"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    ckpt = make_checkpoint(TINY, work / "tiny" / "checkpoint", max_positions=256)
    mods = load_ours(TINY, ckpt)
    return work, ckpt, mods, export_ours(mods, work / "tiny" / "ours")


def test_weights_reach_our_graphs_as_in_transformers(built):
    """The checkpoint's keys map 1:1 onto our modules: our ONNX graphs give transformers' logits."""
    _, ckpt, _, paths = built
    hf = transformers.Qwen3ForCausalLM.from_pretrained(str(ckpt), attn_implementation="eager").eval()
    ids = np.random.default_rng(3).integers(0, TINY.vocab, (1, 11))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids)).logits[:, -1].numpy()
    emb = open_session(paths["embedding"]).run({"ids": ids[..., None]})["inputs_embeds"]
    bb = load_ours(TINY, ckpt).backbone
    caches = {f"past_{n}": c.numpy() for n, c in zip(bb.cache_names, bb.empty_cache())}
    hidden = open_session(paths["backbone"]).run({"inputs_embeds": emb, "past_length": np.zeros(1, np.int64),
                                                  **caches})["hidden"]
    logits = open_session(paths["heads_logits"]).run({"hidden": hidden})["logits"]
    (err,) = compare({"logits": logits}, {"logits": ref})
    assert err.rel < 1e-4, err


def test_onnx_step_equals_torch_step(built):
    _, _, mods, paths = built
    got = step_parity(mods, paths, past=13, steps=6)
    assert got["hidden_rel"] < 1e-4 and got["logits_rel"] < 1e-4
    assert got["same_tokens"] == 1.0


def test_runners_resume_at_the_same_past(built):
    """Each round rewinds to the prefilled past: the same steps give the same ids/times shape."""
    _, _, mods, paths = built
    for graphs in ("one-call", "split", "portable"):
        ours = OursRunner(paths, mods, steps=5, threads=1, graphs=graphs)
        ours.prepare(7)
        a, b = ours.run(7, 5), ours.run(7, 5)
        assert len(a.step_ms) == len(b.step_ms) == 5 and ours.generators[7].cache.pos == 12
        assert ours.generators[7].cache.in_place is (graphs != "portable")
        assert (ours.generators[7].fused is not None) is (graphs == "one-call")
        assert all(t > 0 for t in a.step_ms) and all(math.isfinite(t) for t in a.host_ms)
    torch_runner = TorchRunner(mods, steps=5, threads=1)
    torch_runner.prepare(7)
    assert len(torch_runner.run(7, 5).step_ms) == 5


def test_whole_benchmark_on_a_tiny_shape(built):
    work = built[0]
    contenders = ("genai", "genai-graph", "matmul", "ours", "ours-split", "ours-portable", "torch", "transformers")
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        contenders = contenders[2:]
    opts = BenchOptions(shape=TINY, pasts=(4, 16), steps=4, rounds=2, threads=1, work=work, contenders=contenders)
    result = run_bench(opts)
    assert len(result.ms) == len(contenders)
    for per_past in result.ms.values():
        assert set(per_past) == {4, 16} and all(math.isfinite(v) and v > 0 for v in per_past.values())
    assert set(result.host_ms) == {"ours", "ours (3 calls)", "ours (portable)"}
    assert all(math.isfinite(v) for per in result.host_ms.values() for v in per.values())
    assert result.parity["same_tokens"] == 1.0 and result.floor_ms > 0 
    # a step does all the MatMul's reading and more, so the lone MatMul over its bytes is faster
    assert all(result.ms["MatMul alone"][p] < result.ms["ours"][p] for p in (4, 16))
    table = render(result)
    assert table.row_count == 2 and "MatMul alone: one MatMul over the same bytes" in table.caption
    assert dataclasses.asdict(result.options)["steps"] == 4


def test_copy_bandwidth_is_measured():
    bw = copy_bandwidth(threads=2, nbytes=1 << 24, repeats=2)
    assert math.isfinite(bw) and bw > 0.1


def test_module_imports_without_torch():
    """Only the functions that build checkpoints or run the references import torch/transformers."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import qinyu_edge.export.bench_decode as b\n"
        "print(b.SHAPES['qwen3-1024'].weight_bytes())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == SHAPES["qwen3-1024"].weight_bytes()
