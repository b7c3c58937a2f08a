"""Build plans: ONNX variant per component and target, optimization profiles from the bundle's
shape ranges, builder settings per TensorRT version, JSON round trip, and `qinyu-edge build
--plan-only` / without TensorRT."""

from __future__ import annotations

import dataclasses
import json

import pytest

from qinyu_edge.bundle import file_entries, load_bundle, write_manifest
from qinyu_edge.cli import main
from qinyu_edge.device.targets import GiB, get_target
from qinyu_edge.engines.plan import (
    PLAN_FILE, BuildOptions, BuildPlan, make_build_plans, profiles_for, read_plans, usual_trt_versions, write_plans,
)
from qinyu_edge.errors import ConfigError

from engine_fixtures import write_bundle


def _by_name(plans):
    return {p.component: p for p in plans}


def test_backbone_gets_prefill_and_decode_profiles(mini_bundle):
    plans = _by_name(make_build_plans(mini_bundle, get_target("agx-orin-64")))
    prefill, decode = plans["backbone"].profiles
    assert (prefill.name, decode.name) == ("prefill", "decode")
    # Ranges from the bundle: seq (1, 256, 2048), past (1, 513, 4097) = the null row + 0..4096 positions.
    # Prefill takes one chunk (PREFILL_CHUNK = 512 positions) at a time, over any past.
    assert prefill.shapes["inputs_embeds"] == ((1, 1, 64), (1, 256, 64), (1, 512, 64))
    caches = [n for n in prefill.shapes if n.startswith("past_")]
    assert caches == ["past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    for cache in caches:
        assert prefill.shapes[cache] == ((1, 1, 2, 16), (1, 1, 2, 16), (4097, 1, 2, 16))
        assert decode.shapes[cache] == ((2, 1, 2, 16), (513, 1, 2, 16), (4097, 1, 2, 16))
    assert decode.shapes["inputs_embeds"] == ((1, 1, 64),) * 3
    # What the runtime feeds lands in a profile: a prompt's chunks on an empty and on a filled cache
    # (a long prompt, or a later turn's new positions), then steps.
    empty = {c: (1, 1, 2, 16) for c in caches}
    assert prefill.contains({"inputs_embeds": (1, 37, 64), **empty}) and not decode.contains(
        {"inputs_embeds": (1, 37, 64), **empty})
    assert prefill.contains({"inputs_embeds": (1, 512, 64), **{c: (1025, 1, 2, 16) for c in caches}})
    assert not prefill.contains({"inputs_embeds": (1, 513, 64), **empty})
    step = {"inputs_embeds": (1, 1, 64), **{c: (38, 1, 2, 16) for c in caches}}
    assert decode.contains(step)


def test_backbone_profiles_without_a_null_row(tmp_path):
    bundle = write_bundle(tmp_path / "b", past_range=(0, 512, 4096))
    prefill, decode = _by_name(make_build_plans(bundle, get_target("rtx-4090")))["backbone"].profiles
    assert prefill.shapes["past_key_0"] == ((0, 1, 2, 16), (0, 1, 2, 16), (4096, 1, 2, 16))  # from past 0
    assert decode.shapes["past_key_0"] == ((1, 1, 2, 16), (512, 1, 2, 16), (4096, 1, 2, 16))  # past 1..max
    with pytest.raises(ConfigError, match="no room for decoding"):
        make_build_plans(write_bundle(tmp_path / "c", past_range=(1, 1, 1)), get_target("rtx-4090"))


def test_other_components_one_profile_static_ones_none(mini_bundle):
    plans = _by_name(make_build_plans(mini_bundle, get_target("rtx-4090")))
    (enc,) = plans["encoder"].profiles
    assert enc.shapes == {"features": ((1, 1, 560), (1, 100, 560), (1, 500, 560))}
    (emb,) = plans["embedding"].profiles
    assert emb.shapes["ids"] == ((1, 1, 1), (1, 256, 8), (1, 2048, 8))
    assert plans["heads_greedy"].profiles == ()


def test_profiles_of_the_exported_presets_cover_every_dynamic_input(preset_bundle):
    bundle = load_bundle(preset_bundle[1])
    for spec in bundle.components.values():
        profiles = profiles_for(spec)
        dynamic = {t.name for t in spec.inputs if any(isinstance(d, str) for d in t.shape)}
        assert bool(profiles) == bool(dynamic), spec.name
        for prof in profiles:
            assert set(prof.shapes) == dynamic, (spec.name, prof.name)
            for name, (lo, opt, hi) in prof.shapes.items():
                declared = next(t.shape for t in spec.inputs if t.name == name)
                assert len(lo) == len(declared)
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (spec.name, name)
                # Fixed dims stay as the bundle declares them.
                assert all(d == lo[i] == hi[i] for i, d in enumerate(declared) if isinstance(d, int))
    assert [p.name for p in profiles_for(bundle.components["backbone"])] == ["prefill", "decode"]


def test_plan_json_round_trip(mini_bundle, tmp_path):
    plans = make_build_plans(mini_bundle, get_target("orin-nano-8"))
    path = write_plans(tmp_path / PLAN_FILE, plans)
    assert read_plans(path) == plans
    d = json.loads(path.read_text())["plans"][0]
    assert d["bundle"] == str(mini_bundle.root.resolve()) and d["onnx_sha256"] == mini_bundle.files[d["onnx_file"]].sha256


def test_unknown_target_and_missing_precision_are_refused(mini_bundle):
    with pytest.raises(ConfigError, match="unknown target 'jetson-nano'.*orin-nano-8"):
        get_target("jetson-nano")
    with pytest.raises(ConfigError, match=r"Orin Nano 8GB \(SM 8.7\) has no fp8.*fp16, int8, int4"):
        make_build_plans(mini_bundle, get_target("orin-nano-8"), BuildOptions(precision="fp8"))
    with pytest.raises(ConfigError, match="has no fp4"):
        make_build_plans(mini_bundle, get_target("rtx-4090"), BuildOptions(precision="fp4"))
    with pytest.raises(ConfigError, match="unknown precision 'int3'"):
        make_build_plans(mini_bundle, get_target("rtx-4090"), BuildOptions(precision="int3"))


def test_each_component_is_built_in_the_precision_its_graph_holds(tmp_path):
    fp32 = write_bundle(tmp_path / "fp32")
    int4 = write_bundle(tmp_path / "int4", {"backbone": "int4", "encoder": "fp16", "embedding": "fp16"}, fp32)
    plans = _by_name(make_build_plans(int4, get_target("orin-nx-16")))
    assert {n: p.precision for n, p in plans.items()} == {
        "encoder": "fp16", "embedding": "fp16", "backbone": "int4", "heads_greedy": "fp32"}
    assert all(p.requested_precision == "int4" and p.bundle == str(int4.root.resolve()) for p in plans.values())
    assert plans["backbone"].onnx_sha256 == int4.files["backbone.onnx"].sha256 != fp32.files["backbone.onnx"].sha256
    # Asking for the precision the bundle holds is fine; asking for another names the quantize step.
    assert make_build_plans(int4, get_target("orin-nx-16"), BuildOptions(precision="int4"))
    with pytest.raises(ConfigError, match=r"holds fp32 graphs, not int8.*qinyu-edge quantize"):
        make_build_plans(fp32, get_target("rtx-3090"), BuildOptions(precision="int8"))
    assert {p.precision for p in make_build_plans(fp32, get_target("rtx-3090"))} == {"fp32"}


def test_external_weights_are_part_of_the_graph(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    (bundle.root / "backbone.onnx.data").write_bytes(b"weights past 2 GiB, in miniature")
    write_manifest(dataclasses.replace(bundle, files=file_entries(bundle.root, [*bundle.files, "backbone.onnx.data"])))
    plans = _by_name(make_build_plans(load_bundle(bundle.root), get_target("rtx-4090")))
    assert plans["backbone"].onnx_data_sha256 == load_bundle(bundle.root).files["backbone.onnx.data"].sha256
    assert plans["encoder"].onnx_data_sha256 is None


def test_a_bundle_holding_a_precision_the_target_lacks_is_refused(tmp_path):
    fp8 = write_bundle(tmp_path / "fp8", {"backbone": "fp8", "encoder": "fp16"})
    with pytest.raises(ConfigError, match=r"Orin NX 16GB \(SM 8.7\) has no fp8"):
        make_build_plans(fp8, get_target("orin-nx-16"))
    assert _by_name(make_build_plans(fp8, get_target("rtx-4090")))["backbone"].precision == "fp8"


def test_int8_qdq_on_orin_falls_back_to_a_wider_graph(tmp_path):
    fp32 = write_bundle(tmp_path / "fp32")
    fp16 = write_bundle(tmp_path / "fp16", {c: "fp16" for c in ("encoder", "embedding", "backbone", "heads_greedy")}, fp32)
    int8 = write_bundle(tmp_path / "int8", {"backbone": "int8", "encoder": "int8", "embedding": "fp16"}, fp32)
    orin, card = get_target("agx-orin-64"), get_target("rtx-4090")
    # TensorRT 10.16 on Orin: reported to fail (NVIDIA/TensorRT#4832), so the plan builds the fp16 graph.
    p = _by_name(make_build_plans(int8, orin, BuildOptions(trt_version="10.16.2.10", fallback_bundles=(fp16,))))
    assert (p["backbone"].bundle, p["backbone"].precision) == (str(fp16.root.resolve()), "fp16")
    assert p["backbone"].onnx_sha256 == fp16.files["backbone.onnx"].sha256 and p["backbone"].fallback is None
    assert any("4832" in n for n in p["backbone"].notes) and p["embedding"].bundle == str(int8.root.resolve())
    # Without an fp16 bundle the recorded fp32 source serves.
    p = _by_name(make_build_plans(int8, orin, BuildOptions(trt_version="10.16.2.10")))["backbone"]
    assert (p.bundle, p.precision) == (str(fp32.root.resolve()), "fp32")
    # JetPack 6 (10.3): not reported either way: build int8, keep the fp16 graph as the fallback.
    p = _by_name(make_build_plans(int8, orin, BuildOptions(trt_version="10.3", fallback_bundles=(fp16,))))["backbone"]
    assert p.precision == "int8" and p.fallback is not None and p.fallback.precision == "fp16"
    assert (p.fallback.bundle, p.fallback.onnx_sha256) == (str(fp16.root.resolve()), fp16.files["backbone.onnx"].sha256)
    # Elsewhere int8 is built with no fallback.
    p = _by_name(make_build_plans(int8, card, BuildOptions(fallback_bundles=(fp16,))))["backbone"]
    assert p.precision == "int8" and p.fallback is None


def test_no_wider_graph_at_hand_is_a_clear_error(tmp_path):
    fp32 = write_bundle(tmp_path / "fp32")
    int8 = write_bundle(tmp_path / "int8", {"backbone": "int8"}, fp32)
    (fp32.root / "backbone.onnx").write_bytes(b"changed since the quantization")  # the source is no longer it
    write_manifest(dataclasses.replace(fp32, files=file_entries(fp32.root, list(fp32.files))))
    with pytest.raises(ConfigError, match="4832.*--fallback-bundle"):
        make_build_plans(int8, get_target("orin-nano-8"), BuildOptions(trt_version="10.16.2.10"))


def test_builder_settings_per_trt_version(mini_bundle):
    ten = make_build_plans(mini_bundle, get_target("orin-nano-8"))[0].settings
    eleven = make_build_plans(mini_bundle, get_target("rtx-5090"), BuildOptions(trt_version="11.4.0.106"))[0].settings
    assert ten.network_flags == ("STRONGLY_TYPED",)  # 10.x: strong typing is a flag
    assert eleven.network_flags == ()  # 11.x: always strongly typed, the flag is ignored
    for s in (ten, eleven):
        assert s.builder_flags == () and s.hardware_compatibility_level == "NONE"
    assert ten.timing_cache != eleven.timing_cache  # a timing cache is version-specific


def test_usual_trt_versions_per_target():
    assert usual_trt_versions(get_target("orin-nano-8"))[0] == "10.3"
    assert usual_trt_versions(get_target("agx-thor"))[0] == "10.13.3"
    assert "11.4.1" in usual_trt_versions(get_target("agx-orin-64"))
    assert usual_trt_versions(get_target("rtx-4090")) == ("11.4",)


def test_workspace_and_optimization_level_respect_small_boards(mini_bundle):
    nano = make_build_plans(mini_bundle, get_target("orin-nano-8"))[0].settings
    card = make_build_plans(mini_bundle, get_target("rtx-3090"))[0].settings
    assert 256 << 20 <= nano.workspace_bytes < 1 * GiB and nano.optimization_level == 2
    assert nano.workspace_bytes < card.workspace_bytes <= 4 * GiB and card.optimization_level == 3
    custom = make_build_plans(mini_bundle, get_target("rtx-3090"),
                              BuildOptions(workspace_bytes=512 << 20, optimization_level=5))[0].settings
    assert (custom.workspace_bytes, custom.optimization_level) == (512 << 20, 5)
    with pytest.raises(ConfigError, match="0..5"):
        make_build_plans(mini_bundle, get_target("rtx-3090"), BuildOptions(optimization_level=7))


def test_compatibility_choices_where_the_platform_allows_them(mini_bundle):
    with pytest.raises(ConfigError, match="not supported on JetPack"):
        make_build_plans(mini_bundle, get_target("agx-thor"), BuildOptions(hardware_compatibility="ampere_plus"))
    with pytest.raises(ConfigError, match="not supported on JetPack"):
        make_build_plans(mini_bundle, get_target("orin-nx-16"), BuildOptions(version_compatible=True))
    with pytest.raises(ConfigError, match="10.3 has no SAME_COMPUTE_CAPABILITY.*10.13"):
        make_build_plans(mini_bundle, get_target("rtx-4090"),
                         BuildOptions(trt_version="10.3", hardware_compatibility="same_compute_capability"))
    s = make_build_plans(mini_bundle, get_target("rtx-4090"),
                         BuildOptions(trt_version="10.13.3.9", hardware_compatibility="same_compute_capability",
                                      version_compatible=True))[0].settings
    assert s.hardware_compatibility_level == "SAME_COMPUTE_CAPABILITY" and s.builder_flags == ("VERSION_COMPATIBLE",)


def test_old_or_malformed_trt_versions_are_refused(mini_bundle):
    with pytest.raises(ConfigError, match="8.6.2 is too old"):
        make_build_plans(mini_bundle, get_target("orin-nano-8"), BuildOptions(trt_version="8.6.2"))
    with pytest.raises(ConfigError, match="not a TensorRT version"):
        make_build_plans(mini_bundle, get_target("orin-nano-8"), BuildOptions(trt_version="ten"))
    notes = make_build_plans(mini_bundle, get_target("rtx-4090"), BuildOptions(trt_version="10.8"))[0].notes
    assert any("not one of the versions" in n for n in notes)


def test_a_plan_file_cannot_smuggle_settings(mini_bundle):
    d = make_build_plans(mini_bundle, get_target("rtx-4090"))[0].to_dict()
    for field, value in (("builder_flags", ["FP16"]), ("network_flags", [1]), ("hardware_compatibility_level", 2)):
        bad = json.loads(json.dumps(d))
        bad["settings"][field] = value
        with pytest.raises(ConfigError, match="does not use"):
            BuildPlan.from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["format_version"] = 99
    with pytest.raises(ConfigError, match="format 99"):
        BuildPlan.from_dict(bad)


def test_cli_plan_only_writes_the_plans(mini_bundle, tmp_path, capsys):
    out = tmp_path / "engines"
    rc = main(["build", "--bundle", str(mini_bundle.root), "--target", "orin-nx-16", "--out", str(out), "--plan-only"])
    assert rc == 0
    plans = read_plans(out / PLAN_FILE)
    assert [p.component for p in plans] == list(mini_bundle.components)
    assert all(p.target == "orin-nx-16" and p.trt_version for p in plans)
    assert not (out / "manifest.json").exists()


def test_cli_without_tensorrt_writes_plans_and_says_how_to_get_it(mini_bundle, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; this test is about machines without it")
    except ImportError:
        pass
    out = tmp_path / "engines"
    rc = main(["build", "--bundle", str(mini_bundle.root), "--target", "orin-nano-8", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "TensorRT is not installed here" in err and "JetPack" in err
    assert read_plans(out / PLAN_FILE)
    rc = main(["build", "--bundle", str(mini_bundle.root), "--target", "rtx-4090", "--out", str(out)])
    assert rc == 2 and "pip install tensorrt-cu12" in capsys.readouterr().err


def test_cli_bad_inputs(mini_bundle, tmp_path, capsys):
    assert main(["build", "--bundle", str(mini_bundle.root), "--target", "nope", "--plan-only"]) == 2
    assert "unknown target 'nope'" in capsys.readouterr().err
    assert main(["build", "--bundle", str(mini_bundle.root), "--target", "orin-nano-8", "--precision", "fp8",
                 "--plan-only"]) == 2
    assert "has no fp8" in capsys.readouterr().err
    assert main(["build", "--bundle", str(tmp_path / "none"), "--target", "orin-nano-8", "--plan-only"]) == 2
    assert "not a model bundle" in capsys.readouterr().err
