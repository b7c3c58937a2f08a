"""Undoing the codebook delay step by step equals the official offline de-skew."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from qinyu_edge.runtime.delay import DelayUndo, audio_steps_for_frames


def offline_deskew(steps: np.ndarray) -> np.ndarray:
    """The offline recipe of model-spec 1.7: rows k of the (8, S) matrix shifted left by k
    (circularly), the last 7 columns dropped, values >= 1024 set to 0. Returns (8, max(S-7, 0))."""
    m = steps.T.copy()
    rolled = np.stack([np.roll(m[k], -k) for k in range(8)])
    kept = rolled[:, : max(m.shape[1] - 7, 0)]
    kept[kept >= 1024] = 0
    return kept


def streamed(steps: np.ndarray) -> np.ndarray:
    undo = DelayUndo()
    frames = [f for row in steps if (f := undo.push(row)) is not None]
    frames += undo.finish()
    return np.stack(frames, axis=1) if frames else np.zeros((8, 0), dtype=np.int64)


@settings(max_examples=300, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(0, 40), st.just(8)), elements=st.integers(0, 1031)))
def test_streaming_equals_offline_deskew(steps):
    np.testing.assert_array_equal(streamed(steps), offline_deskew(steps))


def delayed_reply(frames: np.ndarray) -> np.ndarray:
    """A well-formed reply's audio steps: stream k = k leading pads, the frames, 7-k trailing pads."""
    n = frames.shape[1]
    steps = np.zeros((n + 7, 8), dtype=np.int64)
    for k in range(8):
        steps[:k, k] = 1024 + np.arange(k)
        steps[k:k + n, k] = frames[k]
        steps[k + n:, k] = 1024 + np.arange(k, 7)
    return steps


@pytest.mark.parametrize("n", [0, 1, 7, 8, 50])
def test_well_formed_reply_round_trips(n):
    rng = np.random.default_rng(n)
    frames = rng.integers(0, 1024, (8, n))
    np.testing.assert_array_equal(streamed(delayed_reply(frames)), frames)


def test_frame_completes_at_step_f_plus_8():
    undo = DelayUndo()
    rng = np.random.default_rng(0)
    for step in range(1, 30):
        out = undo.push(rng.integers(0, 1024, 8))
        assert (out is not None) == (step >= 8)
        assert undo.frames == max(step - 7, 0)
        assert audio_steps_for_frames(undo.frames) == (step if step >= 8 else 0)


def test_pad_ids_map_to_zero_including_1024():
    undo = DelayUndo()
    for _ in range(8):
        out = undo.push(np.full(8, 1024))
    np.testing.assert_array_equal(out, np.zeros(8))


def test_finish_resets_for_the_next_reply():
    rng = np.random.default_rng(1)
    a = delayed_reply(rng.integers(0, 1024, (8, 5)))
    b = rng.integers(0, 1024, (8, 9))
    undo = DelayUndo()
    for row in a[:6]:
        undo.push(row)
    assert undo.finish() == []
    got = [f for row in delayed_reply(b) if (f := undo.push(row)) is not None]
    np.testing.assert_array_equal(np.stack(got, axis=1), b)


@pytest.mark.parametrize("bad", [np.zeros(7, dtype=np.int64), np.full(8, 1032), np.full(8, -1), np.zeros(8) + 0.5])
def test_rejects_malformed_steps(bad):
    with pytest.raises(ValueError):
        DelayUndo().push(bad)
