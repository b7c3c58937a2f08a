"""`qinyu-edge voice design | list | add | remove`: the agent voices of a bundle.

`design` runs VoiceDesign in PyTorch (workstation); `list`, `add` and `remove` need no torch, so they
run on the device too (`add` computes the clip's CAM++ vector with the bundle's campplus graph).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import numpy as np

from .errors import ConfigError, QinyuError
from .role_text import check_role
from .voices import SPEAKERS_FILE, Voice, VoiceStore

log = logging.getLogger(__name__)

MIN_CLIP_SECONDS = 1.0  # CAM++ tiles short clips to 10 s; under a second it mostly repeats one syllable
SILENCE_RMS = 1e-3  # about -60 dBFS: nothing a microphone picked up on purpose


class ClipError(QinyuError):
    """A reference clip that cannot give a voice."""


def _print_added(store: VoiceStore, voice: Voice) -> None:
    print(f"voice {voice.name!r} ({voice.describe()}) written to {store.root / SPEAKERS_FILE}")
    near = store.nearest_shipped(voice.vector)
    if near:
        print("nearest shipped voices by cosine: " + ", ".join(f"{n} {c:+.3f}" for n, c in near))


def _designer(args: argparse.Namespace, store: VoiceStore):
    """The PyTorch designer from --voicedesign, or the tiny preset for a tiny bundle; and where it came from."""
    from .export.voice_design import load_voice_designer, tiny_voice_designer

    if args.voicedesign is not None:
        return load_voice_designer(args.voicedesign, args.text_encoder), str(args.voicedesign)
    if store.bundle.config.tiny:
        print(f"{store.bundle.config.name} is a tiny preset: using the tiny VoiceDesign preset")
        return tiny_voice_designer(), "tiny preset (random weights)"
    raise ConfigError("this bundle is a real model: pass --voicedesign DIR (VITA-QinYu-Models/voicedesign, "
                      "holding voicedesign.pt) and --text-encoder DIR (the Qwen3-Embedding-0.6B folder)")


def cmd_export(args: argparse.Namespace) -> int:
    """Put VoiceDesign's ONNX graphs into the bundle, so the device designs voices without torch."""
    import shutil
    import tempfile

    from .export.bundle_export import PARITY_TOLERANCE
    from .export.voice_design_onnx import export_voice_design
    from .runtime.voice_designer import DESIGNER_FILES

    store = VoiceStore(args.bundle)
    designer, source = _designer(args, store)
    tmp = Path(tempfile.mkdtemp(dir=store.root, prefix=".voice-graphs."))
    try:
        graphs = export_voice_design(designer, tmp)
        worst = max(graphs.parity.values())
        if worst > PARITY_TOLERANCE:
            raise QinyuError(f"VoiceDesign ONNX parity {graphs.parity} exceeds {PARITY_TOLERANCE:g}; nothing was "
                             "added to the bundle. This is a bug in the export: please report it.")
        store.add_files(tmp, DESIGNER_FILES)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, rel in graphs.parity.items():
        print(f"{name}: parity rel {rel:.1e} against PyTorch")
    print(f"VoiceDesign graphs from {source} added to {store.root}: `qinyu-edge chat --role ...` without --voice "
          "now designs the agent's voice at start")
    return 0


def cmd_design(args: argparse.Namespace) -> int:
    role = check_role(args.role)
    store = VoiceStore(args.bundle)
    store.check_new_name(args.name, args.force)  # before minutes of loading weights
    designer, source = _designer(args, store)
    vector = designer.design(role, args.seed)
    voice = store.add(args.name, vector, {"source": "text", "role": role, "seed": args.seed, "designer": source},
                      force=args.force)
    _print_added(store, voice)
    return 0


