"""TLS plaintext, HTTP/2: curl --http2 (OpenSSL, ALPN h2) against nghttpd with TLS, the
sensor's meter on the client's veth. The plaintext stream is h2c's: the client preface and
frames after the handshake (nghttpd writes its SETTINGS before the preface reaches it), so
the same HTTP/2 parser gives one event per stream, marked source tls_plaintext, with the
wire flow's Community ID and uid.

The sensor is the one the TLS plaintext modules share (rig.SharedTlsSensor, started
once); this test reads only the records of flows to its server's port."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.export.collector_proc import query, wait_for
from tests.live.rig import stop, wait_tcp
from tests.live.test_tls_plaintext import _check_joined, _flows
from tests.live.tls_peers import certificate

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

COLS = ("stream_id", "method", "path", "status", "source", "community_id", "uid")
PORT = 8443


def _rows(collector) -> list[dict]:
    rows = query(collector.address,
                 f"SELECT {', '.join(COLS)} FROM http2 WHERE source = 'tls_plaintext' "
                 f"AND community_id IN (SELECT community_id FROM flows "
                 f"WHERE dst_port = {PORT}) ORDER BY stream_id")
    return [dict(zip(COLS, r)) for r in rows]


def test_curl_http2_against_nghttpd(tls_shared, tmp_path):
    if not shutil.which("nghttpd"):
        pytest.skip("nghttpd is not installed (scripts/apt-packages.txt: nghttp2-server)")
    pair, collector = tls_shared.pair, tls_shared.collector
    key, cert = certificate(tmp_path)
    www = tmp_path / "www"
    www.mkdir()
    (www / "a.txt").write_bytes(b"a" * 100)
    (www / "b.txt").write_bytes(b"b" * 3000)
    srv = pair.b.popen("nghttpd", "-a", pair.b.ip4, "-d", str(www), str(PORT), str(key),
                       str(cert), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    paths = ["/a.txt", "/b.txt", "/missing", "/a.txt", "/b.txt"]
    try:
        wait_tcp(pair.a, pair.b.ip4, PORT)
        argv = ["curl", "-sk", "--http2", "--max-time", "20"]
        for i, path in enumerate(paths):
            if i:
                argv += ["--next", "-sk", "--http2"]
            argv += ["-o", "/dev/null", "-w", "%{http_version} %{http_code}\\n",
                     f"https://{pair.b.ip4}:{PORT}{path}"]
        out = pair.a.run(*argv, timeout=60)
        assert out.stdout.split() == ["2", "200", "2", "200", "2", "404", "2", "200",
                                      "2", "200"], out.stdout
        wait_for(lambda: len(_rows(collector)) >= len(paths), 20,
                 "the plaintext HTTP/2 events")
        wait_for(lambda: _flows(collector, PORT), 20, "the wire flow")
    finally:
        stop(srv)
    rows = _rows(collector)
    # One connection (curl reuses it for --next): client streams 1, 3, 5, ...
    assert [(r["stream_id"], r["method"], r["path"], r["status"]) for r in rows] == [
        (1 + 2 * i, "GET", p, 404 if p == "/missing" else 200) for i, p in enumerate(paths)]
    assert {r["source"] for r in rows} == {"tls_plaintext"}
    _check_joined(collector, rows, PORT)
