"""`qinyu-edge service`: the unit it writes passes `systemd-analyze verify` (system and user units), a bad
config is refused before anything is written, and `status` reads systemd's answer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qinyu_edge.cli import main
from qinyu_edge.service import UnitSpec, describe_status, parse_show, unit_text


def _verify(unit: Path, user: bool, tmp_path: Path) -> subprocess.CompletedProcess:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (`apt-get install systemd`)")
    runtime = tmp_path / "runtime"  # a user manager needs a runtime dir even to verify
    runtime.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(["systemd-analyze", *(["--user"] if user else []), "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})


@pytest.fixture
def config(tmp_path):
    (tmp_path / "bundle").mkdir()
    path = tmp_path / "assistant.toml"
    path.write_text('bundle = "bundle"\nduplex = "full"\nlog = "turns.jsonl"\n')
    return path


@pytest.mark.parametrize("user", [False, True])
def test_installed_unit_verifies(tmp_path, config, capsys, user):
    units = tmp_path / "units"
    assert main(["service", "install", "--config", str(config), "--unit-dir", str(units), *(["--user"] if user else [])]) == 0
    unit = units / "qinyu-edge.service"
    text = unit.read_text()
    assert "Type=notify" in text and "WatchdogSec=30" in text and "Restart=on-failure" in text
    assert "RestartPreventExitStatus=2 78" in text
    assert f"chat --config {config.resolve()}" in text
    # The venv's own qinyu-edge: this interpreter's bin folder.
    assert text.split("ExecStart=")[1].split()[0] == str(Path(os.path.abspath(sys.executable)).parent / "qinyu-edge")
    assert ("After=pipewire-pulse.service pulseaudio.service" in text) == user
    assert ("After=sound.target" in text) != user
    r = _verify(unit, user, tmp_path)
    # verify exits 0 even on directives it ignores: anything it says is a finding.
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr + r.stdout
    assert main(["service", "uninstall", "--unit-dir", str(units), *(["--user"] if user else [])]) == 0
    assert not unit.exists()


def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a unit systemd would only half read is reported."""
    spec = UnitSpec(("/bin/true", "chat", "--config", "/etc/a b/x%.toml"), Path("/etc/a b/x%.toml"), False, "nobody")
    text = unit_text(spec)
    assert 'ExecStart=/bin/true chat --config "/etc/a b/x%%.toml"' in text  # quoting and % escaped
    unit = tmp_path / "qinyu-edge.service"
    unit.write_text(text.replace("Type=notify", "Type=notifyy"))
    r = _verify(unit, False, tmp_path)
    assert "Failed to parse service type" in r.stderr


def test_install_refuses_a_bad_config_and_writes_nothing(tmp_path, config, capsys):
    config.write_text(config.read_text() + 'silense-ms = 400\n')
    units = tmp_path / "units"
    assert main(["service", "install", "--config", str(config), "--unit-dir", str(units)]) == 2
    assert "silense-ms: unknown key (did you mean 'silence-ms'?)" in capsys.readouterr().err
    config.write_text('bundle = "elsewhere"\n')
    assert main(["service", "install", "--config", str(config), "--unit-dir", str(units)]) == 2
    assert "bundle = " in capsys.readouterr().err
    assert not units.exists()
    assert main(["service", "uninstall", "--unit-dir", str(units)]) == 2
    assert "no qinyu-edge service is installed" in capsys.readouterr().err


def test_status_lines_from_systemd():
    props = parse_show("LoadState=loaded\nActiveState=active\nSubState=running\nMainPID=812\nNRestarts=2\n"
                       "StatusText=waiting for audio devices (try 3, next in 4 s): no audio input device\n"
                       "ExecMainStatus=0\nUnitFileState=enabled\nFragmentPath=/etc/systemd/system/qinyu-edge.service\n")
    text, code = describe_status("qinyu-edge", props, user=False)
    assert code == 0 and "active (running)" in text and "pid 812, restarted 2 times" in text
    assert "assistant: waiting for audio devices (try 3" in text
    failed = {**props, "ActiveState": "failed", "SubState": "failed", "MainPID": "0", "ExecMainStatus": "78", "StatusText": ""}
    text, code = describe_status("qinyu-edge", failed, user=True)
    assert code == 3 and "last exit status 78: the engine set does not fit" in text
    assert "journalctl --user -u qinyu-edge" in text
    assert describe_status("qinyu-edge", {"LoadState": "not-found"}, user=False)[1] == 3
