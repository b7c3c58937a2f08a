"""The target registry: ids, precisions per compute capability, figures against their sources, the
local entry, and `qinyu-edge targets`."""

from __future__ import annotations

import json

import pytest

from qinyu_edge.cli import main
from qinyu_edge.device.detect import DetectedGPU, detect
from qinyu_edge.device.targets import (
    DISCRETE_RESERVED_BYTES, JETSON_OS_BYTES, LOCAL, PRECISIONS, TARGETS, GiB, get_target, jetpack_for_l4t,
    local_target, precisions_for, target_ids,
)
from qinyu_edge.errors import ConfigError

JETSONS = ("orin-nano-8", "orin-nano-8-super", "orin-nx-8", "orin-nx-16", "agx-orin-32", "agx-orin-64", "agx-thor")
CARDS = ("rtx-3090", "rtx-4090", "rtx-5090")


def test_registry_has_every_target_of_the_issue():
    assert set(TARGETS) == set(JETSONS + CARDS)
    assert target_ids()[-1] == LOCAL and set(target_ids()) == set(JETSONS + CARDS + (LOCAL,))
    for tid, t in TARGETS.items():
        assert t.id == tid and t.bandwidth_gbs and t.fp16_tflops and t.int8_tops and t.software


@pytest.mark.parametrize("tid, gib", [("orin-nano-8", 8), ("orin-nano-8-super", 8), ("orin-nx-8", 8), ("orin-nx-16", 16),
                                      ("agx-orin-32", 32), ("agx-orin-64", 64), ("agx-thor", 128),
                                      ("rtx-3090", 24), ("rtx-4090", 24), ("rtx-5090", 32)])
def test_memory_size_is_the_one_in_the_name(tid, gib):
    t = TARGETS[tid]
    assert t.memory_bytes == gib * GiB
    assert t.unified_memory == (tid in JETSONS)


def test_bandwidths_are_the_field_notes_figures():
    # field-notes A3, a table written independently of this registry.
    a3 = {"agx-orin-64": 204.8, "orin-nx-16": 102.4, "orin-nano-8": 68, "orin-nano-8-super": 102, "agx-thor": 273,
          "rtx-3090": 936, "rtx-4090": 1008, "rtx-5090": 1792}
    for tid, bw in a3.items():
        assert TARGETS[tid].bandwidth_gbs == pytest.approx(bw), tid


