"""Echo cancellation figures in a simulated room: `python -m qinyu_edge.runtime.bench_echo`.

The room plays the assistant's replies on a speaker; the microphone hears them back delayed, attenuated,
low-pass filtered and under room noise, with the user's speech on top when a barge-in is wanted. Time is
the room's own (the microphone's sample count), so the run is exact and faster than real time; the
echo canceller, Silero VAD and espeak-ng speech are the real ones. Prints ERLE per delay, the delay
estimates, self-interruptions over many replies, barge-ins detected with their cut latency, and the
VAD's agreement on user speech with AEC on vs off.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soxr

from .audio_devices import CAPTURE_RATE, PLAYBACK_RATE, StreamStats
from .audio_io import load_16k_mono
from .echo_cancel import AecConfig, EchoCancelledSource, PlaybackTap
from .turn import SmartTurnModel
from .vad import SileroVad, SpeechStart, VadConfig, VadSegmenter

BLOCK = 512  # the voice loop's mic read


@dataclass
class EchoPath:
    delay_ms: float = 120.0
    gain: float = 0.5  # the echo's amplitude relative to what was played
    cutoff_hz: float = 3000.0  # a small speaker and the room: a low-pass (windowed-sinc FIR)
    noise_rms: float = 0.003
    seed: int = 0


@dataclass
class Room:
    """An AudioSource: the speaker plays `played` (32 kHz, reported to `tap`), the mic hears it through `path`
    plus `user` (16 kHz, the person speaking). `played` is laid out on the room's timeline from sample 0."""

    played: np.ndarray
    user: np.ndarray
    path: EchoPath = field(default_factory=EchoPath)
    tap_rate: int = PLAYBACK_RATE  # the rate the speaker reports its samples at
    rate: int = CAPTURE_RATE

    def __post_init__(self) -> None:
        self.stats = StreamStats(device="room", device_rate=CAPTURE_RATE, channels=1)
        self._pos = 0
        far16 = soxr.resample(self.played, PLAYBACK_RATE, CAPTURE_RATE).astype(np.float32)
        n = max(far16.size, self.user.size)
        far16 = np.pad(far16, (0, n - far16.size))
        d = int(self.path.delay_ms * CAPTURE_RATE / 1000)
        fc = self.path.cutoff_hz / CAPTURE_RATE
        taps = np.sinc(2 * fc * np.arange(-32, 33)) * np.hamming(65)
        echo = np.zeros(n, np.float32)
        echo[d:] = (self.path.gain / taps.sum() * np.convolve(far16, taps)[32:32 + n])[: n - d]
        rng = np.random.default_rng(self.path.seed)
        self.echo = echo
        self.mic = echo + self.path.noise_rms * rng.standard_normal(n).astype(np.float32)
        self.mic[: self.user.size] += self.user
        self._speaker = self.played if self.tap_rate == PLAYBACK_RATE else soxr.resample(self.played, PLAYBACK_RATE, self.tap_rate)
        self.tap = PlaybackTap(clock=self.clock)

    def clock(self) -> float:
        return self._pos / CAPTURE_RATE

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def read(self, n: int) -> np.ndarray | None:
        if self._pos >= self.mic.size:
            return None
        a, b = self._pos, min(self._pos + n, self.mic.size)
        # The speaker plays this span first (as a device callback would), then the mic delivers it.
        sa, sb = a * self.tap_rate // CAPTURE_RATE, b * self.tap_rate // CAPTURE_RATE
        chunk = self._speaker[sa:sb]
        if chunk.size:  # the speaker plays the whole timeline, silences included (one run of its clock)
            self.tap.played(chunk, self.tap_rate, at=a / CAPTURE_RATE)
        self._pos = b
        out = self.mic[a:b]
        return np.concatenate([out, np.zeros(n - out.size, np.float32)]) if out.size < n else out.copy()


def run_through(source, n: int = BLOCK) -> np.ndarray:
    chunks = []
    while (x := source.read(n)) is not None:
        chunks.append(x)
    return np.concatenate(chunks)


