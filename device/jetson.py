"""Which JetPack this Jetson runs, and what scripts/setup-jetson.sh installs for it.

Reads files only: /etc/nv_tegra_release, dpkg's status database (nvidia-l4t-core, and whether
JetPack's TensorRT bindings python3-libnvinfer are there) and /proc/sys/kernel/arch, all under a
root folder: `/`, or the folder QINYU_EDGE_SYSROOT names, so tests run the detection on made-up
release files. Needs the standard library only: the set-up script runs it before anything is installed
(`python3 -m qinyu_edge.device.jetson --python 3.10` prints shell assignments; errors exit 2).

The choices per JetPack major:
- JetPack 6 (L4T R36, Ubuntu 22.04): Python 3.10, CUDA 12.6, TensorRT 10.3 from apt;
  onnxruntime-gpu from NVIDIA's Jetson AI Lab index for JetPack 6 / CUDA 12.6.
- JetPack 7 (L4T R38/R39, Ubuntu 24.04, SBSA CUDA): Python 3.12, CUDA 13; onnxruntime-gpu from the
  same index's SBSA CUDA 13.0 set (a 13.0 build runs on 13.x by CUDA's minor-version compatibility;
  UNVERIFIED on JetPack 7.2's CUDA 13.2).
JetPack 6.0 (TensorRT 8.6) and 5.x (Python 3.8, TensorRT 8.5) are too old: qinyu-edge needs TensorRT 10.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from qinyu_edge.errors import QinyuError

from .detect import parse_tegra_release
from .targets import jetpack_for_l4t

SYSROOT_ENV = "QINYU_EDGE_SYSROOT"
JETPACK_ENV = "QINYU_EDGE_JETPACK"  # "6" or "7": install as for that JetPack when the L4T release is unknown
JETSON_INDEX = "https://pypi.jetson-ai-lab.io"
MIN_L4T = (36, 4)  # JetPack 6.1: TensorRT 10.3


@dataclass(frozen=True)
class Stack:
    """What one JetPack major ships and where its Python wheels come from."""

    jetpack: str
    l4t_majors: tuple[int, ...]
    python: str
    cuda: str  # the CUDA its first supported release ships
    ort_index: str | None


STACKS = {
    "6": Stack("6", (36,), "3.10", "12.6", f"{JETSON_INDEX}/jp6/cu126"),
    "7": Stack("7", (38, 39), "3.12", "13.0", f"{JETSON_INDEX}/sbsa/cu130"),
}


class JetsonSetupError(QinyuError):
    """No usable JetPack here; the message says what to do."""


@dataclass(frozen=True)
class JetsonRelease:
    l4t: str  # "36.4.3"
    source: str  # the file or package it was read from
    jetpack: str | None  # from the release table; None for a release it does not list
    cuda: str | None
    tensorrt: str | None


@dataclass(frozen=True)
class JetsonSetup:
    release: JetsonRelease
    stack: Stack
    cuda: str
    cuda_python: str  # pip requirement: the CUDA major, at least its minor
    apt: tuple[str, ...]  # Debian packages still missing
    notes: tuple[str, ...]

    def shell(self) -> str:
        """`NAME=value` lines for the set-up script to eval."""
        values = {
            "JETSON_L4T": self.release.l4t, "JETSON_JETPACK": self.release.jetpack or f"{self.stack.jetpack}.x",
            "JETSON_CUDA": self.cuda, "JETSON_PYTHON": self.stack.python, "JETSON_ORT_INDEX": self.stack.ort_index or "",
            "JETSON_CUDA_PYTHON": self.cuda_python, "JETSON_APT": " ".join(self.apt),
        }
        return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())

    def summary(self) -> str:
        r = self.release
        lines = [f"L4T {r.l4t} (from {r.source}): JetPack {r.jetpack or self.stack.jetpack + '.x'}, CUDA {self.cuda}"
                 + (f", TensorRT {r.tensorrt}" if r.tensorrt else ""),
                 f"Python {self.stack.python} (JetPack's own, with --system-site-packages for its TensorRT)",
                 f"onnxruntime-gpu from {self.stack.ort_index}" if self.stack.ort_index else
                 "onnxruntime: the CPU build (no onnxruntime-gpu is published for this JetPack)",
                 self.cuda_python]
        return "\n".join(lines + list(self.notes))


def sysroot() -> Path:
    return Path(os.environ.get(SYSROOT_ENV) or "/")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def dpkg_installed(root: Path) -> dict[str, str]:
    """Installed package -> version, from dpkg's status file (dpkg itself may not be there in a fake root)."""
    text = _read(root / "var/lib/dpkg/status") or ""
    found = {}
    for para in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", para, re.MULTILINE))
        if fields.get("Status", "").endswith("install ok installed") and "Package" in fields:
            found[fields["Package"]] = fields.get("Version", "")
    return found


