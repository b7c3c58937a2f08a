"""A virtual sound card for real PortAudio streams in tests, and the test speech the runtime tests share.

A private PulseAudio daemon (own socket and state under a temp dir, no hardware modules) gets two null
sinks: `qy_mic`, whose monitor is the default source, so audio played into it is what a microphone
hears, and `qy_speaker`, the default sink, whose monitor records what was played. PortAudio reaches them
through ALSA's `pulse` plugin (Debian `libasound2-plugins`). An idle null sink only renders in bursts
(its latency grows to 2 s) and its monitor then drops the first ~100 ms of a new stream, so a silent
low-latency keep-alive stream plays into each sink for the daemon's whole life.

Needs Debian `pulseaudio` (pulseaudio, pactl, pacat, paplay, parec) and `libasound2-plugins`; without
them, or when the daemon does not come up, the fixture skips with the reason.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

PR_SET_PDEATHSIG = 1  # linux/prctl.h
MIC_SINK = "qy_mic"
SPEAKER = "qy_speaker"
RATE = 48000


def _die_with_parent() -> None:
    """In the child before exec: be killed when the test process dies, even by os._exit (a test timeout)
    or SIGKILL, so no sound server outlives its test run and eats the CPU of the tests after it."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class VirtualSoundCard:
    dir: Path
    env: dict[str, str]
    daemon: subprocess.Popen | None = None
    helpers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def server(self) -> str:
        return f"unix:{self.dir / 'native'}"

    @property
    def client_env(self) -> dict[str, str]:
        return {**self.env, "PULSE_SERVER": self.server}

    def _run(self, *cmd: str, timeout: float = 10) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.client_env, check=False, capture_output=True, text=True, timeout=timeout)

    def pactl(self, *args: str) -> str:
        r = self._run("pactl", *args)
        if r.returncode:
            raise RuntimeError(f"pactl {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "daemon.log", "w") as log:
            self.daemon = subprocess.Popen(
                ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit", "--use-pid-file=no",
                 "-L", f"module-native-protocol-unix socket={self.dir / 'native'} auth-anonymous=1",
                 "-L", f"module-null-sink sink_name={MIC_SINK} rate={RATE}",
                 "-L", f"module-null-sink sink_name={SPEAKER} rate={RATE}"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + 10
        while self._run("pactl", "info").returncode:
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.dir / "daemon.log").read_text()[-600:]
                raise RuntimeError(f"PulseAudio did not start: {tail}")
            time.sleep(0.1)
        self.pactl("set-default-source", f"{MIC_SINK}.monitor")
        self.pactl("set-default-sink", SPEAKER)
        for sink in (MIC_SINK, SPEAKER):
            self.helpers.append(subprocess.Popen(
                ["pacat", "--playback", "-d", sink, "--raw", "--format=s16le", f"--rate={RATE}", "--channels=1", "--latency-msec=20", "/dev/zero"],
                env=self.client_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            ))
        self._wait_until_monitors_flow()

    def _wait_until_monitors_flow(self, timeout: float = 5.0) -> None:
        # A new null sink renders its first cycle with a 2 s latency whatever its streams ask for; until that
        # cycle ends its monitor delivers nothing. Wait for both monitors to deliver samples.
        recorders = [
            subprocess.Popen(["parec", "-d", f"{sink}.monitor", "--raw", "--format=s16le", "--rate=16000", "--channels=1", "--latency-msec=20"],
                             env=self.client_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             preexec_fn=_die_with_parent)
            for sink in (MIC_SINK, SPEAKER)
        ]
        try:
            pending = {p.stdout.fileno(): p for p in recorders}
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                ready, _, _ = select.select(list(pending), [], [], 0.1)
                for fd in ready:
                    if os.read(fd, 4096):
                        del pending[fd]
            if pending:
                raise RuntimeError(f"the null sinks' monitors delivered nothing within {timeout} s")
        finally:
            for p in recorders:
                stop_process(p)
                p.stdout.close()

    def play_into_mic(self, wav: Path) -> None:
        """Play a WAV file into the virtual microphone; returns when it has been played."""
        r = self._run("paplay", "-d", MIC_SINK, "--latency-msec=100", str(wav), timeout=60)
        if r.returncode:
            raise RuntimeError(f"paplay failed: {r.stderr.strip()}")

    def player(self, wav: Path) -> "Player":
        """`play_into_mic` on a thread (start it; `join_or_skip` after)."""
        return Player(self, wav)

    def echo_into_mic(self, latency_ms: int, volume: float) -> str:
        """An open speaker: what the speaker plays reaches the microphone too, `volume` times as loud and
        `latency_ms` later (PulseAudio's loopback, which also tracks the two sinks' clocks). Returns the
        module to give `unload`."""
        module = self.pactl("load-module", "module-loopback", f"source={SPEAKER}.monitor", f"sink={MIC_SINK}",
                            f"latency_msec={latency_ms}", "source_dont_move=true", "sink_dont_move=true").strip()
        for line in self.pactl("list", "short", "sink-inputs").splitlines():
            index, owner = line.split("\t")[:2]
            if owner == module:
                # PulseAudio volumes are cubic: raw volume v scales amplitude by (v / 65536) ** 3.
                self.pactl("set-sink-input-volume", index, f"{round(volume ** (1 / 3) * 65536)}")
        return module

    def unload(self, module: str) -> None:
        self.pactl("unload-module", module)

    def record_speaker(self, raw: Path, rate: int = 16000) -> subprocess.Popen:
        """Start recording the virtual speaker as float32 mono raw samples; stop it with `stop_process`."""
        return subprocess.Popen(
            ["parec", "-d", f"{SPEAKER}.monitor", "--raw", "--format=float32le", f"--rate={rate}", "--channels=1", "--latency-msec=20"],
            env=self.client_env, stdout=open(raw, "wb"), stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )

    def kill_daemon(self) -> None:
        """Crash the sound server (a device vanishing mid-stream)."""
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGKILL)
            self.daemon.wait(5)
            self.daemon = None
        for p in self.helpers:
            stop_process(p)
        self.helpers.clear()

    def stop(self) -> None:
        for p in self.helpers:
            stop_process(p)
        self.helpers.clear()
        if self.daemon is not None:
            stop_process(self.daemon)
            self.daemon = None