def erle_db(raw: np.ndarray, cleaned: np.ndarray, start: int) -> float:
    """Echo return loss enhancement over the samples from `start` where the echo is loud (speech, not pauses)."""
    r, c = raw[start:], cleaned[start: raw.size]
    f = 160
    n = min(r.size, c.size) // f
    pr = np.mean(r[: n * f].reshape(n, f) ** 2, axis=1)
    pc = np.mean(c[: n * f].reshape(n, f) ** 2, axis=1)
    loud = pr > pr.max() * 1e-3
    return float(10 * np.log10(pr[loud].sum() / (pc[loud].sum() + 1e-12)))


def replies_timeline(replies: list[np.ndarray], gap_s: float = 1.0) -> np.ndarray:
    """Replies at 32 kHz one after another with `gap_s` of silence between (the user's turns)."""
    gap = np.zeros(int(gap_s * PLAYBACK_RATE), np.float32)
    return np.concatenate([x for r in replies for x in (r, gap)])


def speech_starts(audio: np.ndarray, vad: SileroVad, config: VadConfig = VadConfig()) -> list[SpeechStart]:
    """SpeechStarts the VAD finds, fed in the loop's 512-sample blocks."""
    seg = VadSegmenter(config, vad)
    events = []
    for i in range(0, audio.size - BLOCK + 1, BLOCK):
        events += seg.process(audio[i:i + BLOCK])
    return [e for e in events if isinstance(e, SpeechStart)]


def barge_in_block(audio: np.ndarray, vad: SileroVad, barge_in_ms: int = 300, config: VadConfig = VadConfig()) -> int | None:
    """The first 512-sample block at which the voice loop would cut the reply: speech heard for barge_in_ms."""
    seg = VadSegmenter(config, vad)
    start = None
    for k, i in enumerate(range(0, audio.size - BLOCK + 1, BLOCK)):
        for e in seg.process(audio[i:i + BLOCK]):
            if isinstance(e, SpeechStart):
                start = e.sample
        if seg.in_speech and start is not None and (i + BLOCK - start) * 1000 / CAPTURE_RATE >= barge_in_ms:
            return k
    return None


def barge_in(lead: np.ndarray, reply: np.ndarray, user: np.ndarray, after_s: float, delay_ms: float,
             vad: SileroVad, seed: int = 0) -> tuple[int | None, int | None, float | None]:
    """The user speaks `after_s` into `reply` (played after `lead`, for convergence): (block at which the cleaned
    mic triggers a barge-in, block at which the user's speech alone, no echo and no AEC, would; counted from 4 blocks
    before the user's speech), and the ms from the speech onset + 300 ms to the end of the block that cuts."""
    at = lead.size * CAPTURE_RATE // PLAYBACK_RATE + int(1.0 * CAPTURE_RATE) + int(after_s * CAPTURE_RATE)
    room = Room(replies_timeline([lead, reply]), np.concatenate([np.zeros(at, np.float32), user]),
                EchoPath(delay_ms=delay_ms, seed=seed))
    cleaned, _ = cancel(room)
    alone = np.concatenate([np.zeros(BLOCK * 4, np.float32), room.mic[at:] - room.echo[at:]])
    got = barge_in_block(cleaned[at - BLOCK * 4:], vad)
    ideal = barge_in_block(alone, vad)
    onset = int(np.argmax(np.abs(user) > 0.05 * np.abs(user).max()))
    late = None if got is None else ((got + 1) * BLOCK - 4 * BLOCK - onset) * 1000 / CAPTURE_RATE - 300
    return got, ideal, late


def vad_turn_agreement(clip: np.ndarray, vad: SileroVad, turn, seed: int = 0) -> tuple[float, bool]:
    """(share of 512-sample blocks where the VAD decides alike, Smart Turn verdicts equal) for `clip` in room noise,
    read raw (AEC off) and through the echo canceller with nothing played (AEC on)."""
    room = Room(np.zeros(0, np.float32), clip, EchoPath(seed=seed))
    cleaned, _ = cancel(room)
    n = min(room.mic.size, cleaned.size)
    off, on = vad.probabilities(room.mic[:n]) > 0.5, vad.probabilities(cleaned[:n]) > 0.5
    return float(np.mean(off == on)), turn.decide(room.mic[:n]).verdict == turn.decide(cleaned[:n]).verdict


