"""TLS plaintext, mutual TLS: nginx (TLS 1.2, ssl_verify_client optional, certificates
from collector/certs.py) and two curl connections from the metered veth, one presenting a
client certificate and one not. The wire's TLS parser sees the client's Certificate in
the clear (TLS 1.2) and the plaintext stage joins it to every request of that
connection: its HTTP events carry the `mtls` credential, the other connection's none; the
wire flow's l7_summary says tls_client_cert=sent, and the collector's inventory counts
`mtls` for the endpoint.

The sensor is the one the TLS plaintext modules share (rig.SharedTlsSensor, started
once); this test reads only the records of flows to its server's port."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from collector import certs
from tests import nginx as nginx_peer
from tests.export.collector_proc import query, wait_for
from tests.live.rig import stop, wait_tcp
from tests.live.tls_peers import nginx_conf

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

PORT = 8463
LOUPE = str(Path(sys.executable).with_name("loupe"))


def _rows(collector) -> list[tuple]:
    return [tuple(r) for r in query(
        collector.address,
        "SELECT src_port, path, array_to_string(list_transform(auth, lambda x: x.kind), ',') "
        "FROM http WHERE source = 'tls_plaintext' AND community_id IN (SELECT community_id "
        f"FROM flows WHERE dst_port = {PORT}) ORDER BY ts_ns")]


def test_client_certificate_marks_every_request_of_its_connection(tls_shared, tmp_path):
    pair, collector = tls_shared.pair, tls_shared.collector
    pki = certs.init(tmp_path / "pki", collector_name="api.test", sensors=["client-a"],
                     analysts=[], extra_sans=[pair.b.ip4])
    www = tmp_path / "www"
    www.mkdir()
    (www / "a.txt").write_bytes(b"a" * 100)
    (tmp_path / "cert.pem").write_bytes(pki.collector[0].read_bytes())
    (tmp_path / "key.pem").write_bytes(pki.collector[1].read_bytes())
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(tmp_path, PORT, f"""ssl_protocols TLSv1.2;
        ssl_client_certificate {pki.ca_cert};
        ssl_verify_client optional;"""))
    srv = pair.b.popen(nginx_peer.binary(), "-c", str(conf), "-e", str(tmp_path / "error.log"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"https://{pair.b.ip4}:{PORT}/a.txt"
    cert, key = pki.clients["client-a"]
    try:
        wait_tcp(pair.a, pair.b.ip4, PORT)
        base = ["-sk", "--http1.1", "--tlsv1.2", "--tls-max", "1.2", "-o", "/dev/null",
                "-w", "%{http_code}\\n"]
        with_cert = ["curl", "--max-time", "20", *base, "--cert", str(cert), "--key",
                     str(key), url, "--next", *base, "--cert", str(cert), "--key", str(key),
                     url]
        out = pair.a.run(*with_cert, timeout=60)
        assert out.stdout.split() == ["200", "200"], out.stdout
        out = pair.a.run("curl", "--max-time", "20", *base, url, timeout=60)
        assert out.stdout.split() == ["200"], out.stdout
        wait_for(lambda: len(_rows(collector)) >= 3, 20, "the plaintext HTTP events")
        wait_for(lambda: len(query(collector.address, "SELECT uid FROM flows WHERE "
                                   f"dst_port = {PORT}")) >= 2, 20, "the wire flows")
    finally:
        stop(srv)
    rows = _rows(collector)
    assert len(rows) == 3, rows
    by_conn: dict[int, list[str]] = {}
    for sport, path, kinds in rows:
        assert path == "/a.txt"
        by_conn.setdefault(sport, []).append(kinds)
    # curl reuses its connection for --next: two requests with mtls, one without.
    assert sorted(by_conn.values()) == [[""], ["mtls", "mtls"]], by_conn
    summaries = sorted(str(r[0]) for r in query(
        collector.address, f"SELECT l7_summary FROM flows WHERE dst_port = {PORT}"))
    assert any("tls_client_cert" in s and "sent" in s for s in summaries), summaries
    assert any("requested" in s for s in summaries), summaries
    # The inventory counts it for the endpoint.
    done = subprocess.run([LOUPE, "endpoints", "-o", "json", "--collector",
                           collector.address], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (ep,) = [e for e in map(json.loads, done.stdout.splitlines())
             if e["service"].endswith(f":{PORT}")]
    assert (ep["requests"], ep["auth_counts"], ep["unauthenticated"]) == (
        3, {"mtls": 2}, 1), ep
    assert "client-a" not in done.stdout
