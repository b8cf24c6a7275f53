"""sd_notify against real AF_UNIX datagram sockets: a path socket and an abstract one,
read back as systemd would read them."""

from __future__ import annotations

import os
import socket

import pytest

from sensor.notify import MAX_STATUS_CHARS, Notifier, socket_address


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        env_value = str(tmp_path / "notify.sock")
        sock.bind(env_value)
    else:
        name = f"loupe-ops-test-{os.getpid()}-{id(sock)}"
        sock.bind(b"\0" + name.encode())
        env_value = "@" + name
    sock.settimeout(2)
    yield sock, env_value
    sock.close()


def _messages(sock: socket.socket) -> list[dict[str, str]]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(4096)
            out.append(dict(line.split("=", 1) for line in data.decode().split("\n")))
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
    return out


def test_lifecycle_messages(listener):
    sock, env_value = listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": env_value})
    assert n.enabled
    assert n.ready("attached to lo\nand eth0")
    assert n.status("exporting")
    assert n.reloading(monotonic_ns=5_000_123_456)
    assert n.watchdog()
    assert n.stopping("flushing")
    n.close()
    assert _messages(sock) == [
        {"READY": "1", "STATUS": "attached to lo and eth0"},
        {"STATUS": "exporting"},
        {"RELOADING": "1", "MONOTONIC_USEC": "5000123"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1", "STATUS": "flushing"},
    ]


def test_reloading_uses_the_monotonic_clock(listener):
    import time

    sock, env_value = listener
    with Notifier.from_environ({"NOTIFY_SOCKET": env_value}) as n:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        n.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    (message,) = _messages(sock)
    assert before <= int(message["MONOTONIC_USEC"]) <= after


def test_status_is_bounded(listener):
    sock, env_value = listener
    with Notifier.from_environ({"NOTIFY_SOCKET": env_value}) as n:
        n.status("x" * 10_000)
    (message,) = _messages(sock)
    assert len(message["STATUS"]) == MAX_STATUS_CHARS


def test_keepalive_pings_at_half_the_watchdog_interval(listener):
    sock, env_value = listener
    env = {"NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}
    n = Notifier.from_environ(env, pid=4242)
    assert n.watchdog_interval_ns == 1_000_000_000
    sent = [n.keepalive(t) for t in (0, 500_000_000, 999_999_999, 1_000_000_000,
                                     1_500_000_000, 2_000_000_000)]
    assert sent == [True, False, False, True, False, True]
    assert _messages(sock) == [{"WATCHDOG": "1"}] * 3
    n.close()


def test_watchdog_belongs_to_the_named_pid_only(listener):
    sock, env_value = listener
    env = {"NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}
    n = Notifier.from_environ(env, pid=9999)
    assert n.watchdog_interval_ns == 0
    assert not n.keepalive(0)
    assert _messages(sock) == []


def test_without_systemd_everything_is_a_no_op():
    n = Notifier.from_environ({})
    assert not n.enabled
    assert not n.ready("x") and not n.keepalive(0) and not n.stopping()


def test_a_vanished_socket_is_reported_not_raised(tmp_path, caplog):
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.ready() is False
    assert n.status("still running") is False
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1   # logged once, not at every call
    n.close()


def test_socket_address_forms():
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == b"\0abc"
    assert socket_address("") is None
    assert socket_address("@") is None
    assert socket_address("vsock:2:1234") is None
    assert socket_address("relative/path") is None
