"""systemd's notify protocol (sd_notify(3)): READY=1, STATUS=..., WATCHDOG=1 and STOPPING=1, each a
datagram on the unix socket systemd names in $NOTIFY_SOCKET.

Written here rather than installed: the protocol is one datagram per message, and the binding
(systemd-python) needs libsystemd headers and a compiler to build. Outside systemd (no
$NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None, watchdog_s: float | None = None):
        self.address = address
        # systemd kills the service when no WATCHDOG=1 comes within WatchdogSec; ping at half of it.
        self.ping_every_s = None if watchdog_s is None else watchdog_s / 2
        self._sock: socket.socket | None = None
        self._last_ping = 0.0
        self._last_status: str | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Notifier":
        usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
        mine = not pid or (pid.isdigit() and int(pid) == os.getpid())
        watchdog = int(usec) / 1e6 if usec and usec.isdigit() and int(usec) > 0 and mine else None
        return cls(environ.get("NOTIFY_SOCKET") or None, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        if self.address is None:
            return
        # "@name" is a socket in the abstract namespace, spelled with a leading NUL.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode("utf-8"), target)
        except OSError as e:  # systemd went away or the socket is wrong: the assistant keeps running
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address, e)
                self._warned = True

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def heartbeat(self) -> None:
        """WATCHDOG=1, at most every half watchdog interval: call it from the loop that must stay alive."""
        if self.ping_every_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.ping_every_s:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
