"""The one place a command's failure becomes what the user reads.

Known failures (a `QinyuError`, or an environment fault such as a full or read-only disk, a missing
file, a closed pipe) print `error: <what> ... <fix>` and exit 2. Anything else is a bug: its traceback
is kept. `-v` adds the traceback to known failures too.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

from .errors import QinyuError

EXIT_KNOWN = 2

# errno -> what to do about it; the OSError itself says what happened and to which file.
_FIXES = {
    errno.ENOSPC: "Free some space on that disk, or write to another folder.",
    errno.EDQUOT: "Your disk quota is used up: free some space, or write to another folder.",
    errno.EROFS: "That file system is mounted read-only: write to another folder.",
    errno.EACCES: "Check the permissions of the file and its folder, or use another path.",
    errno.EPERM: "Check the permissions of the file and its folder, or use another path.",
    errno.ENOENT: "Check the path.",
    errno.EISDIR: "Give a file name, not a folder.",
    errno.ENOTDIR: "A part of the path is a file, not a folder: check the path.",
    errno.ENOMEM: "Not enough memory: close other programs, or use a smaller --context.",
}


def describe(exc: BaseException) -> str | None:
    """The message for a known failure, None for a bug."""
    if isinstance(exc, QinyuError):
        return str(exc)
    if isinstance(exc, BrokenPipeError):
        return "the output pipe was closed before the command finished (e.g. `| head`); nothing else went wrong."
    if isinstance(exc, MemoryError):
        return "out of memory. Close other programs, or use a smaller --context."
    if isinstance(exc, OSError) and exc.errno in _FIXES:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}. {_FIXES[exc.errno]}"
    return None


def report(exc: BaseException, verbose: bool) -> int | None:
    """Print a known failure and return the exit status; None means re-raise (a bug)."""
    message = describe(exc)
    if message is None:
        return None
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, BrokenPipeError):
        # Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    print(f"error: {message}", file=sys.stderr)
    return EXIT_KNOWN
