"""The embedding graph's work done on the host, from a memory-mapped table.

A decode step's input is one text row, or the mean of the eight codebook rows of an audio frame:
a few KB gathered from the table. Doing it in numpy saves a session call per step, and mapping the
table (rather than loading a graph that holds it) keeps only the rows a conversation touches
resident; on a Jetson, whose GPU shares that memory, that is what the budget sees.

Same interface as a session (`run(inputs, into=...)`, `stats`), so the generator does not care
which one it has. The table's bytes are covered by the bundle's sha256 check like every file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import numpy as np

from qinyu_edge.errors import BundleError

from .session import CopyStats


class HostEmbedding:
    input_names = ("ids",)
    output_names = ("inputs_embeds",)

    def __init__(self, path: str | Path, vocab_size: int, hidden_size: int):
        path = Path(path)
        self.name = path.stem
        try:
            # A plain array over the mapping: np.memmap's indexing hooks cost more host time per
            # step than the gather itself.
            self.table = np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
        except (OSError, ValueError) as e:
            raise BundleError(f"{path}: not a readable .npy embedding table ({e}); export the bundle again") from e
        if self.table.shape != (vocab_size, hidden_size) or self.table.dtype not in (np.float32, np.float16):
            raise BundleError(f"{path}: table {self.table.dtype} {list(self.table.shape)}, the model needs float "
                              f"[{vocab_size}, {hidden_size}]; the bundle is inconsistent. Export it again.")
        self.stats = CopyStats()

    def run(self, inputs: Mapping[str, np.ndarray], into: Mapping[str, np.ndarray] | None = None
            ) -> dict[str, np.ndarray]:
        """ids [1, S, K] -> inputs_embeds [1, S, H]: the mean of each position's K rows, in fp32."""
        t0 = time.perf_counter()
        ids = inputs["ids"]
        if ids.ndim != 3 or ids.shape[0] != 1 or ids.shape[2] == 0:
            raise ValueError(f"ids must be [1, positions, ids_per_step], got {list(ids.shape)}")
        out = (into or {}).get("inputs_embeds")
        if out is None:
            out = np.empty((1, ids.shape[1], self.table.shape[1]), np.float32)
        if ids.shape[1] == 1:  # one position: a decode step
            self._one_position(ids, out[0, 0])
        else:
            flat = ids.astype(np.int64, copy=False).reshape(-1)
            # One comparison finds both kinds of bad id: a negative one is huge as unsigned.
            if flat.size and flat.view(np.uint64).max() >= self.table.shape[0]:
                self._refuse(ids)
            k = ids.shape[2]
            if k == 1:
                out[0] = self.table[flat]
            else:  # np.mean's arithmetic (a float32 sum, then a division) without its Python wrapper
                np.add.reduce(self.table[flat].reshape(ids.shape[1], k, -1), axis=1, out=out[0], dtype=np.float32)
                np.true_divide(out[0], k, out=out[0])
        self.stats.calls += 1
        self.stats.busy_ms += (time.perf_counter() - t0) * 1e3
        return {"inputs_embeds": out}

    def _one_position(self, ids: np.ndarray, out: np.ndarray) -> None:
        """The mean of a few rows, summed in order in fp32 as the vectorized path sums them. After a
        step has streamed the weights through the caches every distinct numpy routine a step enters
        costs tens of microseconds, so this uses the fewest: Python ints and row copies/adds."""
        rows = ids.ravel().tolist()
        if min(rows) < 0 or max(rows) >= self.table.shape[0]:
            self._refuse(ids)
        out[...] = self.table[rows[0]]
        for i in rows[1:]:
            out += self.table[i]
        if len(rows) > 1:
            out /= len(rows)

    def _refuse(self, ids: np.ndarray) -> None:
        raise ValueError(f"token ids must lie in [0, {self.table.shape[0]}), got {ids.min()}..{ids.max()}")


__all__ = ["HostEmbedding"]