def clip_vector(store: VoiceStore, path: Path) -> tuple[np.ndarray, float]:
    """The clip's CAM++ vector through the bundle's campplus graph, and its length in seconds."""
    from .runtime.audio_io import load_16k_mono
    from .runtime.engine import campplus_vector
    from .runtime.session import open_session

    wav = load_16k_mono(path)
    seconds = wav.shape[0] / 16000
    if seconds < MIN_CLIP_SECONDS:
        raise ClipError(f"{path} is {seconds:.2f} s long; record at least {MIN_CLIP_SECONDS:.0f} s of the voice "
                        "(3-10 s of clear speech works best)")
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))
    if rms < SILENCE_RMS:
        raise ClipError(f"{path} is silent (RMS {rms:.1e}); record the voice closer to the microphone")
    bundle = store.bundle
    spec = bundle.components["campplus"]
    session = open_session(bundle.root / spec.file, disabled_optimizers=spec.ort_disabled_optimizers)
    return campplus_vector(session, bundle.config.campplus, wav), seconds


def cmd_add(args: argparse.Namespace) -> int:
    store = VoiceStore(args.bundle)
    store.check_new_name(args.name, args.force)
    vector, seconds = clip_vector(store, args.from_wav)
    sha = hashlib.sha256(args.from_wav.read_bytes()).hexdigest()
    voice = store.add(args.name, vector, {"source": "clip", "clip": args.from_wav.name, "seconds": round(seconds, 2),
                                          "sha256": sha}, force=args.force)
    _print_added(store, voice)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    voices = VoiceStore(args.bundle).voices()
    if not voices:
        print(f"{args.bundle} has no agent voices; add one with `qinyu-edge voice design` or `voice add`")
    from rich.cells import cell_len  # Chinese names are two cells wide per character

    width = max((cell_len(n) for n in voices), default=0)
    for voice in voices.values():
        print(voice.name + " " * (width - cell_len(voice.name) + 2) + voice.describe())
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    voice = VoiceStore(args.bundle).remove(args.name)
    print(f"removed voice {voice.name!r} ({voice.describe()})")
    return 0


def _designer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--voicedesign", type=Path, help="folder with voicedesign.pt (default on a tiny bundle: the tiny preset)")
    p.add_argument("--text-encoder", type=Path, help="Qwen3-Embedding-0.6B folder (default: VOICEDESIGN/Qwen3-Embedding-0.6B)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("voice", help="the agent voices of a bundle: design from text, add from a clip, list, remove")
    vsub = v.add_subparsers(dest="voice_command", required=True)

    d = vsub.add_parser("design", help="a new agent voice from a role description (VoiceDesign, PyTorch)")
    d.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    d.add_argument("--role", required=True, help="the character, e.g. 该角色是一个中年男性，身份是小吃店老板，温和爽朗")
    d.add_argument("--name", required=True, help="the new voice's name")
    d.add_argument("--seed", type=int, default=0, help="the sampler's noise; same text and seed give the same voice")
    d.add_argument("--force", action="store_true", help="replace a designed or added voice of that name")
    _designer_args(d)
    d.set_defaults(func=cmd_design)

    x = vsub.add_parser("export", help="add VoiceDesign's ONNX graphs to a bundle (torch-free designs on the device)")
    x.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    _designer_args(x)
    x.set_defaults(func=cmd_export)

    a = vsub.add_parser("add", help="a new agent voice from a reference clip (its CAM++ embedding)")
    a.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    a.add_argument("--from-wav", type=Path, required=True, help="a few seconds of the voice (any rate, any channels)")
    a.add_argument("--name", required=True, help="the new voice's name")
    a.add_argument("--force", action="store_true", help="replace a designed or added voice of that name")
    a.set_defaults(func=cmd_add)

    ls = vsub.add_parser("list", help="every voice and where it came from")
    ls.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    ls.set_defaults(func=cmd_list)

    r = vsub.add_parser("remove", help="remove a designed or added voice")
    r.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    r.add_argument("name", help="the voice to remove")
    r.set_defaults(func=cmd_remove)