def cancel(room: Room, config: AecConfig = AecConfig()) -> tuple[np.ndarray, EchoCancelledSource]:
    src = EchoCancelledSource(room, room.tap, config)
    return run_through(src), src


# ---------------------------------------------------------------- the benchmark


def _espeak(text: str, speed: int = 160) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng renders the benchmark's speech: `apt-get install espeak-ng`")
    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "s.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(speed), "-w", str(wav), text], check=True, capture_output=True)
        return load_16k_mono(wav)


REPLY_TEXTS = (
    "The tallest mountain in the world is Mount Everest, in the Himalaya.",
    "It rises eight thousand eight hundred and forty nine metres above the sea.",
    "Many climbers try to reach its summit every spring, when the weather is calm.",
    "The first people known to stand on top were Tenzing Norgay and Edmund Hillary.",
)
USER_TEXT = "Wait, stop, I have another question."
USER_TURNS = ("What is the tallest mountain in the world", "And how high is it", "Tell me about the weather in",
              "Can you tell me a short story about the sea")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replies", type=int, default=20, help="replies for the self-interruption count")
    args = p.parse_args(argv)
    vad = SileroVad()
    replies = [soxr.resample(_espeak(t), CAPTURE_RATE, PLAYBACK_RATE).astype(np.float32) for t in REPLY_TEXTS]
    long_far = replies_timeline(replies * 3)
    print("ERLE after convergence (second half of ~%.0f s of replies), delay estimate" % (long_far.size / PLAYBACK_RATE))
    for delay in (20, 60, 120, 200):
        room = Room(long_far, np.zeros(0, np.float32), EchoPath(delay_ms=delay))
        cleaned, src = cancel(room)
        print(f"  delay {delay:3d} ms: ERLE {erle_db(room.mic, cleaned, room.mic.size // 2):5.1f} dB, "
              f"estimated {src.aec.delay_ms:.1f} ms ({src.aec.delay_estimates} estimates)")

    many = replies_timeline([replies[i % len(replies)] for i in range(args.replies)])
    room = Room(many, np.zeros(0, np.float32), EchoPath(delay_ms=120))
    cleaned, _ = cancel(room)
    raw_starts, clean_starts = speech_starts(room.mic, vad), speech_starts(cleaned, vad)
    print(f"self-interruptions over {args.replies} replies: raw mic (no AEC) {len(raw_starts)} speech starts, "
          f"AEC on {len(clean_starts)} speech starts, "
          f"{sum(barge_in_block(cleaned[s.sample:], vad) is not None for s in clean_starts)} of them long enough to barge in")

    user = _espeak(USER_TEXT)
    detected, lat, late = 0, [], []
    for k, reply in enumerate(replies * 2):
        got, ideal, ms = barge_in(long_far[: 10 * PLAYBACK_RATE], reply, user, 1.5 + 0.25 * k, 60 + 20 * k, vad, seed=k)
        if got is not None:
            detected += 1
            lat.append(got - ideal)
            late.append(ms)
    print(f"barge-ins detected: {detected}/{len(replies) * 2}; the cut comes {', '.join(f'{x:+d}' for x in lat)} "
          f"blocks (32 ms) after the same speech without echo or AEC would cut; from speech onset + 300 ms "
          f"(--barge-in-ms) to the end of the cutting block: {', '.join(f'{x:.0f}' for x in late)} ms")

    turn = SmartTurnModel()
    blocks, verdicts = [], 0
    for k, text in enumerate(USER_TURNS):
        clip = np.concatenate([np.zeros(8000, np.float32), _espeak(text), np.zeros(16000, np.float32)])
        agree, same = vad_turn_agreement(clip, vad, turn, seed=k)
        blocks.append(agree)
        verdicts += same
    print(f"user speech, AEC on vs off (no echo): VAD block decisions agree {100 * np.mean(blocks):.1f}% "
          f"(worst clip {100 * min(blocks):.1f}%), Smart Turn verdicts agree {verdicts}/{len(USER_TURNS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
