"""TLS plaintext end to end: `loupe sensor run --tls-plaintext` on the host, a client in one
namespace and a TLS server in the other (the sensor's meter on the client's veth), a real
collector. The HTTP transactions inside TLS come out as the same L7 events as on the
wire, marked source tls_plaintext, with the Community ID and uid of the wire flow.

- curl (OpenSSL, keep-alive) against nginx: 20 requests with a POST and a 404;
- Python's ssl (SSL_read_ex / SSL_write_ex, SSL_set_fd) against openssl s_server -WWW;
- gnutls-cli against nginx;
- a client started after the sensor is seen (a uprobe on the library inode covers it);
- a "libssl.so.3" without the functions is a warning naming it, and the sensor goes on.

The tests differ only in their traffic, so they share one sensor, one namespace pair and
one collector with the _h2, _mysql and _pgsql modules (rig.SharedTlsSensor: a sensor
start is mostly its bcc compile). Each test's server listens on a port of its own and
each test reads only the events of flows to that port, so one test's records cannot
satisfy another's; every client and server also starts after the sensor, which the
uprobes on the library inodes must cover. After the last of these tests the sensor is
stopped and must exit 0 without a traceback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from tests.export.collector_proc import query, wait_for
from tests.live.rig import stop, tls_plaintext_args, wait_tcp
from tests.live.tls_peers import nginx, s_server
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

HTTP_COLS = ("method", "path", "status", "source", "community_id", "uid", "src_addr",
             "dst_port")

# One server port per test (see the module's docstring).
CURL_PORT, PY_PORT, GNUTLS_PORT, LATE_PORT = 443, 4433, 8444, 9443


# The pair, the arguments and _http_rows are for the other test_tls_plaintext_* modules,
# whose sensors differ from this module's (or whose peers take a while to set up).
@pytest.fixture
def pair():
    with VethPair.create("tp") as p:
        p.wait_ready()
        yield p


_args = tls_plaintext_args


def _http_rows(collector, source: str = "tls_plaintext", *, ours: bool = False) -> list[dict]:
    """ours: only events of connections this sensor's meter saw (the probes see every
    process on the host, other tests' namespaces included)."""
    where = " AND community_id IN (SELECT community_id FROM flows)" if ours else ""
    rows = query(collector.address, f"SELECT {', '.join(HTTP_COLS)} FROM http "
                                    f"WHERE source = '{source}'{where} ORDER BY ts_ns")
    return [dict(zip(HTTP_COLS, r)) for r in rows]


def _port_rows(collector, port: int) -> list[dict]:
    """The plaintext events of connections this sensor's meter saw to `port` (the probes
    see every process on the host, other tests' namespaces included)."""
    rows = query(collector.address,
                 f"SELECT {', '.join(HTTP_COLS)} FROM http WHERE source = 'tls_plaintext' "
                 f"AND community_id IN (SELECT community_id FROM flows WHERE dst_port = {port})"
                 f" ORDER BY ts_ns")
    return [dict(zip(HTTP_COLS, r)) for r in rows]


def _flows(collector, port: int) -> list[dict]:
    cols = ("uid", "community_id", "src_port", "dst_port")
    rows = query(collector.address, f"SELECT {', '.join(cols)} FROM flows "
                                    f"WHERE dst_port = {port}")
    return [dict(zip(cols, r)) for r in rows]


def _curl_keepalive(pair, port: int, requests: list[tuple[str, str]]
                    ) -> subprocess.CompletedProcess:
    """One curl process, one connection (--next reuses it), the given (method, path)."""
    argv = ["curl", "-sk", "--http1.1", "--max-time", "20"]
    for i, (method, path) in enumerate(requests):
        if i:
            argv += ["--next", "-sk", "--http1.1"]
        if method == "POST":
            argv += ["-d", "name=value"]
        argv += ["-o", "/dev/null", "-w", "%{http_code} %{num_connects}\\n",
                 f"https://{pair.b.ip4}:{port}{path}"]
    return pair.a.run(*argv, timeout=60)


def _check_joined(collector, rows, port: int) -> None:
    flows = _flows(collector, port)
    assert flows, "no wire Flow record for the TLS connection"
    by_cid = {f["community_id"]: f for f in flows}
    for row in rows:
        flow = by_cid.get(row["community_id"])
        assert flow is not None, (row, flows)
        assert flow["uid"] == row["uid"]


def test_curl_keepalive_against_nginx(tls_shared, tmp_path):
    pair, collector = tls_shared.pair, tls_shared.collector
    srv = nginx(pair.b, tmp_path, port=CURL_PORT)
    try:
        wait_tcp(pair.a, pair.b.ip4, CURL_PORT)
        want = [("GET", "/index.html", 200) if i % 2 else ("GET", "/a.txt", 200)
                for i in range(18)]
        want[5] = ("POST", "/post", 200)
        want[11] = ("GET", "/missing", 404)
        want += [("GET", "/a.txt", 200), ("GET", "/index.html", 200)]
        out = _curl_keepalive(pair, CURL_PORT, [(m, p) for m, p, _ in want])
        codes = out.stdout.split()
        assert codes[0::2] == [str(s) for _, _, s in want]
        assert sum(map(int, codes[1::2])) == 1        # one connection: keep-alive
        # The wire flow is exported a linger after curl's FIN, after its events.
        wait_for(lambda: len(_port_rows(collector, CURL_PORT)) >= 20, 30,
                 "20 plaintext HTTP events and the wire flow")
    finally:
        stop(srv)
    rows = _port_rows(collector, CURL_PORT)
    assert [(r["method"], r["path"], r["status"]) for r in rows] == want
    assert {r["source"] for r in rows} == {"tls_plaintext"}
    assert {r["src_addr"] for r in rows} == {pair.a.ip4}
    assert len({r["uid"] for r in rows}) == 1
    _check_joined(collector, rows, CURL_PORT)
    # The wire still sees only the handshake of this connection, as before (no test of
    # this module sends HTTP in the clear).
    wire = query(collector.address, "SELECT count(*) FROM http WHERE source = 'wire'")
    assert wire == [[0]]


