"""What the live sensor tests drive: `loupe sensor run` as a real subprocess (readiness
from its own sd_notify datagrams, counters from its own /metrics), a keep-alive HTTP/1.1
server, and the peers (openssl s_server, dnsmasq) in a namespace.

The sensor runs in the host's namespace and attaches to a veth inside a test namespace
(--netns), so it reaches a real collector on 127.0.0.1 while it watches traffic that
stays between the namespaces (198.18.0.0/15, fc00::/7).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sensor.export import jsonfmt
from sensor.status_cli import scrape
from tests.conftest import REPO
from tests.export.collector_proc import free_port

LOUPE = [sys.executable, "-m", "sensor.cli"]

# A keep-alive HTTP/1.1 server: GET /size/N answers N bytes (Content-Length), anything
# else 404. Bodies come from one preallocated buffer, so a 10 MiB body costs the server
# no Python work per byte.
HTTP_SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BLOB = b"b" * (16 << 20)
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # head and body are separate writes
    def log_message(self, *a):
        pass
    def do_GET(self):
        if self.path.startswith("/size/"):
            n = int(self.path[6:])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            view = memoryview(BLOB)
            while n:
                k = min(n, len(BLOB))
                self.wfile.write(view[:k])
                n -= k
        else:
            self.send_error(404)
ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


# A paced keep-alive HTTP/1.1 client: N GETs of /size/SIZE on one connection at RATE
# requests per second at most (a fast client, but one userspace can follow), then it
# prints how many responses it read completely.
HTTP_CLIENT = r"""
import http.client, sys, time
host, port, size, n, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
conn = http.client.HTTPConnection(host, port, timeout=30)
ok = 0
start = time.monotonic()
for i in range(n):
    conn.request("GET", f"/size/{size}")
    resp = conn.getresponse()
    got = 0
    while True:
        chunk = resp.read(1 << 20)
        if not chunk:
            break
        got += len(chunk)
    ok += resp.status == 200 and got == size
    delay = start + (i + 1) / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
conn.close()
print(ok)
"""


def http_requests(host, workdir: Path, server_ip: str, size: int, n: int, rate: float,
                  port: int = 8080) -> int:
    """Runs HTTP_CLIENT in host's namespace; the number of complete 200 responses."""
    script = workdir / "httpc.py"
    script.write_text(HTTP_CLIENT)
    out = host.run(sys.executable, str(script), server_ip, str(port), str(size), str(n),
                   str(rate), timeout=n / rate + 120)
    return int(out.stdout.strip())


