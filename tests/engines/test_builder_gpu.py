"""Build the tiny presets' components with real TensorRT, run them through TrtSession and compare
with ONNX Runtime on the CPU; rebuild only stale plans; refuse tampered and foreign plans.

Needs tensorrt, cuda-python and an NVIDIA GPU. Where any is missing the tests are skipped with
the reason; there is no fake TensorRT.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (x86: pip install tensorrt-cu12 cuda-python; Jetson: JetPack ships it)"
    from qinyu_edge.errors import QinyuError
    from qinyu_edge.runtime.trt_session import cuda_device

    try:
        cuda_device()
    except QinyuError as e:
        return f"no usable NVIDIA GPU or cuda-python: {e}"
    return None


MISSING = _missing()
if MISSING is not None:
    pytest.skip(MISSING, allow_module_level=True)

import tensorrt as trt  # noqa: E402

from qinyu_edge.bundle import load_bundle  # noqa: E402
from qinyu_edge.device.targets import Target  # noqa: E402
from qinyu_edge.engine_manifest import (  # noqa: E402
    MANIFEST, SHARED_SCRATCH_COMPONENTS, EngineError, EngineSet, parse_trt_version, read_plan_header, rebuild_command, same_trt_build,
)
from qinyu_edge.engines.builder import build_all  # noqa: E402
from qinyu_edge.engines.plan import BuildOptions, make_build_plans  # noqa: E402
from qinyu_edge.runtime.kv_cache import KVCache  # noqa: E402
from qinyu_edge.runtime.session import OrtSession, open_session  # noqa: E402
from qinyu_edge.runtime.trt_session import SharedScratch, TrtSession, cuda_device  # noqa: E402

# TensorRT may run fp32 matrix products in TF32 (on by default), ~1e-3 relative.
TOLERANCE = 2e-2


def _local_target() -> Target:
    gpu = cuda_device()
    return Target("local", gpu.name, "jetson" if gpu.integrated else "local", gpu.compute_capability,
                  gpu.memory_bytes, gpu.integrated, None, None, None, 0, ())


@pytest.fixture(scope="module")
def built(preset_bundle, tmp_path_factory):
    bundle = load_bundle(preset_bundle[1])
    plans = make_build_plans(bundle, _local_target(), BuildOptions(precision="fp32", trt_version=trt.__version__))
    out = tmp_path_factory.mktemp(f"engines-{preset_bundle[0]}")
    rebuild = rebuild_command(str(bundle.root), "local", "fp32", str(out))
    results = build_all(plans, out, str(bundle.root), rebuild)
    return bundle, plans, out, results, rebuild


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


def _feeds(spec, cfg, rng) -> dict[str, np.ndarray]:
    out = {}
    for t in spec.inputs:
        shape = tuple(d if isinstance(d, int) else min(max(spec.shape_ranges[d][0], 17), spec.shape_ranges[d][2])
                      for d in t.shape)
        if t.dtype == "int64":
            high = cfg.xy.codebook_size if t.name == "codes" else cfg.backbone.vocab_size
            out[t.name] = rng.integers(0, high, shape, dtype=np.int64)
        else:
            out[t.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def test_every_component_is_built_with_its_manifest(built):
    bundle, plans, out, results, rebuild = built
    assert [r.action for r in results] == ["built"] * len(plans)
    eset = EngineSet.load(out)
    gpu = cuda_device()
    for plan in plans:
        e = eset.engines[plan.component]
        data = (out / e.plan_file).read_bytes()
        assert same_trt_build(read_plan_header(data).trt_version, parse_trt_version(trt.__version__))
        assert e.trt_version == trt.__version__ and e.gpu_name == gpu.name and e.rebuild == rebuild
        assert e.onnx_sha256 == bundle.files[plan.onnx_file].sha256 and e.profiles == plan.profiles
    assert len(eset.engines["backbone"].profiles) == 2
    assert (out / plans[0].settings.timing_cache).is_file()


def test_a_second_build_rebuilds_only_stale_plans(built, tmp_path):
    bundle, plans, out, _, rebuild = built
    copy = tmp_path / "engines"
    shutil.copytree(out, copy)
    assert {r.action for r in build_all(plans, copy, str(bundle.root), rebuild)} == {"up to date"}
    plan = copy / "heads_logits.plan"
    plan.write_bytes(plan.read_bytes()[:-1] + b"\0")
    results = {r.component: r for r in build_all(plans, copy, str(bundle.root), rebuild)}
    assert results["heads_logits"].action == "rebuilt" and "changed after it was built" in results["heads_logits"].reason
    assert {r.action for n, r in results.items() if n != "heads_logits"} == {"up to date"}


def test_components_match_onnx_runtime(built):
    bundle, plans, out, _, _ = built
    rng = np.random.default_rng(0)
    for plan in plans:
        if plan.component == "backbone":
            continue
        spec = bundle.components[plan.component]
        feeds = _feeds(spec, bundle.config, rng)
        ref = OrtSession(bundle.path(plan.component), disabled_optimizers=spec.ort_disabled_optimizers).run(feeds)
        got = open_session(out / plan.plan_file, backend="trt").run(feeds)
        for name, want in ref.items():
            assert got[name].shape == want.shape and got[name].dtype == want.dtype, (plan.component, name)
            if want.dtype == np.int64:
                assert np.mean(got[name] == want) >= 0.75, (plan.component, name, got[name], want)
            else:
                assert _rel(got[name], want) <= TOLERANCE, (plan.component, name, _rel(got[name], want))


def test_engines_sharing_scratch_match_their_own_memory(built):
    """The encoder, CAM++, projectors and XY decoder run on one block of context memory, sized to the
    largest of them, and give the same outputs as contexts with memory of their own."""
    bundle, plans, out, _, _ = built
    rng = np.random.default_rng(2)
    scratch = SharedScratch.on_device()
    files = {p.component: out / p.plan_file for p in plans if p.component in SHARED_SCRATCH_COMPONENTS}
    shared = {name: TrtSession(path, scratch=scratch) for name, path in files.items()}
    assert set(shared) == set(SHARED_SCRATCH_COMPONENTS)
    needs = [s._engine.device_memory_size_v2 for s in shared.values()]
    assert scratch.nbytes == max(max(needs), 256) and scratch.separate_bytes == sum(needs)
    for _ in range(2):  # interleaved, as a reply alternates between them
        for name, session in shared.items():
            feeds = _feeds(bundle.components[name], bundle.config, rng)
            want = TrtSession(files[name]).run(feeds)
            got = session.run(feeds)
            for k, v in want.items():
                assert np.array_equal(got[k], v) if v.dtype == np.int64 else _rel(got[k], v) <= 1e-5, (name, k)
    for session in shared.values():
        session.close()
    assert scratch.nbytes == 0


def test_backbone_prefill_then_decode_into_the_cache(built):
    bundle, _, out, _, _ = built
    spec = bundle.components["backbone"]
    h = bundle.config.backbone.hidden_size
    ort = OrtSession(bundle.path("backbone"), disabled_optimizers=spec.ort_disabled_optimizers)
    session = TrtSession(out / "backbone.plan", onnx_sha256=bundle.files[spec.file].sha256)
    caches = {s: KVCache.for_backbone(spec, 64) for s in ("ort", "trt")}
    hidden = {s: np.zeros((1, h), np.float32) for s in caches}
    rng = np.random.default_rng(1)
    for i, n in enumerate((9, 1, 1, 1, 1)):
        embeds = rng.standard_normal((1, n, h)).astype(np.float32)
        before = session.stats.bytes_in
        for name, sess in (("ort", ort), ("trt", session)):
            cache = caches[name]
            sess.run({"inputs_embeds": embeds, **cache.past()}, into={**cache.slot(n), "hidden": hidden[name]})
            cache.advance(n)
        assert _rel(hidden["trt"], hidden["ort"]) <= TOLERANCE
        for a, b in zip(caches["trt"].buffers, caches["ort"].buffers):
            assert _rel(a, b) <= TOLERANCE  # rows not written yet are zero in both
        if i > 0:  # the past is already on the device: a step uploads its embeddings and nothing else
            assert session.stats.bytes_in - before == embeds.nbytes
    session.close()


def test_tampered_and_foreign_plans_are_refused(built, tmp_path):
    _, _, out, _, rebuild = built
    copy = tmp_path / "engines"
    shutil.copytree(out, copy)
    plan = copy / "encoder.plan"
    data = plan.read_bytes()
    plan.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(EngineError, match="changed after it was built") as e:
        TrtSession(plan)
    assert rebuild in str(e.value)
    plan.write_bytes(data)
    manifest = json.loads((copy / MANIFEST).read_text())
    for field, value, words in (("gpu_name", "Another GPU", "this GPU is"),
                                ("compute_capability", "5.3", "compute capability 5.3"),
                                ("trt_version", "10.0.0.1", "in its header but the manifest says 10.0.0.1")):
        changed = json.loads(json.dumps(manifest))
        changed["engines"]["encoder"][field] = value
        (copy / MANIFEST).write_text(json.dumps(changed))
        with pytest.raises(EngineError, match=words):
            TrtSession(plan)
    assert json.loads((out / MANIFEST).read_text()) == manifest  # the original set was not touched
