"""scripts/lib.sh's virtual environment: made from the interpreter given, reused when it works, made
again when it is broken or lacks the system site-packages a Jetson needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _make_venv(cwd: Path, python: str, *flags: str) -> subprocess.CompletedProcess:
    script = f'set -euo pipefail; source {ROOT / "scripts/lib.sh"}; make_venv {python} {" ".join(flags)}; ' \
             '"$VENV_PY" -c "import sys; print(sys.prefix)"'
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_venv_made_reused_and_remade(tmp_path):
    python = shutil.which("python3", path="/usr/bin") or sys.executable
    r = _make_venv(tmp_path, python)
    assert r.returncode == 0, r.stderr
    assert "creating the virtual environment" in r.stdout and r.stdout.strip().endswith(str(tmp_path / ".venv"))
    cfg = (tmp_path / ".venv/pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    again = _make_venv(tmp_path, python)
    assert again.returncode == 0 and "creating" not in again.stdout  # reused
    # A venv left without pip (an interrupted run) is made again, not reused.
    shutil.rmtree(next((tmp_path / ".venv/lib").glob("python3*/site-packages/pip")))
    broken = _make_venv(tmp_path, python)
    assert broken.returncode == 0 and "creating" in broken.stdout, broken.stderr
    jetson = _make_venv(tmp_path, python, "--system-site-packages")
    assert "recreating" in jetson.stdout and "include-system-site-packages = true" in (tmp_path / ".venv/pyvenv.cfg").read_text()


def test_missing_interpreter_is_named(tmp_path):
    r = _make_venv(tmp_path, "/nonexistent/python3.99")
    assert r.returncode == 2 and "/nonexistent/python3.99 not found" in r.stderr
    assert not (tmp_path / ".venv").exists()
