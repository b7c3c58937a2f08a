"""Host audio frontend: file reading, resampling, SenseVoice fbank + LFR + CMVN, CAM++ fbank and chunks.

Oracles: torchaudio's own `compliance.kaldi.fbank` and sinc resampler (what the official code calls),
and an independent float64 torch implementation of Kaldi's fbank written here from its definition.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import soundfile as sf
import torch

from qinyu_edge.config import SenseVoiceConfig
from qinyu_edge.errors import AudioInputError, BundleError
from qinyu_edge.runtime.audio_io import (
    load_16k_mono, read_audio, resample_torchaudio, to_16k_mono, write_wav,
)
from qinyu_edge.runtime.frontend import (
    CAMPPLUS_FBANK, MIN_SAMPLES, FrontendConfig, SenseVoiceFrontend, apply_lfr, campplus_chunks, campplus_fbank,
    kaldi_fbank,
)

SR = 16000
FBANK_TOL = 1e-3  # log-mel, float32 FFTs of different libraries on int16-scale speech


def identity_frontend(config: FrontendConfig | None = None) -> SenseVoiceFrontend:
    cfg = config or FrontendConfig()
    return SenseVoiceFrontend(cfg, np.zeros(cfg.output_dim, np.float32), np.ones(cfg.output_dim, np.float32))


# --- oracles -----------------------------------------------------------------------------------


ORACLE_DIR = pathlib.Path(__file__).resolve().parents[2] / ".oracles"


@pytest.fixture(scope="session")
def torchaudio_source(tmp_path_factory) -> pathlib.Path:
    """torchaudio's Python sources, unpacked from the wheel `scripts/setup.sh` downloads to `.oracles/`.

    The wheel is never installed: its C extension is built for another torch, and an importable but
    broken `torchaudio` would break transformers (which imports it when present). The fbank and
    resample code is pure torch, so those module files run on their own (see `_torchaudio_module`).
    """
    wheels = sorted(ORACLE_DIR.glob("torchaudio-*.whl"))
    if not wheels:
        pytest.skip(f"no torchaudio wheel in {ORACLE_DIR}; `bash scripts/setup.sh` downloads it")
    out = tmp_path_factory.mktemp("torchaudio_oracle")
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(out, [n for n in z.namelist() if n.startswith("torchaudio/") and n.endswith(".py")])
    return out / "torchaudio"


def _torchaudio_module(root: pathlib.Path, relpath: str, name: str) -> types.ModuleType:
    """One torchaudio source module, executed under placeholder parents: the package's own
    `__init__` (which loads the C extension) never runs."""
    ext = types.ModuleType("torchaudio._extension")
    ext._IS_TORCHAUDIO_EXT_AVAILABLE = False
    functional = types.ModuleType("torchaudio.functional")
    functional.__path__ = [str(root / "functional")]
    package = types.ModuleType("torchaudio")
    package.__path__ = [str(root)]  # other submodules (torchaudio._internal) load from the sources
    stubs = {"torchaudio": package, "torchaudio._extension": ext, "torchaudio.functional": functional}
    touched = list(stubs) + ["torchaudio.functional.filtering", "torchaudio._internal", "torchaudio._internal.module_utils", name]
    saved = {k: sys.modules.get(k) for k in touched}
    sys.modules.update(stubs)
    try:
        mspec = importlib.util.spec_from_file_location(name, root / relpath)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module
        mspec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


@pytest.fixture(scope="module")
def ta_kaldi(torchaudio_source) -> types.ModuleType:
    return _torchaudio_module(torchaudio_source, "compliance/kaldi.py", "_oracle_torchaudio_kaldi")


@pytest.fixture(scope="module")
def ta_functional(torchaudio_source) -> types.ModuleType:
    return _torchaudio_module(torchaudio_source, "functional/functional.py", "torchaudio.functional.functional")


def reference_fbank(wav: np.ndarray, *, window: str, scale: float, frame_len: int = 400, shift: int = 160,
                    n_mels: int = 80) -> np.ndarray:
    """Kaldi fbank from its definition, in float64: per frame remove DC, pre-emphasise (0.97, first
    sample against itself), window, zero-pad to a power of two, power spectrum, triangular filters
    equally spaced on the mel scale 1127 ln(1 + f/700) from 20 Hz to Nyquist, log floored at float eps."""
    x = torch.from_numpy(wav.astype(np.float64)) * scale
    frames = x.unfold(0, frame_len, shift)
    frames = frames - frames.mean(dim=1, keepdim=True)
    frames = frames - 0.97 * torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    cos = torch.cos(2 * math.pi * torch.arange(frame_len, dtype=torch.float64) / (frame_len - 1))
    win = 0.54 - 0.46 * cos if window == "hamming" else (0.5 - 0.5 * cos) ** 0.85
    n_fft = 1 << (frame_len - 1).bit_length()
    power = torch.fft.rfft(frames * win, n=n_fft).abs() ** 2

    def mel(f):
        return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)

    lo, hi = mel(20.0), mel(SR / 2)
    delta = (hi - lo) / (n_mels + 1)
    bins = mel(torch.arange(n_fft // 2, dtype=torch.float64) * SR / n_fft)
    left = lo + delta * torch.arange(n_mels, dtype=torch.float64)[:, None]
    up = (bins - left) / delta
    down = (left + 2 * delta - bins) / delta
    weights = torch.clamp(torch.minimum(up, down), min=0.0)
    energies = power[:, : n_fft // 2] @ weights.T
    return torch.log(torch.clamp(energies, min=torch.finfo(torch.float32).eps)).numpy()


def ta_fbank(ta_kaldi, wav: np.ndarray, **kw) -> np.ndarray:
    return ta_kaldi.fbank(torch.from_numpy(np.asarray(wav, np.float32))[None], sample_frequency=SR, **kw).numpy()


@pytest.fixture(scope="module")
def speech(speech_files) -> np.ndarray:
    wav, rate = read_audio(speech_files["mono16k"])
    assert rate == SR
    return wav


# --- fbank ---------------------------------------------------------------------------------------


def test_sensevoice_fbank_matches_torchaudio(ta_kaldi, speech):
    # FunASR WavFrontend as SenseVoiceSmall configures it, with dither 0.
    ref = ta_fbank(ta_kaldi, speech * 32768, num_mel_bins=80, frame_length=25, frame_shift=10, dither=0.0,
                   energy_floor=0.0, window_type="hamming", snip_edges=True)
    ours = identity_frontend().fbank(speech)
    assert ours.shape == ref.shape == (1 + (speech.size - 400) // 160, 80)
    assert np.abs(ours - ref).max() <= FBANK_TOL


def test_campplus_fbank_matches_torchaudio(ta_kaldi, speech):
    # 3D-Speaker FBank(80, 16000, mean_nor=True): torchaudio defaults otherwise (povey), unscaled input.
    chunk = campplus_chunks(speech)[0]
    ref = ta_fbank(ta_kaldi, chunk, num_mel_bins=80, dither=0)
    ref = ref - ref.mean(axis=0, keepdims=True)
    ours = campplus_fbank(chunk)
    assert ours.shape == ref.shape == (998, 80)
    assert np.abs(ours - ref).max() <= FBANK_TOL
    assert np.abs(ours.mean(axis=0)).max() < 1e-4


@pytest.mark.parametrize("window,scale", [("hamming", 32768.0), ("povey", 1.0)])
def test_fbank_matches_kaldi_definition(speech, window, scale):
    cfg = FrontendConfig().fbank if window == "hamming" else CAMPPLUS_FBANK
    ours = kaldi_fbank(speech, cfg)
    ref = reference_fbank(speech, window=window, scale=scale)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= FBANK_TOL


@pytest.mark.parametrize("n", [MIN_SAMPLES, 300, 399, 400, 401])
def test_short_clip_window_shrinks_to_clip(ta_kaldi, speech, n):
    # FunASR passes frame_length = min(25 ms, clip length): a clip under 400 samples is one frame of its own length.
    wav = speech[8000:8000 + n]
    ours = identity_frontend().fbank(wav)
    ref = ta_fbank(ta_kaldi, wav * 32768, num_mel_bins=80, frame_length=min(25, n / SR * 1000), frame_shift=10,
                   dither=0.0, energy_floor=0.0, window_type="hamming", snip_edges=True)
    own = reference_fbank(wav, window="hamming", scale=32768.0, frame_len=min(n, 400))
    assert ours.shape == ref.shape == own.shape == (1, 80)
    assert np.abs(ours - ref).max() <= FBANK_TOL
    assert np.abs(ours - own).max() <= FBANK_TOL


def test_too_short_clip_is_refused(speech):
    with pytest.raises(AudioInputError, match=f"{MIN_SAMPLES - 1} samples.*at least {MIN_SAMPLES}"):
        identity_frontend()(speech[8000:8000 + MIN_SAMPLES - 1])


def test_dither_is_a_parameter(speech):
    clip = speech[24000:40000]  # inside the sentence: dither noise (1 LSB rms) is small against speech
    plain = identity_frontend()
    assert np.array_equal(plain(clip), plain(clip))  # dither 0: deterministic
    dithered = identity_frontend(FrontendConfig.from_sensevoice(SenseVoiceConfig(), dither=1.0))
    diff = np.abs(dithered(clip) - plain(clip))
    assert 0 < np.median(diff) < 0.05


# --- LFR and CMVN --------------------------------------------------------------------------------


def test_one_second_gives_17_lfr_frames():
    wav = (0.1 * np.sin(np.arange(SR) * 0.05)).astype(np.float32)
    fe = identity_frontend()
    assert fe.fbank(wav).shape == (98, 80)
    assert fe(wav).shape == (17, 560)
    assert fe(wav).dtype == np.float32


def _lfr_by_rule(feats: np.ndarray, m: int, n: int) -> np.ndarray:
    # FunASR's rule: (m-1)//2 copies of frame 0 in front; output i takes m frames from i*n, and a
    # window running past the end is completed with copies of the last frame.
    t = feats.shape[0]
    padded = [feats[0]] * ((m - 1) // 2) + list(feats)
    rows = []
    for i in range(math.ceil(t / n)):
        window = padded[i * n:i * n + m]
        window += [feats[-1]] * (m - len(window))
        rows.append(np.concatenate(window))
    return np.stack(rows)


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 17, 18, 19, 98, 446])
def test_lfr_padding_rule(t):
    # Each frame is filled with its own index, so every stacked slot names the frame it came from.
    feats = np.repeat(np.arange(t, dtype=np.float32)[:, None], 3, axis=1)
    out = apply_lfr(feats, 7, 6)
    assert out.shape == (math.ceil(t / 6), 21)
    np.testing.assert_array_equal(out, _lfr_by_rule(feats, 7, 6))


def test_lfr_first_and_last_rows_spelled_out():
    feats = np.arange(8, dtype=np.float32)[:, None]
    out = apply_lfr(feats, 7, 6)
    np.testing.assert_array_equal(out, [[0, 0, 0, 0, 1, 2, 3], [3, 4, 5, 6, 7, 7, 7]])


def test_cmvn_is_shift_then_scale(speech):
    rng = np.random.default_rng(0)
    shift = rng.normal(-10, 3, 560).astype(np.float32)
    scale = rng.uniform(0.1, 0.5, 560).astype(np.float32)
    fe = SenseVoiceFrontend(FrontendConfig(), shift, scale)
    raw = apply_lfr(fe.fbank(speech), 7, 6)
    np.testing.assert_array_equal(fe(speech), (raw + shift) * scale)
    assert not np.allclose(fe(speech), raw * scale + shift)


def test_cmvn_size_mismatch_is_a_bundle_error():
    with pytest.raises(BundleError, match="80 .shift. and 560 .scale.*560-dim"):
        SenseVoiceFrontend(FrontendConfig(), np.zeros(80), np.ones(560))


# --- reading and resampling ----------------------------------------------------------------------


def test_flac_reads_like_wav(speech_files):
    a, ra = read_audio(speech_files["mono16k"])
    b, rb = read_audio(speech_files["flac16k"])
    assert ra == rb == SR
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["soxr", "torchaudio"])
def test_44k_stereo_gives_the_features_of_16k_mono(speech_files, speech, method):
    # The stereo file is the 16 kHz speech upsampled, left at full and right at half level.
    wav = load_16k_mono(speech_files["stereo44k"], method=method)
    assert abs(wav.size - speech.size) <= 1
    fe = identity_frontend()
    n = min(wav.size, speech.size)
    want = fe.fbank(0.75 * speech[:n])
    got = fe.fbank(wav[:n])
    # Compare frames within 40 dB of the loudest, and mel bins below ~6.5 kHz, where both the
    # upsampler (sox) and either downsampler are flat; silent frames hold only filter ringing.
    loud = want.max(axis=1) > want.max() - math.log(1e4)
    diff = np.abs(got - want)[loud][:, :74]
    assert diff.mean() < 0.01
    assert np.percentile(diff, 99) < 0.15


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_torchaudio_method_matches_torchaudio_resample(ta_functional, rate):
    # torchaudio.transforms.Resample (what the official code uses) builds its kernel in float64 and
    # keeps it as float32; the private helpers are called the same way here.
    x = np.random.default_rng(rate).normal(0, 0.2, rate + 123).astype(np.float32)
    gcd = math.gcd(rate, SR)
    kernel, width = ta_functional._get_sinc_resample_kernel(rate, SR, gcd, 6, 0.99, "sinc_interp_hann", None)
    ref = ta_functional._apply_sinc_resample_kernel(torch.from_numpy(x)[None], rate, SR, gcd, kernel, width)[0].numpy()
    ours = resample_torchaudio(x, rate, SR)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5


@pytest.mark.parametrize("method", ["soxr", "torchaudio"])
def test_multichannel_downmix_and_rate(method):
    # Five channels of one 440 Hz tone at different levels: the mono mix is the tone at the mean level.
    rate, f = 48000, 440.0
    t = np.arange(rate) / rate
    levels = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    x = (np.sin(2 * np.pi * f * t)[:, None] * levels[None, :]).astype(np.float32)
    out = to_16k_mono(x, rate, method=method)
    assert out.size == SR
    want = 0.3 * np.sin(2 * np.pi * f * np.arange(SR) / SR)
    assert np.abs(out - want)[500:-500].max() < 2e-3


# --- bad inputs ----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    p = tmp_path / "nope.wav"
    with pytest.raises(AudioInputError, match=f"{p}.*does not exist"):
        read_audio(p)


def test_directory_is_not_audio(tmp_path):
    with pytest.raises(AudioInputError, match="is not a file"):
        read_audio(tmp_path)


def test_corrupt_wav(tmp_path):
    p = tmp_path / "broken.wav"
    p.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(256)))
    with pytest.raises(AudioInputError, match=f"{p} cannot be decoded.*corrupt or not audio.*sox"):
        read_audio(p)


def test_unsupported_format(tmp_path):
    p = tmp_path / "clip.m4a"
    p.write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(512))
    with pytest.raises(AudioInputError, match=r"\.m4a files are not supported.*ffmpeg"):
        read_audio(p)


def test_empty_wav(tmp_path):
    p = tmp_path / "empty.wav"
    sf.write(p, np.zeros((0,), np.int16), SR, subtype="PCM_16")
    with pytest.raises(AudioInputError, match=f"{p} contains no audio samples"):
        read_audio(p)


def test_all_nan_wav(tmp_path):
    p = tmp_path / "nan.wav"
    sf.write(p, np.full(1600, np.nan, np.float32), SR, subtype="FLOAT")
    with pytest.raises(AudioInputError, match=f"{p}: every sample is NaN"):
        read_audio(p)


def test_some_nan_samples_are_refused_too():
    x = np.zeros(4000, np.float32)
    x[[5, 9]] = np.nan
    with pytest.raises(AudioInputError, match="2 of 4000 samples are NaN"):
        identity_frontend()(x)


def test_integer_and_multichannel_arrays_are_refused():
    with pytest.raises(AudioInputError, match="dtype int16.*divide int16 PCM by 32768"):
        identity_frontend()(np.zeros(4000, np.int16))
    with pytest.raises(AudioInputError, match=r"mono waveform.*to_16k_mono"):
        identity_frontend()(np.zeros((4000, 2), np.float32))
    with pytest.raises(AudioInputError, match="sample rate 0"):
        to_16k_mono(np.zeros(100, np.float32), 0)


# --- writing -------------------------------------------------------------------------------------


def test_write_wav_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    grid = rng.integers(-32768, 32767, 3000).astype(np.float32) / 32768
    p = tmp_path / "out.wav"
    write_wav(p, np.ones(10, np.float32) * 0.5, 8000)  # overwritten below
    write_wav(p, grid, 24000)
    back, rate = read_audio(p)
    assert rate == 24000 and sf.info(p).subtype == "PCM_16"
    np.testing.assert_array_equal(back, grid)

    f = tmp_path / "float.wav"
    x = rng.normal(0, 0.3, 2000).astype(np.float32)
    write_wav(f, x, 32000, subtype="FLOAT")
    back, _ = read_audio(f)
    assert sf.info(f).subtype == "FLOAT"
    np.testing.assert_array_equal(back, x)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["float.wav", "out.wav"]  # no temp files left


def test_write_wav_clips_pcm16(tmp_path):
    p = write_wav(tmp_path / "loud.wav", np.array([2.0, -2.0, 0.0], np.float32), SR)
    back, _ = read_audio(p)
    np.testing.assert_array_equal(back, [32767 / 32768, -1.0, 0.0])


# --- CAM++ chunks --------------------------------------------------------------------------------


def test_campplus_chunks_fill_by_circular_repeat():
    wav = np.arange(25 * SR, dtype=np.float32)  # each sample names its position
    chunks = campplus_chunks(wav)
    assert [c.size for c in chunks] == [10 * SR] * 3
    np.testing.assert_array_equal(chunks[0], wav[:10 * SR])
    np.testing.assert_array_equal(chunks[2], np.concatenate([wav[20 * SR:], wav[:5 * SR]]))

    short = np.arange(3 * SR, dtype=np.float32)
    (only,) = campplus_chunks(short)
    np.testing.assert_array_equal(only, np.concatenate([short, short, short, short[:SR]]))

    exact = campplus_chunks(np.arange(20 * SR, dtype=np.float32))
    assert len(exact) == 2 and exact[1][-1] == 20 * SR - 1


def test_campplus_chunks_stop_at_max_seconds():
    wav = np.arange(100 * SR, dtype=np.float32)
    chunks = campplus_chunks(wav)
    assert len(chunks) == 9
    assert chunks[-1][-1] == 90 * SR - 1


# --- the device side stays torch-free ------------------------------------------------------------


def test_runtime_frontend_imports_without_torch():
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchaudio', 'transformers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np
from qinyu_edge.runtime import audio_io, frontend
fe = frontend.SenseVoiceFrontend(frontend.FrontendConfig(), np.zeros(560), np.ones(560))
x = (0.1 * np.sin(np.arange(48000) * 0.02)).astype(np.float32)
assert fe(audio_io.to_16k_mono(x, 48000)).shape == (17, 560)
assert fe(audio_io.to_16k_mono(x, 48000, method='torchaudio')).shape == (17, 560)
assert frontend.campplus_fbank(frontend.campplus_chunks(x[:16000])[0]).shape == (998, 80)
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchaudio', 'transformers')]
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
