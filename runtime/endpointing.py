"""When a user turn ends: a decision rule over the turn model's probability and the silence so far.

One check when the VAD closes a segment is not enough (issue 11): a comma pause splits the segment and
the model may call it complete, and one "incomplete" used to mean waiting for a 3 s cap. Instead,
while the silence after the last voiced frame grows, the turn model is asked again every
`check_every_ms`, and a turn commits when

    silence >= min_silence_ms  and  p(complete) >= threshold(silence)     (the model agrees), or
    silence >= max_silence_ms                                               (fallback, whatever it says)

with `threshold` falling linearly from `start_threshold` at min_silence_ms to `end_threshold` at
max_silence_ms: a long pause needs less confidence. The first probability at or above
`tentative_threshold` (or, with no model, the VAD's end of segment) marks a *tentative* end, where a
preemptive reply may start while the commit is still pending.

The defaults are what measured best on `python -m qinyu_edge.device.bench_turns` (espeak-ng
conversations): the silence rule alone keeps 200-400 ms mid-sentence pauses from committing, even
where Smart Turn, which cannot judge flat synthetic prosody, would call them complete.
"""

from __future__ import annotations

from dataclasses import dataclass

from qinyu_edge.errors import ConfigError


@dataclass(frozen=True)
class EndpointPolicy:
    # Measured on espeak-ng speech (device/bench_turns.py): 320 ms of silence after the last voiced
    # frame already committed inside 400 ms pauses (the VAD hears a pause ~60 ms shorter), 352 ms
    # did not; 384 ms keeps a frame of margin. Smart Turn hears no prosody in espeak speech and is
    # unsure of most finished sentences, so it only vetoes: under 0.2 at the minimum (falling to
    # 0.05 at the cap) it holds the turn open, up to the cap.
    min_silence_ms: int = 384  # hard minimum: no commit sooner, whatever the model says
    max_silence_ms: int = 640  # fallback: commit at this silence, whatever the model says
    check_every_ms: int = 128  # model re-run cadence while the silence grows
    start_threshold: float = 0.2  # p(complete) needed at min_silence_ms ...
    end_threshold: float = 0.05  # ... falling to this at max_silence_ms
    # A preemptive reply starts at the first check whose p reaches this. 0: at every VAD end of
    # segment, since the accelerator idles while the user is silent; raise it to save power.
    tentative_threshold: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_silence_ms <= self.max_silence_ms:
            raise ConfigError(
                f"endpointing needs 0 <= min_silence_ms <= max_silence_ms, got {self.min_silence_ms} and {self.max_silence_ms}."
            )
        if self.check_every_ms <= 0:
            raise ConfigError(f"endpointing check_every_ms must be > 0, got {self.check_every_ms}.")
        for name in ("start_threshold", "end_threshold", "tentative_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"endpointing {name} must be in [0, 1], got {getattr(self, name)}.")
        if self.end_threshold > self.start_threshold:
            raise ConfigError(
                f"endpointing end_threshold ({self.end_threshold}) must not exceed start_threshold ({self.start_threshold}): "
                "the threshold falls as silence grows."
            )

    def threshold(self, silence_ms: float) -> float:
        """p(complete) that commits the turn after `silence_ms` of silence (above 1: nothing does)."""
        if silence_ms < self.min_silence_ms:
            return float("inf")
        span = self.max_silence_ms - self.min_silence_ms
        if span == 0:
            return self.end_threshold
        x = min(1.0, (silence_ms - self.min_silence_ms) / span)
        return self.start_threshold + x * (self.end_threshold - self.start_threshold)

    def commits(self, silence_ms: float, probability: float | None) -> bool:
        if silence_ms >= self.max_silence_ms:
            return True
        return probability is not None and probability >= self.threshold(silence_ms)


__all__ = ["EndpointPolicy"]
