"""`make run` as the README tells a new user to run it, in a fresh network namespace: no
default route, so the sensor watches `lo`, and the only traffic is an HTTP server on
127.0.0.1:18080 (a port no selection rule lists: content sniffing has to find it) and a
few curls. The collector's --print output must show an HTTP record within 30 s of the
first request, a heartbeat must show up before any traffic, and a Ctrl-C must end it all
without make reporting an error and without leaving a process behind.

The record is matched by tokens (the word http and the request path), not by columns:
the table layout is not this test's business.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time

import pytest

from tests.conftest import REPO
from tests.netns import sh

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

PORT = 18080
PATH = "/loupe-make-run"


class Lines:
    """Lines of one pipe, read on a thread, waited for with a deadline."""

    def __init__(self, pipe) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, match, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if line is None:
                return None
            self.seen.append(line)
            if match(line):
                return line
        return None

    def rest(self, timeout_s: float = 10.0) -> None:
        self.wait_for(lambda line: False, timeout_s)


def _default_sigint() -> None:
    # A terminal's Ctrl-C reaches a shell that did not ignore SIGINT; the test runner may
    # have been started with it ignored, which bash would then be unable to trap.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def netns():
    name = f"lmr{os.getpid() % 100000}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def _pids(netns: str) -> set[int]:
    return {int(p) for p in sh("ip", "netns", "pids", netns).stdout.split()}


def test_make_run_on_lo_shows_http_and_stops_cleanly(netns, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / PATH.lstrip("/")).write_text("hello\n")
    server = subprocess.Popen(
        ["ip", "netns", "exec", netns, "python3", "-m", "http.server", "--bind", "127.0.0.1",
         "--directory", str(www), str(PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Its own store: a real `make run` on this host keeps ./data. Ports stay the defaults:
    # they are the namespace's own.
    env = {**os.environ, "LOUPE_DATA_DIR": str(tmp_path / "data")}
    run = subprocess.Popen(["ip", "netns", "exec", netns, "make", "--no-print-directory", "run"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True, preexec_fn=_default_sigint)
    out, err = Lines(run.stdout), Lines(run.stderr)
    try:
        assert err.wait_for(lambda line: "sensor on lo" in line, 60), err.seen
        # Compiling takes seconds, more on a busy host: the bound that matters is the next.
        assert err.wait_for(lambda line: "attached to lo" in line, 90), "\n".join(err.seen)
        # Before any traffic of ours: something within seconds of the sensor starting.
        beat = err.wait_for(lambda line: "no L7 yet" in line, 15)
        assert beat and "packets" in beat, "\n".join(err.seen)
        start = time.monotonic()
        record = None
        for _ in range(10):   # bounded: at most 10 requests, one every 3 s
            sh("ip", "netns", "exec", netns, "curl", "-s", "-o", "/dev/null", "--max-time",
               "5", f"http://127.0.0.1:{PORT}{PATH}")
            record = out.wait_for(lambda line: "http" in line.lower() and PATH in line, 3)
            if record is not None:
                break
        elapsed = time.monotonic() - start
        assert record is not None, (out.seen, err.seen)
        assert elapsed <= 30, f"the HTTP record took {elapsed:.1f} s"
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGINT)   # what Ctrl-C sends: the whole group
        try:
            code = run.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            raise
        finally:
            server.terminate()
            server.wait(10)
    err.rest()
    # run.sh ends 0 after a Ctrl-C, so make reports no error; make itself then re-raises
    # the SIGINT it got (GNU make), which a shell shows as status 130 without a message.
    assert code in (0, -signal.SIGINT), (code, err.seen)
    assert not [line for line in err.seen if line.startswith("make: ***")], err.seen
    assert any(line.startswith("loupe sensor: ") for line in err.seen), err.seen  # closing line
    assert _pids(netns) == set(), "processes left in the namespace"
