"""Atomic file writes and hashing: a crash or Ctrl-C never leaves half a file behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import QinyuError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """What open() would give a new file (mkstemp makes them 0600, too strict for shared bundles)."""
    return 0o666 & ~_umask()


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move a finished folder onto `out`, replacing what is there in two renames (never half of each)."""
    from .staging import share_like_umask

    tmp, out = Path(tmp), Path(out)
    share_like_umask(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        remove_path(old)
    else:
        os.replace(tmp, out)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_writable(path: str | os.PathLike, need_bytes: int = 0, what: str = "output") -> Path:
    """Refuse, before any work, an output that could not be written at the end: a folder in its place,
    a parent that cannot be created or written (permissions, read-only file system), or fewer than
    `need_bytes` free there. A probe file is created and removed beside it."""
    from .errors import OutputError

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder: give the path of a file (a new name inside it, say).")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write the {what} {path}: {e.strerror or e}. Choose a folder you can write "
                          "(check its permissions, and that the disk is not mounted read-only).") from e
    check_free_space(path, need_bytes, what)
    return path


def check_free_space(path: str | os.PathLike, need_bytes: int, what: str = "output") -> None:
    """Refuse before the work, not after it, when the disk `path` goes to has less than `need_bytes` free.
    `path` and its parents need not exist yet: the nearest existing one's disk is asked."""
    from .errors import OutputError

    probe = Path(path).resolve().parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise OutputError(f"the {what} {path} needs {need_bytes / 1e9:.2f} GB of disk under {probe}, but only "
                          f"{free / 1e9:.2f} GB are free there. Free some space or write to a folder on a larger disk.")


def remove_path(path: str | os.PathLike) -> None:
    """Remove a folder tree, or a file or symlink (what `--force` replaces may be either)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
