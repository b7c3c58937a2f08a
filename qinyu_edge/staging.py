"""Output folders built beside their destination: one writer at a time, leftovers of killed runs
removed, permissions as the umask says.

`export` and `quantize` build a bundle in `.NAME.partial-PID-XXXX` and rename it onto NAME
(`fileio.replace_dir`, which parks the old one as `.NAME.old-PID` for an instant). A `kill -9`
leaves those behind; the next run for the same NAME removes the ones whose process is gone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError
from .fileio import check_free_space, default_mode, remove_path

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove `.NAME.partial-PID-*` and `.NAME.old-PID` beside `out` whose process is gone (and older
    `.NAME.partial-XXXX` without a pid, which only a crashed run of an older version leaves)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:partial-(?:(\d+)-)?[^/]*|old-(\d+))$")
    removed = []
    for p in out.parent.iterdir() if out.parent.is_dir() else ():
        m = pattern.match(p.name)
        if not m:
            continue
        pid = m.group(1) or m.group(2)
        if pid is not None and _alive(int(pid)):
            continue
        remove_path(p)  # `.NAME.old-PID` is a file when --force replaced a file
        log.warning("removed %s, left behind by an interrupted run%s", p, f" (process {pid} is gone)" if pid else "")
        removed.append(p)
    return removed


@contextmanager
def _writer_lock(out: Path) -> Iterator[None]:
    """Exclusive, non-blocking lock on `.NAME.writer` beside `out`; the file is removed on release.
    (A lock file whose name was unlinked and recreated by another process is detected and retried.)"""
    path = out.parent / f".{out.name}.writer"
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(f"{out} is being written by {owner} right now; wait for it to finish, "
                              "or choose another --out.") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()}\n".encode())
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def refuse_existing(out: Path, force: bool) -> None:
    """Refuse an existing `out` unless `force`: called before minutes of work as well as at the end."""
    if out.exists() and not force:
        raise OutputError(f"{out} already exists. Choose another --out, or pass --force to replace it.")


@contextmanager
def staged_dir(out: str | os.PathLike, force: bool, need_bytes: int = 0) -> Iterator[Path]:
    """A fresh folder beside `out` to build it in, while holding `out`'s writer lock.

    A second writer of the same `out` is refused at once (not after minutes of work, and never
    silently replacing the first). An existing `out` is refused unless `force`. The caller renames the
    folder onto `out` (`fileio.replace_dir`) inside the block; whatever is left is removed on exit.
    Fewer than `need_bytes` free beside `out` is refused before the work starts.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(out):
        remove_stale(out)
        refuse_existing(out, force)
        check_free_space(out, need_bytes, "--out")
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def share_like_umask(folder: Path) -> None:
    """Give a finished folder and its files the modes a plain mkdir/open would (mkdtemp and mkstemp
    make them 0700/0600, which keeps other users from reading a bundle meant to be shared)."""
    file_mode = default_mode()
    dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # searchable wherever readable: 0644 -> 0755
    for root, dirs, files in os.walk(folder):
        os.chmod(root, dir_mode)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, file_mode)
