"""Engine manifests and the checks before deserializing: the plan header, tampered and foreign
plans, stale plans, engine-set files, and interrupted writes (real files, no TensorRT needed)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct

import pytest

from qinyu_edge.device.targets import get_target
from qinyu_edge.engine_manifest import (
    MANIFEST, BuilderSettings, EngineError, EngineManifest, EngineSet, check_engine, read_plan_header, rebuild_command,
)
from qinyu_edge.engines.builder import buffer_chunks, stale_reason, write_plan
from qinyu_edge.errors import BundleError
from qinyu_edge.engines.plan import make_build_plans
from qinyu_edge.runtime.trt_session import CudaDevice

REBUILD = rebuild_command("/data/bundle", "orin-nano-8", "fp16")


def plan_blob(version: tuple[int, int, int, int] = (10, 3, 0, 26), payload: bytes = b"engine body " * 50,
              tag: int = 0x74727466, serialization: int = 0) -> bytes:
    """A serialized-engine header as trtexec --getPlanVersionOnly reads it: uint32 tag, uint32
    serialization version, 16 bytes we do not interpret, then major, minor, patch, build."""
    return struct.pack("<II", tag, serialization) + bytes(range(16)) + bytes(version) + payload


def entry_for(data: bytes, **changes) -> EngineManifest:
    e = EngineManifest(
        component="backbone", onnx_file="backbone.onnx", onnx_sha256="ab" * 32, plan_file="backbone.plan",
        plan_sha256=hashlib.sha256(data).hexdigest(), plan_bytes=len(data), trt_version="10.3.0.26",
        gpu_name="Orin", compute_capability="8.7", precision="fp16", profiles=(),
        builder=BuilderSettings(("STRONGLY_TYPED",), (), "NONE", 1 << 30, 3, "timing-trt10.3.0.26.cache"),
        target="orin-nano-8", bundle="/data/bundle", rebuild=REBUILD, created="2026-11-22T00:00:00+00:00",
    )
    return dataclasses.replace(e, **changes)


# --- header ------------------------------------------------------------------------------------

def test_header_version_is_read_from_bytes_24_to_27():
    assert read_plan_header(plan_blob((10, 3, 0, 26))).trt_version == (10, 3, 0, 26)
    assert read_plan_header(plan_blob((11, 4, 0, 106))).trt_version == (11, 4, 0, 106)
    assert read_plan_header(memoryview(plan_blob((10, 16, 1, 11)))).trt_version == (10, 16, 1, 11)


def test_header_problems_are_named():
    h = read_plan_header(b"\x08\x00\x00\x00onnx protobuf, not a plan............")
    assert h.trt_version is None and "not a serialized engine" in h.problem
    h = read_plan_header(plan_blob()[:20])
    assert h.trt_version is None and "shorter than a TensorRT plan header" in h.problem
    h = read_plan_header(plan_blob(serialization=3))
    assert h.trt_version is None and h.serialization_version == 3 and "serialization version 3" in h.problem


# --- check_engine ------------------------------------------------------------------------------

def test_a_matching_plan_passes():
    data = plan_blob()
    assert check_engine(entry_for(data), "10.3.0.26", "Orin", (8, 7), "ab" * 32, data) is None
    # Some installs report three version parts.
    assert check_engine(entry_for(data), "10.3.0", "Orin", (8, 7), None, data) is None


def test_tampered_plan_is_refused_with_the_rebuild_command():
    data = plan_blob()
    tampered = bytearray(data)
    tampered[-1] ^= 1
    m = check_engine(entry_for(data), "10.3.0.26", "Orin", (8, 7), None, bytes(tampered))
    assert m.check == "plan_sha256" and "changed after it was built" in m.reason
    assert m.command == REBUILD and "qinyu-edge build --bundle /data/bundle --target orin-nano-8" in str(m)
    m = check_engine(entry_for(data), "10.3.0.26", "Orin", (8, 7), None, data[:-10])
    assert m.check == "plan_sha256" and "copied incompletely" in m.reason
    m = check_engine(entry_for(data), "10.3.0.26", "Orin", (8, 7), None, None)
    assert m.check == "plan_missing"


def test_a_plan_whose_header_disagrees_with_its_manifest_is_refused():
    data = plan_blob((10, 16, 1, 11))  # a 10.16 plan under a manifest that says 10.3
    m = check_engine(entry_for(data), "10.3.0.26", "Orin", (8, 7), None, data)
    assert m.check == "plan_version" and "10.16.1.11" in m.reason and "10.3.0.26" in m.reason
    junk = b"\x00" * 64
    assert check_engine(entry_for(junk), None, None, None, None, junk).check == "plan_header"


def test_a_plan_built_from_other_weights_is_refused():
    """The graph file only says where its weights lie: the same graph over new weights is stale."""
    data = plan_blob()
    entry = entry_for(data, onnx_data_sha256="11" * 32)
    assert check_engine(entry, "10.3.0.26", "Orin", (8, 7), "ab" * 32, data, "11" * 32) is None
    m = check_engine(entry, "10.3.0.26", "Orin", (8, 7), "ab" * 32, data, "22" * 32)
    assert m is not None and m.check == "onnx_data_sha256" and "weights of the bundle's backbone.onnx changed" in m.reason
    # a plan recorded before weights were recorded cannot be compared: the build's staleness check rebuilds it
    assert check_engine(entry_for(data), "10.3.0.26", "Orin", (8, 7), "ab" * 32, data, "22" * 32) is None


@pytest.mark.parametrize("runtime, gpu, cc, onnx, check, words", [
    ("10.16.1.11", "Orin", (8, 7), None, "trt_version", "exact TensorRT build"),
    ("10.3.0.30", "Orin", (8, 7), None, "trt_version", "10.3.0.30"),
    ("10.3.0.26", "NVIDIA GeForce RTX 4090", (8, 9), None, "compute_capability", "8.7"),
    ("10.3.0.26", "Orin (other)", (8, 7), None, "gpu", "Orin (other)"),
    ("10.3.0.26", "Orin", (8, 7), "cd" * 32, "onnx_sha256", "backbone.onnx changed"),
])
def test_foreign_or_stale_plans_are_refused(runtime, gpu, cc, onnx, check, words):
    data = plan_blob()
    m = check_engine(entry_for(data), runtime, gpu, cc, onnx, data)
    assert m is not None and m.check == check and words in m.reason and m.command == REBUILD


def test_version_compatible_plans_run_on_newer_trt_of_the_same_major():
    data = plan_blob((10, 13, 3, 9))
    vc = entry_for(data, trt_version="10.13.3.9", gpu_name="NVIDIA GeForce RTX 4090", compute_capability="8.9",
                   builder=BuilderSettings(("STRONGLY_TYPED",), ("VERSION_COMPATIBLE",), "NONE", 1 << 30, 3, None))
    gpu = ("NVIDIA GeForce RTX 4090", (8, 9))
    assert check_engine(vc, "10.16.1.11", *gpu, None, data) is None
    assert check_engine(vc, "10.3.0.26", *gpu, None, data).check == "trt_version"
    assert check_engine(vc, "11.4.0.106", *gpu, None, data).check == "trt_version"


def test_hardware_compatible_plans_move_between_gpus_within_their_level():
    data = plan_blob((10, 16, 1, 11))
    base = dict(trt_version="10.16.1.11", gpu_name="NVIDIA GeForce RTX 3090", compute_capability="8.6")
    amp = entry_for(data, builder=BuilderSettings((), (), "AMPERE_PLUS", 1 << 30, 3, None), **base)
    assert check_engine(amp, "10.16.1.11", "NVIDIA GeForce RTX 4090", (8, 9), None, data) is None
    assert check_engine(amp, "10.16.1.11", "Tesla T4", (7, 5), None, data).check == "compute_capability"
    same = entry_for(data, builder=BuilderSettings((), (), "SAME_COMPUTE_CAPABILITY", 1 << 30, 3, None), **base)
    assert check_engine(same, "10.16.1.11", "NVIDIA RTX A6000", (8, 6), None, data) is None
    assert check_engine(same, "10.16.1.11", "NVIDIA GeForce RTX 4090", (8, 9), None, data).check == "compute_capability"


# --- engine set files ----------------------------------------------------------------------------

def test_engine_set_round_trip_and_lookup(tmp_path):
    data = plan_blob()
    eset = EngineSet(tmp_path, "orin-nano-8", "/data/bundle", {"backbone": entry_for(data, notes=("a note",))})
    eset.write()
    back = EngineSet.load(tmp_path)
    assert back.engines == eset.engines and back.target == "orin-nano-8"
    assert back.entry_for_plan("backbone.plan").component == "backbone"
    with pytest.raises(EngineError, match="lists no plan named 'encoder.plan'"):
        back.entry_for_plan("encoder.plan")


def test_engine_set_load_errors(tmp_path):
    with pytest.raises(EngineError, match="not an engine set.*qinyu-edge build"):
        EngineSet.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{half a manifest")
    with pytest.raises(EngineError, match="not valid JSON"):
        EngineSet.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 9, "target": "x", "bundle": "y", "engines": {}}))
    with pytest.raises(EngineError, match="format 9, newer"):
        EngineSet.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "target": "x", "bundle": "y",
                                                        "engines": {"backbone": {"component": "backbone"}}}))
    with pytest.raises(EngineError, match="lacks or mangles"):
        EngineSet.load(tmp_path)


# --- interrupted builds ----------------------------------------------------------------------------

def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("interrupt", [RuntimeError("TensorRT died"), KeyboardInterrupt()])
def test_an_interrupted_plan_write_leaves_nothing_behind(tmp_path, interrupt):
    target = tmp_path / "engines" / "backbone.plan"

    def build_then_fail():
        yield plan_blob()[:16]  # writing has started
        raise interrupt

    with pytest.raises(type(interrupt)):
        write_plan(target, build_then_fail())
    assert not target.exists() and _leftovers(target.parent) == []
    # With an older plan in place, it stays byte for byte, and so does the manifest that lists it.
    old = plan_blob(payload=b"old engine")
    sha, size = write_plan(target, [old])
    assert (sha, size) == (hashlib.sha256(old).hexdigest(), len(old))
    EngineSet(target.parent, "orin-nano-8", "/data/bundle", {"backbone": entry_for(old)}).write()
    manifest = (target.parent / "manifest.json").read_bytes()
    with pytest.raises(type(interrupt)):
        write_plan(target, build_then_fail())
    assert target.read_bytes() == old and (target.parent / "manifest.json").read_bytes() == manifest
    assert _leftovers(target.parent) == []
    assert check_engine(entry_for(old), None, None, None, None, target.read_bytes()) is None


def test_plan_chunks_stream_a_buffer_without_copying_it(tmp_path):
    blob = plan_blob(payload=os.urandom(10_000))
    chunks = list(buffer_chunks(blob, size=4096))
    assert [len(c) for c in chunks] == [4096, 4096, len(blob) - 8192]
    sha, size = write_plan(tmp_path / "x.plan", buffer_chunks(blob, size=4096))
    assert (tmp_path / "x.plan").read_bytes() == blob and sha == hashlib.sha256(blob).hexdigest()


# --- staleness --------------------------------------------------------------------------------------

def test_stale_reasons(mini_bundle, tmp_path):
    engine_dir = tmp_path / "engines"
    plan = next(p for p in make_build_plans(mini_bundle, get_target("orin-nano-8"),) if p.component == "backbone")
    plan = dataclasses.replace(plan, trt_version="10.3.0.26")
    data = plan_blob()
    write_plan(engine_dir / plan.plan_file, [data])
    entry = entry_for(data, onnx_sha256=plan.onnx_sha256, build_plan=plan.to_dict())
    orin = CudaDevice(0, "Orin", (8, 7), 8 << 30, True)
    assert stale_reason(plan, None, engine_dir, "10.3.0.26", orin) == "not built yet"
    assert stale_reason(plan, entry, engine_dir, "10.3.0.26", orin) is None
    changed = dataclasses.replace(plan, onnx_sha256="ef" * 32)
    assert "backbone.onnx changed" in stale_reason(changed, entry, engine_dir, "10.3.0.26", orin)
    reweighted = dataclasses.replace(plan, onnx_data_sha256="01" * 32)  # same graph, new external weights
    assert "backbone.onnx changed" in stale_reason(reweighted, entry, engine_dir, "10.3.0.26", orin)
    newer = dataclasses.replace(plan, trt_version="10.3.0.30")
    assert "TensorRT changed from 10.3.0.26 to 10.3.0.30" in stale_reason(newer, entry, engine_dir, "10.3.0.30", orin)
    wider = dataclasses.replace(plan, settings=dataclasses.replace(plan.settings, workspace_bytes=1 << 31))
    assert "build plan changed (settings)" in stale_reason(wider, entry, engine_dir, "10.3.0.26", orin)
    other_gpu = CudaDevice(0, "Orin (nvgpu)", (8, 7), 8 << 30, True)
    assert "this GPU is 'Orin (nvgpu)'" in stale_reason(plan, entry, engine_dir, "10.3.0.26", other_gpu)
    (engine_dir / plan.plan_file).write_bytes(data[:-1] + b"!")
    assert "changed after it was built" in stale_reason(plan, entry, engine_dir, "10.3.0.26", orin)
    (engine_dir / plan.plan_file).unlink()
    assert "does not exist" in stale_reason(plan, entry, engine_dir, "10.3.0.26", orin)


def test_engine_set_names_stay_inside(tmp_path):
    """An engine set's manifest is untrusted too: a plan_file naming a path out of the folder, or a
    format_version that is not an integer, is refused when the set is loaded."""
    escape = EngineSet(tmp_path, "t", "b", {"backbone": entry_for(plan_blob(), plan_file="../../etc/shadow")})
    escape.write()
    with pytest.raises(BundleError, match="only relative names"):
        EngineSet.load(tmp_path)
    d = json.loads((tmp_path / MANIFEST).read_text())
    d["format_version"] = "1"
    (tmp_path / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(EngineError, match="not an integer"):
        EngineSet.load(tmp_path)
