"""`qinyu-edge chat` as the service runs it: the real chat loop on the tiny preset in a subprocess, its
systemd notifications read from a socket this test listens on, audio through a virtual sound card that
appears only after the assistant started, and SIGTERM in the middle of a reply."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from pulse import speak, start_sound_card

from qinyu_edge.engine_manifest import EngineSet
from qinyu_edge.runtime.audio_devices import AudioDeviceConfig
from qinyu_edge.runtime.audio_io import write_wav
from qinyu_edge.runtime.supervised import EXIT_ENGINES, DeviceLock


class NotifyListener:
    """The NOTIFY_SOCKET end that systemd would hold."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.5)
        self.messages: list[str] = []

    def wait_for(self, needle: str, proc: subprocess.Popen, timeout: float, log: Path) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.sock.recv(65536).decode()
            except socket.timeout:
                if proc.poll() is not None:
                    pytest.fail(f"chat exited ({proc.returncode}) before {needle!r}:\n{log.read_text()[-3000:]}")
                continue
            self.messages.append(msg)
            if needle in msg:
                return msg
        pytest.fail(f"no {needle!r} within {timeout} s; got {self.messages}\n{log.read_text()[-3000:]}")

    def drain(self) -> None:
        try:
            while True:
                self.messages.append(self.sock.recv(65536).decode())
        except socket.timeout:
            pass


def _chat(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # stdout is a file, not a terminal: the service's plain output.
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "qinyu_edge.cli", "chat", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def test_service_run_waits_for_devices_notifies_and_stops_cleanly(tmp_path):
    from qinyu_edge.export.bundle_export import preset_bundle

    bundle = preset_bundle("tiny-8b")
    speech = speak("What is the tallest mountain in the world", tmp_path)
    wav = tmp_path / "question.wav"
    write_wav(wav, np.concatenate([np.zeros(4800, np.float32), speech, np.zeros(24000, np.float32)]), 16000)
    config = tmp_path / "assistant.toml"
    # A long reply (random weights talk until the step cap or im_end), so SIGTERM comes while it plays.
    config.write_text(f'bundle = "{bundle}"\nturn = "silence"\nsilence-ms = 500\nlog = "turns.jsonl"\n'
                      'max-new-tokens = 600\n')
    pulse_dir = Path(tempfile.mkdtemp(prefix="qysv-"))  # short: a unix socket path must stay under 108 bytes
    listener = NotifyListener(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "2000000",
           # The sound server of this test, not running yet: the assistant starts with no audio device.
           "PULSE_SERVER": f"unix:{pulse_dir / 'native'}", "QINYU_EDGE_LOCK_DIR": str(tmp_path)}
    log = tmp_path / "chat.log"
    proc = _chat(["--config", str(config)], env, log)
    card = None
    try:
        waiting = listener.wait_for("waiting for audio devices", proc, 180, log)
        assert "READY=1" in waiting and "no audio input device" in waiting
        card = start_sound_card(pulse_dir)
        listener.wait_for("STATUS=listening", proc, 60, log)  # found on a retry; the loop's first read says so
        player = card.player(wav)
        player.start()
        listener.wait_for("STATUS=speaking", proc, 90, log)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        player.join_or_skip()
    finally:
        if proc.poll() is None:
            proc.kill()
        if card is not None:
            card.stop()
    listener.drain()
    messages = listener.messages
    assert any("WATCHDOG=1" in m for m in messages)
    assert any("STOPPING=1" in m for m in messages)
    assert any("1 turns, the last one's first audio after" in m for m in messages)
    (line,) = (tmp_path / "turns.jsonl").read_text().splitlines()
    turn = json.loads(line)
    # The reply was cut where it was playing: far less was played than generated, and it is logged.
    played_s = (turn["reply_end_ms"] - turn["first_played_ms"]) / 1000
    assert turn["reply_audio_seconds"] > 10 and played_s < turn["reply_audio_seconds"] / 2, turn
    assert not turn["barge_in"]
    out = log.read_text()
    assert "user_speaking -> responding" in out and "\x1b[" not in out  # plain lines for the journal
    assert "SIGTERM: stopping (the reply in flight is cut)" in out


def test_second_assistant_on_the_same_devices_is_refused(tmp_path):
    env = {**os.environ, "QINYU_EDGE_LOCK_DIR": str(tmp_path)}
    held = DeviceLock(AudioDeviceConfig(input_device="usb mic"), tmp_path)
    held.acquire()
    try:
        r = subprocess.run([sys.executable, "-m", "qinyu_edge.cli", "chat", "--bundle", str(tmp_path / "none"),
                            "--input-device", "usb mic"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2
        assert f"another qinyu-edge assistant (pid {os.getpid()}) is using these audio devices" in r.stderr
        assert "input usb mic, output default" in r.stderr
    finally:
        held.release()
    # Released: the next one gets the devices (and fails later, on the missing bundle).
    held.acquire()
    held.release()


def test_engine_set_that_cannot_run_here_exits_with_its_own_code_and_the_build_command(tmp_path):
    from qinyu_edge.export.bundle_export import preset_bundle

    bundle = preset_bundle("tiny-8b")
    engines = tmp_path / "engines"
    engines.mkdir()
    EngineSet(engines, "orin-nano-8", str(bundle), {}).write()
    env = {**os.environ, "QINYU_EDGE_LOCK_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "qinyu_edge.cli", "chat", "--bundle", str(bundle), "--engines", str(engines)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_ENGINES, r.stderr
    # This machine has neither TensorRT nor a GPU; the fix is a build on the machine that runs it.
    assert "no TensorRT and no GPU" in r.stderr
    assert f"qinyu-edge build --bundle {bundle} --target orin-nano-8 --out {engines}" in r.stderr


def test_stop_with_cut_reply_ends_the_reply_where_it_plays(tmp_path):
    """VoiceLoop.stop(cut_reply=True), the SIGTERM path, in process: the turn is recorded with what was played."""
    from qinyu_edge.export.bundle_export import preset_bundle
    from qinyu_edge.runtime.audio_devices import FileSink, FileSource
    from qinyu_edge.runtime.conversation import Conversation
    from qinyu_edge.runtime.engine import Engine
    from qinyu_edge.runtime.turn import TurnConfig, TurnDetector
    from qinyu_edge.runtime.vad import VadConfig
    from qinyu_edge.runtime.voice_loop import LoopConfig, State, StateChanged, TurnRecord, VoiceLoop

    speech = speak("Tell me about the weather in the mountains", tmp_path)
    wav = tmp_path / "mic.wav"
    write_wav(wav, np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(16000 * 30, np.float32)]), 16000)
    conv = Conversation(Engine(preset_bundle("tiny-8b")), max_new_tokens=600)
    loop = None

    def on_event(ev):
        if isinstance(ev, StateChanged) and ev.new == State.SPEAKING:
            loop.stop(cut_reply=True)

    loop = VoiceLoop(conv, FileSource(wav, realtime=True, speed=3.0), FileSink(tmp_path / "out.wav", realtime=True, speed=3.0),
                     TurnDetector(VadConfig(), TurnConfig(kind="silence", silence_timeout_ms=600)), LoopConfig(),
                     on_event=on_event)
    (turn,) = loop.run()
    assert isinstance(turn, TurnRecord) and not turn.barge_in
    assert turn.reply_audio_seconds > 5 * ((turn.reply_end_ms - turn.first_played_ms) / 1000)
    # The history keeps only what was played (the tiny model's text is random, so compare lengths).
    assert [t.role for t in conv.history] == ["user", "assistant"]
    assert turn.reply_text == conv.history[-1].text
    assert loop.state == State.LISTENING
