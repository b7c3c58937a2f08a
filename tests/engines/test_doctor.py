"""`qinyu-edge doctor`: runs on this machine without GPU, TensorRT or sound devices and says what will
not work; its judgements (exit code, engine-set matching) are checked on described environments."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct

import pytest

from qinyu_edge.cli import main
from qinyu_edge.device.detect import DetectedGPU
from qinyu_edge.engine_manifest import (
    PLAN_TAG, BuilderSettings, EngineManifest, EngineSet, OptimizationProfile, rebuild_command,
)
from qinyu_edge.engines.doctor import AudioProbe, Environment, diagnose, probe, run_doctor
from qinyu_edge.fileio import sha256_file

ORIN = DetectedGPU("NVIDIA Jetson AGX Orin Developer Kit", "jetson", 64 * 2**30, True, (8, 7), 204.8, "agx-orin-64",
                   "L4T 36.4 (JetPack 6.1, CUDA 12.6, TensorRT 10.3)")


def _env(**changes) -> Environment:
    """A CPU box with ONNX Runtime and working sound; tests change what they are about."""
    base = Environment(python="3.11.7", system="Linux 6.1", machine="x86_64", gpu=None, nvml_installed=True,
                       trt_version=None, trt_error="ModuleNotFoundError: No module named 'tensorrt'", cuda_python=None,
                       ort_version="1.31.1", ort_providers=("CPUExecutionProvider",), ort_error=None,
                       audio=AudioProbe(None, None, ("mic",), ("speaker",)), in_audio_group=True)
    return dataclasses.replace(base, **changes)


def _line(report, area, item=None):
    hits = [c for c in report.checks if c.area == area and (item is None or c.item == item)]
    assert hits, f"no {area}/{item} line in {report.checks}"
    return hits[0]


# --- this machine ----------------------------------------------------------------------------


def test_runs_here_and_says_what_is_missing():
    env = probe()
    report = diagnose(env)
    assert env.ort_version is not None and report.exit_code == 0  # nothing was required
    gpu = _line(report, "gpu", "NVIDIA GPU")
    trt = _line(report, "tensorrt", "TensorRT")
    if env.gpu is None:
        assert gpu.status == "warning" and "none found" in gpu.found and "driver" in gpu.fix
    else:
        assert gpu.status == "ok" and env.gpu.name in gpu.found
    if env.trt_version is None:
        assert trt.status == "warning" and "not importable" in trt.found and trt.fix
        assert "qinyu-edge build" in trt.found
    else:
        assert env.trt_version in trt.found
    audio = [c for c in report.checks if c.area == "audio"]
    assert audio and all(c.status == "ok" or c.fix for c in audio)


def test_cli_json_and_exit_codes(capsys):
    env = probe()
    assert main(["doctor", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["exit_code"] == 0
    assert {c["area"] for c in doc["checks"]} >= {"gpu", "tensorrt", "onnxruntime", "audio"}
    expected = 1 if env.gpu is None else 0
    assert main(["doctor", "--require", "gpu", "--json"]) == expected
    capsys.readouterr()
    assert main(["doctor"]) == 0
    assert "qinyu-edge doctor" in capsys.readouterr().out


# --- judgements ------------------------------------------------------------------------------


def test_missing_onnxruntime_is_always_an_error():
    report = diagnose(_env(ort_version=None, ort_providers=(), ort_error="ModuleNotFoundError: onnxruntime"))
    line = _line(report, "onnxruntime", "ONNX Runtime")
    assert line.status == "error" and "pip install onnxruntime" in line.fix
    assert report.exit_code == 1


@pytest.mark.parametrize("require,code", [((), 0), (("gpu",), 1), (("tensorrt",), 1), (("gpu", "tensorrt"), 1)])
def test_required_items_turn_warnings_into_errors(require, code):
    report = diagnose(_env(), require=require)
    assert report.exit_code == code
    for area in ("gpu", "tensorrt"):
        line = _line(report, area)
        assert line.status == ("error" if area in require else "warning")


def test_unknown_requirement_is_refused():
    from qinyu_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="gpu, tensorrt, audio"):
        diagnose(_env(), require=["wifi"])


def test_no_sound_devices_names_the_fixes():
    report = diagnose(_env(audio=AudioProbe(None, None), in_audio_group=False))
    lines = [c for c in report.checks if c.area == "audio"]
    assert [c.item for c in lines] == ["input devices", "output devices"]
    assert all(c.status == "warning" and "PortAudio sees no" in c.found for c in lines)
    assert all("pulseaudio" in c.fix and "usermod -aG audio" in c.fix for c in lines)
    assert diagnose(_env(audio=AudioProbe(None, None)), require=["audio"]).exit_code == 1


def test_missing_portaudio_library():
    report = diagnose(_env(audio=AudioProbe("PortAudio library not found", "library")))
    line = _line(report, "audio")
    assert line.status == "warning" and "libportaudio2" in line.fix


def test_cpu_only_onnxruntime_on_a_gpu_machine():
    report = diagnose(_env(gpu=ORIN, trt_version="10.3.0.30", trt_error=None, cuda_python="12.6.0"))
    assert _line(report, "gpu", "target").found.startswith("agx-orin-64")
    line = _line(report, "onnxruntime", "GPU providers")
    assert line.status == "warning" and "onnxruntime-gpu" in line.fix
    assert report.exit_code == 0


def test_tensorrt_without_cuda_python():
    report = diagnose(_env(gpu=ORIN, trt_version="10.3.0.30", trt_error=None), require=["tensorrt"])
    line = _line(report, "cuda-python")
    assert line.status == "error" and "cuda-python==12" in line.fix


def test_pip_tensorrt_differs_from_jetpack():
    report = diagnose(_env(gpu=ORIN, trt_version="10.16.1.11", trt_error=None, cuda_python="12.6.0"))
    assert _line(report, "tensorrt", "JetPack match").status == "warning"


# --- bundles ---------------------------------------------------------------------------------


def test_bundle_is_verified(preset_bundle, tmp_path, flip_byte):
    _, path = preset_bundle
    report = diagnose(_env(), bundle=path)
    assert _line(report, "bundle", str(path)).status == "ok" and report.exit_code == 0
    assert _line(report, "bundle", "TensorRT lint").status == "info"  # no TensorRT version to lint for

    copy = tmp_path / "bundle"
    shutil.copytree(path, copy)
    flip_byte(copy / "audio_projector.onnx")
    report = diagnose(_env(), bundle=copy)
    line = _line(report, "bundle", str(copy))
    assert line.status == "error" and "audio_projector.onnx" in line.found and report.exit_code == 1


def test_bundle_is_linted_for_the_local_tensorrt(preset_bundle):
    _, path = preset_bundle
    report = diagnose(_env(gpu=ORIN, trt_version="10.3.0.30", trt_error=None, cuda_python="12.6.0"), bundle=path)
    line = _line(report, "bundle", "TensorRT 10.3.0.30 lint")
    assert line.status == "ok" and "no errors" in line.found


# --- engine sets -----------------------------------------------------------------------------


def _plan(version=(10, 3, 0, 30), size=256) -> bytes:
    head = struct.pack("<II", PLAN_TAG, 0) + bytes(16) + bytes(version)
    return head + bytes(range(256))[: size - len(head)]


def _engine_set(root, bundle_dir, trt="10.3.0.30", cc="8.7", gpu="Orin", level="NONE"):
    root.mkdir(parents=True, exist_ok=True)
    plan = _plan(tuple(int(x) for x in trt.split(".")))
    (root / "audio_projector.plan").write_bytes(plan)
    entry = EngineManifest(
        component="audio_projector", onnx_file="audio_projector.onnx",
        onnx_sha256=sha256_file(bundle_dir / "audio_projector.onnx"), plan_file="audio_projector.plan",
        plan_sha256=sha256_file(root / "audio_projector.plan"), plan_bytes=len(plan), trt_version=trt, gpu_name=gpu,
        compute_capability=cc, precision="fp16",
        profiles=(OptimizationProfile("default", {"encoder_out": ((1, 1, 64), (1, 100, 64), (1, 500, 64))}),),
        builder=BuilderSettings(("STRONGLY_TYPED",), (), level, 1 << 30, 3, None), target="agx-orin-64",
        bundle=str(bundle_dir), rebuild=rebuild_command(str(bundle_dir), "agx-orin-64", "fp16", str(root)),
        created="2026-11-22T00:00:00Z")
    EngineSet(root, "agx-orin-64", str(bundle_dir), {"audio_projector": entry}).write()
    return root


def test_engine_set_cannot_run_without_tensorrt_or_gpu(preset_bundle, tmp_path):
    _, bundle = preset_bundle
    root = _engine_set(tmp_path / "orin", bundle)
    report = diagnose(_env(), engines=root)
    line = _line(report, "engines", "orin")
    assert line.status == "error" and "no TensorRT and no GPU" in line.found and "TensorRT 10.3.0.30" in line.found
    assert report.exit_code == 1
    # --engines makes TensorRT a need, so its line is an error too.
    assert _line(report, "tensorrt").status == "error"


def test_engine_set_matching_this_machine(preset_bundle, tmp_path):
    _, bundle = preset_bundle
    root = _engine_set(tmp_path / "sets" / "orin", bundle)
    env = _env(gpu=ORIN, trt_version="10.3.0.30", trt_error=None, cuda_python="12.6.0")
    report = diagnose(env, engines=tmp_path / "sets")  # a folder of engine sets
    line = _line(report, "engines", "orin")
    assert line.status == "ok" and "match this machine" in line.found
    assert report.exit_code == 0, [c for c in report.errors]
    assert root.is_dir()


@pytest.mark.parametrize("change,needle", [
    ({"trt_version": "10.16.1.11"}, "exact TensorRT build"),
    ({"gpu": dataclasses.replace(ORIN, compute_capability=(11, 0), target_id="agx-thor")}, "compute capability 8.7"),
])
def test_engine_set_mismatch_names_the_reason_and_the_rebuild(preset_bundle, tmp_path, change, needle):
    _, bundle = preset_bundle
    root = _engine_set(tmp_path / "orin", bundle)
    env = dataclasses.replace(_env(gpu=ORIN, trt_version="10.3.0.30", trt_error=None, cuda_python="12.6.0"), **change)
    report = diagnose(env, engines=root)
    bad = _line(report, "engines", "orin/audio_projector")
    assert bad.status == "error" and needle in bad.found
    assert bad.fix.startswith("rebuild: qinyu-edge build --bundle") and report.exit_code == 1


def test_tampered_plan_is_reported(preset_bundle, tmp_path):
    _, bundle = preset_bundle
    root = _engine_set(tmp_path / "orin", bundle)
    plan = root / "audio_projector.plan"
    data = bytearray(plan.read_bytes())
    data[-1] ^= 0xFF
    plan.write_bytes(bytes(data))
    report = diagnose(_env(gpu=ORIN, trt_version="10.3.0.30", trt_error=None, cuda_python="12.6.0"), engines=root)
    assert "changed after it was built" in _line(report, "engines", "orin/audio_projector").found


def test_no_engine_set_and_a_damaged_manifest(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no engine set" in _line(diagnose(_env(), engines=empty), "engines").found
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    line = _line(diagnose(_env(), engines=broken), "engines")
    assert line.status == "error" and "not valid JSON" in line.found


def test_run_doctor_with_engines_here(preset_bundle, tmp_path):
    """The real probe plus an engine set: on this machine (no TensorRT) it must refuse, not crash."""
    _, bundle = preset_bundle
    root = _engine_set(tmp_path / "orin", bundle)
    report = run_doctor(bundle=bundle, engines=root)
    env = report.environment
    line = _line(report, "engines", "orin") if env.trt_version is None or env.gpu is None else None
    if line is not None:
        assert report.exit_code == 1 and "cannot run here" in line.found
    else:  # a GPU machine with TensorRT: a plan built for Orin's 10.3.0.30 matches only there
        assert [c for c in report.checks if c.area == "engines"]