class Player(threading.Thread):
    """Plays into the virtual mic while the test reads; a sound server that cannot play skips the
    test (the test machine's audio stack failed, not the code under test)."""

    def __init__(self, card: VirtualSoundCard, wav: Path):
        super().__init__(daemon=True)
        self.card, self.wav = card, wav
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.card.play_into_mic(self.wav)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            self.error = e

    def join_or_skip(self) -> None:
        self.join()
        if self.error is not None:
            pytest.skip(f"the virtual sound card could not play into the mic: {self.error}")


def stop_process(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _use_server(server: str | None) -> None:
    """Point this process's PortAudio (ALSA pulse plugin) at `server` and make it list devices again."""
    from qinyu_edge.runtime.audio_devices import rescan_devices

    if server is None:
        os.environ.pop("PULSE_SERVER", None)
    else:
        os.environ["PULSE_SERVER"] = server
    rescan_devices()


def start_sound_card(directory: Path) -> VirtualSoundCard:
    missing = [t for t in ("pulseaudio", "pactl", "pacat", "paplay", "parec") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"PulseAudio is not installed (missing {', '.join(missing)}): `apt-get install pulseaudio libasound2-plugins`")
    # A short path: the unix socket path must stay under ~108 bytes.
    env = {**os.environ, "HOME": str(directory), "XDG_RUNTIME_DIR": str(directory), "PULSE_RUNTIME_PATH": str(directory / "rt")}
    env.pop("PULSE_SERVER", None)
    card = VirtualSoundCard(directory, env)
    try:
        card.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"PulseAudio cannot start here: {e}")
    return card


@pytest.fixture(scope="module", name="sound_card")
def sound_card_fixture():
    """A running virtual sound card that this process's PortAudio uses; PortAudio devices `pulse` / `default`."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="qypa-"))
    card = start_sound_card(d)
    old = os.environ.get("PULSE_SERVER")
    _use_server(card.server)
    from qinyu_edge.runtime.audio_devices import list_devices

    if not any(dev.name == "pulse" for dev in list_devices()):
        card.stop()
        _use_server(old)
        pytest.skip("PortAudio does not see the `pulse` ALSA device: install Debian `libasound2-plugins`")
    try:
        yield card
    finally:
        card.stop()
        _use_server(old)
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- test speech

def speak(text: str, directory: Path, voice: str = "en-us", speed: int = 160) -> np.ndarray:
    """`text` spoken by espeak-ng, as 16 kHz mono float32 (skips the test when espeak-ng is missing)."""
    from qinyu_edge.runtime.audio_io import load_16k_mono

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed; it renders the test speech (`apt-get install espeak-ng`)")
    out = directory / f"{hashlib.sha1(f'{voice}|{speed}|{text}'.encode()).hexdigest()[:12]}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(out), text], check=True, capture_output=True)
    return load_16k_mono(out)


def speech_edges(audio: np.ndarray, floor_db: float = -40.0) -> tuple[int, int]:
    """First and last sample of 5 ms frames whose RMS is within `floor_db` of the loudest frame."""
    f = 80
    n = audio.size // f
    rms = np.sqrt((audio[: n * f].reshape(n, f).astype(np.float64) ** 2).mean(axis=1))
    loud = np.nonzero(rms > rms.max() * 10 ** (floor_db / 20))[0]
    return int(loud[0] * f), int((loud[-1] + 1) * f)


def align(recorded: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    """(lag, correlation coefficient) of `reference` inside `recorded`, searched over every lag."""
    n = recorded.size + reference.size
    size = 1 << (n - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(recorded, size) * np.conj(np.fft.rfft(reference, size)), size)
    lags = np.concatenate([xc[: recorded.size], xc[size - reference.size + 1:]])
    idx = int(np.argmax(np.abs(lags)))
    lag = idx if idx < recorded.size else idx - lags.size
    a = recorded[max(lag, 0): lag + reference.size]
    b = reference[max(-lag, 0): max(-lag, 0) + a.size]
    if a.size == 0:
        return lag, 0.0
    return lag, float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
