"""CAM++ checkpoint files, speaker-embedding files, and the chunked embedding procedure."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from qinyu_edge.config import TINY_CAMPP, CamPPConfig
from qinyu_edge.errors import AudioInputError, CheckpointError
from qinyu_edge.export.models.campplus import CAMPPlus
from qinyu_edge.runtime.frontend import campplus_chunks, campplus_fbank
from qinyu_edge.export.speaker_checkpoint import (
    campplus_embedding,
    load_campplus,
    load_speaker_presets,
    write_campplus,
    write_official_speaker_dict,
    write_speaker_presets,
)

SR = 16000


@dataclasses.dataclass
class NotATensor:
    """Pickled by torch.save as a custom class: a weights-only load must refuse it."""

    value: int = 1


def randomize(module: CAMPPlus, seed: int = 0) -> CAMPPlus:
    """He-scaled random conv weights and random BatchNorm statistics, so the output follows the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


def _voice(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    # The pitch steps every 10 s so that chunks differ in spectral shape, not only in level.
    f0 = 110.0 * 1.6 ** np.floor(t / 10.0) + 20 * np.sin(2 * np.pi * 0.3 * t)
    wav = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / SR) + 0.02 * rng.standard_normal(t.size)
    return wav.astype(np.float32)


def _vectors(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"spk{i}": rng.standard_normal(192).astype(np.float32) for i in range(n)}


# --- CAM++ weights -------------------------------------------------------------------------------

def test_campplus_roundtrip(tmp_path):
    module = randomize(CAMPPlus(TINY_CAMPP), seed=3)
    path = write_campplus(module, tmp_path / "campplus.bin")
    assert [p.name for p in tmp_path.iterdir()] == ["campplus.bin"]
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert type(raw) is dict and list(raw) == list(module.state_dict())
    loaded = load_campplus(path, TINY_CAMPP)
    for k, v in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(1, 160, 80)
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))


def test_campplus_key_problems_listed_together(tmp_path):
    state = CAMPPlus(TINY_CAMPP).state_dict()
    del state["xvector.block2.tdnnd1.linear1.weight"]
    state["xvector.extra.weight"] = torch.zeros(3)
    state["head.conv1.weight"] = torch.zeros(5, 1, 3, 3)
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError) as e:
        load_campplus(tmp_path / "bad.bin", TINY_CAMPP)
    msg = str(e.value)
    for key in ("xvector.block2.tdnnd1.linear1.weight", "xvector.extra.weight", "head.conv1.weight", "bad.bin"):
        assert key in msg


def test_campplus_config_mismatch(tmp_path):
    write_campplus(CAMPPlus(TINY_CAMPP), tmp_path / "tiny.bin")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_campplus(tmp_path / "tiny.bin", CamPPConfig())


def test_campplus_refuses_pickled_objects(tmp_path):
    torch.save({"head.conv1.weight": NotATensor()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="evil.bin"):
        load_campplus(tmp_path / "evil.bin", TINY_CAMPP)


# --- speaker-embedding files ---------------------------------------------------------------------

def test_official_dict_roundtrip(tmp_path):
    presets = _vectors(3)
    path = write_official_speaker_dict(presets, tmp_path / "spk2embeds_roleplay.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == set(presets)
    assert all(v.dtype == torch.float32 and v.shape == (192,) for v in raw.values())
    loaded = load_speaker_presets(path)
    assert set(loaded) == set(presets)
    for name, vec in presets.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], vec)


