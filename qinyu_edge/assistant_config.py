"""The assistant config file: `qinyu-edge chat --config assistant.toml` and `qinyu-edge config example`.

The keys are not a second list to keep in step with the chat flags: they are DERIVED from the chat
parser. Every option of `qinyu-edge chat` is a key spelled like its long flag without the dashes
(`--silence-ms` -> `silence-ms`), its value checked as argparse checks the flag (type, choices; a
switch takes true/false), so a flag added to the chat command later is a config key at once.

A flag given on the command line overrides the file. To tell "given" from "left at its default",
`add_config_option` replaces each option's default by a `_Default` marker before parsing; argparse
leaves markers in place for flags that were not given, and `resolve_chat_args` fills those from the
file, or else from the real default.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser, from PyPI
    import tomli as tomllib

CONFIG_DEST = "config"
_KEYS_DEST = "config_keys"
_REQUIRED_DEST = "config_required"


@dataclass(frozen=True)
class _Default:
    """A chat option's default, standing in until `resolve_chat_args` knows whether the file sets it."""

    value: Any


def config_key(action: argparse.Action) -> str | None:
    """`--silence-ms` -> `silence-ms`; None for options without a long flag (help) and --config itself."""
    longs = [o for o in action.option_strings if o.startswith("--")]
    if not longs or action.dest in (CONFIG_DEST, "help"):
        return None
    return longs[0][2:]


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Give `parser` a --config option whose file may set any of its other options.

    Call it after the last add_argument: the options added before it are the file's keys."""
    keys: dict[str, argparse.Action] = {}
    required: list[str] = []
    for action in parser._actions:
        key = config_key(action)
        if key is None:
            continue
        keys[key] = action
        action.default = _Default(action.default)
        if action.required:  # may come from the file instead; checked after the merge
            action.required = False
            required.append(key)
    parser.add_argument("--config", dest=CONFIG_DEST, type=Path, metavar="FILE.toml",
                        help="TOML file with any of these options, as `key = value` with the flag's name "
                             "(`qinyu-edge config example` prints one); flags given here override it")
    parser.set_defaults(**{_KEYS_DEST: keys, _REQUIRED_DEST: tuple(required)})


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def _scalar(path: Path, key: str, action: argparse.Action, value: Any) -> Any:
    t = action.type
    if isinstance(value, dict):
        raise ConfigError(f"{_where(path, key)}: a [table]; the file has no sections, every key is at the top level "
                          "before any [header]")
    if isinstance(value, list):
        raise ConfigError(f"{_where(path, key)} = {value!r}: give a single value, not a list")
    if isinstance(value, bool) and t is not bool:
        raise ConfigError(f"{_where(path, key)} = {value!r}: not a switch; give a value like the flag --{key} takes")
    if t is None or t is str:
        if not isinstance(value, (str, int)):
            raise ConfigError(f"{_where(path, key)} = {value!r}: give a string")
        out: Any = str(value)
    elif t is int:
        if not isinstance(value, int):
            raise ConfigError(f"{_where(path, key)} = {value!r}: give a whole number")
        out = value
    elif t is float:
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(path, key)} = {value!r}: give a number")
        out = float(value)
    elif isinstance(t, type) and issubclass(t, PurePath):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{_where(path, key)} = {value!r}: give a path as a string")
        p = Path(value).expanduser()
        # Relative to the file, not to wherever the service happens to start.
        out = p if p.is_absolute() else path.parent.resolve() / p
    else:  # the flag's own converter, on the text it would get from the command line
        try:
            out = t(value if isinstance(value, str) else str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{_where(path, key)} = {value!r}: {e}") from None
    if action.choices is not None and out not in action.choices:
        raise ConfigError(f"{_where(path, key)} = {value!r}: choose one of {', '.join(map(str, action.choices))}")
    return out


def _convert(path: Path, key: str, action: argparse.Action, value: Any, default: Any) -> Any:
    if action.nargs == 0:  # store_true / store_false / store_const: the key says whether the flag is given
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(path, key)} = {value!r}: a switch; give true or false")
        return action.const if value else default
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+") or isinstance(action.nargs, int)
    if many:
        if not isinstance(value, list):
            raise ConfigError(f"{_where(path, key)} = {value!r}: give a list, e.g. [{json.dumps('a')}, {json.dumps('b')}]")
        return [_scalar(path, key, action, v) for v in value]
    return _scalar(path, key, action, value)


