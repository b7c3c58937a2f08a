"""Output folders: one writer per --out, leftovers of killed runs removed on the next run, umask modes."""

import logging
import os
import subprocess
import sys

import pytest

from qinyu_edge.cli import main
from qinyu_edge.errors import OutputError
from qinyu_edge.fileio import replace_dir
from qinyu_edge.staging import staged_dir


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_force_over_a_file_leaves_nothing(tmp_path):
    """`export --out FILE --force` left `.FILE.old-PID` (rmtree cannot remove a file)."""
    (tmp_path / "b").write_text("a file in the way")
    with staged_dir(tmp_path / "b", force=True) as tmp:
        replace_dir(tmp, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and (tmp_path / "b").is_dir()


def test_second_writer_of_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "bundle"
    with staged_dir(out, force=False) as tmp:
        (tmp / "a").write_text("first")
        # The CLI's export takes the same lock: refused at once, with who holds it.
        assert main(["export", "--preset", "tiny-4b", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"is being written by process {os.getpid()}" in err
        replace_dir(tmp, out)
    assert (out / "a").read_text() == "first"
    with pytest.raises(OutputError, match="already exists"):
        with staged_dir(out, force=False):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no lock file, no partial folder


def test_stale_leftovers_of_dead_processes_are_removed(tmp_path, caplog):
    out = tmp_path / "b"
    dead = dead_pid()
    stale = [tmp_path / f".b.partial-{dead}-x1y2", tmp_path / f".b.old-{dead}", tmp_path / ".b.partial-abc123"]
    live = [tmp_path / f".b.partial-{os.getpid()}-zz", tmp_path / f".other.partial-{dead}-q"]
    for d in stale + live:
        d.mkdir()
        (d / "weights.onnx").write_bytes(b"x" * 100)
    stale.append(tmp_path / f".b.old-{dead_pid()}")  # a file that --force replaced
    stale[-1].write_text("old file")
    with caplog.at_level(logging.WARNING, logger="qinyu_edge.staging"), staged_dir(out, force=False):
        pass
    assert not any(d.exists() for d in stale) and all(d.exists() for d in live)
    for d in stale:
        assert any(str(d) in r.getMessage() and "interrupted run" in r.getMessage() for r in caplog.records)


def test_finished_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "b", force=False) as tmp:
            (tmp / "w.safetensors").write_bytes(b"x")
            os.chmod(tmp / "w.safetensors", 0o600)  # as safetensors and mkstemp leave them
            replace_dir(tmp, tmp_path / "b")
    finally:
        os.umask(old)
    assert oct((tmp_path / "b").stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "b" / "w.safetensors").stat().st_mode & 0o777) == "0o644"


def test_too_full_a_disk_is_refused_before_the_work(tmp_path):
    with pytest.raises(OutputError, match="needs .* GB of disk under .* but only .* GB are free"):
        with staged_dir(tmp_path / "b", force=False, need_bytes=1 << 60):
            pytest.fail("the work started")
    assert list(tmp_path.iterdir()) == []
