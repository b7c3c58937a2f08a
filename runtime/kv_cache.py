"""The KV cache: one preallocated, time-major buffer per layer and cache tensor.

Each buffer holds `[NULL_ROWS + capacity, batch, ...]`: row 0 is the backbone's null slot (masked
in the graph, kept at zero), then one row per position. The past `[:NULL_ROWS + pos]` is a
zero-copy view and the slot for the new positions right after it is a contiguous region the
backbone's output is bound to. Nothing is copied per step, whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qinyu_edge.bundle import ComponentSpec
from qinyu_edge.errors import BundleError, ContextFullError

# Rows in front of position 0 of every cache tensor. ONNX Runtime scores the cache in place
# (FusedMatMul with transBatchB), and that kernel divides by the past's length, so a past is never
# empty: a prefill passes just this masked row. The backbone graph shares the constant.
NULL_ROWS = 1


@dataclass
class KVCache:
    names_in: tuple[str, ...]  # past_key_0, past_value_0, ... | past_latent_0, ...
    names_out: tuple[str, ...]  # new_key_0, new_value_0, ... in the same order
    buffers: tuple[np.ndarray, ...]  # per name: [NULL_ROWS + capacity, batch, ...]
    pos: int = 0

    @classmethod
    def for_backbone(cls, spec: ComponentSpec, capacity: int, dtype: type = np.float32) -> "KVCache":
        ins = tuple(t for t in spec.inputs if t.name.startswith("past_"))
        outs = tuple("new_" + t.name.removeprefix("past_") for t in ins)
        missing = sorted(set(outs) - {t.name for t in spec.outputs})
        if missing:
            raise BundleError(f"backbone {spec.file} has cache inputs without the outputs {missing}; "
                              "export the bundle again with this version of qinyu-edge.")
        buffers = tuple(np.zeros((NULL_ROWS + capacity, *t.shape[1:]), dtype=dtype) for t in ins)
        return cls(tuple(t.name for t in ins), outs, buffers)

    @property
    def capacity(self) -> int:
        """Positions the cache can hold."""
        return self.buffers[0].shape[0] - NULL_ROWS

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    @property
    def positions(self) -> tuple[np.ndarray, ...]:
        """Per name, the rows of positions 0..capacity-1 (views, without the null slot)."""
        return tuple(b[NULL_ROWS:] for b in self.buffers)

    def free(self) -> int:
        return self.capacity - self.pos

    def past(self) -> dict[str, np.ndarray]:
        return {n: b[: NULL_ROWS + self.pos] for n, b in zip(self.names_in, self.buffers)}

    def slot(self, n_new: int) -> dict[str, np.ndarray]:
        if self.pos + n_new > self.capacity:
            raise ContextFullError(
                f"the context window is full: {self.pos} positions used, {n_new} more needed, capacity "
                f"{self.capacity}. Start a new conversation, keep fewer turns, or raise the context length."
            )
        start = NULL_ROWS + self.pos
        return {n: b[start : start + n_new] for n, b in zip(self.names_out, self.buffers)}

    def advance(self, n_new: int) -> None:
        self.pos += n_new

    def rewind(self, pos: int) -> None:
        """Forget every position from `pos` on (the rows stay; they are overwritten next)."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot rewind to {pos}: the cache holds {self.pos} positions")
        self.pos = pos

    def reset(self) -> None:
        self.pos = 0
