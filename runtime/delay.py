"""Undo the codebook delay pattern one audio step at a time (model-spec 1.7).

The model emits, at each audio step, one id per codebook, and codebook k lags k steps behind
codebook 0: frame f of codebook k is the value the model gives codebook k at audio step f + k.
So frame f is complete once audio step f + 7 exists (8 steps when counting from one), and a reply
of F frames takes F + 7 audio steps, the last 7 carrying only the tails of earlier frames.

Pad ids (1024..1031 within a book) are mapped to code 0, as the offline official path does
(`tools/inference_sts.py`: values >= 1024 become 0). The official web streaming path zeroes only
values > 1024 and would pass 1024 to the codec, an index one past its codebook; we follow the
offline rule. In a well-formed reply no pad reaches a completed frame at all (leading pads sit
before step k in row k, trailing pads after frame F-1), so the rule only matters when the model
misplaces a pad.
"""

from __future__ import annotations

import numpy as np

from qinyu_edge.config import CODES_PER_BOOK, IDS_PER_BOOK, N_CODEBOOKS


def audio_steps_for_frames(frames: int, n_codebooks: int = N_CODEBOOKS) -> int:
    """Audio steps the model must have produced before `frames` de-delayed frames are complete."""
    return frames + n_codebooks - 1 if frames > 0 else 0


class DelayUndo:
    """Feed each audio step's within-book ids; get back the frames that step completed.

    Streaming counterpart of the offline de-skew (shift row k left by k, drop the last 7 steps,
    pads -> 0): after all steps of a reply are pushed, the frames returned, in order, equal it.
    """

    def __init__(self, n_codebooks: int = N_CODEBOOKS, ids_per_book: int = IDS_PER_BOOK,
                 codes_per_book: int = CODES_PER_BOOK) -> None:
        self.n_codebooks = n_codebooks
        self.ids_per_book = ids_per_book
        self.codes_per_book = codes_per_book
        # Only the last n_codebooks steps can still contribute to an incomplete frame.
        self._ring = np.zeros((n_codebooks, n_codebooks), dtype=np.int64)
        self._books = np.arange(n_codebooks)
        self.steps = 0
        self.frames = 0

    def push(self, step_ids: np.ndarray) -> np.ndarray | None:
        """One audio step's ids ([n_codebooks], within-book, 0..1031) -> the frame it completed, if any."""
        ids = np.asarray(step_ids)
        if ids.shape != (self.n_codebooks,) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"an audio step has {self.n_codebooks} integer ids; got shape {ids.shape} dtype {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.ids_per_book:
            raise ValueError(
                f"audio ids are within-book indices 0..{self.ids_per_book - 1} (subtract the codebook's first "
                f"vocabulary id); got {ids.tolist()}"
            )
        self._ring[self.steps % self.n_codebooks] = ids
        self.steps += 1
        f = self.steps - self.n_codebooks  # the frame this step completes (its codebook-7 value is this step's)
        if f < 0:
            return None
        frame = self._ring[(f + self._books) % self.n_codebooks, self._books]
        frame = np.where(frame >= self.codes_per_book, 0, frame)
        self.frames += 1
        return frame

    def finish(self) -> list[np.ndarray]:
        """End of the reply. The last n_codebooks - 1 steps only complete earlier frames, so no
        frame is left over; returns an empty list and makes the object ready for the next reply."""
        self.reset()
        return []

    def reset(self) -> None:
        self._ring[:] = 0
        self.steps = 0
        self.frames = 0
