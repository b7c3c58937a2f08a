"""Real speech for the runtime tests: espeak-ng renders it, sox converts it (both are system tools)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SENTENCE = "The quick brown fox jumps over the lazy dog. Testing one, two, three."


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def speech_files(tmp_path_factory) -> dict[str, Path]:
    """The same sentence as 16 kHz mono int16 WAV, 16 kHz FLAC, and 44.1 kHz stereo float WAV.

    The stereo file carries the speech at full level on the left and half level on the right, so a
    correct downmix (the channel average) is 0.75 x the mono speech.
    """
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed; it renders the test speech")
    d = tmp_path_factory.mktemp("speech")
    raw, mono = d / "raw.wav", d / "speech16k.wav"
    _run("espeak-ng", "-v", "en-us", "-w", str(raw), SENTENCE)
    _run("sox", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(mono))
    flac = d / "speech16k.flac"
    _run("sox", str(mono), str(flac))
    stereo = d / "speech44k_stereo.wav"
    # From the 16 kHz file, so its content is band-limited to 8 kHz and resampling back can recover it.
    _run("sox", "-D", str(mono), "-r", "44100", "-e", "floating-point", "-b", "32", str(stereo), "remix", "1", "1v0.5")
    return {"mono16k": mono, "flac16k": flac, "stereo44k": stereo}
