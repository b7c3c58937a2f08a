"""Soak benchmark: hundreds of turns through the runtime API, spoken and text alternating.

Prints the process RSS from turn 10 to the end (and from the turn the context window first filled),
and prompt-build time against conversation length, for each tiny preset:

    .venv/bin/python -m qinyu_edge.runtime.bench_soak --turns 300

A long conversation must hold bounded memory (only the turns a prompt can still use are kept) and
cost the same per turn at turn 300 as at turn 30 (dropped turns are never tokenized again).
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import numpy as np

from qinyu_edge.validate import COUNT

from .audio_io import load_16k_mono
from .conversation import Conversation
from .engine import Engine, EngineOptions
from .prompt import Turn

NEXT = Turn.question("And what happened after that?")


def rss_mib() -> float:
    """Resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status: the soak benchmark needs Linux")


def soak(bundle: Path, turns: int, context: int, max_new_tokens: int) -> dict:
    engine = Engine(bundle, EngineOptions(context=context))
    conv = Conversation(engine, max_new_tokens=max_new_tokens)
    speech = load_16k_mono(resources.files("qinyu_edge") / "data" / "demo_question.wav")
    rss, build_ms, prompt_ms, history, full_at = [], [], [], [], None
    for i in range(turns):
        if i % 2:
            reply = conv.ask(text=f"Question {i}: what happened next in the story?")
        else:
            reply = conv.ask(speech)
        # Prompt building alone, for the next (text) turn of the conversation as it now stands.
        t0 = time.perf_counter()
        conv.builder.build(conv.mode, conv.history, NEXT, [c.embeds.shape[0] for c in conv.clips],
                           reply_reserve=conv.reply_reserve)
        build_ms.append((time.perf_counter() - t0) * 1e3)
        prompt_ms.append(reply.timings.prompt_ms)
        history.append(len(conv.history) // 2)
        rss.append(rss_mib())
        if full_at is None and reply.prompt.dropped_turns:
            full_at = i
    return {"rss": rss, "build_ms": build_ms, "prompt_ms": prompt_ms, "pairs": history, "full_at": full_at, "clips": len(conv.clips)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=COUNT, default=300)
    p.add_argument("--context", type=COUNT, default=1024, help="KV cache positions (small: the window fills early)")
    p.add_argument("--max-new-tokens", type=COUNT, default=24)
    p.add_argument("--preset", action="append", choices=["tiny-4b", "tiny-8b"])
    args = p.parse_args(argv)
    from qinyu_edge.export.bundle_export import preset_bundle

    for preset in args.preset or ["tiny-4b", "tiny-8b"]:
        t0 = time.perf_counter()
        r = soak(preset_bundle(preset), args.turns, args.context, args.max_new_tokens)
        rss, full = r["rss"], r["full_at"]
        growth = lambda a: (rss[-1] - rss[a]) / rss[a] * 100  # noqa: E731
        print(f"{preset}: {args.turns} turns (spoken and text alternating) in {time.perf_counter() - t0:.0f} s, "
              f"context {args.context}, window full from turn {full}")
        print(f"  RSS turn 10 {rss[9]:.1f} MiB -> end {rss[-1]:.1f} MiB: {growth(9):+.2f}%; "
              f"from the full window (turn {full}) {growth(full if full is not None else 9):+.2f}%")
        print(f"  history kept at the end: {r['pairs'][-1]} pairs, {r['clips']} clips")
        edges = sorted({10, 30, 100, args.turns // 2, args.turns} - {0})
        print("  median ms per span of turns: prompt build alone | the turn's prompt (build + embed)")
        for a, b in zip(edges, edges[1:]):
            print(f"    turns {a:4d}-{b:4d}: {np.median(r['build_ms'][a:b]):6.2f} | {np.median(r['prompt_ms'][a:b]):6.2f}"
                  f"   (history {min(r['pairs'][a:b])}-{max(r['pairs'][a:b])} pairs, RSS at turn {b} {rss[b - 1]:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