def machine(root: Path) -> str:
    return (_read(root / "proc/sys/kernel/arch") or platform.machine()).strip()


def read_release(root: Path) -> JetsonRelease | None:
    """The L4T release: dpkg's nvidia-l4t-core (what apt upgraded to), else /etc/nv_tegra_release."""
    l4t, source = None, None
    core = dpkg_installed(root).get("nvidia-l4t-core")
    if core:
        m = re.match(r"(\d+\.\d+(?:\.\d+)?)", core)  # "36.4.3-20250107174145"
        if m:
            l4t, source = m.group(1), f"dpkg nvidia-l4t-core {core}"
    if l4t is None:
        text = _read(root / "etc/nv_tegra_release")
        l4t = parse_tegra_release(text) if text else None
        source = "/etc/nv_tegra_release"
    if l4t is None:
        return None
    stack = jetpack_for_l4t(l4t)
    return JetsonRelease(l4t, source, *(stack if stack else (None, None, None)))


def _l4t_tuple(l4t: str) -> tuple[int, ...]:
    return tuple(int(x) for x in l4t.split("."))


def plan_setup(root: Path, python: str) -> JetsonSetup:
    """The choices for this Jetson, or JetsonSetupError saying why there are none and what to do.

    `python` is the version of the interpreter the venv will be made from ("3.10")."""
    release = read_release(root)
    arch = machine(root)
    if release is None:
        if arch != "aarch64":
            raise JetsonSetupError(f"this is not a Jetson (a {arch} machine without JetPack): use "
                                   "`bash scripts/setup.sh` here, and scripts/setup-jetson.sh on the Jetson")
        raise JetsonSetupError(f"no JetPack found on this aarch64 machine: neither {root / 'etc/nv_tegra_release'} "
                               "nor the nvidia-l4t-core package. Flash JetPack 6.1 or later with NVIDIA SDK Manager "
                               "(or the SD card image); on an ARM server without JetPack use `bash scripts/setup.sh`")
    v = _l4t_tuple(release.l4t)
    notes: list[str] = []
    if v[:2] < MIN_L4T:
        jp = release.jetpack or ("5.x or older" if v[0] < 36 else "6.0")
        raise JetsonSetupError(f"L4T {release.l4t} (from {release.source}) is JetPack {jp}: too old. qinyu-edge needs "
                               "JetPack 6.1 or later (L4T 36.4+, TensorRT 10.3): flash JetPack 6.2 with SDK Manager "
                               "(Orin), or JetPack 7 (Thor)")
    stack = next((s for s in STACKS.values() if v[0] in s.l4t_majors), None)
    if stack is None:
        forced = os.environ.get(JETPACK_ENV)
        if forced not in STACKS:
            known = ", ".join(f"JetPack {s.jetpack} = L4T R{'/R'.join(map(str, s.l4t_majors))}" for s in STACKS.values())
            raise JetsonSetupError(f"L4T {release.l4t} (from {release.source}) is a release this qinyu-edge does not know "
                                   f"({known}). Update qinyu-edge, or set {JETPACK_ENV}=6 or 7 to install as for "
                                   "that JetPack")
        stack = STACKS[forced]
        notes.append(f"installing as for JetPack {forced} ({JETPACK_ENV}); L4T {release.l4t} is not in the table")
    elif release.jetpack is None:
        notes.append(f"L4T {release.l4t} is not in the release table: using JetPack {stack.jetpack}'s choices "
                     f"(CUDA {stack.cuda}); check `qinyu-edge doctor` afterwards")
    if python != stack.python:
        raise JetsonSetupError(f"JetPack {stack.jetpack}'s TensorRT bindings (python3-libnvinfer) are built for Python "
                               f"{stack.python}, but the interpreter given is Python {python}: run "
                               f"`PYTHON=/usr/bin/python{stack.python} bash scripts/setup-jetson.sh`")
    cuda = release.cuda or stack.cuda
    major = int(cuda.split(".")[0])
    apt = tuple(p for p in ("python3-libnvinfer",) if p not in dpkg_installed(root))
    return JetsonSetup(release, stack, cuda, f"cuda-python>={cuda},<{major + 1}", apt, tuple(notes))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qinyu_edge.device.jetson",
                                description="Detect the JetPack and print the set-up choices as shell assignments.")
    p.add_argument("--python", required=True, help="version of the interpreter the venv is made from, e.g. 3.10")
    args = p.parse_args(argv)
    try:
        setup = plan_setup(sysroot(), args.python)
    except JetsonSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(setup.summary(), file=sys.stderr)
    sys.stdout.write(setup.shell())
    return 0


if __name__ == "__main__":
    sys.exit(main())