def load_config(path: Path, keys: dict[str, argparse.Action]) -> dict[str, Any]:
    """The file's values by argparse dest, every key known and every value valid (else one ConfigError
    naming each bad key)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no config file {path}; write one with `qinyu-edge config example > {path}`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the config file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    problems, values = [], {}
    for key, value in raw.items():
        action = keys.get(key)
        if action is None:
            close = difflib.get_close_matches(key, keys, n=1) or difflib.get_close_matches(key.replace("_", "-"), keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{_where(path, key)}: unknown key{hint}; the keys are the `qinyu-edge chat` flags "
                            "without their dashes, at the top level: `qinyu-edge config example` lists them")
            continue
        default = action.default.value if isinstance(action.default, _Default) else action.default
        try:
            values[action.dest] = _convert(path, key, action, value, default)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("the config file has problems:\n  " + "\n  ".join(problems))
    return values


def _real_default(action: argparse.Action, marker: _Default) -> Any:
    value = marker.value
    if isinstance(value, str) and action.type is not None:  # what argparse does to a string default
        return action.type(value)
    return value


def resolve_chat_args(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the config file's values where no flag was given, else the defaults."""
    keys: dict[str, argparse.Action] = vars(args).pop(_KEYS_DEST)
    required: tuple[str, ...] = vars(args).pop(_REQUIRED_DEST)
    path = getattr(args, CONFIG_DEST)
    from_file = load_config(path, keys) if path is not None else {}
    for action in keys.values():
        current = getattr(args, action.dest, None)
        if isinstance(current, _Default):
            setattr(args, action.dest, from_file.get(action.dest, _real_default(action, current)))
    missing = [k for k in required if getattr(args, keys[k].dest) is None]
    if missing:
        raise ConfigError("missing " + ", ".join(f"--{k}" for k in missing) + ": give it as a flag or as "
                          + ", ".join(f"`{k} = ...`" for k in missing) + " in the --config file")
    return args


# --- the template ------------------------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string


def _placeholder(action: argparse.Action) -> str:
    if action.type in (int, float):
        return "0"
    return '"..."'


def example_config(parser: argparse.ArgumentParser) -> str:
    """A commented TOML template with every key of `parser` (a parser given `add_config_option`)."""
    keys: dict[str, argparse.Action] = parser.get_default(_KEYS_DEST)
    required = set(parser.get_default(_REQUIRED_DEST))
    formatter = parser._get_formatter()
    lines = [
        "# qinyu-edge assistant config: `qinyu-edge chat --config assistant.toml`, or run it as a service with",
        "# `qinyu-edge service install --config assistant.toml [--user]`.",
        "# Every key is a `qinyu-edge chat` flag without its dashes; a flag given on the command line overrides",
        "# the file. Relative paths are read from this file's folder. Uncomment what you change.",
    ]
    for key, action in keys.items():
        default = action.default.value if isinstance(action.default, _Default) else action.default
        help_text = formatter._expand_help(action) if action.help else ""
        if action.choices is not None:
            help_text += f" (one of: {', '.join(map(str, action.choices))})"
        if action.nargs == 0:
            help_text += " (true or false)"
        lines += ["", f"# {help_text.strip() or key}"]
        if key in required:
            lines.append(f"{key} = {_placeholder(action)}  # required")
        elif action.nargs == 0:
            lines.append(f"# {key} = false")
        elif default is None:
            lines.append(f"# {key} = {_placeholder(action)}  (not set by default)")
        else:
            lines.append(f"# {key} = {_toml_value(default)}")
    return "\n".join(lines) + "\n"


def chat_parser() -> argparse.ArgumentParser:
    from .cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["chat"]


def cmd_config_example(args: argparse.Namespace) -> int:
    sys.stdout.write(example_config(chat_parser()))
    return 0


def check_config_file(path: Path) -> dict[str, Any]:
    """The file's values by dest, valid and complete on their own (a service has no flags to add)."""
    parser = chat_parser()
    keys = parser.get_default(_KEYS_DEST)
    values = load_config(path, keys)
    missing = [k for k in parser.get_default(_REQUIRED_DEST) if keys[k].dest not in values]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(f'`{k} = ...`' for k in missing)}")
    return values


def cmd_config_check(args: argparse.Namespace) -> int:
    values = check_config_file(args.file)
    print(f"{args.file}: {len(values)} keys, all valid")
    return 0


def add_parsers(sub) -> None:
    c = sub.add_parser("config", help="the assistant config file (TOML) that `qinyu-edge chat --config` reads")
    csub = c.add_subparsers(dest="config_command", required=True)
    e = csub.add_parser("example", help="print a commented template with every key")
    e.set_defaults(func=cmd_config_example)
    k = csub.add_parser("check", help="check a config file: every key known, every value valid")
    k.add_argument("file", type=Path)
    k.set_defaults(func=cmd_config_check)
