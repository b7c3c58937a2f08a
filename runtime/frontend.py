"""Host-side audio features: SenseVoice (Kaldi fbank -> LFR -> CMVN) and CAM++ (Kaldi fbank, mean-normalised).

Both reproduce `torchaudio.compliance.kaldi.fbank` as the official code calls it, computed here with
kaldi-native-fbank so the device side needs no torch.

SenseVoice (FunASR `WavFrontend` with SenseVoiceSmall's `frontend_conf`): waveform x 32768, hamming
window, 25/10 ms, snip_edges, 80 mel bins, then LFR m=7 n=6 and CMVN (x + shift) * scale. FunASR's
default dither is 1.0 (the config sets none), which makes official features random; we default to 0.

CAM++ (3D-Speaker `FBank(80, 16000, mean_nor=True)`): the waveform is NOT scaled, the window is
Kaldi's default povey, dither 0, and each chunk's mean over time is subtracted.

Every other option is the Kaldi default in both: pre-emphasis 0.97, DC offset removal, FFT size
rounded up to a power of two, mel range 20 Hz .. Nyquist, power spectrum, log with float eps floor,
no energy term.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import kaldi_native_fbank as knf
import numpy as np

from qinyu_edge.config import CamPPConfig, SenseVoiceConfig
from qinyu_edge.errors import AudioInputError, BundleError

from .audio_io import TARGET_RATE, check_samples

# Kaldi's mel banks need at least one FFT bin under each filter; with 80 bins at 16 kHz a window of
# <= 256 samples (FFT size 256) leaves some empty and kaldi-native-fbank refuses it. torchaudio would
# return log(eps) for those bins; clips that short (16 ms) carry no speech anyway.
MIN_SAMPLES = 257


@dataclass(frozen=True)
class FbankConfig:
    """Kaldi fbank options; the defaults are those of `torchaudio.compliance.kaldi.fbank` (dither 0)."""

    sample_rate: int = TARGET_RATE
    n_mels: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    window: str = "povey"
    dither: float = 0.0
    preemph_coeff: float = 0.97
    remove_dc_offset: bool = True
    snip_edges: bool = True
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0 means offset from Nyquist
    energy_floor: float = 0.0  # only used with an energy term, which neither model has
    # Multiplier applied to the [-1, 1] waveform before the fbank (FunASR feeds int16-scale samples).
    input_scale: float = 1.0
    # FunASR shrinks the window to the clip for clips shorter than one frame (model-spec 10.9).
    shrink_window_to_clip: bool = False


SENSEVOICE_FBANK = FbankConfig(window="hamming", input_scale=32768.0, shrink_window_to_clip=True)
CAMPPLUS_FBANK = FbankConfig()


@dataclass(frozen=True)
class FrontendConfig:
    """The SenseVoice frontend: fbank options plus low-frame-rate stacking."""

    fbank: FbankConfig = SENSEVOICE_FBANK
    lfr_m: int = 7
    lfr_n: int = 6

    @classmethod
    def from_sensevoice(cls, sv: SenseVoiceConfig, dither: float = 0.0) -> "FrontendConfig":
        return cls(
            fbank=dataclasses.replace(SENSEVOICE_FBANK, n_mels=sv.n_mels, dither=dither),
            lfr_m=sv.lfr_m,
            lfr_n=sv.lfr_n,
        )

    @property
    def output_dim(self) -> int:
        return self.fbank.n_mels * self.lfr_m


def _window_size(cfg: FbankConfig, n_samples: int) -> int:
    frame_ms = cfg.frame_length_ms
    if cfg.shrink_window_to_clip:
        # Same double-precision expression as FunASR + torchaudio, so the truncation agrees bit for bit.
        frame_ms = min(frame_ms, n_samples / cfg.sample_rate * 1000)
    return int(cfg.sample_rate * frame_ms * 0.001)


def _knf_options(cfg: FbankConfig, window_size: int) -> knf.FbankOptions:
    opts = knf.FbankOptions()
    fo = opts.frame_opts
    fo.samp_freq = float(cfg.sample_rate)
    # kaldi-native-fbank truncates samp_freq * ms / 1000 in float32; half a sample of margin makes it
    # land on exactly the window size torchaudio computes.
    fo.frame_length_ms = (window_size + 0.5) * 1000.0 / cfg.sample_rate
    fo.frame_shift_ms = cfg.frame_shift_ms
    fo.window_type = cfg.window
    fo.dither = cfg.dither
    fo.preemph_coeff = cfg.preemph_coeff
    fo.remove_dc_offset = cfg.remove_dc_offset
    fo.snip_edges = cfg.snip_edges
    fo.round_to_power_of_two = True
    mo = opts.mel_opts
    mo.num_bins = cfg.n_mels
    mo.low_freq = cfg.low_freq
    mo.high_freq = cfg.high_freq
    opts.use_energy = False
    opts.energy_floor = cfg.energy_floor
    opts.use_log_fbank = True
    opts.use_power = True
    return opts


def kaldi_fbank(wav_16k: np.ndarray, cfg: FbankConfig, source: str = "audio input") -> np.ndarray:
    """Log-mel filterbank [T, n_mels] float32 of a float waveform in [-1, 1]."""
    wav = _as_waveform(wav_16k, source)
    n = wav.size
    if n < MIN_SAMPLES:
        raise AudioInputError(
            f"{source} has {n} samples ({1000 * n / cfg.sample_rate:.1f} ms); the fbank needs at least "
            f"{MIN_SAMPLES} samples ({1000 * MIN_SAMPLES / cfg.sample_rate:.1f} ms) at {cfg.sample_rate} Hz; pass a longer clip."
        )
    ws = _window_size(cfg, n)
    if n < ws:
        raise AudioInputError(
            f"{source} has {n} samples, shorter than one {cfg.frame_length_ms:g} ms frame ({ws} samples); pass a longer clip."
        )
    fb = knf.OnlineFbank(_knf_options(cfg, ws))
    scaled = wav * np.float32(cfg.input_scale) if cfg.input_scale != 1.0 else wav
    fb.accept_waveform(float(cfg.sample_rate), scaled)
    fb.input_finished()
    frames = fb.num_frames_ready
    out = np.empty((frames, cfg.n_mels), dtype=np.float32)
    for i in range(frames):
        out[i] = fb.get_frame(i)
    return out


def _as_waveform(wav: np.ndarray, source: str) -> np.ndarray:
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise AudioInputError(f"{source}: expected a mono waveform [samples], got shape {wav.shape}; downmix it first (audio_io.to_16k_mono).")
    if not np.issubdtype(wav.dtype, np.floating):
        raise AudioInputError(f"{source}: samples have dtype {wav.dtype}; pass float samples in [-1, 1] (divide int16 PCM by 32768).")
    check_samples(wav, source)
    return np.ascontiguousarray(wav, dtype=np.float32)


def lfr_indices(n_frames: int, lfr_m: int, lfr_n: int) -> np.ndarray:
    """[ceil(T/n), m] fbank-frame indices of each stacked output frame.

    The sequence is padded with (m-1)//2 copies of frame 0 in front and with copies of the last frame
    at the end as far as needed; output frame i stacks padded frames i*n .. i*n+m-1.
    """
    t_lfr = -(-n_frames // lfr_n)
    padded = np.arange(t_lfr)[:, None] * lfr_n + np.arange(lfr_m)[None, :] - (lfr_m - 1) // 2
    return np.clip(padded, 0, n_frames - 1)


def apply_lfr(feats: np.ndarray, lfr_m: int, lfr_n: int) -> np.ndarray:
    """[T, d] -> [ceil(T/n), m*d] low-frame-rate stacking."""
    return feats[lfr_indices(feats.shape[0], lfr_m, lfr_n)].reshape(-(-feats.shape[0] // lfr_n), lfr_m * feats.shape[1])


class SenseVoiceFrontend:
    """Waveform (16 kHz mono float) -> SenseVoice encoder input [T_lfr, n_mels*lfr_m] float32."""

    def __init__(self, config: FrontendConfig, cmvn_shift: np.ndarray, cmvn_scale: np.ndarray):
        self.config = config
        dim = config.output_dim
        shift = np.asarray(cmvn_shift, dtype=np.float32).reshape(-1)
        scale = np.asarray(cmvn_scale, dtype=np.float32).reshape(-1)
        if shift.shape != (dim,) or scale.shape != (dim,):
            raise BundleError(
                f"CMVN vectors have {shift.size} (shift) and {scale.size} (scale) values but the frontend "
                f"produces {dim}-dim features; re-export the bundle from the matching SenseVoiceSmall am.mvn."
            )
        if not (np.isfinite(shift).all() and np.isfinite(scale).all()):
            raise BundleError("CMVN vectors contain NaN or infinite values; re-export the bundle from a valid am.mvn.")
        self.cmvn_shift = shift
        self.cmvn_scale = scale

    def fbank(self, wav_16k: np.ndarray, source: str = "audio input") -> np.ndarray:
        return kaldi_fbank(wav_16k, self.config.fbank, source)

    def __call__(self, wav_16k: np.ndarray, source: str = "audio input") -> np.ndarray:
        feats = apply_lfr(self.fbank(wav_16k, source), self.config.lfr_m, self.config.lfr_n)
        # Same two float32 steps as FunASR (add, then multiply), so the rounding matches too.
        return (feats + self.cmvn_shift) * self.cmvn_scale


def campplus_chunks(wav_16k: np.ndarray, chunk_seconds: float = 10.0, max_seconds: float = 90.0,
                    sample_rate: int = TARGET_RATE) -> list[np.ndarray]:
    """Cut the first max_seconds into chunk_seconds pieces; the last piece continues from the clip's start.

    The clip is repeated end to end until it fills a whole number of chunks, so a 3 s clip becomes one
    10 s chunk of the clip played 3.3 times, and a 25 s clip's third chunk is its last 5 s then its first 5 s.
    """
    wav = _as_waveform(wav_16k, "speaker audio")[: int(max_seconds * sample_rate)]
    chunk = int(chunk_seconds * sample_rate)
    n_chunks = math.ceil(wav.size / chunk)
    filled = np.resize(wav, n_chunks * chunk)  # np.resize repeats the array cyclically
    return [filled[i * chunk:(i + 1) * chunk] for i in range(n_chunks)]


def campplus_fbank(wav_16k: np.ndarray, n_mels: int = CamPPConfig.feat_dim) -> np.ndarray:
    """CAM++ input features [T, n_mels] of one chunk: unscaled waveform, povey window, mean over time removed."""
    cfg = dataclasses.replace(CAMPPLUS_FBANK, n_mels=n_mels)
    feats = kaldi_fbank(wav_16k, cfg, "speaker audio")
    return feats - feats.mean(axis=0, keepdims=True)


__all__ = [
    "MIN_SAMPLES", "FbankConfig", "SENSEVOICE_FBANK", "CAMPPLUS_FBANK", "FrontendConfig", "kaldi_fbank",
    "lfr_indices", "apply_lfr", "SenseVoiceFrontend", "campplus_chunks", "campplus_fbank",
]