class Sensor:
    """`loupe sensor run` in a subprocess. start() returns after READY=1."""

    def __init__(self, args: list[str], *, workdir: Path) -> None:
        self.workdir = workdir
        self.metrics_port = free_port()
        self.args = [*LOUPE, "sensor", "run", "--metrics", f"127.0.0.1:{self.metrics_port}",
                     *args]
        self.proc: subprocess.Popen | None = None
        self.notes: list[str] = []
        self._sock: socket.socket | None = None
        self.stdout = ""
        self.stderr = ""

    def start(self, timeout_s: float = 90.0) -> "Sensor":
        self.launch()
        self.wait_note("READY=1", timeout_s)
        return self

    def launch(self) -> "Sensor":
        """Starts the process and returns at once: the caller does other setup while it
        compiles (on another core), then waits for wait_note("READY=1", ...) itself."""
        sock_path = tempfile.mktemp(prefix="lvnotify", dir="/tmp")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(sock_path)
        env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": sock_path}
        self._out = open(self.workdir / f"sensor-{len(self.notes)}.out", "w+")
        self._err = open(self.workdir / f"sensor-{len(self.notes)}.err", "w+")
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=self._out,
                                     stderr=self._err, text=True)
        return self

    def wait_note(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._err.seek(0)
                raise AssertionError(f"sensor exited {self.proc.returncode}: {self._err.read()}")
            self._sock.settimeout(0.2)
            try:
                note = self._sock.recv(4096).decode()
            except socket.timeout:
                continue
            self.notes.append(note)
            if text in note:
                return note
        raise AssertionError(f"no {text} from the sensor within {timeout_s} s: {self.notes}")

    def stderr_now(self) -> str:
        """What the running sensor has written to stderr so far (for a sensor shared by
        a module's tests, which stop it only at the end)."""
        return Path(self._err.name).read_text()

    def metrics(self) -> dict[str, dict[str, float]]:
        """family -> {label value or "": value}, from the sensor's own /metrics, read
        as `loupe status` reads it."""
        return scrape(f"127.0.0.1:{self.metrics_port}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, wait; stdout/stderr are then in self.stdout / self.stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._out.seek(0)
        self._err.seek(0)
        self.stdout, self.stderr = self._out.read(), self._err.read()
        self._out.close()
        self._err.close()
        self._sock.setblocking(False)
        while True:   # what it said while stopping (STOPPING=1)
            try:
                self.notes.append(self._sock.recv(4096).decode())
            except BlockingIOError:
                break
        path = self._sock.getsockname()
        self._sock.close()
        os.unlink(path)
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def records(self) -> list:
        """The model records of the JSON lines it printed (--output jsonl)."""
        return [jsonfmt.from_dict(__import__("json").loads(line))
                for line in self.stdout.splitlines() if line.startswith("{")]

    def records_now(self) -> list:
        """The records the running sensor has printed so far (its sink flushes every
        batch): whole lines only, a line being written is left for the next read."""
        text = Path(self._out.name).read_text()
        return [jsonfmt.from_dict(__import__("json").loads(line))
                for line in text.splitlines(keepends=True)
                if line.startswith("{") and line.endswith("\n")]

    def wait_records(self, done, timeout_s: float, what: str) -> list:
        """Polls records_now() until done(records) is true (bounded); returns them. For
        "the flows of this test have ended and been printed" instead of a fixed sleep."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"sensor exited {self.proc.returncode} while waiting "
                                     f"for {what}: {self.stderr_now()}")
            records = self.records_now()
            if done(records):
                return records
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} from the sensor within {timeout_s} s")
            time.sleep(0.2)

    def closing(self) -> dict[str, int]:
        """Numbers from the closing line on stderr."""
        m = re.search(r"loupe sensor: (\d+) flows, (\d+) L7 events.*?kernel: (\d+) packets, "
                      r"(\d+) payload events, payload (\d+) octets copied", self.stderr)
        assert m, self.stderr
        keys = ("flows", "l7_events", "packets", "payload_events", "payload_octets")
        return dict(zip(keys, map(int, m.groups())))


def wait_tcp(host, addr: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probe = host.run("bash", "-c", f"exec 3<>/dev/tcp/{addr}/{port}", check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {addr}:{port}")


# TCP states in which a connection may still send a packet (TIME-WAIT sends none).
_OPEN_STATES = [a for st in ("established", "syn-sent", "syn-recv", "fin-wait-1", "fin-wait-2",
                             "close-wait", "last-ack", "closing") for a in ("state", st)]


def wait_closed(port: int, *hosts, timeout_s: float = 10.0) -> None:
    """Returns once no connection to or from `port` is open in the hosts' namespaces (the
    host's own namespace when none is given): a wait_tcp probe's flow is over before a
    sensor attaches, so the sensor never sees its tail as a flow of its own."""
    cmd = ["ss", "-Htn", *_OPEN_STATES, f"( sport = :{port} or dport = :{port} )"]
    deadline = time.monotonic() + timeout_s
    while True:
        outs = [(h.run(*cmd) if h is not None else
                 subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30))
                .stdout.strip() for h in (hosts or (None,))]
        if not any(outs):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"connections of port {port} still open: {outs}")
        time.sleep(0.05)


def start_http(host, workdir: Path, port: int = 8080) -> subprocess.Popen:
    script = workdir / "httpd.py"
    script.write_text(HTTP_SERVER)
    proc = host.popen(sys.executable, str(script), host.ip4, str(port),
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def meter_hooks(host) -> list[str]:
    """The hooks of host's interface running the flow meter (tcx or clsact)."""
    from tests.kernel.conftest import meter_hooks as hooks

    return hooks(host.netns, host.iface)


def tls_plaintext_args(pair, collector, workdir: Path, *extra: str) -> list[str]:
    """`loupe sensor run` arguments of the TLS plaintext tests: the meter on pair.a's
    veth, records to collector, the probes on."""
    return ["--netns", pair.a.netns, "--iface", pair.a.iface,
            "--collector", collector.address, "--spool-dir", str(workdir / "spool"),
            "--sensor-id", "tlstest", "--output", "jsonl", "--interval", "0.5",
            "--tls-plaintext", "--set", "timeouts.tcp_linger=1s",
            "--set", "export.batch_delay=100ms", *extra]


class SharedTlsSensor:
    """One `loupe sensor run --tls-plaintext` (a namespace pair, a collector) shared by the
    TLS plaintext tests that differ only in traffic, across modules: each start is mostly
    bcc compiling the meter and the probes. Started by the first test that asks for it,
    stopped after the last one (tests/live/conftest.py): close() checks that it stops
    with 0 and wrote no traceback. The tests keep apart by their servers' ports: each
    reads only the records of flows to its own port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pair = None
        self.collector = None
        self.sensor: Sensor | None = None
        self._stack = None

    def get(self) -> "SharedTlsSensor":
        if self.sensor is not None:
            if self.sensor.proc.poll() is not None:
                raise AssertionError(f"the shared TLS plaintext sensor exited "
                                     f"{self.sensor.proc.returncode}: {self.sensor.stderr_now()}")
            return self
        import contextlib

        from tests.export.collector_proc import CollectorProcess
        from tests.netns import VethPair

        self._stack = contextlib.ExitStack()
        try:
            self.pair = self._stack.enter_context(VethPair.create("tsh"))
            self.pair.wait_ready()
            self.collector = CollectorProcess(self.workdir / "data").start()
            self._stack.callback(self.collector.stop)
            # rescan=1s: a test maps a library after the start and waits for the
            # rescans that find it.
            self.sensor = Sensor(tls_plaintext_args(self.pair, self.collector, self.workdir,
                                                    "--set", "tls_plaintext.rescan=1s"),
                                 workdir=self.workdir)
            self._stack.callback(self.sensor.kill)
            self.sensor.start()
        except BaseException:
            self._stack.close()
            self.sensor = None
            raise
        return self

    def close(self) -> None:
        """SIGTERM; raises AssertionError unless the sensor stopped with 0 and without a
        traceback. Everything is torn down either way."""
        if self.sensor is None:
            return
        sensor, stack = self.sensor, self._stack
        self.sensor = self._stack = None
        with stack:
            code = sensor.stop() if sensor.proc.poll() is None else sensor.proc.returncode
            assert code == 0, f"the shared TLS plaintext sensor exited {code}: {sensor.stderr}"
            assert "Traceback" not in sensor.stderr, sensor.stderr