def test_precisions_follow_the_compute_capability():
    orin = ("fp32", "fp16", "int8", "int4")
    for tid in JETSONS[:-1]:
        assert TARGETS[tid].compute_capability == (8, 7)
        assert TARGETS[tid].precisions == orin, tid  # no FP8 or FP4 on Orin (Edge-LLM supported-models)
    assert set(TARGETS["agx-thor"].precisions) == set(PRECISIONS)
    assert not TARGETS["rtx-3090"].supports("fp8")
    assert TARGETS["rtx-4090"].supports("fp8") and not TARGETS["rtx-4090"].supports("fp4")
    assert TARGETS["rtx-5090"].supports("fp4")
    for cc in [(7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (11, 0), (12, 0)]:
        have = precisions_for(cc)
        assert ("fp8" in have) == (cc >= (8, 9)), cc
        assert ("fp4" in have) == (cc >= (10, 0)), cc
        assert ("int4" in have) == (cc >= (8, 0)), cc
        assert {"fp32", "fp16", "int8"} <= set(have)
        assert list(have) == [p for p in PRECISIONS if p in have]  # widest first


def test_super_mode_is_the_same_module_with_faster_clocks():
    base, sup = TARGETS["orin-nano-8"], TARGETS["orin-nano-8-super"]
    assert (base.memory_bytes, base.compute_capability, base.precisions) == (sup.memory_bytes, sup.compute_capability, sup.precisions)
    assert sup.bandwidth_gbs > base.bandwidth_gbs and sup.int8_tops > base.int8_tops and sup.fp16_tflops > base.fp16_tflops
    # The datasheets' 40 -> 67 sparse TOPS is the 625 -> 1020 MHz clock ratio.
    assert sup.int8_tops / base.int8_tops == pytest.approx(1020 / 625, rel=0.03)


def test_jetson_rates_keep_the_orin_tensor_core_ratio():
    # AGX Orin technical brief: 170 sparse INT8 TOPS and 85 sparse FP16 TFLOPS, so INT8 = 2 x FP16.
    for tid in JETSONS:
        t = TARGETS[tid]
        assert t.int8_tops == pytest.approx(2 * t.fp16_tflops, rel=0.02), tid
    for a, b in [("orin-nx-8", "orin-nx-16"), ("agx-orin-32", "agx-orin-64"), ("orin-nx-16", "agx-orin-32")]:
        assert TARGETS[a].int8_tops < TARGETS[b].int8_tops


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        get_target("orin-nano-16")
    for tid in target_ids():
        assert tid in str(e.value)


def test_jetpack_table():
    assert jetpack_for_l4t("36.4.3")[0] == "6.2"
    assert jetpack_for_l4t("36.4.0")[2] == "10.3"  # R36 REVISION 4.0 is JetPack 6.1
    assert jetpack_for_l4t("39.2.0")[2].startswith("10.16")
    assert jetpack_for_l4t("36.9.9") is None


def test_local_target_is_the_registry_entry_for_a_known_gpu():
    found = DetectedGPU("NVIDIA Jetson AGX Orin Developer Kit", "jetson", 62 * GiB, True, (8, 7), 204.8, "agx-orin-64")
    assert local_target(found) is TARGETS["agx-orin-64"]


def test_local_target_for_an_unknown_gpu_is_built_from_what_it_reports():
    h100 = DetectedGPU("NVIDIA H100 80GB HBM3", "nvml", 85 * 10**9, False, (9, 0), 3352.3, None, "driver 550.54")
    t = local_target(h100)
    assert t.id == LOCAL and t.family == "local" and t.name == h100.name
    assert t.memory_bytes == h100.memory_bytes and t.bandwidth_gbs == 3352.3 and not t.unified_memory
    assert t.precisions == ("fp32", "fp16", "fp8", "int8", "int4")
    assert t.system_reserved_bytes == DISCRETE_RESERVED_BYTES and t.fp16_tflops is None
    nano4 = DetectedGPU("NVIDIA Jetson Orin Nano Developer Kit", "jetson", int(3.6 * GiB), True, (8, 7), None, None)
    t4 = local_target(nano4)
    # MemTotal already excludes the carve-outs; only the OS share is reserved.
    assert t4.unified_memory and t4.system_reserved_bytes == JETSON_OS_BYTES and t4.bandwidth_gbs is None


def test_local_target_without_a_gpu_says_what_to_do():
    if detect() is not None:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="agx-orin-64"):
        get_target("local")


def test_cli_targets_prints_the_table(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for tid in JETSONS + CARDS:
        assert tid in out
    for figure in ("204.8", "1792", "11.0", "fp32 fp16 fp8 int8 fp4 int4", "TensorRT 10.3", "TensorRT 10.16.2"):
        assert figure in out
    assert "local" in out


def test_cli_targets_json(capsys):
    assert main(["targets", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_id = {t["id"]: t for t in doc["targets"]}
    assert set(by_id) == set(TARGETS)
    assert by_id["agx-orin-64"]["precisions"] == ["fp32", "fp16", "int8", "int4"]
    assert by_id["agx-orin-64"]["compute_capability"] == "8.7" and by_id["agx-orin-64"]["unified_memory"] is True
    assert "local" in doc


def test_device_commands_import_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = ("import sys\nfrom qinyu_edge.cli import main\n"
            "import qinyu_edge.device.targets, qinyu_edge.device.detect, qinyu_edge.device.planner\n"
            "main(['targets']); main(['plan', '--target', 'agx-thor'])\n"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
