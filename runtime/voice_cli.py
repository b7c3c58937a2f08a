"""`qinyu-edge chat` (the live assistant) and `qinyu-edge demo` (the same loop on a shipped WAV)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from importlib import resources
from pathlib import Path

from qinyu_edge.assistant_config import add_config_option
from qinyu_edge.errors import AudioInputError, QinyuError
from qinyu_edge.fileio import check_writable
from qinyu_edge.validate import COUNT, NON_NEGATIVE

from .endpointing import EndpointPolicy

log = logging.getLogger(__name__)

# The demo question ships with the package: espeak-ng -v en-us -s 165 "Can you tell me a short story
# about the sea", resampled by sox to 16 kHz mono 16-bit with 0.4 s of leading silence.
DEMO_WAV = "demo_question.wav"


def _loop_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--turn", choices=["smart_turn", "silence"], default="smart_turn",
                   help="end-of-turn detector: Smart Turn v3.2 (pipecat-ai) or silence endpointing")
    p.add_argument("--silence-ms", type=COUNT, default=800, help="silence that ends a turn with --turn silence")
    policy = EndpointPolicy()
    p.add_argument("--min-silence-ms", type=NON_NEGATIVE, default=policy.min_silence_ms,
                   help="--turn smart_turn: silence after the last voiced frame before any end of turn (hard minimum)")
    p.add_argument("--max-silence-ms", type=COUNT, default=policy.max_silence_ms,
                   help="--turn smart_turn: silence that ends the turn whatever Smart Turn says (fallback)")
    p.add_argument("--preemptive", choices=["on", "off"], default="on",
                   help="on: start the reply on a tentative end of turn, playing it only once the turn commits")
    p.add_argument("--vad", choices=["default", "official_web"], default="default", help="VAD preset")
    p.add_argument("--duplex", choices=["half", "full"], default="half",
                   help="half: ignore the mic while speaking (open speakers without AEC); full: barge-in on "
                        "(a headset, or open speakers with chat --aec on)")
    p.add_argument("--barge-in-ms", type=COUNT, default=300, help="user speech during a reply that interrupts it")
    p.add_argument("--voice", help="agent voice name in the bundle")
    p.add_argument("--role", help="role description (role-play)")
    p.add_argument("--max-new-tokens", type=COUNT, default=None)
    p.add_argument("--schedule", default="official", help="audio chunk schedule: official, low_latency, fast_start (first audio after 4 frames) or 8,16,32")
    p.add_argument("--num-history", type=NON_NEGATIVE, default=4, help="turns of history kept (the web demo keeps 4)")
    p.add_argument("--log", type=Path, help="JSONL file with one line of timings per turn")
    p.add_argument("--engines", type=Path, help="run the TensorRT plans of this engine set (from `qinyu-edge build`)")


def _build(args: argparse.Namespace, bundle: Path, source, sink, on_event):
    from .conversation import Conversation
    from .engine import Engine, EngineOptions
    from .streaming import ChunkSchedule
    from .turn import TurnConfig, TurnDetector
    from .vad import VadConfig
    from .voice_loop import LoopConfig, VoiceLoop

    try:
        schedule = ChunkSchedule.parse(args.schedule)
    except ValueError as e:
        raise QinyuError(str(e)) from e
    engine = Engine(bundle, EngineOptions(backend="trt" if args.engines else "ort",
                                          engines=str(args.engines) if args.engines else None))
    mode = "roleplay" if args.role else "conversation"
    voice = args.voice
    if args.role and voice is None:
        from .voice_designer import design_for_bundle

        voice = design_for_bundle(engine.bundle, args.role)
    conv = Conversation(engine, mode=mode, voice=voice, role_description=args.role,
                        num_history=args.num_history, max_new_tokens=args.max_new_tokens, schedule=schedule)
    policy = EndpointPolicy(min_silence_ms=args.min_silence_ms, max_silence_ms=args.max_silence_ms)
    detector = TurnDetector(VadConfig.preset(args.vad), TurnConfig(kind=args.turn, silence_timeout_ms=args.silence_ms, endpoint=policy))
    cfg = LoopConfig(duplex=args.duplex, barge_in_min_ms=args.barge_in_ms, preemptive=args.preemptive == "on")
    return VoiceLoop(conv, source, sink, detector, cfg, on_event=on_event)


class _TurnLog:
    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            check_writable(path, what="--log")

    def write(self, record) -> None:
        if self.path is None:
            return
        # One line per turn, flushed at once, so a crash loses at most the turn in progress.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")


def _wide_console():
    """A console wide enough for the latency table (a pipe or CI log reports 80 columns)."""
    from rich.console import Console

    return Console(width=max(Console().width, 120))


def _latency_table(turns):
    from rich.table import Table

    table = Table(title="per-turn latency, ms from the end of the user's voice (last frame the VAD scored as speech)",
                  caption="vad: the VAD's end-of-segment event; decide: end of turn committed; 1st chunk: first audio "
                          "decoded; 1st play: first sample handed to playback; end: reply finished; pre: the reply "
                          "started preemptively, before the commit")
    cols = ("#", "vad", "decide", "enc", "prefill", "1st chunk", "1st play", "end", "steps", "ms/step", "audio s",
            "pre", "barge")
    for c in cols:
        table.add_column(c, justify="right", no_wrap=True)
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    for t in turns:
        table.add_row(str(t.index), fmt(t.vad_end_ms), fmt(t.turn_decision_ms), f"{t.encoder_ms or 0:.1f}",
                      fmt(t.prefill_ms), fmt(t.first_chunk_ms), fmt(t.first_played_ms), fmt(t.reply_end_ms),
                      str(t.steps), f"{t.ms_per_step:.1f}", f"{t.reply_audio_seconds:.2f}",
                      "yes" if t.preemptive else "", "yes" if t.barge_in else "")
    return table


def _describe(ev) -> str | None:
    from .turn import TurnCheck, TurnEnd, TurnTentative
    from .vad import SpeechEnd, SpeechStart
    from .voice_loop import BargeIn, DeviceLost, ReplyDiscarded, StateChanged, TurnRecord

    if isinstance(ev, StateChanged):
        return f"[bold]{ev.old.value} -> {ev.new.value}[/bold] ({ev.reason})"
    if isinstance(ev, SpeechStart):
        return f"speech start at {ev.seconds:.2f} s"
    if isinstance(ev, SpeechEnd):
        return f"speech end: {ev.start_sample / 16000:.2f}-{ev.end_sample / 16000:.2f} s"
    if isinstance(ev, TurnCheck):
        p = "-" if ev.decision.probability is None else f"{ev.decision.probability:.2f}"
        # The policy, not the model's own 0.5 cut, decides: say what p(complete) had to reach.
        rule = "too early to end the turn" if ev.threshold > 1 else f"the turn ends at p >= {ev.threshold:.2f}"
        return (f"turn check after {ev.silence_ms:.0f} ms of silence: the model says {ev.decision.verdict.value} "
                f"(p={p}); {rule} ({ev.latency_ms:.0f} ms)")
    if isinstance(ev, TurnTentative):
        return "tentative end of turn"
    if isinstance(ev, ReplyDiscarded):
        return f"[yellow]user went on[/yellow]: preemptive reply discarded unplayed ({ev.generated_ms:.0f} ms of work)"
    if isinstance(ev, TurnEnd):
        return (f"end of turn ({ev.reason}) {ev.voiced_latency_ms:.0f} ms after the voice stopped, "
                f"{ev.audio.size / 16000:.2f} s of user audio")
    if isinstance(ev, DeviceLost):
        return f"[red]audio device lost[/red]: {ev.message}"
    if isinstance(ev, BargeIn):
        return f"[yellow]barge-in[/yellow] after {ev.played_seconds:.2f} s played; kept {ev.kept_text!r}"
    if isinstance(ev, TurnRecord):
        return f"reply: {ev.reply_audio_seconds:.2f} s of speech, {ev.steps} steps ({ev.stop})"
    return None


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qinyu_edge.export.bundle_export import preset_bundle

    from .audio_devices import FileSink, FileSource
    from .audio_io import output_format

    console = _wide_console()
    if args.bundle is not None:
        bundle = Path(args.bundle)
        console.print(f"qinyu-edge demo on the bundle [bold]{bundle}[/bold]")
    else:
        console.print(f"qinyu-edge demo: the embedded default [bold]{args.preset}[/bold]. Its weights are RANDOM "
                      "(a tiny model of the real architecture): the reply is noise-like speech, not an answer.")
        bundle = preset_bundle(args.preset, console=Console(stderr=True))
    wav = Path(args.input) if args.input else Path(str(resources.files("qinyu_edge") / "data" / DEMO_WAV))
    out = Path(args.output)
    check_writable(out, what="--output")
    output_format(out)
    source = FileSource(wav, realtime=not args.fast, tail_silence_s=1.5)
    sink = FileSink(out, realtime=not args.fast)
    turn_log = _TurnLog(args.log)

    def on_event(ev) -> None:
        text = _describe(ev)
        if text:
            console.print(f"{time.strftime('%H:%M:%S')} {text}")
        if type(ev).__name__ == "TurnRecord":
            turn_log.write(ev)

    console.print(f"playing {wav.name} into the loop {'as fast as possible' if args.fast else 'in real time'}")
    loop = _build(args, bundle, source, sink, on_event)
    turns = loop.run()
    if not turns:
        raise AudioInputError(f"no speech was heard in {wav}: the voice activity detector found none, so there "
                              "was nothing to answer. Play a recording with speech in it (--input WAV).")
    console.print(_latency_table(turns))
    console.print(f"reply audio (the whole session timeline, 32 kHz): {out}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from qinyu_edge.assistant_config import resolve_chat_args

    from .audio_devices import AudioDeviceConfig
    from .supervised import Supervisor

    args = resolve_chat_args(args)  # the --config file, under the flags given
    dev = AudioDeviceConfig(backend=args.backend, input_device=args.input_device, output_device=args.output_device)
    with Supervisor(dev) as sup:  # one assistant per device pair; SIGTERM cuts the reply; systemd notify
        return _chat(args, dev, sup)


def _chat(args: argparse.Namespace, dev, sup) -> int:
    from contextlib import nullcontext

    from rich.live import Live
    from rich.text import Text

    from .audio_devices import AudioDeviceError, DeviceSink, DeviceSource
    from .supervised import EXIT_DEVICE_LOST, EXIT_ENGINES, EnginesUnusable, check_engines

    console = _wide_console()
    # Not on a terminal (the service: journald): plain lines, no live status line.
    plain = not console.is_terminal
    if args.engines is not None:
        try:
            check_engines(Path(args.bundle), Path(args.engines))
        except EnginesUnusable as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_ENGINES
    source, sink = DeviceSource(dev), DeviceSink(dev)
    source, args.duplex = _echo_cancel(args, dev, source, sink)
    turn_log = _TurnLog(args.log)
    status = {"state": "listening", "last": "-"}
    loop = None

    def render() -> str:
        level = loop.level if loop is not None else 0.0
        bar = "#" * int(min(1.0, level * 8) * 20)
        return (f"[bold]{status['state']:<14}[/bold] mic {bar:<20} | last turn first audio {status['last']} ms "
                f"| overruns {source.stats.overruns} underruns {sink.stats.underruns}  (Ctrl-C to quit)")

    def on_event(ev) -> None:
        from .voice_loop import StateChanged, TurnRecord

        sup.on_event(ev)
        text = _describe(ev)
        if isinstance(ev, StateChanged):
            status["state"] = ev.new.value
        if isinstance(ev, TurnRecord):
            status["last"] = "-" if ev.first_played_ms is None else f"{ev.first_played_ms:.0f}"
            turn_log.write(ev)
        if text and plain:
            print(f"{time.strftime('%H:%M:%S')} {Text.from_markup(text).plain}", flush=True)
        elif text and not isinstance(ev, StateChanged):
            live.console.print(text)

    live = Live(console=console, refresh_per_second=8, transient=False, get_renderable=render)
    loop = _build(args, Path(args.bundle), sup.watch(source), sink, on_event)
    sup.attach(loop)  # SIGINT: finish the reply and end; SIGTERM: cut it and end
    if not sup.stop_requested.is_set() and sup.wait_for_devices():
        with nullcontext() if plain else live:
            try:
                loop.run()
            except AudioDeviceError as e:  # found but would not open (busy, or gone again): a restart retries
                print(f"error: {e}", file=sys.stderr)
                return EXIT_DEVICE_LOST
    if loop.turns:
        console.print(_latency_table(loop.turns))
    return sup.exit_code


def _echo_cancel(args: argparse.Namespace, dev, source, sink):
    """(the source the loop reads, the duplex mode) after --aec: with AEC on the mic is cleaned of our own voice."""
    from .audio_devices import AudioDeviceError, find_device
    from .echo_cancel import AecConfig, wire_echo_canceller

    names = []
    for spec, kind in ((dev.input_device, "input"), (dev.output_device, "output")):
        try:  # the device's real name tells a headset; an absent device is reported when the loop opens it
            names.append(find_device(spec, kind, dev.backend).name)
        except AudioDeviceError:
            names.append(spec)
    source, duplex, decision = wire_echo_canceller(args.aec, source, sink, args.duplex, *names,
                                                   AecConfig(noise_suppression=args.noise_suppression))
    print(f"echo cancellation {'on' if decision.on else 'off'} ({decision.reason}); {duplex} duplex", file=sys.stderr)
    return source, duplex


def add_parsers(sub) -> None:
    d = sub.add_parser("demo", help="the embedded default: the whole voice loop on a shipped spoken WAV, tiny preset")
    d.add_argument("--preset", choices=["tiny-4b", "tiny-8b"], default="tiny-8b",
                   help="the cached tiny preset to run when no --bundle is given")
    d.add_argument("--bundle", type=Path, help="run this model bundle instead of a tiny preset")
    d.add_argument("--input", type=Path,
                   help="another recording to play into the loop (WAV/FLAC/...: any sample rate and channel count; "
                        "it is resampled to 16 kHz mono)")
    d.add_argument("--output", type=Path, default=Path("qinyu-demo-reply.wav"), help="where the reply audio goes")
    d.add_argument("--fast", action="store_true", help="run faster than real time (no pacing)")
    _loop_args(d)
    # A short reply keeps the real-time demo short; the model's own cap is 1024 steps.
    d.set_defaults(max_new_tokens=150)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("chat", help="the live voice assistant: microphone, VAD, turns, streaming playback, barge-in")
    c.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    c.add_argument("--backend", choices=["sounddevice", "pyaudio"], default="sounddevice")
    c.add_argument("--input-device", help="microphone: index or (part of a) name; default: the system's")
    c.add_argument("--output-device", help="speaker: index or (part of a) name; default: the system's")
    c.add_argument("--aec", choices=["on", "off", "auto"], default="auto",
                   help="acoustic echo cancellation (livekit's WebRTC AEC3); auto: on unless the devices are a "
                        "headset (a name with headset/headphone/earbud). With it on, --duplex full works on open speakers")
    c.add_argument("--noise-suppression", action="store_true", help="WebRTC noise suppression on the microphone")
    _loop_args(c)
    c.set_defaults(func=cmd_chat)
    # Last: every chat option added above is also a key of the --config file.
    add_config_option(c)