PY_CLIENT = r"""
import socket, ssl, sys
host, port, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
for path in paths:
    with socket.create_connection((host, port)) as raw, ctx.wrap_socket(raw) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        print(data.split(b"\r\n", 1)[0].decode())
"""


def test_python_ssl_against_openssl_s_server(tls_shared, tmp_path):
    pair, collector = tls_shared.pair, tls_shared.collector
    srv = s_server(pair.b, tmp_path, port=PY_PORT)
    (tmp_path / "www" / "page.txt").write_bytes(b"p" * 300)
    client = tmp_path / "client.py"
    client.write_text(PY_CLIENT)
    paths = ["/page.txt"] * 19 + ["/nothing.txt"]
    try:
        wait_tcp(pair.a, pair.b.ip4, PY_PORT)
        out = pair.a.run(sys.executable, str(client), pair.b.ip4, str(PY_PORT), *paths,
                         timeout=60)
        # s_server -WWW answers 200 even for a missing file (with an error text).
        assert out.stdout.split("\n")[:20] == ["HTTP/1.0 200 ok"] * 20, out.stdout
        wait_for(lambda: len(_port_rows(collector, PY_PORT)) >= 20, 30,
                 "20 plaintext HTTP events and their wire flows")
    finally:
        stop(srv)
    rows = _port_rows(collector, PY_PORT)
    assert [(r["method"], r["path"]) for r in rows] == [("GET", p) for p in paths]
    assert [r["status"] for r in rows] == [200] * 20
    assert len({r["uid"] for r in rows}) == 20
    _check_joined(collector, rows, PY_PORT)


def test_gnutls_cli_against_nginx(tls_shared, tmp_path):
    if not shutil.which("gnutls-cli"):
        pytest.skip("gnutls-cli is not installed (scripts/apt-packages.txt: gnutls-bin)")
    pair, collector = tls_shared.pair, tls_shared.collector
    srv = nginx(pair.b, tmp_path, port=GNUTLS_PORT)
    request = (f"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
               f"GET /gone HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    try:
        wait_tcp(pair.a, pair.b.ip4, GNUTLS_PORT)
        out = subprocess.run(pair.a.cmd("gnutls-cli", "--insecure", "--port",
                                        str(GNUTLS_PORT), pair.b.ip4), input=request,
                             text=True, capture_output=True, timeout=30)
        assert "404 Not Found" in out.stdout, out.stdout + out.stderr
        wait_for(lambda: len(_port_rows(collector, GNUTLS_PORT)) >= 2, 30,
                 "2 plaintext HTTP events and the wire flow")
    finally:
        stop(srv)
    rows = _port_rows(collector, GNUTLS_PORT)
    assert [(r["method"], r["path"], r["status"]) for r in rows] == [
        ("GET", "/a.txt", 200), ("GET", "/gone", 404)]


NO_SYMBOLS = r"""
import ctypes, sys, time
ctypes.CDLL(sys.argv[1])       # maps a file named libssl.so.3 that is no TLS library
print("mapped", flush=True)
time.sleep(30)
"""


def _fake_warnings(sensor) -> list[str]:
    return [line for line in sensor.stderr_now().splitlines()
            if "libssl.so.3" in line and "fake" in line]


def test_late_process_and_library_without_symbols(tls_shared, tmp_path):
    """A client started after the sensor is seen; a mapped libssl.so.3 without SSL_read
    and SSL_write gives one warning naming it, and the sensor keeps running."""
    pair, collector, sensor = tls_shared.pair, tls_shared.collector, tls_shared.sensor
    fake = tmp_path / "fake" / "libssl.so.3"
    fake.parent.mkdir()
    shutil.copy(next(p for p in ("/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1")
                     if __import__("os").path.exists(p)), fake)
    srv = nginx(pair.b, tmp_path, port=LATE_PORT)
    holder = None
    try:
        wait_tcp(pair.a, pair.b.ip4, LATE_PORT)
        holder = subprocess.Popen([sys.executable, "-c", NO_SYMBOLS, str(fake)],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "mapped"
        wait_for(lambda: _fake_warnings(sensor), 10, "the warning naming the library",
                 interval_s=0.1)
        warned = time.monotonic()
        out = _curl_keepalive(pair, LATE_PORT, [("GET", "/a.txt"), ("GET", "/late")])
        assert out.stdout.split()[0::2] == ["200", "404"]
        wait_for(lambda: len(_port_rows(collector, LATE_PORT)) >= 2, 30,
                 "the late client's events and the wire flow")
        # Two more rescans (1 s apart) with the library still mapped: still one warning.
        time.sleep(max(0.0, warned + 2.5 - time.monotonic()))
        warnings = _fake_warnings(sensor)
    finally:
        stop(srv)
        if holder is not None:
            holder.kill()
            holder.wait()
    rows = _port_rows(collector, LATE_PORT)
    assert [(r["path"], r["status"]) for r in rows] == [("/a.txt", 200), ("/late", 404)]
    assert len(warnings) == 1, sensor.stderr_now()
    assert "no SSL_read or SSL_write symbol" in warnings[0]
    assert sensor.proc.poll() is None, "the sensor stopped after the warning"
