"""GPU detection from fixture files shaped like a Jetson's /proc and /etc, and the NVML helpers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from qinyu_edge.device.detect import (
    DetectedGPU, detect, detect_jetson, detect_nvml, jetson_target_id, nvml_bandwidth_gbs, nvml_target_id,
    parse_meminfo_total, parse_tegra_release,
)
from qinyu_edge.device.targets import TARGETS, GiB

RELEASE_36_4_3 = ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
                  "DATE: Wed Jan  8 01:49:37 UTC 2025\n")
RELEASE_39_2 = "# R39 (release), REVISION: 2.0, GCID: 41000000, BOARD: generic, EABI: aarch64, DATE: Mon\n"


def meminfo(gib: float) -> str:
    return f"MemTotal:       {int(gib * GiB / 1024)} kB\nMemFree:         1000000 kB\nMemAvailable:    2000000 kB\n"


def board(tmp_path: Path, model: str, mem_gib: float | None, release: str | None = RELEASE_36_4_3) -> dict[str, Path]:
    paths = {"model_path": tmp_path / "model", "tegra_release_path": tmp_path / "nv_tegra_release",
             "meminfo_path": tmp_path / "meminfo"}
    # The device tree stores the model NUL-terminated.
    paths["model_path"].write_bytes(model.encode() + b"\x00")
    if mem_gib is not None:
        paths["meminfo_path"].write_text(meminfo(mem_gib))
    if release is not None:
        paths["tegra_release_path"].write_text(release)
    return paths


# MemTotal values are below the DRAM size by the carve-outs (an 8 GB Orin Nano reports ~7.3 GiB).
@pytest.mark.parametrize("model, mem_gib, expected", [
    ("NVIDIA Jetson AGX Orin Developer Kit", 61.4, "agx-orin-64"),
    ("NVIDIA Jetson AGX Orin Developer Kit", 30.6, "agx-orin-32"),
    ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", 7.3, "orin-nano-8-super"),
    ("NVIDIA Jetson Orin Nano Developer Kit", 7.3, "orin-nano-8"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 14.5, "orin-nx-16"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 7.2, "orin-nx-8"),
    ("NVIDIA Jetson AGX Thor Developer Kit", 122.0, "agx-thor"),
])
def test_jetson_model_strings_map_to_targets(tmp_path, model, mem_gib, expected):
    found = detect(**board(tmp_path, model, mem_gib), use_nvml=False)
    assert isinstance(found, DetectedGPU)
    assert found.target_id == expected and found.source == "jetson" and found.unified_memory
    assert found.name == model  # the trailing NUL is gone
    assert found.compute_capability == TARGETS[expected].compute_capability
    assert found.bandwidth_gbs == TARGETS[expected].bandwidth_gbs
    assert found.memory_bytes == int(mem_gib * GiB / 1024) * 1024


def test_release_file_names_the_software_stack(tmp_path):
    found = detect_jetson(**board(tmp_path, "NVIDIA Jetson AGX Orin Developer Kit", 61.4))
    assert found.software == "L4T 36.4.3 (JetPack 6.2, CUDA 12.6, TensorRT 10.3 (UNVERIFIED))"
    (tmp_path / "thor").mkdir()
    found = detect_jetson(**board(tmp_path / "thor", "NVIDIA Jetson AGX Thor Developer Kit", 122.0, RELEASE_39_2))
    assert "JetPack 7.2" in found.software and "TensorRT 10.16.2" in found.software
    (tmp_path / "bare").mkdir()
    found = detect_jetson(**board(tmp_path / "bare", "NVIDIA Jetson AGX Orin Developer Kit", 61.4, release=None))
    assert found.software is None and found.target_id == "agx-orin-64"


def test_boards_outside_the_registry(tmp_path):
    nano4 = detect_jetson(**board(tmp_path, "NVIDIA Jetson Orin Nano Developer Kit", 3.6))
    assert nano4 is not None and nano4.target_id is None and nano4.bandwidth_gbs is None
    xavier = tmp_path / "xavier"
    xavier.mkdir()
    assert detect(**board(xavier, "NVIDIA Jetson Xavier NX Developer Kit", 7.2), use_nvml=False) is None
    # A missing MemTotal picks the smaller module, the conservative choice for planning.
    assert jetson_target_id("NVIDIA Jetson AGX Orin Developer Kit", None) == "agx-orin-32"
    assert jetson_target_id("Raspberry Pi 5 Model B Rev 1.0", 8 * GiB) is None


def test_no_gpu_gives_none(tmp_path):
    missing = {"model_path": tmp_path / "nope", "tegra_release_path": tmp_path / "nope2", "meminfo_path": tmp_path / "nope3"}
    assert detect(**missing, use_nvml=False) is None
    # A directory where the file should be, and an empty file, are not Jetsons either.
    assert detect(model_path=tmp_path, use_nvml=False) is None
    (tmp_path / "empty").write_bytes(b"")
    assert detect(model_path=tmp_path / "empty", use_nvml=False) is None


def test_default_detection_never_raises():
    found = detect()
    assert found is None or isinstance(found, DetectedGPU)


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="nvidia-ml-py is installed")
def test_nvml_without_the_library_is_none():
    assert detect_nvml() is None


def test_parsers():
    assert parse_tegra_release(RELEASE_36_4_3) == "36.4.3"
    assert parse_tegra_release("garbage") is None
    assert parse_meminfo_total("MemTotal:        7650336 kB\n") == 7650336 * 1024
    assert parse_meminfo_total("MemFree: 1 kB\n") is None


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA GeForce RTX 3090", "rtx-3090"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA GeForce RTX 5090", "rtx-5090"), ("NVIDIA GeForce RTX 3090 Ti", None),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", None), ("NVIDIA H100 80GB HBM3", None),
])
def test_nvml_names(name, expected):
    assert nvml_target_id(name) == expected


@pytest.mark.parametrize("bus_bits, mem_clock_mhz, tid", [(384, 9751, "rtx-3090"), (384, 10501, "rtx-4090"),
                                                          (512, 14001, "rtx-5090")])
def test_nvml_bandwidth_estimate_matches_the_vendor_figure(bus_bits, mem_clock_mhz, tid):
    # nvidia-smi's max memory clocks against the vendors' bandwidths in the registry.
    assert nvml_bandwidth_gbs(bus_bits, mem_clock_mhz) == pytest.approx(TARGETS[tid].bandwidth_gbs, rel=0.002)
