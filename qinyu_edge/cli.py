"""The `qinyu-edge` command. Each subcommand imports what it needs, so the device-side commands
never import torch."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import QinyuError
from .failures import report
from .validate import COUNT, NON_NEGATIVE, check_max_context, real

log = logging.getLogger("qinyu_edge")


def cmd_export(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .device.telemetry import peak_line

    console = Console(stderr=True)
    t0 = time.perf_counter()
    rc = _cmd_export(args, console)
    console.print(peak_line("export", time.perf_counter() - t0))
    return rc


def _cmd_export(args: argparse.Namespace, console) -> int:
    from .export.qinyu_checkpoint import load_preset, load_qinyu
    from .staging import refuse_existing

    if args.out is not None:  # before minutes of loading or writing a checkpoint
        refuse_existing(args.out, args.force)

    if args.preset and args.max_context is not None:  # before minutes of building (a checkpoint's is checked on load)
        from .config import preset

        check_max_context(args.max_context, preset(args.preset).backbone.max_position_embeddings)
    if args.random_weights:
        from .export.random_checkpoint import random_folders

        with random_folders(args, console) as folders:
            if folders is None:
                return 0
            return _export(load_qinyu(folders["checkpoint"], folders["sensevoice"], folders["models"],
                                      name=args.random_weights, tiny=args.random_weights.startswith("tiny")), args, console)
    if args.out is None:
        raise QinyuError("give --out: the bundle folder to create")
    if args.preset:
        console.print(f"building preset [bold]{args.preset}[/bold] (random weights, seed {args.seed}) in the real checkpoint layout")
        # The model is passed, never bound here: `_export` drops it before quantizing.
        return _export(load_preset(args.preset, seed=args.seed), args, console)
    missing = [f for f in ("sensevoice", "xy") if getattr(args, f) is None]
    if missing:
        raise QinyuError(f"--checkpoint needs {' and '.join('--' + m for m in missing)} too "
                         "(the SenseVoiceSmall folder and the VITA-QinYu-Models folder).")
    return _export(load_qinyu(args.checkpoint, args.sensevoice, args.xy), args, console)


def _export(model, args: argparse.Namespace, console) -> int:
    import gc

    from .export.bundle_export import export_bundle
    from .fileio import remove_path

    out = args.out
    if args.dtype != "fp32":  # the fp32 bundle is the quantizer's input and reference, written beside --out
        out = out.with_name(f"{out.name}.fp32")
    bundle = export_bundle(model, out, force=args.force, max_context=args.max_context, console=console)
    console.print(f"bundle written to [bold]{bundle.root}[/bold]: {len(bundle.components)} components, "
                  f"worst parity rel error {bundle.parity['worst_rel']:.2e}")
    if args.dtype == "fp32":
        return 0
    from .engines.quant_cli import quantize_exported

    del model, bundle
    gc.collect()
    console.print(f"--dtype {args.dtype}: quantizing it with `--recipe {args.dtype}` into [bold]{args.out}[/bold]")
    try:
        rc = quantize_exported(out, args.out, args.dtype, args.force, console)
    except BaseException:
        console.print(f"the fp32 bundle stays at {out}: `qinyu-edge quantize --bundle {out} --out {args.out} "
                      f"--recipe {args.dtype}` finishes the job without exporting again")
        raise
    remove_path(out)
    return rc


def _load_voice(value: str | None):
    """A voice name in the bundle, or a 192-d vector file (.npy or .safetensors with one tensor)."""
    if value is None or not Path(value).suffix:
        return value
    import numpy as np

    path = Path(value)
    if not path.is_file():
        raise QinyuError(f"--voice {value}: no such file, and names have no extension")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as e:  # a pickled object array, or not an .npy at all
            raise QinyuError(f"--voice {path} is not a plain .npy array ({e}); save the vector with "
                             "numpy.save(path, vector), never as a pickled object") from e
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
        except SafetensorError as e:
            raise QinyuError(f"--voice {path} is not a readable .safetensors file ({e}); write it again") from e
        if len(tensors) != 1:
            raise QinyuError(f"{path} holds {len(tensors)} tensors ({', '.join(tensors)}); pass one voice name with --voice")
        return next(iter(tensors.values()))
    raise QinyuError(f"--voice {path}: use a .npy or .safetensors vector (convert .pt files with `qinyu-edge export`)")


def cmd_run(args: argparse.Namespace) -> int:
    import json

    from .fileio import atomic_write_text, check_writable
    from .runtime.audio_io import load_16k_mono, output_format, write_wav
    from .runtime.conversation import Conversation
    from .runtime.engine import Engine, EngineOptions
    from .runtime.sampling import SamplingConfig
    from .runtime.streaming import ChunkSchedule

    if args.input is None and not args.text:
        raise QinyuError("give --input WAV or --text TEXT")
    if args.mode == "tts" and args.input is not None:
        raise QinyuError("--mode tts speaks text: give --text TEXT instead of --input")
    if args.mode == "asr" and args.input is None:
        raise QinyuError("--mode asr transcribes speech: give --input WAV instead of --text")
    if args.mode == "roleplay" and not args.role:
        raise QinyuError("--mode roleplay needs --role \"a description of the character\"")
    if args.role is not None and args.mode not in ("conversation", "roleplay"):
        raise QinyuError(f"--role describes a character: use it with --mode roleplay, not --mode {args.mode}")
    check_writable(args.output, what="--output")
    output_format(args.output)
    check_writable(Path(args.json) if args.json else Path(args.output).with_suffix(".json"), what="--json")
    try:
        schedule = ChunkSchedule.parse(args.schedule)
        sampling = (SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed) if args.sample else None)
    except ValueError as e:
        raise QinyuError(str(e)) from e
    wav = load_16k_mono(args.input) if args.input is not None else None
    engine = Engine(args.bundle, EngineOptions(backend="trt" if args.engines else "ort", provider=args.provider,
                                               threads=args.threads, context=args.context,
                                               engines=str(args.engines) if args.engines else None,
                                               ort_variants=not args.portable))
    conv = Conversation(engine, mode=args.mode, voice=_load_voice(args.voice), role_description=args.role,
                        max_new_tokens=args.max_new_tokens, sampling=sampling, schedule=schedule)
    reply = conv.ask(wav, args.text or "", user_speaker=not args.no_user_speaker)
    out = Path(args.output)
    write_wav(out, reply.audio, 32000)
    t = reply.timings
    report = {
        "text": reply.text, "stop": reply.stop, "tokens": reply.tokens, "text_tokens": reply.text_tokens,
        "audio_frames": int(reply.frames.shape[0]), "audio_seconds": t.audio_seconds,
        "prompt_length": len(reply.prompt), "dropped_turns": reply.prompt.dropped_turns,
        "timings": {
            "frontend_ms": t.frontend_ms, "encoder_ms": t.encoder_ms, "speaker_ms": t.speaker_ms,
            "prompt_ms": t.prompt_ms, "prefill_ms": t.prefill_ms, "steps": t.steps, "ms_per_step": t.ms_per_step,
            "host_ms_per_step": t.host_ms_per_step, "steps_to_first_audio": t.steps_to_first_audio,
            "time_to_first_audio_ms": t.first_audio_ms, "total_ms": t.total_ms, "real_time_factor": t.rtf,
        },
        "definitions": {
            "time_to_first_audio_ms": "from the start of the turn (end of user speech) until the first 32 kHz "
                                      "audio chunk was decoded",
            "real_time_factor": "wall time of the whole turn divided by the seconds of speech produced; "
                                "below 1 is faster than real time",
        },
        "schedule": list(schedule.sizes), "bundle": str(engine.root), "preset": engine.config.name,
    }
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    atomic_write_text(json_path, json.dumps(report, indent=2, ensure_ascii=False))
    print(f"reply text: {reply.text!r}")
    print(f"{t.audio_seconds:.2f} s of speech in {out}; {t.steps} steps, {t.ms_per_step:.2f} ms/step, "
          f"first audio after {t.steps_to_first_audio} steps ({t.first_audio_ms or 0:.0f} ms); details in {json_path}")
    return 0


class UsageError(QinyuError):
    """A command line argparse refuses (unknown flag, a value out of range)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its refusals on the one error path: `error: <what>` and exit 2, like every other
    bad input (argparse alone prints the usage block first). Subcommand parsers inherit the class."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qinyu-edge", description="VITA-QinYu on edge GPUs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="checkpoint folders or a tiny preset -> model bundle (ONNX + bundle.json) with a parity report")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=["tiny-4b", "tiny-8b"], help="a tiny preset with random weights")
    src.add_argument("--checkpoint", type=Path, help="VITA-QinYu-8B or -4B model folder")
    src.add_argument("--random-weights", choices=["qinyu-4b", "qinyu-8b", "tiny-4b", "tiny-8b"],
                     help="write random weights in the real checkpoint layout, tensor by tensor, then export them "
                          "(checks a machine's memory and disk before downloading the real weights)")
    e.add_argument("--checkpoint-only", type=Path, metavar="DIR",
                   help="with --random-weights: write the checkpoint, sensevoice and models folders under DIR and stop")
    e.add_argument("--layers", type=COUNT, help="with --random-weights: fewer decoder layers, same widths")
    e.add_argument("--sensevoice", type=Path, help="SenseVoiceSmall folder (model.pt, config.yaml, am.mvn)")
    e.add_argument("--xy", type=Path, help="VITA-QinYu-Models folder (xy_tokenizer.ckpt + yaml, campplus_cn_common.bin, spk2embeds_roleplay.pt)")
    e.add_argument("--out", type=Path, help="bundle folder to create")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of a preset's random weights")
    e.add_argument("--max-context", type=COUNT, default=None, help="longest context the shape ranges allow")
    e.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="fp32: the reference bundle (CPU checks, the input of `quantize`); fp16: the bundle a GPU "
                        "runs, made by exporting fp32 to OUT.fp32, quantizing that with `--recipe fp16` (with its "
                        "accuracy report) and removing it, so the disk must hold both")
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("run", help="one turn from a WAV (or text) to a reply WAV and a JSON with text, tokens, timings")
    r.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help="the user's speech (any rate, any channels)")
    src.add_argument("--text", help="a text question (or the text to speak with --mode tts)")
    r.add_argument("--output", type=Path, required=True, help="reply audio, 32 kHz (.wav; .flac, .ogg, .mp3 by suffix)")
    r.add_argument("--json", type=Path, help="where to write the report (default: OUTPUT with .json)")
    r.add_argument("--mode", choices=["conversation", "roleplay", "asr", "tts"], default="conversation")
    r.add_argument("--voice", help="agent voice: a name in the bundle (default tian) or a 192-d .npy/.safetensors file")
    r.add_argument("--role", help="role description for --mode roleplay")
    r.add_argument("--no-user-speaker", action="store_true", help="do not add the user's CAM++ embedding")
    r.add_argument("--max-new-tokens", type=COUNT, default=None, help="step cap (default 1024, as upstream)")
    r.add_argument("--schedule", default="official", help="audio chunk schedule: official, low_latency or sizes like 8,16,32")
    r.add_argument("--sample", action="store_true", help="sample instead of the official greedy decoding")
    r.add_argument("--temperature", type=real(0, low_open=True), default=0.8)
    r.add_argument("--top-k", type=COUNT, default=20)
    r.add_argument("--top-p", type=real(0, 1, low_open=True), default=0.95)
    r.add_argument("--seed", type=NON_NEGATIVE, default=0)
    r.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu", help="ONNX Runtime provider")
    r.add_argument("--engines", type=Path, help="run the TensorRT plans of this engine set (from `qinyu-edge build`)")
    r.add_argument("--portable", action="store_true",
                   help="run the portable graphs even where the bundle has a faster ONNX Runtime CPU variant")
    r.add_argument("--threads", type=COUNT, default=None)
    r.add_argument("--context", type=COUNT, default=None, help="KV cache positions (default: the bundle's maximum)")
    r.set_defaults(func=cmd_run)

    # Each area adds its own subcommands; those modules import nothing heavy until a command runs.
    from .device import bench_cli, cli as device_cli
    from .engines import cli as engines_cli, cli_doctor, quant_cli
    from .runtime import voice_cli
    from . import assistant_config, service, voices_cli

    for module in (voice_cli, device_cli, bench_cli, cli_doctor, engines_cli, quant_cli, assistant_config, service, voices_cli):
        module.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return report(e, verbose=False)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (QinyuError, OSError, MemoryError) as e:
        status = report(e, args.verbose)
        if status is None:
            raise
        return status
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
