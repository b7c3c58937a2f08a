"""`qinyu-edge service install|uninstall|status [--user]`: the assistant as a systemd unit.

The unit runs `qinyu-edge chat --config FILE` from the environment this command runs in (the venv
that scripts/setup.sh or setup-jetson.sh made), as `Type=notify`: the assistant says READY=1 when it
is up and pings the watchdog from its voice loop (runtime/supervised.py). It restarts on failure,
except on the exit codes a restart cannot fix (a bad config or a busy device: 2; an engine set
that does not fit: EXIT_ENGINES).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, QinyuError
from .fileio import atomic_write_text

DEFAULT_NAME = "qinyu-edge"
WATCHDOG_S = 30
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
# What `status` reads from systemd.
STATUS_PROPERTIES = ("LoadState", "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts", "ExecMainStatus",
                     "Result", "UnitFileState", "FragmentPath")


class ServiceError(QinyuError):
    """The unit cannot be installed, removed or read."""


@dataclass(frozen=True)
class UnitSpec:
    command: tuple[str, ...]  # ExecStart, argv
    config: Path
    user_unit: bool  # a user unit (the login's sound server) rather than a system one
    run_as: str | None = None  # system unit: the account it runs as (None: root)


def user_unit_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def _systemd_word(arg: str) -> str:
    """One ExecStart argument: `%` is a specifier to systemd, whitespace and quotes need quoting."""
    arg = arg.replace("%", "%%")
    if not arg or any(c in arg for c in " \t\"'\\;"):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def assistant_command(config: Path) -> tuple[str, ...]:
    """The venv's own qinyu-edge (this interpreter's bin folder), else this interpreter with -m."""
    # Not resolved: a venv's python is a symlink to the base interpreter, which has no qinyu-edge.
    bindir = Path(os.path.abspath(sys.executable)).parent
    script = bindir / "qinyu-edge"
    head = (str(script),) if script.is_file() else (os.path.abspath(sys.executable), "-m", "qinyu_edge.cli")
    return (*head, "chat", "--config", str(config))


def unit_text(spec: UnitSpec) -> str:
    # A user unit follows the login's sound server; a system unit, the sound cards (ALSA directly).
    after = "pipewire-pulse.service pulseaudio.service" if spec.user_unit else "sound.target"
    lines = [
        "[Unit]",
        f"Description=qinyu-edge voice assistant ({spec.config})",
        f"After={after}",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={' '.join(_systemd_word(a) for a in spec.command)}",
        f"WorkingDirectory={_systemd_word(str(spec.config.parent))}",
        # Plain lines reach the journal at once.
        "Environment=PYTHONUNBUFFERED=1",
        "Restart=on-failure",
        "RestartSec=5",
        "# 2: a bad config or another assistant on these devices; 78: the engine set does not fit the bundle or",
        "# this machine (the journal names the `qinyu-edge build` command). A restart fixes neither.",
        "RestartPreventExitStatus=2 78",
        f"WatchdogSec={WATCHDOG_S}",
        # Deserializing a real model's TensorRT plans takes a while on a Jetson.
        "TimeoutStartSec=300",
        # SIGTERM cuts the reply in flight; the loop then ends within a device block or a decode step.
        "TimeoutStopSec=30",
    ]
    if not spec.user_unit:
        if spec.run_as:
            lines.append(f"User={spec.run_as}")
        lines.append("SupplementaryGroups=audio")
    lines += ["", "[Install]", f"WantedBy={'default.target' if spec.user_unit else 'multi-user.target'}", ""]
    return "\n".join(lines)


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def _systemctl(user: bool, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["systemctl", *(["--user"] if user else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and r.returncode:
        raise ServiceError(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()}")
    return r


def parse_show(text: str) -> dict[str, str]:
    """`systemctl show -p A,B` output (`A=value` lines) as a dict."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def describe_status(name: str, props: dict[str, str], user: bool) -> tuple[str, int]:
    """The status lines and an exit code (0 running, 3 not: as `systemctl status`)."""
    journal = f"journalctl {'--user ' if user else ''}-u {name} -n 50"
    if props.get("LoadState") == "not-found":
        return (f"{name}: not installed (`qinyu-edge service install --config FILE{' --user' if user else ''}`)", 3)
    state = f"{props.get('ActiveState', '?')} ({props.get('SubState', '?')})"
    lines = [f"{name}: {state}, enabled: {props.get('UnitFileState', '?')}, unit: {props.get('FragmentPath', '?')}"]
    if props.get("MainPID", "0") != "0":
        lines.append(f"  pid {props['MainPID']}, restarted {props.get('NRestarts', '0')} times")
    if props.get("StatusText"):
        lines.append(f"  assistant: {props['StatusText']}")
    code = props.get("ExecMainStatus", "0")
    if props.get("ActiveState") != "active" and code not in ("", "0"):
        why = {"2": "a bad config, or another assistant holds the audio devices",
               "75": "an audio device was lost or would not open; systemd restarts it, and it waits for the device",
               "78": "the engine set does not fit the bundle or this GPU; the journal names the `qinyu-edge build` "
                     "command"}.get(code, "it failed")
        lines.append(f"  last exit status {code}: {why}")
    lines.append(f"  log: {journal}")
    return "\n".join(lines), 0 if props.get("ActiveState") == "active" else 3


