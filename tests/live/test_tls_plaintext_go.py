"""TLS plaintext, Go: a Go HTTPS client (tests/live/go/tlsclient.go, built here with the
distribution's Go) against nginx, the sensor's meter on the client's veth. Go links
crypto/tls into the binary: the sensor finds the new executable when it rescans, probes
(*Conn).Read/Write at their entry and at each RET (no uretprobes on Go), keys each call
by goroutine, and the requests come out as tls_plaintext HTTP events joined to the wire
flow, like OpenSSL's."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.export.collector_proc import wait_for
from tests.live.rig import Sensor, stop, wait_tcp
from tests.live.test_tls_plaintext import _args, _check_joined, _flows, _http_rows, pair  # noqa: F401
from tests.live.tls_peers import go_client, nginx

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]


def test_go_client_against_nginx(pair, collector, tmp_path):
    client = go_client(tmp_path)
    srv = nginx(pair.b, tmp_path)
    # Only the Go client is probed: nginx's OpenSSL view of the same connection would
    # otherwise feed the engine whenever its chunk came first.
    sensor = Sensor(_args(pair, collector, tmp_path, "--set", "tls_plaintext.rescan=1s",
                          "--set", "tls_plaintext.processes=tlsclient"),
                    workdir=tmp_path)
    want = [("GET", "/a.txt", 200), ("GET", "/missing", 404), ("POST", "/post", 200),
            ("GET", "/index.html", 200)]
    proc = None
    try:
        wait_tcp(pair.a, pair.b.ip4, 443)
        sensor.start()
        argv = [a for m, p, _ in want for a in (m, f"https://{pair.b.ip4}{p}")]
        proc = pair.a.popen(str(client), *argv, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        err = tmp_path / "sensor-0.err"
        deadline = time.monotonic() + 30
        while f"Go crypto/tls in {client}" not in err.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
            time.sleep(0.2)
        out, errs = proc.communicate("go\n", timeout=60)
        assert out.split() == [str(s) for _, _, s in want], out + errs
        wait_for(lambda: len(_http_rows(collector)) >= len(want), 20, "the Go client's events")
        assert sensor.stop() == 0
        wait_for(lambda: _flows(collector, 443), 20, "the wire flow")
    finally:
        sensor.kill()
        stop(srv)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    rows = _http_rows(collector, ours=True)
    assert [(r["method"], r["path"], r["status"]) for r in rows] == want
    assert {r["source"] for r in rows} == {"tls_plaintext"}
    assert len({r["uid"] for r in rows}) == 1       # one keep-alive connection
    _check_joined(collector, rows, 443)
    assert "Traceback" not in sensor.stderr
