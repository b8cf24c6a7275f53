"""The sd_notify protocol, for Type=notify services: tell systemd we are ready, what we
are doing, that the main loop is alive, and that we are reloading or stopping.

The protocol (sd_notify(3), systemd.service(5)) is one AF_UNIX datagram per message,
newline-separated KEY=VALUE assignments, sent to the socket named by $NOTIFY_SOCKET: a
path, or an abstract socket name written with a leading "@". It is a few lines, so we
speak it directly instead of depending on a binding.

Outside systemd (no $NOTIFY_SOCKET) every call is a cheap no-op, so daemons call it
unconditionally. A send that fails is logged and reported as False, never raised: a
daemon that cannot talk to its supervisor should keep doing its job, and systemd's own
timeouts will report the silence.

The watchdog: with WatchdogSec= set, systemd passes WATCHDOG_USEC (and WATCHDOG_PID) and
kills the service if WATCHDOG=1 does not arrive within that interval. The main loop calls
`keepalive(now_ns)` every iteration; it sends at half the interval, as sd_watchdog_enabled(3)
recommends, so a wedged loop stops the pings and systemd restarts the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

log = logging.getLogger(__name__)

# systemd reads notification datagrams into a fixed buffer (PIPE_BUF-sized in practice);
# a STATUS= line longer than this is truncated here rather than dropped there.
MAX_STATUS_CHARS = 1024


class Notifier:
    """A client for $NOTIFY_SOCKET. Build it with `Notifier.from_environ()`."""

    def __init__(self, address: str | bytes | None, *, watchdog_usec: int = 0) -> None:
        self._address = address
        self._watchdog_ns = watchdog_usec * 1000
        self._last_ping_ns: int | None = None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *,
                     pid: int | None = None) -> "Notifier":
        """Read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID. The watchdog is ours only
        if WATCHDOG_PID is unset or names this process (a child must not ping for us)."""
        env = os.environ if environ is None else environ
        address = socket_address(env.get("NOTIFY_SOCKET", ""))
        watchdog_usec = 0
        raw_usec = env.get("WATCHDOG_USEC", "")
        raw_pid = env.get("WATCHDOG_PID", "")
        own_pid = os.getpid() if pid is None else pid
        if raw_usec.isdigit() and (not raw_pid or raw_pid == str(own_pid)):
            watchdog_usec = int(raw_usec)
        return cls(address, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_ns(self) -> int:
        """How often keepalive() pings: half of WatchdogSec, 0 when there is no watchdog."""
        return self._watchdog_ns // 2

    def send(self, **fields: str | int) -> bool:
        """Send one message: send(READY=1, STATUS="attached to eth0")."""
        if self._address is None:
            return False
        message = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode("utf-8"), self._address)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %r: %s (continuing without it)",
                            self._address, exc.strerror or exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is complete (send only once the service is really usable)."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=_status(status))

    def status(self, text: str) -> bool:
        return self.send(STATUS=_status(text))

    def reloading(self, monotonic_ns: int | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (required by Type=notify-reload; harmless with
        Type=notify). Send ready() again when the reload is done."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if monotonic_ns is None else monotonic_ns
        return self.send(RELOADING=1, MONOTONIC_USEC=now // 1000)

    def stopping(self, status: str | None = None) -> bool:
        if status is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, STATUS=_status(status))

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def keepalive(self, now_ns: int) -> bool:
        """Call from every main-loop iteration with a monotonic clock; pings the watchdog
        when half the interval has passed. Returns True when it sent a ping."""
        if self._watchdog_ns == 0 or self._address is None:
            return False
        if self._last_ping_ns is not None and now_ns - self._last_ping_ns < self.watchdog_interval_ns:
            return False
        self._last_ping_ns = now_ns
        return self.watchdog()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def socket_address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET to a sendto() address: "@name" is the abstract socket "\\0name";
    a path must be absolute. Anything else (unset, "vsock:" of newer systemd) is None."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    if value:
        log.warning("ignoring NOTIFY_SOCKET=%r: only paths and @abstract names are supported", value)
    return None


def _one_line(text: str) -> str:
    # A newline inside a value would start a new assignment: KEY=VALUE framing breaks.
    return text.replace("\n", " ")


def _status(text: str) -> str:
    return text[:MAX_STATUS_CHARS]
