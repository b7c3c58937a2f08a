"""The torch-free generation loop over ONNX sessions against the PyTorch reference loop."""

import threading

import numpy as np
import onnx
import pytest
import torch

from qinyu_edge.errors import ContextFullError
from qinyu_edge.export.qinyu_checkpoint import load_preset
from qinyu_edge.export.reference import reference_generate
from qinyu_edge.runtime.engine import Engine, EngineOptions
from qinyu_edge.runtime.sampling import SamplingConfig

PROMPT = "<|im_start|>user\nHello there, how are you?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=[(True, True), (False, True), (True, False)],
                ids=["fused", "fused-portable", "split"])
def engine(preset_bundle, request):
    """Each preset's engine as the CPU runs it by default (a greedy step is the host embedding table and
    the fused decode graph, on the backbone's ONNX Runtime variant where the bundle has one), on the
    portable graphs, and on the separate graphs (embedding, backbone, heads_greedy)."""
    name, path = preset_bundle
    variants, fused = request.param
    eng = Engine(path, EngineOptions(ort_variants=variants, fused=fused))
    if not variants and not eng.bundle.ort_variants:
        pytest.skip("this bundle has no ONNX Runtime variants: the default run covers its graphs")
    assert eng.cache.in_place == bool(variants and eng.bundle.ort_variants)
    assert (eng.generator.fused is not None) == fused and (eng.host_embedding is not None) == fused
    return name, eng


def prompt_embeds(eng, text=PROMPT):
    ids = np.array(eng.tokenizer.encode(text).ids)
    return eng.prompt_embeds(ids, [], [], [], [])


def test_runtime_tokens_equal_reference(engine):
    name, eng = engine
    emb = prompt_embeds(eng)
    got = eng.generator.generate(emb, max_new_tokens=120)
    ref = reference_generate(load_preset(name), torch.from_numpy(emb), 120)
    assert got.tokens == ref.tokens
    assert got.text_tokens == ref.text_tokens
    assert [r.tolist() for r in got.audio_rows] == ref.audio_rows
    assert got.stop == ref.stop


