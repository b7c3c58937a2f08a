"""The fused greedy head against a step-by-step rendering of the official `next_token`."""

import numpy as np
import pytest
import torch

from qinyu_edge.export.models.heads import Embedding, Heads, HeadsGreedy, HeadsLogits
from qinyu_edge.export.onnx_io import export_onnx, run_onnx
from qinyu_edge.export.tiny_tokenizer import build_tiny_tokenizer, padded_vocab_size
from qinyu_edge.tokens import TokenLayout

H = 32


@pytest.fixture(scope="module")
def setup():
    tok = build_tiny_tokenizer()
    layout = TokenLayout.from_tokenizer(tok)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(padded_vocab_size(tok), H, generator=g)
    return layout, Heads(weight, layout)


def official_next(logits: torch.Tensor, frames: list[list[int]], layout: TokenLayout, penalty=1.1) -> list[int]:
    """Plain-Python rendering of utils/xy_inference_utils.py next_token (greedy), for one item.

    `frames` are earlier audio frames as within-book indices (the official `audio_tokens`).
    """
    a, per, n = layout.audio_start, layout.ids_per_book, layout.n_codebooks
    masked = logits.clone()
    masked[a + per : a + n * per] = -1e10
    first = int(torch.argmax(masked))
    if a <= first < a + per * n and len(frames) > 0:
        pen = logits[: a + per].clone()
        # The official loop runs over a set of 0-d tensors, which never merges equal ids, so each
        # occurrence in the last 5 frames applies the penalty once more.
        for f in frames[-5:]:
            t = a + f[0]
            pen[t] = pen[t] * penalty if pen[t] < 0 else pen[t] / penalty
        first = int(torch.argmax(pen))
    ids = [first]
    for k in range(1, n):
        ids.append(a + k * per + int(torch.argmax(logits[a + k * per : a + (k + 1) * per])))
    return ids


def history_of(frames, layout, width=5):
    hist = [layout.audio_start + f[0] for f in frames[-width:]]
    return torch.tensor([hist + [-1] * (width - len(hist))], dtype=torch.int64)


def test_penalty_changes_the_choice_exactly_as_official(setup):
    layout, heads = setup
    a = layout.audio_start
    # Build a hidden state whose top two codebook-0 candidates are close: the penalty decides.
    w = heads.weight
    hidden = (w[a + 10] + 0.97 * w[a + 11]).unsqueeze(0) * 4
    logits = heads.logits(hidden)[0]
    frames = [[10, 1, 2, 3, 4, 5, 6, 7]] * 3
    want = official_next(logits, frames, layout)
    got = heads.greedy(hidden, history_of(frames, layout))[0].tolist()
    assert got == want
    no_pen = official_next(logits, [], layout)
    got_no_pen = heads.greedy(hidden, history_of([], layout))[0].tolist()
    assert got_no_pen == no_pen


def test_greedy_matches_official_on_many_random_states(setup):
    layout, heads = setup
    a = layout.audio_start
    g = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    differing = 0
    for trial in range(200):
        token = int(rng.integers(a, a + 1032)) if trial % 2 else int(rng.integers(0, heads.weight.shape[0]))
        hidden = (heads.weight[token] * 3 + torch.randn(H, generator=g)).unsqueeze(0)
        n_frames = int(rng.integers(0, 8))
        frames = [[int(rng.choice([token - a, int(rng.integers(0, 1032))]))] + [0] * 7 for _ in range(n_frames)]
        frames = [[f[0] % 1032] + f[1:] for f in frames]
        logits = heads.logits(hidden)[0]
        want = official_next(logits, frames, layout)
        got = heads.greedy(hidden, history_of(frames, layout))[0].tolist()
        assert got == want, (trial, got, want)
        differing += want != official_next(logits, [], layout)
    assert differing > 0  # the penalty path was actually exercised


def test_audio_heads_replace_the_slices(setup):
    layout, heads = setup
    g = torch.Generator().manual_seed(2)
    audio_heads = torch.randn(7, 1032, H, generator=g)
    sep = Heads(heads.weight, layout, audio_heads=audio_heads)
    hidden = torch.randn(1, H, generator=g)
    ids = sep.greedy(hidden, history_of([], layout))[0].tolist()
    for k in range(1, 8):
        assert ids[k] == layout.book_start(k) + int(torch.argmax(audio_heads[k - 1] @ hidden[0]))


def test_embedding_averages_codebook_rows():
    w = torch.randn(50, 8)
    emb = Embedding(w)
    ids = torch.tensor([[[1, 2, 3, 4, 5, 6, 7, 8]]])
    assert torch.allclose(emb(ids)[0, 0], w[1:9].mean(0))
    assert torch.equal(emb(torch.tensor([[[3], [4]]]))[0], w[[3, 4]])


def test_heads_export_to_onnx(setup, tmp_path):
    layout, heads = setup
    a = layout.audio_start
    hidden = (heads.weight[a + 5] * 3).unsqueeze(0)
    hist = torch.tensor([[a + 5, a + 5, a + 9, -1, -1]])
    p = export_onnx(HeadsGreedy(heads), (hidden, hist), tmp_path / "g.onnx", ["hidden", "history"], ["ids"])
    got = run_onnx(p, {"hidden": hidden.numpy(), "history": hist.numpy()})["ids"]
    assert got.tolist() == heads.greedy(hidden, hist).tolist()
    p = export_onnx(HeadsLogits(heads), (hidden,), tmp_path / "l.onnx", ["hidden"], ["logits"])
    got = run_onnx(p, {"hidden": hidden.numpy()})["logits"]
    np.testing.assert_allclose(got, heads.logits(hidden).numpy(), rtol=1e-5, atol=1e-4)
