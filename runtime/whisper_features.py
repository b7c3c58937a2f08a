"""Whisper-style log-mel features in numpy, as Smart Turn v3 takes them (no torch, no transformers).

Definition (the one `transformers.WhisperFeatureExtractor` uses at 16 kHz): periodic Hann window of
400 samples, hop 160, centred frames (reflect padding of 200 each side), power spectrum, 80 Slaney
mel filters with Slaney area normalisation over 0-8 kHz, log10 with a floor of 1e-10, the last frame
dropped, values below (max - 8) raised to it, then (x + 4) / 4. Smart Turn also normalises the
waveform to zero mean and unit variance first (`do_normalize=True`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 80
_LOG_FLOOR = 1e-10
_DYNAMIC_RANGE = 8.0  # in log10 units: 80 dB below the loudest bin
_NORM_EPS = 1e-7


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    # Slaney scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic (27 mels per factor 6.4) above.
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz < 1000.0, hz * 3.0 / 200.0, 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * 27.0 / np.log(6.4))


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0))


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """[n_fft // 2 + 1, n_mels] triangular filters, each scaled to unit area over its band (Slaney norm)."""
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - lower) / (centre - lower)
    falling = (upper - bins[:, None]) / (upper - centre)
    tri = np.clip(np.minimum(rising, falling), 0.0, None)
    filters = tri * (2.0 / (upper - lower))
    filters.setflags(write=False)
    return filters


@lru_cache(maxsize=4)
def _hann(n: int) -> np.ndarray:
    # Periodic (not symmetric) window: the DFT-even form torch.hann_window gives.
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    w.setflags(write=False)
    return w


def log_mel(audio: np.ndarray, normalize: bool = True) -> np.ndarray:
    """float32 [80, len(audio) // 160] Whisper log-mel of 16 kHz mono `audio` (1-D, at least 201 samples)."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"log_mel takes 1-D audio, got shape {x.shape}")
    if x.size <= N_FFT // 2:
        raise ValueError(f"log_mel needs more than {N_FFT // 2} samples for reflect padding, got {x.size}")
    if normalize:
        # float32 statistics, as the reference normalises its float32 buffer before the float64 STFT.
        x = (x - x.mean()) / np.sqrt(x.var() + np.float32(_NORM_EPS))
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * _hann(N_FFT), axis=-1)) ** 2  # [frames, 201]
    mel = power[:-1] @ mel_filters()  # the last centred frame is dropped
    logm = np.log10(np.maximum(mel, _LOG_FLOOR))
    logm = np.maximum(logm, logm.max() - _DYNAMIC_RANGE)
    return ((logm + 4.0) / 4.0).T.astype(np.float32)


def fit_window(audio: np.ndarray, n_samples: int) -> np.ndarray:
    """The last `n_samples` of `audio`, zero-padded at the front when shorter (Smart Turn's 8 s window)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.size >= n_samples:
        return audio[audio.size - n_samples:]
    return np.concatenate([np.zeros(n_samples - audio.size, dtype=np.float32), audio])


__all__ = ["HOP", "N_FFT", "N_MELS", "SAMPLE_RATE", "fit_window", "log_mel", "mel_filters"]
