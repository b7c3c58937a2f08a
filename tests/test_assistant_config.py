"""The assistant config file: its keys are the chat flags (derived, so later flags map too), bad keys and
values are refused by name, the command line wins over the file, and the template is valid."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from qinyu_edge.assistant_config import (
    add_config_option, chat_parser, config_key, example_config, load_config, resolve_chat_args,
)
from qinyu_edge.cli import build_parser, main
from qinyu_edge.errors import ConfigError


def _chat_args(argv: list[str]) -> argparse.Namespace:
    return resolve_chat_args(build_parser().parse_args(["chat", *argv]))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "assistant.toml"
    path.write_text(text)
    return path


def test_every_chat_flag_is_a_key():
    parser = chat_parser()
    flags = {o[2:] for a in parser._actions for o in a.option_strings if o.startswith("--") and o not in ("--help", "--config")}
    keys = set(parser.get_default("config_keys"))
    assert keys == flags and {"bundle", "engines", "input-device", "duplex", "silence-ms", "log", "voice", "role"} <= keys
    # add_config_option ran after the last flag: no option kept a default the file could not replace.
    assert all(type(a.default).__name__ == "_Default" for a in parser._actions if config_key(a))


def test_file_values_typed_and_flags_override_them(tmp_path):
    cfg = _write(tmp_path, 'bundle = "models/b"\nduplex = "full"\nsilence-ms = 500\nturn = "silence"\n'
                           'input-device = 3\nlog = "/var/log/turns.jsonl"\n')
    args = _chat_args(["--config", str(cfg), "--duplex", "half"])
    assert args.duplex == "half"  # the flag wins
    assert args.silence_ms == 500 and args.turn == "silence" and args.input_device == "3"
    assert args.bundle == tmp_path.resolve() / "models/b"  # relative to the file
    assert args.log == Path("/var/log/turns.jsonl")
    assert args.barge_in_ms == 300 and args.voice is None  # untouched defaults
    # Without a file, the defaults are the parser's own.
    plain = _chat_args(["--bundle", "b"])
    assert plain.duplex == "half" and plain.bundle == Path("b") and plain.silence_ms == 800


def test_bundle_is_required_from_flag_or_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing --bundle: give it as a flag or as `bundle = \.\.\.`"):
        _chat_args(["--config", str(_write(tmp_path, 'duplex = "full"\n'))])


@pytest.mark.parametrize("text,needle", [
    ('silense-ms = 500', "silense-ms: unknown key (did you mean 'silence-ms'?)"),
    ('barge_in_ms = 200', "barge_in_ms: unknown key (did you mean 'barge-in-ms'?)"),
    ('[turn]\nsilence-ms = 1', "turn: a [table]; the file has no sections"),
    ('duplex = "quarter"', "duplex = 'quarter': choose one of half, full"),
    ('silence-ms = "long"', "silence-ms = 'long': give a whole number"),
    ('silence-ms = true', "silence-ms = True: not a switch"),
    ('engines = 5', "engines = 5: give a path as a string"),
    ('duplex = ["full"]', "duplex = ['full']: give a single value"),
    ('duplex = ', "is not valid TOML"),
])
def test_bad_keys_and_values_are_named(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        _chat_args(["--config", str(_write(tmp_path, 'bundle = "b"\n' + text + "\n"))])
    assert needle in str(e.value)


def test_all_problems_at_once_and_through_the_cli(tmp_path, capsys):
    cfg = _write(tmp_path, 'bundle = "b"\nvoise = "tian"\nvad = "loud"\n')
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "voise: unknown key (did you mean 'voice'?)" in err and "vad = 'loud': choose one of default, official_web" in err
    assert main(["chat", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "qinyu-edge config example >" in capsys.readouterr().err


def test_a_flag_added_later_is_a_key_with_its_checks(tmp_path):
    """What another chat flag (a switch, a float, a custom type, a list) gets without any change here."""
    def ms(text: str) -> int:
        if not text.endswith("ms"):
            raise argparse.ArgumentTypeError(f"{text!r} needs a unit, like 300ms")
        return int(text[:-2])

    p = argparse.ArgumentParser()
    p.add_argument("--aec", action="store_true")
    p.add_argument("--gain", type=float, default=1.0)
    p.add_argument("--hold", type=ms, default="200ms")
    p.add_argument("--stop-words", nargs="+", default=[])
    add_config_option(p)
    keys = p.get_default("config_keys")
    cfg = _write(tmp_path, 'aec = true\ngain = 2\nhold = "450ms"\nstop-words = ["bye", "stop"]\n')
    args = resolve_chat_args(p.parse_args(["--config", str(cfg)]))
    assert (args.aec, args.gain, args.hold, args.stop_words) == (True, 2.0, 450, ["bye", "stop"])
    assert resolve_chat_args(p.parse_args([])).hold == 200  # a string default still goes through its type
    with pytest.raises(ConfigError, match=r"hold = '450': '450' needs a unit, like 300ms"):
        load_config(_write(tmp_path, 'hold = "450"\n'), keys)
    with pytest.raises(ConfigError, match=r"aec = 'yes': a switch; give true or false"):
        load_config(_write(tmp_path, 'aec = "yes"\n'), keys)
    with pytest.raises(ConfigError, match=r"stop-words = 'bye': give a list"):
        load_config(_write(tmp_path, 'stop-words = "bye"\n'), keys)


def test_example_is_valid_and_lists_every_key(tmp_path, capsys):
    assert main(["config", "example"]) == 0
    text = capsys.readouterr().out
    assert tomllib.loads(text) == {"bundle": "..."}  # only the required key is live
    for key in chat_parser().get_default("config_keys"):
        assert f"{key} = " in text, key
    # Uncommenting a line gives a valid file.
    live = text.replace("# duplex = ", "duplex = ").replace("# silence-ms = ", "silence-ms = ")
    cfg = _write(tmp_path, live)
    args = _chat_args(["--config", str(cfg)])
    assert args.duplex == "half" and args.silence_ms == 800
    assert example_config(chat_parser()) == text
