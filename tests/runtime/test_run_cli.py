"""`qinyu-edge run` end to end, and its answers to bad input."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from qinyu_edge.cli import main


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    raw, wav = d / "raw.wav", d / "q.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), "Can you sing me a song?"], check=True)
    # 22.05 kHz as espeak writes it: the runtime resamples.
    shutil.copy(raw, wav)
    return wav


def test_run_writes_reply_and_report(preset_bundle, question, tmp_path):
    _, bundle = preset_bundle
    out = tmp_path / "reply.wav"
    assert main(["run", "--bundle", str(bundle), "--input", str(question), "--output", str(out),
                 "--max-new-tokens", "80"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    info = sf.info(str(out))
    assert info.samplerate == 32000
    assert report["timings"]["steps"] == len(report["tokens"]) <= 80
    assert report["audio_seconds"] == pytest.approx(info.frames / 32000)
    assert info.frames == report["audio_frames"] * 2560
    for key in ("prefill_ms", "ms_per_step", "steps_to_first_audio", "time_to_first_audio_ms", "real_time_factor"):
        assert key in report["timings"]
    assert "real_time_factor" in report["definitions"]


def test_run_text_and_tts(preset_bundle, tmp_path):
    _, bundle = preset_bundle
    assert main(["run", "--bundle", str(bundle), "--text", "Hello!", "--output", str(tmp_path / "a.wav"),
                 "--max-new-tokens", "20"]) == 0
    assert main(["run", "--bundle", str(bundle), "--mode", "tts", "--text", "Read this aloud.",
                 "--output", str(tmp_path / "b.wav"), "--max-new-tokens", "20", "--schedule", "low_latency"]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["schedule"][0] == 8


def test_portable_graphs_give_the_same_reply(preset_bundle, question, tmp_path):
    """`--portable` runs the portable backbone instead of the bundle's ONNX Runtime CPU variant: the
    same reply, token for token."""
    _, bundle = preset_bundle
    reports = []
    for extra in ([], ["--portable"]):
        out = tmp_path / f"reply{len(extra)}.wav"
        assert main(["run", "--bundle", str(bundle), "--input", str(question), "--output", str(out),
                     "--max-new-tokens", "60", *extra]) == 0
        reports.append(json.loads(out.with_suffix(".json").read_text()))
    assert reports[0]["tokens"] == reports[1]["tokens"] and len(reports[0]["tokens"]) > 0


def err_of(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs(preset_bundle, tmp_path, capsys):
    _, bundle = preset_bundle
    out = str(tmp_path / "r.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    assert "corrupt.wav" in err_of(capsys, ["run", "--bundle", str(bundle), "--input", str(corrupt), "--output", out])
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), 16000)
    assert "empty" in err_of(capsys, ["run", "--bundle", str(bundle), "--input", str(empty), "--output", out]).lower()
    long_text = "word " * 5000
    msg = err_of(capsys, ["run", "--bundle", str(bundle), "--text", long_text, "--output", out, "--context", "512"])
    assert "context" in msg.lower()
    bad_voice = tmp_path / "voice.npy"
    np.save(bad_voice, np.zeros(100, np.float32))
    assert "192" in err_of(capsys, ["run", "--bundle", str(bundle), "--text", "hi", "--voice", str(bad_voice),
                                    "--output", out])
    assert "no agent voice named" in err_of(capsys, ["run", "--bundle", str(bundle), "--text", "hi", "--voice", "nobody",
                                                     "--output", out])
    assert not (tmp_path / "r.wav").exists()


def test_tampered_bundle_is_refused_before_running(preset_bundle, tmp_path, capsys):
    _, bundle = preset_bundle
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    with open(copy / "backbone.onnx", "ab") as f:
        f.write(b"\0")
    msg = err_of(capsys, ["run", "--bundle", str(copy), "--text", "hi", "--output", str(tmp_path / "r.wav")])
    assert "backbone.onnx" in msg and "re-export" in msg
