"""`qinyu-edge bench` on the tiny-4b bundle with few runs: every section, the report and plots,
`bench compare` on a planted regression, Ctrl-C keeping partial results, ratios against torch."""

import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from qinyu_edge.device.bench import SECTIONS
from qinyu_edge.device.bench_report import compare
from qinyu_edge.export.bundle_export import preset_bundle

from qinyu_edge.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = ["--runs", "3", "--warmup", "1", "--audio-seconds", "1", "--prompt-lengths", "16", "--contexts", "16,200",
         "--e2e-runs", "1", "--ttfa-runs", "1", "--max-new-tokens", "48", "--first-chunks", "4,8", "--schedule", "8,16"]

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng renders the bench's speech")


@pytest.fixture(scope="module")
def bundle():
    return preset_bundle("tiny-4b")


@pytest.fixture(scope="module")
def run(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--bundle", str(bundle), "--out", str(out), *QUICK, "--against", "torch"])
    assert rc == 0
    return out, json.loads((out / "bench.json").read_text())


def test_every_section_and_figure(run, bundle):
    _, doc = run
    assert doc["status"]["complete"] and doc["status"]["interrupted_during"] is None
    assert set(doc["sections"]) == set(SECTIONS)
    for name in ("environment", "components", "end_to_end", "memory", "roofline", "against"):
        assert doc["sections"][name]["status"] == "measured", name
    power = doc["sections"]["power"]
    if power["status"] == "measured":
        assert {"power/joules_per_reply", "power/watts_per_reply"} <= set(doc["figures"])
    else:
        assert power["status"] == "not reported on this platform" and power["note"]

    env = doc["environment"]
    assert env["bundle"]["sha256"] == hashlib.sha256((bundle / "bundle.json").read_bytes()).hexdigest()
    assert {"qinyu-edge", "onnxruntime", "numpy", "python"} <= set(env["versions"])
    assert set(env["precisions"]) == set(json.loads((bundle / "bundle.json").read_text())["components"])

    figs = doc["figures"]
    wanted = ["frontend/1s", "encoder/1s", "audio_projector/1s", "campplus/chunk", "speaker_projector/2", "prefill/16",
              "backbone_step/ctx=16", "decode_step/ctx=200", "xy_decoder/chunk=8+ctx=0", "xy_decoder/chunk=16+ctx=8",
              "xy_decoder/chunk=16+ctx=16", "e2e/time_to_first_audio", "e2e/reply_latency", "e2e/decode_steps_per_s",
              "e2e/audio_s_per_wall_s", "e2e/ttfa/first_chunk=4", "e2e/ttfa/first_chunk=8", "memory/rss_peak",
              "memory/kv_cache_bytes", "roofline/weights_fraction/ctx=16", "roofline/weights_kv_fraction/ctx=200"]
    missing = [f for f in wanted if f not in figs]
    assert not missing
    for f in figs.values():
        assert f["value"] is not None and math.isfinite(f["value"]), f["id"]
        s = f["stats"]
        if s:
            assert s["min"] <= s["p50"] <= s["p95"] <= s["p99"] <= s["max"], f["id"]
    assert figs["encoder/1s"]["stats"]["n"] == 3
    # A 4096-position MLA cache: positions x layers x (kv_lora_rank + rope dims) x 4 bytes, plus at
    # most one masked null row in front.
    cfg = json.loads((bundle / "bundle.json").read_text())["config"]["backbone"]
    per_pos = cfg["num_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4
    assert 4096 * per_pos <= figs["memory/kv_cache_bytes"]["value"] <= 4097 * per_pos
    assert figs["memory/kv_cache_bytes"]["params"]["bytes_per_position"] == per_pos
    # A longer context reads more KV per step, so weights+KV exceeds weights alone there.
    roof = {r["context"]: r for r in doc["roofline"]["per_context"]}
    assert roof[200]["weights_kv_gbs"] > roof[200]["weights_gbs"] > 0
    assert doc["turn"]["timings"]["steps"] > 0 and doc["turn"]["chunk_ms"]


def test_report_and_plots(run):
    out, _ = run
    report = (out / "report.md").read_text()
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"latency_by_context.png", "ttfa_by_first_chunk.png", "turn_waterfall.png",
                                     "components.png"}
    import matplotlib.image

    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
        h, w = matplotlib.image.imread(p).shape[:2]
        assert h > 200 and w > 400
        assert f"]({p.name})" in report
    assert "## Against PyTorch" in report and "e2e/time_to_first_audio" in report


def _compare(tmp_path, a, b, *extra):
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    return main(["bench", "compare", str(pa), str(pb), *extra])


def test_compare_flags_a_planted_regression(run, tmp_path, capsys):
    _, doc = run
    assert _compare(tmp_path, doc, doc) == 0
    slower = copy.deepcopy(doc)
    slower["figures"]["decode_step/ctx=16"]["value"] *= 1.2
    assert _compare(tmp_path, doc, slower) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "decode_step/ctx=16" in out and "1 regression(s)" in out
    # A higher-is-better figure falling by 20% is a regression too; 5% is within the threshold.
    fewer = copy.deepcopy(doc)
    fewer["figures"]["e2e/decode_steps_per_s"]["value"] /= 1.2
    assert _compare(tmp_path, doc, fewer) == 1
    small = copy.deepcopy(doc)
    small["figures"]["decode_step/ctx=16"]["value"] *= 1.05
    assert _compare(tmp_path, doc, small) == 0
    assert _compare(tmp_path, doc, small, "--threshold", "0.01") == 1


def test_ctrl_c_writes_what_was_measured(bundle, tmp_path):
    """--stop-after sends this process a real SIGINT during the 5th figure's measurement."""
    out = tmp_path / "partial"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "qinyu_edge.cli", "bench", "--bundle", str(bundle), "--out", str(out),
                          *QUICK, "--stop-after", "4"], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 130, res.stderr
    doc = json.loads((out / "bench.json").read_text())
    assert doc["status"]["complete"] is False and doc["status"]["interrupted_during"]
    assert doc["status"]["figures_measured"] == len([f for f in doc["figures"] if not f.startswith("roofline/w")]) == 4
    assert "Interrupted during" in (out / "report.md").read_text()
    assert "interrupted" in res.stderr


