"""A greedy decode step is one session call: the fused decode graph (backbone + heads + greedy
choice) and the embedding rows gathered on the host from the bundle's memory-mapped table. Older
bundles without them still run on the separate graphs, and a tampered table is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qinyu_edge.bundle import MANIFEST, load_bundle
from qinyu_edge.errors import BundleError
from qinyu_edge.runtime.engine import Engine, EngineOptions
from qinyu_edge.runtime.host_embedding import HostEmbedding

PROMPT = "<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n"


def _embeds(eng):
    return eng.prompt_embeds(np.array(eng.tokenizer.encode(PROMPT).ids), [], [], [], [])


def test_a_greedy_step_is_one_session_call(preset_bundle):
    _, path = preset_bundle
    eng = Engine(path)
    b = eng.bundle
    # the host table is the embedding graph's own side file: the bundle stores the table once
    assert "decode" in b.components and b.host_embedding == b.components["embedding"].file + ".data"
    assert not (path / "embedding_table.npy").exists()
    # neither the separate backbone and greedy heads nor the embedding graph is loaded
    assert not {"backbone", "heads_greedy", "embedding", "heads_logits"} & set(eng.sessions)
    assert isinstance(eng.generator.embedding, HostEmbedding)
    assert isinstance(eng.host_embedding.table.base, np.memmap)  # a view of the mapping, not read into memory
    res = eng.generator.generate(_embeds(eng), max_new_tokens=30)
    calls = sum(s.stats.calls for s in eng.sessions.values() if s.name != "xy_decoder")
    # one prefill call (the prompt is shorter than a chunk) giving the first choice, then one call per
    # chosen token that is fed back (all but a closing <|im_end|>)
    assert calls == (res.steps if res.stop == "im_end" else 1 + res.steps)
    split = Engine(path, EngineOptions(fused=False))
    assert split.generator.generate(_embeds(split), max_new_tokens=30).tokens == res.tokens


def test_host_rows_equal_the_embedding_graph(preset_bundle):
    _, path = preset_bundle
    eng = Engine(path, EngineOptions(fused=False))
    host = Engine(path).host_embedding
    rng = np.random.default_rng(3)
    vocab = eng.config.backbone.vocab_size
    for k in (1, 8):
        ids = rng.integers(0, vocab, (1, 5, k), dtype=np.int64)
        want = eng.sessions["embedding"].run({"ids": ids})["inputs_embeds"]
        np.testing.assert_allclose(host.run({"ids": ids})["inputs_embeds"], want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="token ids must lie in"):
        host.run({"ids": np.array([[[vocab]]], np.int64)})


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_decode_step_gathers_what_a_prompt_gathers(tmp_path, dtype):
    """A step's one position takes its own short path; it must give the vectorized path's bits."""
    table = np.random.default_rng(5).standard_normal((300, 24)).astype(dtype)
    np.save(tmp_path / "t.npy", table)
    host = HostEmbedding(tmp_path / "t.npy", 300, 24)
    ids = np.random.default_rng(6).integers(0, 300, (1, 4, 8), dtype=np.int64)
    for k in (1, 8):
        prompt = host.run({"ids": ids[:, :, :k]})["inputs_embeds"]
        out = np.full((1, 1, 24), np.nan, np.float32)
        for pos in range(4):
            host.run({"ids": ids[:, pos:pos + 1, :k]}, into={"inputs_embeds": out})
            np.testing.assert_array_equal(out[0, 0], prompt[0, pos])
        np.testing.assert_allclose(prompt[0], table[ids[0, :, :k]].astype(np.float32).mean(axis=1), rtol=1e-6)
    for bad in (-1, 300):
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, 300\)"):
            host.run({"ids": np.array([[[3, bad, 4]]], np.int64)})


def _copy(path, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(path, copy)
    return copy


def test_a_bundle_from_before_the_fused_graph_runs_the_separate_graphs(preset_bundle, tmp_path):
    _, path = preset_bundle
    copy = _copy(path, tmp_path)
    d = json.loads((copy / MANIFEST).read_text())
    for section in ("components", "ort_variants"):
        d[section].pop("decode", None)
    d["files"] = {k: v for k, v in d["files"].items() if not k.startswith("decode")}
    d.pop("host_embedding")
    d["format_version"] = 4
    (copy / MANIFEST).write_text(json.dumps(d))
    old = Engine(copy)
    assert old.generator.fused is None and old.host_embedding is None and "embedding" in old.sessions
    new = Engine(path)
    assert old.generator.generate(_embeds(old), 24).tokens == new.generator.generate(_embeds(new), 24).tokens


def test_a_bundle_with_a_separate_table_copy_still_runs(preset_bundle, tmp_path):
    """Format 5 kept the host table as a copy, `embedding_table.npy`: such a bundle reads the same."""
    from qinyu_edge.fileio import sha256_file

    _, path = preset_bundle
    copy = _copy(path, tmp_path)
    d = json.loads((copy / MANIFEST).read_text())
    table = np.load(copy / d["host_embedding"], mmap_mode="r")
    np.save(copy / "embedding_table.npy", np.asarray(table))
    d["host_embedding"], d["format_version"] = "embedding_table.npy", 5
    d["files"]["embedding_table.npy"] = {"sha256": sha256_file(copy / "embedding_table.npy"),
                                         "bytes": (copy / "embedding_table.npy").stat().st_size}
    (copy / MANIFEST).write_text(json.dumps(d))
    old, new = Engine(copy), Engine(path)
    assert old.host_embedding is not None and Path(old.host_embedding.table.base.filename).name == "embedding_table.npy"
    assert old.generator.generate(_embeds(old), 24).tokens == new.generator.generate(_embeds(new), 24).tokens


def test_a_tampered_host_table_is_refused(preset_bundle, tmp_path):
    _, path = preset_bundle
    copy = _copy(path, tmp_path)
    name = load_bundle(path).host_embedding
    table = copy / name
    data = bytearray(table.read_bytes())
    data[-3] ^= 0x40
    table.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name}: sha256 differs"):
        Engine(copy)
    with pytest.raises(BundleError, match="not a readable .npy"):
        HostEmbedding(copy / "tokenizer.json", 10, 4)
    b = load_bundle(path)
    with pytest.raises(BundleError, match="the model needs float"):
        HostEmbedding(path / b.host_embedding, b.config.backbone.vocab_size + 1, b.config.backbone.hidden_size)