class CallShapes:
    """The backbone session as it is, recording the length of every call's positions."""

    def __init__(self, session):
        self.session, self.lengths = session, []

    def run(self, inputs, into=None):
        self.lengths.append(inputs["inputs_embeds"].shape[1])
        return self.session.run(inputs, into)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_a_long_prompt_is_prefilled_in_chunks_with_the_same_result(engine):
    """Chunks of 7 positions over the cache the earlier chunks wrote give the hidden state and cache
    of one call over the whole prompt, and the same greedy reply."""
    _, eng = engine
    gen = eng.generator
    emb = prompt_embeds(eng, PROMPT * 3)
    whole = gen.generate(emb, max_new_tokens=40)
    gen.prefill(emb)
    hidden_whole, cache_whole = gen.hidden.copy(), [b.copy() for b in eng.cache.buffers]
    which = "fused" if gen.fused is not None else "backbone"
    spy, chunk = CallShapes(getattr(gen, which)), gen.prefill_chunk
    setattr(gen, which, spy)
    gen.prefill_chunk = 7
    try:
        gen.prefill(emb)
        assert spy.lengths == [7] * (emb.shape[1] // 7) + ([emb.shape[1] % 7] if emb.shape[1] % 7 else [])
        np.testing.assert_allclose(gen.hidden, hidden_whole, rtol=1e-4, atol=1e-5)
        for a, b in zip(eng.cache.buffers, cache_whole):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        chunked = gen.generate(emb, max_new_tokens=40)
    finally:
        setattr(gen, which, spy.session)
        gen.prefill_chunk = chunk
    assert chunked.tokens == whole.tokens
    assert max(spy.lengths) == 7  # decode steps are single positions


def test_bytes_moved_per_step_do_not_grow_with_context(engine):
    """The past is bound as a view of the cache; only the step's small tensors are copied."""
    _, eng = engine
    gen, cache = eng.generator, eng.cache
    h = eng.config.backbone.hidden_size
    sessions = [s for s in (gen.embedding, gen.backbone, gen.greedy, gen.fused) if s is not None]

    def moved_in_steps(past_len, n=5):
        cache.reset()
        cache.advance(past_len)  # pretend a prompt of past_len positions was prefilled
        embeds = np.random.default_rng(0).normal(size=(1, 1, h)).astype(np.float32)
        gen._forward(embeds)  # the step before: the generator's own buffers are bound from then on
        for s in sessions:
            s.stats.reset()
        for _ in range(n):
            gen._forward(embeds)
        return sum(s.stats.bytes_in + s.stats.bytes_out for s in sessions)

    short, long = moved_in_steps(4), moved_in_steps(min(cache.capacity - 10, 2000))
    assert short == long
    # and what is moved is only the new cache rows copied out of their bound buffers, never the
    # cache; the hidden state and the fused graph's ids land in place in the generator's buffers,
    # and a graph that updates the cache in place moves nothing at all
    new_rows = 0 if cache.in_place else sum(b[0].nbytes for b in cache.buffers)
    assert short == 5 * new_rows


def test_new_positions_land_in_the_cache_slot(engine):
    _, eng = engine
    gen, cache = eng.generator, eng.cache
    emb = prompt_embeds(eng)
    gen.prefill(emb)
    n = emb.shape[1]
    assert cache.pos == n
    before = [b[:n].copy() for b in cache.positions]
    x = np.ones((1, 1, eng.config.backbone.hidden_size), np.float32)
    gen._forward(x)
    new = [b[n : n + 1].copy() for b in cache.positions]
    for buf, old in zip(cache.positions, before):
        np.testing.assert_array_equal(buf[:n], old)  # the past is untouched
    # The step's position is where a prefill of the prompt plus that input puts it.
    gen.prefill(np.concatenate([emb, x], axis=1))
    for buf, row in zip(cache.positions, new):
        np.testing.assert_allclose(buf[n : n + 1], row, rtol=1e-5, atol=1e-5)


def test_cancel_between_steps(engine):
    _, eng = engine
    cancel = threading.Event()
    seen = []

    def on_token(_):
        seen.append(1)
        if len(seen) == 3:
            cancel.set()

    res = eng.generator.generate(prompt_embeds(eng), max_new_tokens=100, on_text=on_token, on_audio=on_token,
                                 cancel=cancel)
    assert res.stop == "cancelled" and res.steps == 3


def test_sampling_is_seeded(engine):
    _, eng = engine
    emb = prompt_embeds(eng)
    a = eng.generator.generate(emb, 30, sampling=SamplingConfig(temperature=0.9, top_k=50, top_p=0.9, seed=7))
    b = eng.generator.generate(emb, 30, sampling=SamplingConfig(temperature=0.9, top_k=50, top_p=0.9, seed=7))
    c = eng.generator.generate(emb, 30, sampling=SamplingConfig(temperature=0.9, top_k=50, top_p=0.9, seed=8))
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_logits_head_is_opened_only_when_sampling_needs_it(preset_bundle):
    """Greedy decoding never loads heads_logits (a second copy of the LM head); sampling opens it once."""
    _, path = preset_bundle
    eng = Engine(path)
    emb = prompt_embeds(eng)
    greedy = eng.generator.generate(emb, 10)
    assert "heads_logits" not in eng.sessions and greedy.steps > 0
    first = eng.generator.generate(emb, 10, sampling=SamplingConfig(seed=3))
    opened = eng.sessions["heads_logits"]
    assert opened.stats.calls == first.steps
    eng.generator.generate(emb, 10, sampling=SamplingConfig(seed=3))
    assert eng.sessions["heads_logits"] is opened


def test_full_context(preset_bundle):
    _, path = preset_bundle
    probe = Engine(path, EngineOptions(context=64))
    n = len(probe.tokenizer.encode(PROMPT).ids)
    eng = Engine(path, EngineOptions(context=n + 5))
    res = eng.generator.generate(prompt_embeds(eng), max_new_tokens=100)
    # A reply that reaches the end of the cache stops there and keeps what it has.
    assert res.stop == "context_full" and res.steps == 6 and eng.cache.pos == n + 5
    small = Engine(path, EngineOptions(context=n - 1))
    with pytest.raises(ContextFullError, match="context window is full"):
        small.generator.generate(prompt_embeds(small), max_new_tokens=10)


def test_a_variant_onnx_runtime_cannot_load_falls_back_to_the_portable_graph(preset_bundle, tmp_path, caplog):
    """An ONNX Runtime without the variant's operators (e.g. an older JetPack build) still runs the
    bundle, on the portable backbone, and says why."""
    import json
    import shutil

    from qinyu_edge.bundle import MANIFEST
    from qinyu_edge.fileio import sha256_file

    name, path = preset_bundle
    if name != "tiny-8b":
        pytest.skip("only the Qwen3 bundle has an ONNX Runtime variant")
    copy = tmp_path / "bundle"
    shutil.copytree(path, copy)
    d = json.loads((copy / MANIFEST).read_text())
    assert set(d["ort_variants"]) == {"backbone", "decode"}
    for spec in d["ort_variants"].values():  # the backbone's variant and the fused graph made from it
        variant = spec["file"]
        model = onnx.load(str(copy / variant))
        for node in model.graph.node:
            if node.op_type == "GroupQueryAttention":
                node.op_type = "GroupQueryAttentionFromTheFuture"
        onnx.save_model(model, str(copy / variant))
        d["files"][variant] = {"sha256": sha256_file(copy / variant), "bytes": (copy / variant).stat().st_size}
    (copy / MANIFEST).write_text(json.dumps(d))
    eng = Engine(copy)
    assert not eng.cache.in_place and "cannot load its CPU variant" in caplog.text
    ref = Engine(path, EngineOptions(ort_variants=False))
    emb = prompt_embeds(eng)
    assert eng.generator.generate(emb, 20).tokens == ref.generator.generate(emb, 20).tokens
