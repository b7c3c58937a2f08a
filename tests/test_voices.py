"""`qinyu-edge voice design | add | list | remove` on a copy of a tiny bundle: vectors land in the
speakers file, the bundle still verifies, shipped voices stay bit for bit, bad input changes nothing."""

import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

from qinyu_edge.bundle import load_bundle
from qinyu_edge.cli import main
from qinyu_edge.export.bundle_export import preset_bundle
from qinyu_edge.export.qinyu_checkpoint import load_preset
from qinyu_edge.export.speaker_checkpoint import campplus_embedding
from qinyu_edge.export.voice_design import tiny_voice_designer, write_tiny_voicedesign
from qinyu_edge.fileio import sha256_file
from qinyu_edge.runtime.audio_io import load_16k_mono, write_wav
from qinyu_edge.voices import SPEAKERS_FILE

PRESET = "tiny-8b"
ROLE = "该角色是一个「老」年「女」性， 性格「慈祥、说话慢」"


@pytest.fixture
def bundle(tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(preset_bundle(PRESET), out)
    return out


def voices(bundle):
    return load_file(str(bundle / SPEAKERS_FILE))


def run(*argv):
    return main([str(a) for a in argv])


def test_design_writes_a_voice_and_keeps_the_rest(bundle, capsys):
    shipped = voices(bundle)
    assert run("voice", "design", "--bundle", bundle, "--role", ROLE, "--name", "奶奶", "--seed", 5) == 0
    out = capsys.readouterr().out
    assert "nearest shipped voices by cosine: " in out and "tian" in out
    load_bundle(bundle)  # hashes updated: still verifies
    after = voices(bundle)
    assert set(after) == set(shipped) | {"奶奶"}
    assert all(np.array_equal(after[k], v) for k, v in shipped.items())
    assert np.array_equal(after["奶奶"], tiny_voice_designer().design(ROLE, seed=5))
    run("voice", "list", "--bundle", bundle)
    listing = capsys.readouterr().out
    assert f'\n奶奶         designed from text "{ROLE}" (seed 5)\n' in listing  # aligned by display width:
    assert "\ntian         shipped\n" in listing and listing.startswith("2619-王承恩  shipped\n")  # 2 cells per 汉字

    # The same name is refused without --force; with it, the voice is replaced.
    assert run("voice", "design", "--bundle", bundle, "--role", ROLE, "--name", "奶奶", "--seed", 6) == 2
    assert "pass --force" in capsys.readouterr().err
    assert run("voice", "design", "--bundle", bundle, "--role", ROLE, "--name", "奶奶", "--seed", 6, "--force") == 0
    assert not np.array_equal(voices(bundle)["奶奶"], after["奶奶"])


@pytest.mark.parametrize("argv, message", [
    (["--role", "  ", "--name", "x"], "role description is empty"),
    (["--role", "长" * 500, "--name", "x"], "more than 400"),
    (["--role", ROLE, "--name", "tian", "--force"], "shipped voice"),
    (["--role", ROLE, "--name", "a/b"], "voice name"),
])
def test_design_bad_input_changes_nothing(bundle, capsys, argv, message):
    before = sha256_file(bundle / SPEAKERS_FILE), sha256_file(bundle / "bundle.json")
    assert run("voice", "design", "--bundle", bundle, *argv) == 2
    assert message in capsys.readouterr().err
    assert (sha256_file(bundle / SPEAKERS_FILE), sha256_file(bundle / "bundle.json")) == before


def test_design_with_a_checkpoint_missing_keys(bundle, tmp_path, capsys):
    import torch

    folder = write_tiny_voicedesign(tmp_path / "vd")
    state = torch.load(folder / "voicedesign.pt", weights_only=True)
    del state["decoder.text_encoder.projection.bias"]
    torch.save(state, folder / "voicedesign.pt")
    before = sha256_file(bundle / SPEAKERS_FILE)
    assert run("voice", "design", "--bundle", bundle, "--role", ROLE, "--name", "x", "--voicedesign", folder) == 2
    assert "1 missing key(s): projection.bias" in capsys.readouterr().err
    assert sha256_file(bundle / SPEAKERS_FILE) == before


def test_add_from_clip_list_and_remove(bundle, tmp_path, capsys):
    raw, clip = tmp_path / "raw.wav", tmp_path / "clip.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), "Hello, this is my voice for the assistant."], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(clip)], check=True)
    assert run("voice", "add", "--bundle", bundle, "--from-wav", clip, "--name", "me") == 0
    load_bundle(bundle)
    # The runtime's CAM++ graph gives the PyTorch CAM++ vector of the same clip.
    ref = campplus_embedding(load_preset(PRESET).campplus, load_16k_mono(clip))
    np.testing.assert_allclose(voices(bundle)["me"], ref, atol=1e-4, rtol=1e-4)
    run("voice", "list", "--bundle", bundle)
    assert "me" in (out := capsys.readouterr().out) and "from clip clip.wav" in out

    assert run("voice", "remove", "--bundle", bundle, "me") == 0
    assert "me" not in voices(bundle) and "me" not in load_bundle(bundle).origin["voices"]
    assert run("voice", "remove", "--bundle", bundle, "tian") == 2
    assert "shipped with the bundle" in capsys.readouterr().err
    assert run("voice", "remove", "--bundle", bundle, "nobody") == 2
    assert "no voice named 'nobody'" in capsys.readouterr().err


@pytest.mark.parametrize("samples, message", [
    (np.full(8000, 0.1, np.float32), "at least 1 s"),
    (np.zeros(32000, np.float32), "is silent"),
])
def test_add_refuses_short_or_silent_clips(bundle, tmp_path, capsys, samples, message):
    clip = write_wav(tmp_path / "clip.wav", samples, 16000)
    before = sha256_file(bundle / SPEAKERS_FILE)
    assert run("voice", "add", "--bundle", bundle, "--from-wav", clip, "--name", "me") == 2
    assert message in capsys.readouterr().err
    assert sha256_file(bundle / SPEAKERS_FILE) == before
