"""Numeric command-line options, checked where they are parsed and against the bundle's limits.

argparse `type=` callables refuse a value outside its range with `error: argument --X: ...` (exit 2)
before any work starts; the bundle-dependent limits are checked once the bundle is read.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from .errors import ConfigError


def whole(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An integer option in [low, high] (either bound may be open)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"give a whole number, not {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {_range(low, high)}")
        return value

    parse.__name__ = "whole number"
    return parse


def real(low: float | None = None, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    """A finite float option in [low, high], or (low, high] with `low_open`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"give a number, not {text!r}") from None
        if (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
                or (high is not None and value > high)):
            bound = f"{'more than' if low_open else 'at least'} {low:g}" if low is not None else ""
            top = f"at most {high:g}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"{text} is out of range: use a finite number "
                                             f"{' and '.join(b for b in (bound, top) if b)}".rstrip())
        return value

    parse.__name__ = "number"
    return parse


def _range(low: int | None, high: int | None) -> str:
    if high is None:
        return f"a whole number >= {low}"
    if low is None:
        return f"a whole number <= {high}"
    return f"a whole number from {low} to {high}"


COUNT = whole(1)  # threads, runs, steps, token caps: at least one
NON_NEGATIVE = whole(0)  # seeds, milliseconds, kept history turns


def check_context(context: int, largest: int, flag: str = "--context") -> int:
    """A KV cache size the bundle's backbone was exported for."""
    if not 1 <= context <= largest:
        raise ConfigError(f"{flag} {context} is beyond this bundle: its backbone takes at most {largest} positions. "
                          f"Use {flag} {largest} or less, or export a bundle with a larger --max-context.")
    return context


# The backbone's shape ranges put the optimization point at 256 prompt rows and 512 past positions.
MIN_EXPORT_CONTEXT = 512


def check_max_context(max_context: int, max_position_embeddings: int) -> int:
    """`export --max-context`: room for the optimization point, and no position the model never learned."""
    if not MIN_EXPORT_CONTEXT <= max_context <= max_position_embeddings:
        raise ConfigError(f"--max-context {max_context} is out of range: use {MIN_EXPORT_CONTEXT} to "
                          f"{max_position_embeddings} (the model's max_position_embeddings).")
    return max_context
