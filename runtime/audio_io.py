"""Audio files in and out, and conversion to the 16 kHz mono float waveform every model input starts from.

Torch-free: soundfile (libsndfile) reads and writes; soxr or a numpy port of torchaudio's resampler
converts the rate.

The official code resamples with `torchaudio.transforms.Resample` (Hann-windowed sinc, 6 zero
crossings, roll-off 0.99). That filter is soft: going to 16 kHz it passes 7 kHz at 0.82 and lets
8.1 kHz alias in at 0.43, where soxr VHQ is flat to 7.3 kHz and stops everything above 8 kHz. The
two differ only in the top ~10 mel bins; method="torchaudio" reproduces the official features there.
"""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import soxr

from qinyu_edge.errors import AudioInputError, OutputError
from qinyu_edge.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

TARGET_RATE = 16000
_CONVERT_HINT = "convert it to 16-bit WAV, e.g. `sox INPUT -r 16000 -c 1 -b 16 OUTPUT.wav` or `ffmpeg -i INPUT -ar 16000 -ac 1 OUTPUT.wav`"


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(samples, sample_rate) of an audio file: float32 in [-1, 1], channels averaged to mono, native rate."""
    path = Path(path)
    if not path.exists():
        raise AudioInputError(f"audio file {path} does not exist; check the path.")
    if not path.is_file():
        raise AudioInputError(f"{path} is not a file; pass the path of an audio file (WAV, FLAC, OGG or MP3).")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        ext = path.suffix.lstrip(".").upper()
        if ext and ext not in sf.available_formats():
            raise AudioInputError(
                f"{path}: .{ext.lower()} files are not supported (libsndfile reads "
                f"{', '.join(sorted(sf.available_formats()))}); {_CONVERT_HINT}."
            ) from None
        raise AudioInputError(f"{path} cannot be decoded as audio ({e}); the file is corrupt or not audio; {_CONVERT_HINT}.") from None
    return to_mono(data, source=str(path)), int(rate)


def to_mono(samples: np.ndarray, source: str = "audio input") -> np.ndarray:
    """Average [frames, channels] (or pass [frames]) to float32 [frames], after validating the samples."""
    samples = np.asarray(samples)
    if samples.ndim not in (1, 2):
        raise AudioInputError(f"{source}: expected samples shaped [frames] or [frames, channels], got shape {samples.shape}.")
    if not np.issubdtype(samples.dtype, np.floating):
        raise AudioInputError(
            f"{source}: samples have dtype {samples.dtype}; pass float samples in [-1, 1] (divide int16 PCM by 32768)."
        )
    check_samples(samples, source)
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float64) if samples.shape[1] > 1 else samples[:, 0]
    return np.ascontiguousarray(samples, dtype=np.float32)


def check_samples(samples: np.ndarray, source: str) -> None:
    """Reject inputs that would silently turn into garbage features: empty, NaN or infinite samples."""
    if samples.size == 0:
        raise AudioInputError(f"{source} contains no audio samples; record or pass a non-empty clip.")
    finite = np.isfinite(samples)
    if not finite.all():
        bad = int(samples.size - np.count_nonzero(finite))
        what = "every sample is NaN or infinite" if bad == samples.size else f"{bad} of {samples.size} samples are NaN or infinite"
        raise AudioInputError(f"{source}: {what}; the file or stream is damaged, re-record or re-export it.")


def to_16k_mono(
    samples: np.ndarray,
    sample_rate: int,
    source: str = "audio input",
    method: Literal["soxr", "torchaudio"] = "soxr",
) -> np.ndarray:
    """Any channel count and rate -> float32 [frames] at 16 kHz. `samples` is [frames] or [frames, channels]."""
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise AudioInputError(f"{source}: sample rate {sample_rate!r} is not a positive integer; pass the rate the audio was recorded at.")
    if method not in ("soxr", "torchaudio"):
        raise ValueError(f"method must be 'soxr' or 'torchaudio', got {method!r}")
    mono = to_mono(samples, source)
    sample_rate = int(sample_rate)
    if sample_rate == TARGET_RATE:
        return mono
    # Mono first: resampling is linear, so downmixing before it gives the same result for 1/C of the work.
    if method == "torchaudio" and _sinc_kernel_size(sample_rate, TARGET_RATE) <= _MAX_KERNEL:
        out = resample_torchaudio(mono, sample_rate, TARGET_RATE)
    else:
        if method == "torchaudio":
            log.warning("%s: %d Hz -> %d Hz needs a huge torchaudio-style kernel; using soxr instead", source, sample_rate, TARGET_RATE)
        out = soxr.resample(mono, sample_rate, TARGET_RATE, quality="VHQ")
    if out.size == 0:
        raise AudioInputError(
            f"{source}: {mono.size} samples at {sample_rate} Hz leave no samples at {TARGET_RATE} Hz; pass a longer clip."
        )
    return np.ascontiguousarray(out, dtype=np.float32)


# Rates whose ratio does not reduce (e.g. 44099 Hz) would need a kernel of new x orig taps.
_MAX_KERNEL = 1 << 22
_LOWPASS_WIDTH = 6
_ROLLOFF = 0.99
_BLOCK = 4096


def _reduced(orig: int, new: int) -> tuple[int, int]:
    g = math.gcd(orig, new)
    return orig // g, new // g


def _sinc_kernel_size(orig: int, new: int) -> int:
    orig, new = _reduced(orig, new)
    base = min(orig, new) * _ROLLOFF
    return new * (2 * math.ceil(_LOWPASS_WIDTH * orig / base) + orig)


def resample_torchaudio(wav: np.ndarray, orig: int, new: int) -> np.ndarray:
    """1-D float32 resampling identical in definition to torchaudio's default `Resample` (sinc_interp_hann).

    Output j is a Hann-windowed sinc interpolation of the input at time j/new, with the cutoff at
    0.99 x the lower Nyquist frequency and the window reaching 6 zero crossings; the input is
    zero-padded at both ends and the output has ceil(len * new / orig) samples.
    """
    orig, new = _reduced(orig, new)
    base = min(orig, new) * _ROLLOFF
    width = math.ceil(_LOWPASS_WIDTH * orig / base)
    # t[j, k]: distance, in cycles of the cutoff, from output j (at j/new) to input tap k - width (at (k - width)/orig).
    taps = np.arange(-width, width + orig, dtype=np.float64) / orig
    t = np.clip((taps[None, :] - np.arange(new, dtype=np.float64)[:, None] / new) * base, -_LOWPASS_WIDTH, _LOWPASS_WIDTH)
    window = np.cos(t * math.pi / _LOWPASS_WIDTH / 2) ** 2
    kernel = (np.sinc(t) * window * (base / orig)).astype(np.float32)
    padded = np.pad(np.asarray(wav, dtype=np.float32), (width, width + orig))
    frames = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::orig]
    out = np.empty((frames.shape[0], new), dtype=np.float32)
    # Blocks bound the copy matmul makes of the strided frames (a 10 min 48 kHz clip would need 1.6 GB at once).
    for start in range(0, frames.shape[0], _BLOCK):
        out[start:start + _BLOCK] = frames[start:start + _BLOCK] @ kernel.T
    return out.reshape(-1)[: math.ceil(new * wav.shape[0] / orig)]


def load_16k_mono(path: str | os.PathLike, method: Literal["soxr", "torchaudio"] = "soxr") -> np.ndarray:
    """An audio file as the float32 16 kHz mono waveform the frontends take."""
    samples, rate = read_audio(path)
    return to_16k_mono(samples, rate, source=str(path), method=method)


def write_wav(
    path: str | os.PathLike,
    samples: np.ndarray,
    sample_rate: int,
    subtype: Literal["PCM_16", "FLOAT"] = "PCM_16",
) -> Path:
    """Write float samples in [-1, 1] ([frames] or [frames, channels]) as a WAV file, atomically.

    PCM_16 rounds to the int16 grid (x * 32768, clipped), the exact inverse of how `read_audio` scales,
    so writing and reading back 16-bit samples is lossless.
    """
    fmt = output_format(path)
    samples = np.asarray(samples)
    if samples.ndim not in (1, 2):
        raise ValueError(f"samples must be [frames] or [frames, channels], got shape {samples.shape}")
    if fmt not in _PCM_FORMATS:  # a lossy codec: its own subtype, float samples within [-1, 1]
        data, subtype = np.clip(samples, -1.0, 1.0).astype(np.float32), sf.default_subtype(fmt)
    elif subtype == "PCM_16":
        clipped = np.clip(np.rint(samples.astype(np.float64) * 32768.0), -32768, 32767)
        n_clipped = int(np.count_nonzero(np.abs(samples) > 32767 / 32768))
        if n_clipped:
            log.warning("write_wav %s: %d samples outside [-1, 1) were clipped", path, n_clipped)
        data = clipped.astype(np.int16)
    elif subtype == "FLOAT":
        data = samples.astype(np.float32)
    else:
        raise ValueError(f"subtype must be 'PCM_16' or 'FLOAT', got {subtype!r}")
    buf = io.BytesIO()
    sf.write(buf, data, int(sample_rate), format=fmt, subtype=subtype)
    return atomic_write_bytes(path, buf.getvalue())


_PCM_FORMATS = ("WAV", "FLAC")
# Suffixes whose libsndfile format name differs from the suffix itself.
_SUFFIX_FORMATS = {".oga": "OGG", ".opus": "OGG", ".aif": "AIFF", ".aiff": "AIFF"}


def output_format(path: str | os.PathLike) -> str:
    """The libsndfile format an audio output's suffix names (.wav, .flac, .ogg, .mp3, ...); refused
    before any work if this libsndfile cannot write it, rather than writing WAV bytes under another name."""
    suffix = Path(path).suffix.lower()
    fmt = _SUFFIX_FORMATS.get(suffix, suffix.lstrip(".").upper())
    known = sf.available_formats()
    if fmt not in known or fmt not in (*_PCM_FORMATS, "OGG", "MP3", "AIFF"):
        raise OutputError(f"{path}: cannot tell an audio format from the suffix {suffix or '(none)'!r}. "
                          "Name the file .wav, .flac, .ogg or .mp3"
                          + ("" if "MP3" in known else " (this libsndfile has no MP3: use .wav)") + ".")
    return fmt


__all__ = [
    "TARGET_RATE", "read_audio", "to_mono", "check_samples", "to_16k_mono", "resample_torchaudio", "load_16k_mono",
    "write_wav", "output_format",
]
