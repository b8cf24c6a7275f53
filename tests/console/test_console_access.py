"""The console's access rules are the gRPC API's: under mTLS it is HTTPS and every request
needs a client certificate from the collector's CA whose role may read (analyst, admin);
without TLS it serves plaintext on loopback only (or with --insecure). Its filter box
takes `loupe tail`'s flags and refuses what tail refuses, in one line."""

from __future__ import annotations

import http.client
import ssl

import duckdb
import pytest

from collector import certs
from collector.server import CollectorConfig
from collector.ui.app import compile_filter
from sensor.errors import CollectorError, ConfigError
from sensor.export import wire

from tests.collector.conftest import dns, http as http_event


def _get(port: int, pki, client: str | None, path: str = "/endpoints") -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.check_hostname = False          # the CA is what is checked here
    if client is not None:
        ctx.load_cert_chain(*pki.clients[client])
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_under_mtls_the_console_needs_a_role_that_reads(start_collector, tmp_path):
    pki = certs.init(tmp_path / "pki", collector_name="localhost", sensors=["s1"],
                     analysts=["ana"], admins=["root1"])
    cert, key = pki.collector
    running = start_collector(tls_cert=cert, tls_key=key, tls_ca=pki.ca_cert,
                              ui_listen="127.0.0.1:0")
    ui = running.collector.ui
    assert ui.url.startswith("https://127.0.0.1:")
    status, body = _get(ui.port, pki, None)
    assert status == 403 and "no client certificate" in body and "--analyst" in body
    status, body = _get(ui.port, pki, "s1", "/static/loupe.css")
    assert status == 403 and "has role sensor, which may not read records" in body
    for reader in ("ana", "root1"):
        status, body = _get(ui.port, pki, reader)
        assert status == 200 and "<h1>Endpoints</h1>" in body, reader
    # Plain HTTP to the console's port gets no page.
    conn = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=10)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        conn.request("GET", "/endpoints")
        conn.getresponse().read()
    conn.close()


def test_plaintext_console_only_on_loopback_and_a_taken_port_is_one_line(start_collector, tmp_path):
    with pytest.raises(ConfigError, match="refusing to serve the console in plaintext on 0.0.0.0:8081"):
        CollectorConfig(listen="127.0.0.1:0", ui_listen="0.0.0.0:8081").check()
    CollectorConfig(listen="127.0.0.1:0", ui_listen="0.0.0.0:8081", insecure=True).check()
    first = start_collector(ui_listen="127.0.0.1:0")
    taken = f"127.0.0.1:{first.collector.ui.port}"
    with pytest.raises(CollectorError, match=f"cannot serve the console on {taken}: .*--ui"):
        start_collector(ui_listen=taken, data_dir=tmp_path / "second")
    # The failed start closed its store: the file is not locked.
    duckdb.connect(str(tmp_path / "second" / "loupe.duckdb")).close()


def test_the_filter_box_takes_tails_flags():
    match = compile_filter("--type dns --not-dns-rcode NXDOMAIN")
    assert match(wire.to_proto(dns(1, rcode=0)))
    assert not match(wire.to_proto(dns(2, rcode=3)))
    assert not match(wire.to_proto(http_event(3)))
    assert compile_filter("")(wire.to_proto(http_event(4)))
    with pytest.raises(ConfigError, match="is not an HTTP status filter"):
        compile_filter("--http-status abc")
    with pytest.raises(ConfigError, match="^filter: unrecognized arguments: --bogus"):
        compile_filter("--bogus 1")
    with pytest.raises(ConfigError, match="^filter: No closing quotation"):
        compile_filter("--http-path '/a")