def test_safetensors_roundtrip_is_torch_free_format(tmp_path):
    from safetensors.numpy import load_file

    presets = _vectors(2, seed=1)
    path = write_speaker_presets(presets, tmp_path / "speakers.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["speakers.safetensors"]
    raw = load_file(str(path))
    assert all(v.dtype == np.float32 and v.shape == (192,) for v in raw.values())
    loaded = load_speaker_presets(path)
    for name, vec in presets.items():
        np.testing.assert_array_equal(loaded[name], vec)


def test_single_vector_files(tmp_path):
    vec = _vectors(1)["spk0"]
    torch.save(torch.from_numpy(vec), tmp_path / "hello_speaker.pt")
    np.save(tmp_path / "other.npy", vec.astype(np.float64))
    assert list(load_speaker_presets(tmp_path / "hello_speaker.pt")) == ["hello_speaker"]
    np.testing.assert_array_equal(load_speaker_presets(tmp_path / "hello_speaker.pt")["hello_speaker"], vec)
    got = load_speaker_presets(tmp_path / "other.npy")["other"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, vec)


def test_low_precision_and_leading_axis_accepted(tmp_path):
    vec = torch.randn(192)
    torch.save({"a": vec.to(torch.bfloat16), "b": vec[None]}, tmp_path / "mixed.pt")
    loaded = load_speaker_presets(tmp_path / "mixed.pt")
    assert loaded["a"].dtype == np.float32 and loaded["a"].shape == (192,)
    np.testing.assert_array_equal(loaded["a"], vec.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(loaded["b"], vec.numpy())


def test_bad_entries_all_reported(tmp_path):
    nan = torch.zeros(192)
    nan[5] = float("nan")
    inf = torch.zeros(192)
    inf[0] = float("inf")
    bad = {
        "short": torch.zeros(128), "nan": nan, "inf": inf, "ok": torch.zeros(192),
        "ints": torch.zeros(192, dtype=torch.int64),
    }
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_speaker_presets(tmp_path / "bad.pt")
    msg = str(e.value)
    assert "bad.pt" in msg and "Fix:" in msg
    for name in ("'short'", "'nan'", "'inf'", "'ints'"):
        assert name in msg
    assert "'ok'" not in msg


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda p: torch.save({}, p / "empty.pt"), "empty.pt"),
        (lambda p: torch.save({"x": NotATensor()}, p / "evil.pt"), "evil.pt"),
        (lambda p: (p / "junk.safetensors").write_bytes(b"not a safetensors file"), "junk.safetensors"),
        (lambda p: np.save(p / "wrong.npy", np.zeros(512, np.float32)), "wrong.npy"),
        (lambda p: (p / "voices.json").write_text("{}"), "voices.json"),
        (lambda p: torch.save([torch.zeros(192)], p / "list.pt"), "list.pt"),
        (lambda p: None, "missing.pt"),
    ],
)
def test_unusable_speaker_files(tmp_path, make, name):
    make(tmp_path)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_speaker_presets(tmp_path / name)


def test_writers_validate(tmp_path):
    with pytest.raises(CheckpointError, match="'bad'"):
        write_speaker_presets({"bad": np.full(192, np.nan, np.float32)}, tmp_path / "s.safetensors")
    with pytest.raises(ValueError):
        write_speaker_presets(_vectors(1), tmp_path / "s.pt")
    with pytest.raises(CheckpointError):
        write_official_speaker_dict({}, tmp_path / "s.pt")
    assert list(tmp_path.iterdir()) == []


# --- embedding procedure -------------------------------------------------------------------------

def test_embedding_is_mean_of_chunk_embeddings():
    module = randomize(CAMPPlus(TINY_CAMPP), seed=5)
    wav = _voice(25.0, seed=2)
    got = campplus_embedding(module, wav)
    assert got.shape == (192,) and got.dtype == np.float32
    per_chunk = []
    for chunk in campplus_chunks(wav):
        with torch.no_grad():
            per_chunk.append(module(torch.from_numpy(campplus_fbank(chunk))[None])[0].numpy())
    assert np.abs(per_chunk[0] - per_chunk[2]).max() > 1e-3  # the chunks really differ
    np.testing.assert_allclose(got, np.mean(per_chunk, axis=0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "wav",
    [np.zeros((2, SR), np.float32), np.zeros(SR, np.int16), np.zeros(0, np.float32), np.full(SR, np.nan, np.float32)],
    ids=["stereo", "int16", "empty", "nan"],
)
def test_bad_audio(wav):
    with pytest.raises(AudioInputError):
        campplus_embedding(CAMPPlus(TINY_CAMPP), wav)
