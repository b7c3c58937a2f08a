"""Benchmark turn-taking on spoken conversations with known truth: turn ends caught, false commits,
missed turns, turn-end delay and time to first audio.

    python -m qinyu_edge.device.bench_turns                    # policy sweep, then the live runs
    python -m qinyu_edge.device.bench_turns --sweep-only       # prefill growth and the endpointing sweep
    python -m qinyu_edge.device.bench_turns --prefill-only     # prefill over 20 turns, with and without KV reuse
    python -m qinyu_edge.device.bench_turns --bundle B --cases en_pauses,barge_in

The conversations are rendered by espeak-ng (English and Mandarin, several voices and speeds) with
mid-sentence pauses of 200-400 ms, fast speech, noise under speech, noise and tones alone, two turns
back to back and a barge-in. Truth is exact: each turn ends where its last clip's speech ends.

1. Sweep: the TurnDetector alone (no generation) runs every case under each endpointing setting,
   faster than real time, and scores the commits against the truth.
2. Live: each case is played in real time through `qinyu-edge demo --input CASE.wav --log L` (full
   duplex, so a barge-in is heard) and scored from the JSONL log's input clock fields alone
   (`input_speech_end_s`, `input_commit_s`, `input_first_audio_s`), as any recorded run can be.

A commit is *caught* if it is the first after its turn's true end (before the next turn starts), a
*false commit* if it comes while the turn's speech is still to continue, *spurious* if no turn is
under way (noise); a turn with no caught commit is *missed*. Delays run from the true end of speech.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from qinyu_edge.errors import QinyuError
from qinyu_edge.runtime.audio_io import load_16k_mono, write_wav
from qinyu_edge.runtime.endpointing import EndpointPolicy
from qinyu_edge.runtime.turn import SmartTurnModel, TurnConfig, TurnDetector, TurnEnd
from qinyu_edge.runtime.vad import SAMPLE_RATE, SileroVad, VadConfig

log = logging.getLogger(__name__)

SR = SAMPLE_RATE


@dataclass(frozen=True)
class Say:
    text: str
    voice: str = "en-us"
    speed: int = 160


@dataclass(frozen=True)
class Pause:
    """Silence inside a turn: the user has more to say."""

    seconds: float


@dataclass(frozen=True)
class Gap:
    """Silence that ends a turn (the assistant's turn to speak)."""

    seconds: float


@dataclass(frozen=True)
class Noise:
    """Non-speech alone: white noise or a tone (`hz`), which must make no turn."""

    seconds: float
    hz: float = 0.0


@dataclass(frozen=True)
class Case:
    name: str
    script: tuple
    noise_under: float = 0.0  # white noise std over the whole case (speech peaks near 0.5)
    max_new_tokens: int = 40


CASES = (
    Case("en_pauses", (Gap(0.5), Say("Could you tell me"), Pause(0.25), Say("how far it is to the station,"), Pause(0.35),
                       Say("and when the last train leaves?"), Gap(3.0))),
    Case("en_gb_pauses", (Gap(0.5), Say("I was wondering", "en-gb", 150), Pause(0.4), Say("whether you could help me", "en-gb", 150),
                          Pause(0.2), Say("with my homework tonight.", "en-gb", 150), Gap(3.0))),
    Case("en_female_pauses", (Gap(0.5), Say("First preheat the oven,", "en-us+f3"), Pause(0.3), Say("then mix the flour", "en-us+f3"),
                              Pause(0.3), Say("with two eggs and some milk.", "en-us+f3"), Gap(3.0))),
    Case("zh_pauses", (Gap(0.5), Say("请问一下", "cmn"), Pause(0.3), Say("明天北京的天气", "cmn"), Pause(0.25), Say("会不会下雨", "cmn"), Gap(3.0))),
    Case("zh_two_turns", (Gap(0.5), Say("你好，我想订一张机票", "cmn", 170), Gap(4.0), Say("从上海到广州，下周一出发", "cmn", 170), Gap(3.0))),
    Case("en_fast", (Gap(0.5), Say("Set a timer for ten minutes and remind me to check the pasta.", "en-us", 260), Gap(3.0))),
    Case("en_noise_under", (Gap(0.5), Say("What time does the museum open"), Pause(0.3), Say("on Sunday mornings?"), Gap(3.0)),
         noise_under=0.02),
    Case("noise_and_tones", (Gap(0.5), Noise(2.0), Gap(0.5), Noise(1.5, 440.0), Gap(0.5), Noise(1.5, 300.0), Gap(1.0))),
    Case("back_to_back", (Gap(0.5), Say("What is the capital of France?"), Gap(4.0), Say("And of Germany?", "en-gb"), Gap(3.0))),
    Case("barge_in", (Gap(0.5), Say("Tell me a long story about a dragon."), Gap(1.6), Say("Wait, make it about a cat instead.", "en-gb"),
                      Gap(3.0)), max_new_tokens=200),
    Case("en_three_turns", (Gap(0.5), Say("Good morning."), Gap(4.0), Say("Can you read me the news,", "en-us+f3"), Pause(0.3),
                            Say("just the headlines?", "en-us+f3"), Gap(4.0), Say("Thank you, that is all.", "en-gb", 190), Gap(3.0))),
)


@dataclass(frozen=True)
class Truth:
    start: float  # seconds: the turn's first speech
    end: float  # the turn's last speech (its true end)
    pauses: tuple[tuple[float, float], ...]  # silences inside the turn


def _speech_edges(audio: np.ndarray, floor_db: float = -40.0) -> tuple[int, int]:
    f = 80  # 5 ms frames
    n = audio.size // f
    rms = np.sqrt((audio[: n * f].reshape(n, f).astype(np.float64) ** 2).mean(axis=1))
    loud = np.nonzero(rms > rms.max() * 10 ** (floor_db / 20))[0]
    return int(loud[0] * f), int((loud[-1] + 1) * f)


def _say(item: Say, directory: Path) -> np.ndarray:
    out = directory / f"say_{abs(hash((item.text, item.voice, item.speed)))}.wav"
    subprocess.run(["espeak-ng", "-v", item.voice, "-s", str(item.speed), "-w", str(out), item.text], check=True, capture_output=True)
    audio = load_16k_mono(out)
    return audio[slice(*_speech_edges(audio))]  # exact edges: the truth


def render(case: Case, directory: Path, seed: int = 0) -> tuple[np.ndarray, list[Truth]]:
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    truth: list[Truth] = []
    pos = 0
    start = end = None
    pauses: list[tuple[float, float]] = []
    for item in case.script:
        if isinstance(item, Say):
            audio = _say(item, directory)
            if start is None:
                start = pos / SR
            elif end is not None:
                pauses.append((end, pos / SR))
            end = (pos + audio.size) / SR
        elif isinstance(item, Noise):
            n = int(item.seconds * SR)
            t = np.arange(n) / SR
            audio = 0.3 * np.sin(2 * np.pi * item.hz * t) if item.hz else 0.05 * rng.standard_normal(n)
        else:
            if isinstance(item, Gap) and start is not None:
                truth.append(Truth(start, end, tuple(pauses)))
                start = end = None
                pauses = []
            audio = np.zeros(int(item.seconds * SR))
        parts.append(np.asarray(audio, dtype=np.float64))
        pos += audio.size
    stream = np.concatenate(parts)
    stream += case.noise_under * rng.standard_normal(stream.size) + 1e-3 * rng.standard_normal(stream.size)
    return stream.astype(np.float32), truth


@dataclass
class Score:
    caught: int = 0
    false_commits: int = 0
    spurious: int = 0
    missed: int = 0
    turns: int = 0
    delays_ms: list[float] = field(default_factory=list)
    first_audio_ms: list[float] = field(default_factory=list)

    def add(self, other: Score) -> None:
        for k in ("caught", "false_commits", "spurious", "missed", "turns"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.delays_ms += other.delays_ms
        self.first_audio_ms += other.first_audio_ms


def score(truth: list[Truth], commits: list[tuple[float, float | None]]) -> Score:
    """Score commits (input clock of the commit, of the first played sample) against the truth."""
    s = Score(turns=len(truth))
    caught = [False] * len(truth)
    for at, first_audio in sorted(commits):
        i = max((k for k, t in enumerate(truth) if t.start <= at), default=None)
        if i is None:
            s.spurious += 1
        elif at < truth[i].end:
            s.false_commits += 1
        elif not caught[i]:
            caught[i] = True
            s.caught += 1
            s.delays_ms.append((at - truth[i].end) * 1e3)
            if first_audio is not None:
                s.first_audio_ms.append((first_audio - truth[i].end) * 1e3)
        else:
            s.spurious += 1
    s.missed = caught.count(False)
    return s


def detector_commits(audio: np.ndarray, config: TurnConfig, models: dict) -> list[tuple[float, None]]:
    """The turn ends the detector alone commits on `audio` (the models are loaded once, shared by all settings)."""
    if not models:
        models["vad"], models["smart_turn"] = SileroVad(), SmartTurnModel()
    model = models["smart_turn"] if config.kind == "smart_turn" else None
    det = TurnDetector(VadConfig(), config, vad=models["vad"], model=model)
    events = []
    for i in range(0, audio.size, 512):
        events += det.process(audio[i:i + 512])
    events += det.flush()
    return [(e.detected_sample / SR, None) for e in events if isinstance(e, TurnEnd) and e.reason != "end_of_stream"]


SWEEP = {
    "silence 800 ms": TurnConfig(kind="silence", silence_timeout_ms=800),
    "silence 500 ms": TurnConfig(kind="silence", silence_timeout_ms=500),
    "smart_turn once, 3 s cap (before)": TurnConfig(kind="smart_turn", endpoint=EndpointPolicy(
        min_silence_ms=0, max_silence_ms=3000, check_every_ms=10_000, start_threshold=0.5, end_threshold=0.5)),
    "silence only, 320 ms after the voice": TurnConfig(kind="smart_turn", endpoint=EndpointPolicy(min_silence_ms=320, max_silence_ms=320)),
    "silence only, 384 ms after the voice": TurnConfig(kind="smart_turn", endpoint=EndpointPolicy(min_silence_ms=384, max_silence_ms=384)),
    "policy 384-704, p 0.9->0.5": TurnConfig(kind="smart_turn", endpoint=EndpointPolicy(
        min_silence_ms=384, max_silence_ms=704, start_threshold=0.9, end_threshold=0.5)),
    "policy default (384-640, p 0.2->0.05)": TurnConfig(kind="smart_turn"),
}


def _fmt(values: list[float], how) -> str:
    return f"{how(values):.0f}" if values else "-"


def table(title: str, rows: list[tuple[str, Score]], first_audio: bool) -> Table:
    t = Table(title=title)
    cols = ["", "turns", "caught", "false", "spurious", "missed", "mean ms", "max ms"]
    if first_audio:
        cols += ["1st audio mean", "1st audio max"]
    for c in cols:
        t.add_column(c, justify="right" if c else "left", no_wrap=True)
    for name, s in rows:
        row = [name, str(s.turns), str(s.caught), str(s.false_commits), str(s.spurious), str(s.missed),
               _fmt(s.delays_ms, statistics.fmean), _fmt(s.delays_ms, max)]
        if first_audio:
            row += [_fmt(s.first_audio_ms, statistics.fmean), _fmt(s.first_audio_ms, max)]
        t.add_row(*row)
    t.caption = "delays in ms from the true end of speech (the last clip's last sample)"
    return t


def sweep(cases: dict[str, tuple[np.ndarray, list[Truth]]], console: Console) -> None:
    cache: dict = {}
    rows = []
    for name, config in SWEEP.items():
        total = Score()
        for audio, truth in cases.values():
            total.add(score(truth, detector_commits(audio, config, cache)))
        rows.append((name, total))
    console.print(table("endpointing sweep (detector only, all cases)", rows, first_audio=False))


def live(cases: dict[str, tuple[np.ndarray, list[Truth]]], case_defs: dict[str, Case], directory: Path,
         model_args: list[str], extra: list[str], console: Console) -> None:
    from qinyu_edge.cli import main as cli_main

    rows, total = [], Score()
    for name, (audio, truth) in cases.items():
        wav, log_path, out = directory / f"{name}.wav", directory / f"{name}.jsonl", directory / f"{name}_reply.wav"
        write_wav(wav, audio, SR)
        log_path.unlink(missing_ok=True)
        argv = ["demo", *model_args, "--input", str(wav), "--output", str(out), "--log", str(log_path), "--duplex", "full",
                "--max-new-tokens", str(case_defs[name].max_new_tokens), *extra]
        log.info("live: %s", " ".join(argv))
        cli_main(argv)
        lines = [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.exists() else []
        s = score(truth, [(r["input_commit_s"], r["input_first_audio_s"]) for r in lines])
        rows.append((name, s))
        total.add(s)
    rows.append(("overall", total))
    console.print(table(f"live runs through `qinyu-edge demo --input` in real time ({' '.join(extra) or 'defaults'})", rows,
                        first_audio=True))


PREFILL_TURNS = ("What is the weather like today?", "Tell me a short story.", "Why is the sky blue?",
                 "How far away is the moon?", "Thank you, that helps.")


def prefill_growth(bundle: Path | None, directory: Path, console: Console, turns: int = 20, steps: int = 24,
                   repeats: int = 3) -> None:
    """A scripted spoken conversation of `turns` turns, with and without cross-turn KV reuse (and the
    idle-time prefill of each reply's text form, as the voice loop runs it): prompt positions, positions
    actually run, and prefill ms at turns 2, 10 and 20 (the median of `repeats` runs of the conversation:
    a prefill of a few dozen positions takes about a millisecond, within one run's noise)."""
    from qinyu_edge.export.bundle_export import preset_bundle
    from qinyu_edge.runtime.conversation import Conversation
    from qinyu_edge.runtime.engine import Engine

    engine = Engine(bundle or preset_bundle("tiny-8b"))
    clips = [_say(Say(t, ("en-us", "en-gb")[i % 2]), directory) for i, t in enumerate(PREFILL_TURNS)]
    t = Table(title=f"prefill over a {turns}-turn spoken conversation ({bundle or 'tiny-8b'}, replies of {steps} steps, "
                    f"median ms of {repeats} runs)")
    for c in ("window", "reuse", "turn", "prompt positions", "positions run", "prefill ms"):
        t.add_column(c, justify="right")
    for num_history in (None, 4):
        for reuse in (False, True):
            ms: dict[int, list[float]] = {n: [] for n in (2, 10, 20) if n <= turns}
            positions: dict[int, tuple[int, int]] = {}  # (prompt, reused): the same in every run
            for _ in range(repeats):
                conv = Conversation(engine, max_new_tokens=steps, reuse_cache=reuse, num_history=num_history)
                for i in range(turns):
                    reply = conv.ask(clips[i % len(clips)], commit=False)
                    conv.prefill_ahead(reply)
                    conv.commit_turn(reply)
                    if i + 1 in ms:
                        ms[i + 1].append(reply.timings.prefill_ms)
                        positions[i + 1] = reply.timings.prefill_positions, reply.timings.reused_positions
            for n, runs in ms.items():
                total, reused = positions[n]
                t.add_row("all turns" if num_history is None else f"{num_history} turns", "yes" if reuse else "no",
                          str(n), str(total), str(total - reused), f"{statistics.median(runs):.1f}")
    t.caption = "window: history kept in the prompt (chat's --num-history); a dropped turn changes the prompt after the system prompt"
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qinyu_edge.device.bench_turns", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, help="model bundle for the live runs (default: the tiny-8b preset)")
    p.add_argument("--cases", help=f"comma-separated subset of: {', '.join(c.name for c in CASES)}")
    p.add_argument("--sweep-only", action="store_true", help="only the detector sweep, no live runs")
    p.add_argument("--prefill-only", action="store_true", help="only the 20-turn prefill comparison")
    p.add_argument("--keep", type=Path, help="keep the case WAVs and JSONL logs in this folder")
    p.add_argument("--demo-args", default="", help="extra `qinyu-edge demo` flags for the live runs, e.g. '--turn silence'")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if shutil.which("espeak-ng") is None:
        raise SystemExit("error: espeak-ng renders the conversations: apt-get install espeak-ng")
    defs = {c.name: c for c in CASES}
    names = args.cases.split(",") if args.cases else list(defs)
    unknown = [n for n in names if n not in defs]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(defs)}")
    console = Console(width=160)
    with tempfile.TemporaryDirectory(prefix="qinyu-turns-") as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        prefill_growth(args.bundle, directory, console)
        if args.prefill_only:
            return 0
        cases = {n: render(defs[n], directory) for n in names}
        sweep(cases, console)
        if not args.sweep_only:
            model = ["--bundle", str(args.bundle)] if args.bundle else []
            try:
                live(cases, defs, directory, model, args.demo_args.split(), console)
            except QinyuError as e:
                raise SystemExit(f"error: {e}") from e
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
