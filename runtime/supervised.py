"""What `qinyu-edge chat` does to run unattended (as the systemd service, or left on a terminal).

- One assistant per pair of audio devices: a second one on the same devices is refused by a lock,
  naming the process that holds it.
- An engine set is checked against the bundle and this machine before anything loads; a stale or
  foreign one ends the process with EXIT_ENGINES and the `qinyu-edge build` command (the unit does
  not restart on that code: a restart cannot fix it).
- Audio devices that are not there yet (a USB microphone, a sound server still starting) are waited
  for, with the reason in the service's status line.
- systemd hears READY=1 once the assistant is up, STATUS= on every state change, and WATCHDOG=1 from
  the voice loop's own thread: every microphone read passes through `_Heartbeat`, so a stuck loop
  stops the pings and systemd restarts it.
- SIGTERM (systemctl stop) cuts the reply in flight and the loop ends cleanly: the turn record of
  the cut reply is written; SIGINT (Ctrl-C) lets the reply finish first.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shlex
import signal
import tempfile
import threading
from pathlib import Path

from qinyu_edge.errors import QinyuError

from .audio_devices import AudioDeviceConfig, AudioDeviceError, find_device, rescan_devices
from .sd_notify import Notifier

log = logging.getLogger(__name__)

EXIT_ENGINES = 78  # EX_CONFIG: the engine set does not fit the bundle or this machine; rebuilding fixes it
EXIT_DEVICE_LOST = 75  # EX_TEMPFAIL: an audio device went away mid-session; a restart waits for it
LOCK_DIR_ENV = "QINYU_EDGE_LOCK_DIR"


class AssistantBusy(QinyuError):
    """Another assistant holds the audio devices."""


class EnginesUnusable(QinyuError):
    """The engine set is stale or foreign; the message says how to rebuild it."""


# --- one assistant per audio device pair ------------------------------------------------------


def lock_dir() -> Path:
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    # /run/lock is shared by every user and every systemd unit (a PrivateTmp unit has its own /tmp).
    run_lock = Path("/run/lock")
    return run_lock / "qinyu-edge" if os.access(run_lock, os.W_OK) else Path(tempfile.gettempdir()) / "qinyu-edge-locks"


class DeviceLock:
    """An exclusive flock on a file named after the device pair; the kernel drops it when the process dies."""

    def __init__(self, config: AudioDeviceConfig, directory: Path | None = None):
        self.devices = f"input {config.input_device or 'default'}, output {config.output_device or 'default'}"
        name = hashlib.sha256(self.devices.encode()).hexdigest()[:16]
        self.path = (directory or lock_dir()) / f"audio-{name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            if not self.path.parent.is_dir():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Shared by every user's assistant, like /run/lock itself (sticky: nobody removes another's).
                os.chmod(self.path.parent, 0o1777)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except PermissionError as e:
            raise AssistantBusy(f"cannot open the audio device lock {self.path} ({e.strerror}): another user's "
                                f"assistant may hold these devices; or set {LOCK_DIR_ENV} to a folder you can "
                                "write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AssistantBusy(
                f"another qinyu-edge assistant (pid {holder}) is using these audio devices ({self.devices}). "
                "Stop it first (`qinyu-edge service status` shows whether it is the service; "
                "`systemctl [--user] stop qinyu-edge` stops it), or give this one other devices "
                "(--input-device/--output-device).") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


# --- engine set ------------------------------------------------------------------------------


def check_engines(bundle: Path, engines: Path) -> None:
    """Raise EnginesUnusable, with every reason and the build command, unless the plans fit here."""
    from qinyu_edge.engine_manifest import EngineError, EngineSet
    from qinyu_edge.engines.doctor import engine_set_errors, probe

    env = probe()
    errors = engine_set_errors(bundle, engines, env)
    if not errors:
        return
    target = env.gpu.target_id if env.gpu is not None and env.gpu.target_id else None
    if target is None:
        try:
            target = EngineSet.load(engines).target
        except EngineError:
            target = "local"
    build = " ".join(shlex.quote(str(a)) for a in ("qinyu-edge", "build", "--bundle", bundle, "--target", target,
                                                   "--out", engines))
    reasons = "\n  ".join(f"{c.item}: {c.found}" for c in errors)
    raise EnginesUnusable(f"the engine set {engines} cannot run bundle {bundle} on this machine:\n  {reasons}\n"
                          f"build it for this machine and bundle: {build}")


# --- waiting for the audio devices -----------------------------------------------------------


def wait_for_devices(config: AudioDeviceConfig, notifier: Notifier, stop: threading.Event,
                     first_wait_s: float = 1.0, max_wait_s: float = 10.0) -> bool:
    """True once the microphone and the speaker exist; False when `stop` is set while waiting."""
    wait, tries, last = first_wait_s, 0, None
    while True:
        try:
            for kind, spec in (("input", config.input_device), ("output", config.output_device)):
                find_device(spec, kind, config.backend)
            if tries:
                log.info("audio devices found after %d tries", tries + 1)
            return True
        except AudioDeviceError as e:
            tries += 1
            if str(e) != last:  # the journal gets each new reason once, the status line every retry
                log.warning("waiting for audio devices: %s", e)
                last = str(e)
            notifier.ready(f"waiting for audio devices (try {tries}, next in {wait:.0f} s): {e}")
        notifier.heartbeat()
        if stop.wait(wait):
            return False
        rescan_devices(config.backend)  # PortAudio lists devices only when (re)initialised
        wait = min(wait * 2, max_wait_s)


# --- the run ---------------------------------------------------------------------------------


class _Heartbeat:
    """The loop's microphone, read through: every read happens on the loop's thread, so it pings the
    watchdog; the first read (devices open, loop running) also says READY."""

    def __init__(self, source, on_read):
        self._source, self._on_read = source, on_read

    def read(self, n: int):
        self._on_read()
        return self._source.read(n)

    def __getattr__(self, name: str):
        return getattr(self._source, name)


class Supervisor:
    """Lock, signals and systemd notifications around one `qinyu-edge chat` run (a context manager)."""

    def __init__(self, devices: AudioDeviceConfig, notifier: Notifier | None = None):
        self.devices = devices
        self.notifier = notifier or Notifier.from_env()
        self.lock = DeviceLock(devices)
        self.stop_requested = threading.Event()
        self.terminated = False
        self.device_lost = False
        self._loop = None
        self._ready = False
        self._turns_note = ""
        self._old_handlers: dict[int, object] = {}

    def __enter__(self) -> "Supervisor":
        self.lock.acquire()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self.notifier.stopping("stopped" if exc[0] is None else f"stopped: {exc[1]}")
        self.notifier.close()
        self.lock.release()

    def _on_signal(self, signum: int, frame) -> None:
        # SIGTERM is systemctl stop: cut the reply now. SIGINT (Ctrl-C) lets it finish.
        term = signum == signal.SIGTERM
        self.terminated = self.terminated or term
        log.info("%s: stopping%s", signal.Signals(signum).name, " (the reply in flight is cut)" if term else "")
        self.notifier.stopping("stopping")
        self.stop_requested.set()
        if self._loop is not None:
            self._loop.stop(cut_reply=term)

    def wait_for_devices(self) -> bool:
        return wait_for_devices(self.devices, self.notifier, self.stop_requested)

    def watch(self, source):
        """`source` as the loop must read it: each read is a watchdog ping (the first, READY)."""
        return _Heartbeat(source, self._tick)

    def _tick(self) -> None:
        if not self._ready:
            self._ready = True
            self.notifier.ready("listening")
        self.notifier.heartbeat()

    def attach(self, loop) -> None:
        self._loop = loop
        if self.stop_requested.is_set():  # a signal came while the model loaded
            loop.stop(cut_reply=self.terminated)

    def on_event(self, ev) -> None:
        from .voice_loop import DeviceLost, StateChanged, TurnRecord

        if isinstance(ev, StateChanged):
            self.notifier.status(ev.new.value.replace("_", " ") + self._turns_note)
        elif isinstance(ev, TurnRecord):
            first = "-" if ev.first_played_ms is None else f"{ev.first_played_ms:.0f} ms"
            self._turns_note = f"; {ev.index + 1} turns, the last one's first audio after {first}"
        elif isinstance(ev, DeviceLost):
            self.device_lost = True
            self.notifier.status(f"audio device lost: {ev.message}")

    @property
    def exit_code(self) -> int:
        """0 for a requested stop or a finished source; EXIT_DEVICE_LOST so that systemd restarts us."""
        return EXIT_DEVICE_LOST if self.device_lost and not self.stop_requested.is_set() else 0
