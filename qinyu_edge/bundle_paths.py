"""Every file name a bundle.json or an engine manifest gives is resolved here, inside its folder.

Bundles and engine sets are copied between machines, so their manifests are untrusted input: a name
like `../../x`, `/etc/passwd` or a symlink out of the folder must never make a reader read, or a
writer (quantize, build) write, anything outside the folder.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import BundleError


def inside(root: str | os.PathLike, name: str, what: str = "a file name") -> Path:
    """`root / name`, refused unless `name` is a relative path without `..` that (following any
    symlinks) stays inside `root`. `what` says where the name came from, for the message."""
    root = Path(root)
    if (not isinstance(name, str) or not name or "\x00" in name or PurePosixPath(name).is_absolute()
            or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive
            or ".." in PurePosixPath(name.replace("\\", "/")).parts):
        raise BundleError(f"{what} is {name!r} in {root}: only relative names inside the folder are allowed "
                          "(no absolute paths, no `..`). The manifest is damaged or hostile: do not use this "
                          "folder; export or build it again.")
    path = root / name
    real_root = root.resolve()
    if not path.resolve().is_relative_to(real_root):
        raise BundleError(f"{what} {name!r} in {root} is a symlink to {path.resolve()}, outside the folder. "
                          "Copy the real file into the folder (or export it again) instead of linking it.")
    return path