def test_split_times_the_three_sessions_a_step_used_to_take(run, bundle, tmp_path):
    """`--split` is the before of the fused decode graph: `bench compare` of the two runs is the A/B."""
    _, fused = run
    assert fused["environment"]["decode_step"].startswith("one call")
    out = tmp_path / "split"
    assert main(["bench", "--bundle", str(bundle), "--out", str(out), *QUICK, "--split"]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert doc["environment"]["decode_step"].startswith("three calls")
    for name in ("decode_step/ctx=200", "e2e/decode_steps_per_s"):
        assert math.isfinite(doc["figures"][name]["value"]) and doc["figures"][name]["value"] > 0
    assert "(fused)" in fused["figures"]["backbone_step/ctx=16"]["label"]
    assert "(fused)" not in doc["figures"]["backbone_step/ctx=16"]["label"]
    # the fused backbone_step also runs the heads: compare shows it but never calls it a regression
    rows = {r.id: r for r in compare(doc, fused, threshold=0.0)}
    assert not rows["backbone_step/ctx=16"].alike and not rows["backbone_step/ctx=16"].regression
    assert rows["decode_step/ctx=200"].alike


def test_against_torch_ratios_are_finite(run):
    _, doc = run
    ag = doc["against"]
    assert max(ag["parity_rel"].values()) < 1e-3
    ratios = {r["figure"]: r["ratio"] for r in ag["ratios"]}
    for comp in ("encoder/1s", "audio_projector/1s", "speaker_projector/2", "backbone_step/ctx=16",
                 "backbone_step/ctx=200", "xy_decoder/chunk=16+ctx=8"):
        assert comp in ratios and math.isfinite(ratios[comp]) and ratios[comp] > 0, comp
        torch_fig = doc["figures"][f"torch/{comp}"]
        paired = torch_fig["params"]["ours_paired"]
        assert paired["n"] == torch_fig["stats"]["n"] == 3
        assert doc["figures"][f"vs_torch/{comp}"]["value"] == pytest.approx(torch_fig["value"] / paired["p50"])


def test_device_modules_do_not_import_torch():
    code = ("import sys; import qinyu_edge.device.bench, qinyu_edge.device.bench_cli, qinyu_edge.device.bench_report, "
            "qinyu_edge.device.telemetry; bad = {'torch', 'matplotlib', 'onnx'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