def _unit_path(args: argparse.Namespace) -> Path:
    directory = args.unit_dir or (user_unit_dir() if args.user else SYSTEM_UNIT_DIR)
    return Path(directory) / f"{args.name}.service"


def _needs_root(args: argparse.Namespace, verb: str) -> None:
    if not args.user and args.unit_dir is None and os.geteuid() != 0:
        raise ServiceError(f"a system service is {verb} as root: `sudo {sys.argv[0]} service {verb} ...`, or add "
                           "--user for a service of your login (it uses your sound server)")


def cmd_install(args: argparse.Namespace) -> int:
    from .assistant_config import check_config_file

    config = args.config.resolve()
    values = check_config_file(config)
    bundle = Path(values["bundle"])
    if not bundle.is_dir():
        raise ConfigError(f"{config}: bundle = {bundle}: no such folder; copy the bundle there or fix the key")
    _needs_root(args, "installed")
    spec = UnitSpec(assistant_command(config), config, args.user,
                    None if args.user else os.environ.get("SUDO_USER") or None)
    path = _unit_path(args)
    atomic_write_text(path, unit_text(spec))
    print(f"wrote {path}")
    name, user_flag = f"{args.name}.service", "--user " if args.user else ""
    if args.unit_dir is not None or not systemd_running():
        print(f"systemd was not asked to start it{'' if systemd_running() else ' (it is not running here)'}: "
              f"`systemctl {user_flag}daemon-reload && systemctl {user_flag}enable --now {name}`")
        return 0
    _systemctl(args.user, "daemon-reload")
    _systemctl(args.user, "enable", "--now", name)
    print(f"enabled and started {name}; `qinyu-edge service status{' --user' if args.user else ''}` shows its state, "
          f"`journalctl {user_flag}-u {args.name} -f` its log")
    if args.user:
        print(f"to start it at boot without logging in: `sudo loginctl enable-linger {os.environ.get('USER', '$USER')}`")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    path = _unit_path(args)
    if not path.is_file():
        raise ServiceError(f"no {args.name} service is installed ({path} does not exist)")
    _needs_root(args, "uninstalled")
    managed = args.unit_dir is None and systemd_running()
    if managed:
        _systemctl(args.user, "disable", "--now", f"{args.name}.service")
    path.unlink()
    if managed:
        _systemctl(args.user, "daemon-reload")
    print(f"removed {path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if not systemd_running():
        raise ServiceError("systemd is not running on this machine, so there is no service to ask; "
                           "run the assistant with `qinyu-edge chat --config FILE`")
    r = _systemctl(args.user, "show", f"{args.name}.service", "-p", ",".join(STATUS_PROPERTIES), check=False)
    text, code = describe_status(args.name, parse_show(r.stdout), args.user)
    print(text)
    return code


def add_parsers(sub) -> None:
    s = sub.add_parser("service", help="run the assistant as a systemd service: install, uninstall, status")
    ssub = s.add_subparsers(dest="service_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--user", action="store_true",
                       help="a service of your login (systemctl --user; uses your sound server) instead of a system one")
        p.add_argument("--name", default=DEFAULT_NAME, help="unit name, for more than one assistant")
        p.add_argument("--unit-dir", type=Path, default=None,
                       help="write the unit here and leave systemctl alone (default: /etc/systemd/system, or "
                            "~/.config/systemd/user with --user)")

    i = ssub.add_parser("install", help="write the unit for `qinyu-edge chat --config FILE`, enable and start it")
    i.add_argument("--config", type=Path, required=True, help="the assistant config (`qinyu-edge config example`)")
    common(i)
    i.set_defaults(func=cmd_install)
    u = ssub.add_parser("uninstall", help="stop and disable the service and remove its unit")
    common(u)
    u.set_defaults(func=cmd_uninstall)
    st = ssub.add_parser("status", help="the service's state and the assistant's own status line")
    common(st)
    st.set_defaults(func=cmd_status)
