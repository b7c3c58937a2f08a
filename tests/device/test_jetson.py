"""The Jetson set-up's detection and choices, on fake roots with made-up release files (QINYU_EDGE_SYSROOT),
through the Python module and through scripts/setup-jetson.sh --check."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from qinyu_edge.device.jetson import JETPACK_ENV, SYSROOT_ENV, JetsonSetupError, main, plan_setup, read_release

ROOT = Path(__file__).resolve().parents[2]


def fake_root(tmp_path: Path, tegra: str | None = None, packages: dict[str, str] | None = None,
              arch: str = "aarch64") -> Path:
    root = tmp_path / "root"
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/arch").write_text(arch + "\n")
    if tegra is not None:
        (root / "etc").mkdir()
        major, rev = tegra.split(".", 1)
        (root / "etc/nv_tegra_release").write_text(f"# R{major} (release), REVISION: {rev}, GCID: 38968081, BOARD: "
                                                   "generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n")
    if packages:
        (root / "var/lib/dpkg").mkdir(parents=True)
        (root / "var/lib/dpkg/status").write_text("".join(
            f"Package: {name}\nStatus: install ok installed\nArchitecture: arm64\nVersion: {version}\n\n"
            for name, version in packages.items()) + "Package: removed-one\nStatus: deinstall ok config-files\n"
                                                    "Version: 1.0\n")
    return root


def test_jetpack_6_2(tmp_path):
    setup = plan_setup(fake_root(tmp_path, "36.4.3"), "3.10")
    r = setup.release
    assert (r.l4t, r.jetpack, r.cuda, r.source) == ("36.4.3", "6.2", "12.6", "/etc/nv_tegra_release")
    assert setup.stack.python == "3.10" and setup.stack.ort_index == "https://pypi.jetson-ai-lab.io/jp6/cu126"
    assert setup.cuda_python == "cuda-python>=12.6,<13"
    assert setup.apt == ("python3-libnvinfer",)  # JetPack's TensorRT bindings are not installed yet
    values = dict(line.split("=", 1) for line in setup.shell().splitlines())
    assert values["JETSON_CUDA_PYTHON"] == shlex.quote("cuda-python>=12.6,<13") and values["JETSON_JETPACK"] == "6.2"


def test_dpkg_release_wins_and_installed_tensorrt_is_not_asked_for(tmp_path):
    # An apt upgrade moved nvidia-l4t-core on; nv_tegra_release may lag.
    root = fake_root(tmp_path, "36.4.0", {"nvidia-l4t-core": "36.4.4-20250616085344", "python3-libnvinfer": "10.3.0.30-1+cuda12.5"})
    setup = plan_setup(root, "3.10")
    assert setup.release.l4t == "36.4.4" and setup.release.jetpack == "6.2.1"
    assert setup.release.source == "dpkg nvidia-l4t-core 36.4.4-20250616085344"
    assert setup.apt == ()


def test_jetpack_7(tmp_path):
    setup = plan_setup(fake_root(tmp_path, packages={"nvidia-l4t-core": "38.2.0-20250821174705"}), "3.12")
    assert setup.release.jetpack == "7.0" and setup.cuda == "13.0" and setup.release.tensorrt == "10.13.3.9"
    assert setup.stack.ort_index == "https://pypi.jetson-ai-lab.io/sbsa/cu130"
    assert setup.cuda_python == "cuda-python>=13.0,<14"
    later = plan_setup(fake_root(tmp_path / "72", "39.2.1"), "3.12")
    assert later.release.jetpack == "7.2.1" and later.cuda == "13.2" and later.cuda_python == "cuda-python>=13.2,<14"


def test_release_missing_from_the_table_uses_its_major(tmp_path):
    setup = plan_setup(fake_root(tmp_path, "36.4.9"), "3.10")
    assert setup.release.jetpack is None and setup.cuda == "12.6"
    assert "not in the release table" in setup.notes[0] and "JetPack 6.x" in setup.summary()


def test_unknown_release_is_refused_unless_forced(tmp_path, monkeypatch):
    root = fake_root(tmp_path, "40.1.0")
    with pytest.raises(JetsonSetupError, match=r"L4T 40\.1\.0 .* is a release this qinyu-edge does not know "
                                               r"\(JetPack 6 = L4T R36, JetPack 7 = L4T R38/R39\)"):
        plan_setup(root, "3.12")
    monkeypatch.setenv(JETPACK_ENV, "7")
    setup = plan_setup(root, "3.12")
    assert setup.stack.jetpack == "7" and "installing as for JetPack 7" in setup.notes[0]


@pytest.mark.parametrize("l4t,needle", [
    ("35.5.0", "L4T 35.5.0 (from /etc/nv_tegra_release) is JetPack 5.x or older: too old"),
    ("36.3.0", "L4T 36.3.0 (from /etc/nv_tegra_release) is JetPack 6.0: too old"),
])
def test_too_old(tmp_path, l4t, needle):
    with pytest.raises(JetsonSetupError) as e:
        plan_setup(fake_root(tmp_path, l4t), "3.10")
    assert needle in str(e.value) and "JetPack 6.1 or later" in str(e.value)


def test_no_jetpack(tmp_path):
    with pytest.raises(JetsonSetupError, match="no JetPack found on this aarch64 machine"):
        plan_setup(fake_root(tmp_path / "arm"), "3.10")
    with pytest.raises(JetsonSetupError, match=r"not a Jetson \(a x86_64 machine"):
        plan_setup(fake_root(tmp_path / "pc", arch="x86_64"), "3.11")
    assert read_release(fake_root(tmp_path / "none")) is None


def test_wrong_python_for_the_jetpack(tmp_path):
    with pytest.raises(JetsonSetupError, match=r"built for Python 3\.10, .* Python 3\.11: run `PYTHON=/usr/bin/python3\.10"):
        plan_setup(fake_root(tmp_path, "36.4.3"), "3.11")


def test_module_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(SYSROOT_ENV, str(fake_root(tmp_path, "36.4.3")))
    assert main(["--python", "3.10"]) == 0
    out = capsys.readouterr()
    assert "JETSON_ORT_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126" in out.out and "L4T 36.4.3" in out.err
    assert main(["--python", "3.12"]) == 2 and "error: JetPack 6's TensorRT" in capsys.readouterr().err


@pytest.mark.parametrize("tegra,arch,needle", [
    (None, "aarch64", "no JetPack found on this aarch64 machine"),
    ("36.4.3", "aarch64", "built for Python 3.10"),  # this machine's interpreters are 3.11
    ("32.7.4", "aarch64", "too old"),
])
def test_setup_script_check_stops_before_installing(tmp_path, tegra, arch, needle):
    """The script's detection runs from the source tree with the standard library only."""
    root = fake_root(tmp_path, tegra, arch=arch)
    env = {**os.environ, SYSROOT_ENV: str(root), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "scripts/setup-jetson.sh"), "--check"], env=env, capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
