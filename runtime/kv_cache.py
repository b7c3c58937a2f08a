"""The KV cache: one preallocated, time-major buffer per cache tensor.

Position t of every layer is one contiguous slab, so the past `[:pos]` is a zero-copy view and the
slot for the new positions `[pos:pos+S]` is a contiguous region the backbone's output is bound to.
Nothing is copied per step, whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qinyu_edge.bundle import ComponentSpec
from qinyu_edge.errors import ContextFullError


@dataclass
class KVCache:
    names_in: tuple[str, ...]  # past_key, past_value | past_latent
    names_out: tuple[str, ...]  # new_key, new_value | new_latent
    buffers: tuple[np.ndarray, ...]
    pos: int = 0

    @classmethod
    def for_backbone(cls, spec: ComponentSpec, capacity: int, dtype: type = np.float32) -> "KVCache":
        ins = tuple(t for t in spec.inputs if t.name.startswith("past_"))
        outs = tuple(t.name for t in spec.outputs if t.name.startswith("new_"))
        buffers = tuple(np.zeros((capacity, *t.shape[1:]), dtype=dtype) for t in ins)
        return cls(tuple(t.name for t in ins), outs, buffers)

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def free(self) -> int:
        return self.capacity - self.pos

    def past(self) -> dict[str, np.ndarray]:
        return {n: b[: self.pos] for n, b in zip(self.names_in, self.buffers)}

    def slot(self, n_new: int) -> dict[str, np.ndarray]:
        if self.pos + n_new > self.capacity:
            raise ContextFullError(
                f"the context window is full: {self.pos} positions used, {n_new} more needed, capacity "
                f"{self.capacity}. Start a new conversation, keep fewer turns, or raise the context length."
            )
        return {n: b[self.pos : self.pos + n_new] for n, b in zip(self.names_out, self.buffers)}

    def advance(self, n_new: int) -> None:
        self.pos += n_new

    def reset(self) -> None:
        self.pos = 0
