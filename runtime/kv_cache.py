"""The KV cache: one preallocated, time-major buffer per layer and cache tensor.

Each buffer holds `[NULL_ROWS + capacity, batch, ...]`: row 0 is the backbone's null slot (masked
in the graph, kept at zero), then one row per position. The backbone reads a window
`[:NULL_ROWS + W]` with W >= pos, rounded up to WINDOW_STEP rows, and `past_length` = pos says how
many of its rows are real: the window views and the `past_length` array are the same objects for
WINDOW_STEP steps in a row, so a session binds them once instead of every step (rebinding 16-72
cache tensors per step costs more host time than the step's other work). The new positions go to
the slot right after the past. Nothing of the past is copied per step, whatever the context length.

A backbone graph whose cache outputs are `present_*` (the ONNX Runtime CPU variant, see
`export/ort_backbone.py`) keeps its cache head-major instead, `[batch, heads, capacity, dim]` with no
null slot, and updates it in place: each `present_*` output is bound to the buffer of its `past_*`
input, the graph writes the new positions at `past_length` and reads only the positions before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qinyu_edge.bundle import ComponentSpec
from qinyu_edge.errors import BundleError, ContextFullError

# Rows in front of position 0 of every cache tensor. ONNX Runtime scores the cache in place
# (FusedMatMul with transBatchB), and that kernel divides by the past's length, so a past is never
# empty: a prefill passes just this masked row. The backbone graph shares the constant.
NULL_ROWS = 1
# Window growth: masked rows read per step (at most this many, half on average) against how often
# the bound arrays change.
WINDOW_STEP = 64


@dataclass
class KVCache:
    names_in: tuple[str, ...]  # past_key_0, past_value_0, ... | past_latent_0, ...
    names_out: tuple[str, ...]  # new_key_0, new_value_0, ... in the same order
    buffers: tuple[np.ndarray, ...]  # per name: [NULL_ROWS + capacity, batch, ...]
    pos: int = 0
    _length: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # the graph's past_length
    _window: tuple[int, dict[str, np.ndarray]] | None = None
    in_place: bool = False  # head-major buffers the graph updates itself (`present_*` outputs)

    @classmethod
    def for_backbone(cls, spec: ComponentSpec, capacity: int, dtype: type = np.float32) -> "KVCache":
        ins = tuple(t for t in spec.inputs if t.name.startswith("past_") and t.name != "past_length")
        if "past_length" not in {t.name for t in spec.inputs}:
            raise BundleError(f"backbone {spec.file} has no past_length input; export the bundle again with this "
                              "version of qinyu-edge.")
        in_place = any(t.name.startswith("present_") for t in spec.outputs)
        outs = tuple(("present_" if in_place else "new_") + t.name.removeprefix("past_") for t in ins)
        missing = sorted(set(outs) - {t.name for t in spec.outputs})
        if missing:
            raise BundleError(f"backbone {spec.file} has cache inputs without the outputs {missing}; "
                              "export the bundle again with this version of qinyu-edge.")
        if in_place:  # [batch, heads, capacity, dim]
            buffers = tuple(np.zeros((1, t.shape[1], capacity, *t.shape[3:]), dtype=dtype) for t in ins)
        else:
            buffers = tuple(np.zeros((NULL_ROWS + capacity, *t.shape[1:]), dtype=dtype) for t in ins)
        return cls(tuple(t.name for t in ins), outs, buffers, in_place=in_place)

    @property
    def capacity(self) -> int:
        """Positions the cache can hold."""
        return self.buffers[0].shape[2] if self.in_place else self.buffers[0].shape[0] - NULL_ROWS

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    @property
    def bytes_per_position(self) -> int:
        """Bytes one position takes in all buffers together."""
        return sum(b.nbytes // self.capacity if self.in_place else b[0].nbytes for b in self.buffers)

    @property
    def positions(self) -> tuple[np.ndarray, ...]:
        """Per name, positions 0..capacity-1 along the first axis (views; batch item 0 when head-major)."""
        if self.in_place:
            return tuple(b[0].swapaxes(0, 1) for b in self.buffers)
        return tuple(b[NULL_ROWS:] for b in self.buffers)

    def free(self) -> int:
        return self.capacity - self.pos

    def past(self) -> dict[str, np.ndarray]:
        """The backbone's past inputs: `past_length` and each cache's window (the same objects until
        the window grows; the whole buffer when the graph updates it in place)."""
        if self.in_place:
            rows = self.capacity
        else:
            rows = min(-(-self.pos // WINDOW_STEP) * WINDOW_STEP, self.capacity)
        if self._window is None or self._window[0] != rows:
            views = {n: b if self.in_place else b[: NULL_ROWS + rows] for n, b in zip(self.names_in, self.buffers)}
            self._window = (rows, {"past_length": self._length, **views})
        self._length[0] = self.pos
        return self._window[1]

    def slot(self, n_new: int) -> dict[str, np.ndarray]:
        if self.pos + n_new > self.capacity:
            raise ContextFullError(
                f"the context window is full: {self.pos} positions used, {n_new} more needed, capacity "
                f"{self.capacity}. Start a new conversation, keep fewer turns, or raise the context length."
            )
        if self.in_place:  # the graph writes the slot itself: each output is its input's buffer
            return dict(zip(self.names_out, self.buffers))
        start = NULL_ROWS + self.pos
        return {n: b[start : start + n_new] for n, b in zip(self.names_out, self.buffers)}

    def advance(self, n_new: int) -> None:
        self.pos += n_new

    def rewind(self, pos: int) -> None:
        """Forget every position from `pos` on (the rows stay, masked, until they are overwritten)."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot rewind to {pos}: the cache holds {self.pos} positions")
        self.pos = pos

    def reset(self) -> None:
        self.pos = 0
