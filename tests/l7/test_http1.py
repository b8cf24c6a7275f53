"""HTTP/1 parser: crafted cases for every feature, real curl <-> http.server bytes recorded
through a relay on loopback, redaction, bounds and fuzzing. Every conversation is fed
whole, one byte at a time and with trailing junk (tests/l7/http_cases.py)."""

from __future__ import annotations

import http.server
import random
import selectors
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensor.l7.base import NEED_DATA, ParserState, Transaction
from sensor.l7.http1 import Http1Parser
from sensor.model import HttpEvent
from tests.l7.http_cases import C, S, data, details, drive, eof, gap, run_all_ways, skip

GET = b"GET /index.html HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
OK_HTML = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
           b"Content-Length: 11\r\n\r\nhello world")


def test_simple_exchange_fields_and_latency():
    out = run_all_ways([data(C, GET, 1_000), data(S, OK_HTML, 4_500)])
    assert out.state is ParserState.OK
    assert out.events == (Transaction(1_000, HttpEvent(
        method="GET", host="example.com", path="/index.html", version="HTTP/1.1",
        status=200, reason="OK", user_agent="curl/7.88.1", response_content_type="text/html",
        response_body_len=11, latency_ns=3_500)),)


def test_keep_alive_and_pipelining_pair_in_order():
    reqs = (b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"HEAD /2 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /3 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Content-Length: 7\r\n\r\n{\"a\":1}")
    resps = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab"
             b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"       # HEAD: no body
             b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    out = run_all_ways([data(C, reqs, 10), data(S, resps, 20)])
    got = [(d.method, d.path, d.status, d.request_body_len, d.response_body_len,
            d.request_content_type) for d in details(out)]
    assert got == [("GET", "/1", 200, 0, 2, ""), ("HEAD", "/2", 200, 0, 0, ""),
                   ("POST", "/3", 201, 7, 0, "application/json")]


def test_chunked_bodies_with_extensions_and_trailers():
    req = (b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    resp = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"a\r\n0123456789\r\n0\r\nX-Checksum: abc\r\nX-Other: d\r\n\r\n")
    out = run_all_ways([data(C, req, 1), data(S, resp, 2)])
    (d,) = details(out)
    assert (d.request_body_len, d.response_body_len, d.status) == (11, 10, 200)


def test_body_until_close_and_http10():
    req = b"GET /old HTTP/1.0\r\n\r\n"
    resp = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of this until close"
    out = run_all_ways([data(C, req, 1), data(S, resp, 2), eof(S, 3), eof(C, 3)],
                       )
    (d,) = details(out)
    assert d.version == "HTTP/1.0" and d.response_body_len == 23 and d.host == ""
    assert out.state is ParserState.DONE


def test_unknown_transfer_coding_in_response_reads_until_close():
    out = drive([data(C, GET, 1), data(S, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxyz", 2),
                 eof(S, 3)])
    assert details(out)[0].response_body_len == 3


def test_interim_100_continue_then_final():
    req = (b"PUT /f HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
    steps = [data(C, req, 10), data(S, b"HTTP/1.1 100 Continue\r\n\r\n", 12),
             data(C, b"DATA", 13), data(S, b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n", 14),
             data(S, b"HTTP/1.1 204 No Content\r\n\r\n", 20)]
    out = run_all_ways(steps)
    (d,) = details(out)
    assert (d.status, d.request_body_len, d.latency_ns) == (204, 4, 10)


def test_304_has_no_body_even_with_content_length():
    out = run_all_ways([data(C, GET, 1),
                        data(S, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", 2),
                        data(C, GET, 3), data(S, OK_HTML, 4)])
    assert [d.status for d in details(out)] == [304, 200]


def test_connect_2xx_makes_the_stream_opaque():
    tls_hello = b"\x16\x03\x01\x00\x05hello"
    steps = [data(C, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 1),
             data(C, tls_hello, 2),          # optimistic client: held, never parsed
             data(S, b"HTTP/1.1 200 Connection established\r\n\r\n", 3),
             data(S, b"\x16\x03\x03\x00\x10server hello....", 4)]
    out = run_all_ways(steps)
    assert out.state is ParserState.DONE
    (d,) = details(out)
    assert (d.method, d.path, d.status, d.host) == ("CONNECT", "example.com:443", 200,
                                                     "example.com:443")


def test_connect_refused_resumes_http():
    steps = [data(C, b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n" + GET, 1),
             data(S, b"HTTP/1.1 407 Proxy Auth Required\r\nContent-Length: 0\r\n\r\n", 2),
             data(S, OK_HTML, 3)]
    out = run_all_ways(steps)
    assert [(d.method, d.status) for d in details(out)] == [("CONNECT", 407), ("GET", 200)]


def test_upgrade_websocket_101_is_done():
    req = (b"GET /chat HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    resp = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            b"\x81\x05hello")
    out = run_all_ways([data(C, req, 1), data(S, resp, 2), data(C, b"\x81\x85abcdefghi", 3)])
    assert out.state is ParserState.DONE
    assert [d.status for d in details(out)] == [101]


def test_upgrade_h2c_declined_stays_http():
    req = (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
           b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n")
    out = run_all_ways([data(C, req + GET, 1), data(S, OK_HTML + OK_HTML, 2)])
    assert [d.status for d in details(out)] == [200, 200]


def test_response_without_request_mid_stream_pickup():
    out = run_all_ways([data(S, OK_HTML, 7), data(C, GET, 8), data(S, OK_HTML, 9)])
    first, second = details(out)
    assert (first.method, first.status, first.latency_ns, first.version) == ("", 200, 0, "HTTP/1.1")
    assert (second.method, second.status, second.latency_ns) == ("GET", 200, 1)
    assert out.events[0].ts_ns == 7


def test_unanswered_request_at_eof_has_status_0():
    out = run_all_ways([data(C, GET, 1), data(C, b"GET /b HTTP/1.1\r\nHost: e\r\n\r\n", 2),
                        data(S, OK_HTML, 3), eof(C, 4), eof(S, 4)])
    assert [(d.path, d.status) for d in details(out)] == [("/index.html", 200), ("/b", 0)]
    assert out.state is ParserState.DONE


def test_response_cut_short_by_eof_reports_what_was_seen():
    out = drive([data(C, GET, 1), data(S, OK_HTML[:-4], 2), eof(S, 3)])
    assert details(out)[0].response_body_len == 7


def test_gap_and_skip_inside_a_body_are_counted_as_body():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    p = Http1Parser()
    out = drive([data(C, GET, 1), data(S, head + b"x" * 100, 2)], parser=p)
    assert p.skip_hint(S) == 900 and p.skip_hint(C) == 0
    out = drive([skip(S, 500, 3), gap(S, 300, 4), data(S, b"y" * 100, 5), data(C, GET, 6),
                 data(S, OK_HTML, 7)], parser=p)
    assert [d.response_body_len for d in details(out)] == [1000, 11]
    assert out.state is ParserState.OK


def test_skip_hint_in_chunked_body():
    p = Http1Parser()
    drive([data(C, GET, 1),
           data(S, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\nab", 2)], parser=p)
    assert p.skip_hint(S) == 0x400 - 2
    out = drive([skip(S, 0x400 - 2, 3), data(S, b"\r\n0\r\n\r\n", 4)], parser=p)
    assert details(out)[0].response_body_len == 0x400


def test_gap_in_headers_is_an_error():
    out = drive([data(C, b"GET / HTTP/1.1\r\nHo", 1), gap(C, 10, 2)])
    assert (out.state, out.error) == (ParserState.ERROR, "gap in headers")
    out = drive([data(C, GET, 1), data(S, OK_HTML, 2), gap(S, 5, 3)])
    assert out.state is ParserState.ERROR and len(out.events) == 1


def test_gap_past_the_body_end_lands_in_headers():
    out = drive([data(C, GET, 1), data(S, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 2),
                 gap(S, 50, 3)])
    assert out.state is ParserState.ERROR and out.error == "gap in headers"
    assert details(out)[0].response_body_len == 5


@pytest.mark.parametrize("raw, reason", [
    (b"GET / HTTP/2.0\r\n\r\n", "bad request line"),
    (b"GET  / HTTP/1.1\r\n\r\n", "bad request line"),
    (b"G@T / HTTP/1.1\r\n\r\n", "bad request line"),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", "bad header line"),
    (b"GET / HTTP/1.1\r\nnocolon\r\n\r\n", "bad header line"),
    (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
     "conflicting Content-Length values"),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
     "request Transfer-Encoding does not end in chunked"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXX", "no CRLF after chunk data"),
    (b"\x16\x03\x01\x02\x00\x01", "not an HTTP request"),
])
def test_malformed_requests_go_to_error_with_reason(raw, reason):
    for bytewise in (False, True):
        out = drive([data(C, raw, 1)], bytewise=bytewise)
        assert (out.state, out.error) == (ParserState.ERROR, reason)


def test_bad_status_line_and_non_http_response():
    assert drive([data(C, GET, 1), data(S, b"HTTP/1.1 2x0 OK\r\n\r\n", 2)]).error == "bad status code"
    out = drive([data(C, GET, 1), data(S, b"SSH-2.0-OpenSSH_9.2\r\n", 2)])
    assert out.error == "not an HTTP response"
    # The request that was waiting is still reported.
    assert [(d.method, d.status) for d in details(out)] == [("GET", 0)]


def test_header_block_limit():
    big = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    out = drive([data(C, big, 1)])
    assert out.state is ParserState.ERROR and "exceeds 65536" in out.error
    out = drive([data(C, big[:70_000], 1)])  # no end in sight: refused before it ends
    assert out.state is ParserState.ERROR
    small = Http1Parser(max_header_bytes=1024)
    out = drive([data(C, b"GET / HTTP/1.1\r\nX: " + b"b" * 1100 + b"\r\n\r\n", 1)], parser=small)
    assert out.state is ParserState.ERROR


def test_outstanding_requests_limit():
    many = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n" * 5
    out = drive([data(C, many, 1)], parser=Http1Parser(max_outstanding=4))
    assert out.state is ParserState.ERROR and "more than 4 requests" in out.error
    assert [d.status for d in details(out)] == [0, 0, 0, 0]


def test_bare_lf_line_endings_and_leading_empty_lines():
    out = run_all_ways([data(C, b"\r\nGET /lf HTTP/1.1\nHost: h\n\n", 1),
                        data(S, b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", 2)])
    assert [(d.path, d.host, d.response_body_len) for d in details(out)] == [("/lf", "h", 2)]


def test_obs_fold_continues_the_previous_value():
    out = run_all_ways([data(C, b"GET / HTTP/1.1\r\nUser-Agent: a\r\n  b\r\nHost: h\r\n\r\n", 1),
                        data(S, OK_HTML, 2)])
    assert details(out)[0].user_agent == "a b"


def test_obs_fold_after_an_unused_header_is_accepted():
    out = run_all_ways([data(C, b"GET / HTTP/1.1\r\nX-Long: a\r\n\tb\r\nHost: h\r\n\r\n", 1),
                        data(S, OK_HTML, 2)])
    assert details(out)[0].host == "h"
    out = drive([data(C, b"GET / HTTP/1.1\r\n folded\r\n\r\n", 1)])
    assert out.error == "continuation line before any header"


def test_datagram_is_an_error():
    p = Http1Parser()
    p.receive_datagram(C, GET, 1)
    assert p.state is ParserState.ERROR


def test_summary_reports_first_host():
    p = Http1Parser()
    assert p.summary() == {}
    drive([data(C, GET, 1)], parser=p)
    assert p.summary() == {"http_host": "example.com"}


# -- redaction ------------------------------------------------------------------------

SECRETS = ("s3cr3tpw", "tok-123456", "abcSESSION", "QWxhZGRpbjpvcGVuIHNlc2FtZQ",
           "cookieval42", "setcookieval43", "proxyauth44", "keykey45", "jsid46")


def _secret_conversation():
    req = (b"GET http://alice:s3cr3tpw@example.com/p;jsessionid=jsid46/x?q=cats&token=tok-123456"
           b"&Session=abcSESSION&api_key=keykey45 HTTP/1.1\r\n"
           b"Host: alice:s3cr3tpw@example.com\r\n"
           b"Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ\r\n"
           b"Proxy-Authorization: Bearer proxyauth44\r\n"
           b"Cookie: id=cookieval42\r\n\r\n")
    resp = (b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=setcookieval43; HttpOnly\r\n"
            b"Content-Length: 0\r\n\r\n")
    return [data(C, req, 1), data(S, resp, 2)]


def test_secrets_never_appear_in_any_field():
    out = run_all_ways(_secret_conversation())
    (d,) = details(out)
    text = repr(out.events)
    for secret in SECRETS:
        assert secret not in text
    assert d.path == ("http://alice:REDACTED@example.com/p;jsessionid=REDACTED/x?q=cats"
                      "&token=REDACTED&Session=REDACTED&api_key=REDACTED")
    assert d.host == "example.com"


def test_redaction_can_be_turned_off_but_headers_never_appear():
    out = drive(_secret_conversation(), parser=Http1Parser(redact=False))
    text = repr(out.events)
    assert "s3cr3tpw" in text and "tok-123456" in text
    for secret in ("QWxhZGRpbjpvcGVuIHNlc2FtZQ", "cookieval42", "setcookieval43", "proxyauth44"):
        assert secret not in text


@pytest.mark.parametrize("target, expected", [
    ("/a?password=x&b=2", "/a?password=REDACTED&b=2"),
    ("/a?PASSWD=x", "/a?PASSWD=REDACTED"),
    ("/a?pwd=x#frag", "/a?pwd=REDACTED#frag"),
    ("/a?client_secret=x&access_token=y&auth=z&sid=w&apikey=v",
     "/a?client_secret=REDACTED&access_token=REDACTED&auth=REDACTED&sid=REDACTED&apikey=REDACTED"),
    ("/a?pass%77ord=x", "/a?pass%77ord=REDACTED"),
    ("/a?page=2&sort=name", "/a?page=2&sort=name"),
    ("/plain/path", "/plain/path"),
    ("ftp://u@h/x", "ftp://u@h/x"),
])
def test_query_and_userinfo_redaction(target, expected):
    out = drive([data(C, b"GET " + target.encode() + b" HTTP/1.1\r\nHost: h\r\n\r\n", 1),
                 eof(S, 2)])
    assert details(out)[0].path == expected


# -- real traffic: curl against http.server, bytes recorded by a relay on loopback ----

class _Relay:
    """Accepts connections on loopback, forwards them to `upstream`, and records every
    chunk each way with its arrival time. Bounded: stops after `max_conns` connections."""

    def __init__(self, upstream: tuple[str, int], max_conns: int = 8) -> None:
        self.upstream = upstream
        self.max_conns = max_conns
        self.conns: list[list[tuple[int, bytes, int]]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for _ in range(self.max_conns):
            try:
                client, _ = self.sock.accept()
            except (TimeoutError, OSError):
                return
            record: list[tuple[int, bytes, int]] = []
            self.conns.append(record)
            server = socket.create_connection(self.upstream, timeout=10)
            self._pump(client, server, record)

    def _pump(self, client: socket.socket, server: socket.socket, record) -> None:
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, (0, server))
        sel.register(server, selectors.EVENT_READ, (1, client))
        open_ = 2
        deadline = time.monotonic() + 20
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                direction, peer = key.data
                chunk = key.fileobj.recv(65536)
                if chunk:
                    record.append((direction, chunk, time.time_ns()))
                    peer.sendall(chunk)
                else:
                    record.append((direction, b"", time.time_ns()))
                    sel.unregister(key.fileobj)
                    peer.shutdown(socket.SHUT_WR)
                    open_ -= 1
        client.close()
        server.close()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=5)


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, Content-Length framing

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(n)
        reply = b"got %d bytes" % len(body)
        self.send_response(201)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


@pytest.fixture
def real_server(tmp_path: Path):
    (tmp_path / "index.txt").write_bytes(b"loupe index\n" * 10)
    (tmp_path / "big.bin").write_bytes(bytes(range(256)) * 400)

    def handler(*args, **kw):
        return _Handler(*args, directory=str(tmp_path), **kw)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[:2]
    httpd.shutdown()
    httpd.server_close()


def _steps(record):
    steps = []
    for direction, chunk, ts in record:
        d = C if direction == 0 else S
        steps.append(data(d, chunk, ts) if chunk else eof(d, ts))
    return steps


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_real_curl_keep_alive_against_http_server(real_server):
    relay = _Relay(real_server)
    try:
        base = f"http://127.0.0.1:{relay.port}"
        subprocess.run(
            ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-o", "/dev/null",
             "-o", "/dev/null", "-o", "/dev/null",
             f"{base}/index.txt", f"{base}/big.bin", f"{base}/missing?token=hunter2",
             f"{base}/index.txt"],
            check=True, timeout=20)
        subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-I",
                        f"{base}/big.bin"], check=True, timeout=20)
        subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null",
                        "-H", "Content-Type: application/json", "--data-binary", '{"k": 1}',
                        "-u", "bob:pw-bob-99", f"{base}/api"], check=True, timeout=20)
    finally:
        relay.close()
    # http.server closes the connection after its 404 page, so curl opens a new one for
    # the fourth URL: 4 connections, the first carrying 3 keep-alive exchanges.
    assert len(relay.conns) == 4
    per_conn = []
    for record in relay.conns:
        out = run_all_ways(_steps(record))
        assert out.state is ParserState.DONE  # both ends closed
        per_conn.append(details(out))
    assert [len(x) for x in per_conn] == [3, 1, 1, 1]
    got = [d for conn in per_conn for d in conn]
    host = f"127.0.0.1:{relay.port}"
    assert [(d.method, d.path, d.status) for d in got] == [
        ("GET", "/index.txt", 200), ("GET", "/big.bin", 200),
        ("GET", "/missing?token=REDACTED", 404), ("GET", "/index.txt", 200),
        ("HEAD", "/big.bin", 200), ("POST", "/api", 201)]
    assert [d.response_body_len for d in got[:2]] == [120, 102400]
    assert got[2].response_body_len > 0 and got[2].response_content_type == "text/html"
    assert got[4].response_body_len == 0
    assert all(d.host == host and d.user_agent.startswith("curl/") for d in got)
    assert got[0].response_content_type == "text/plain"
    assert all(d.latency_ns > 0 and d.version == "HTTP/1.1" for d in got)
    post = got[5]
    assert (post.request_body_len, post.request_content_type, post.response_body_len) == (
        8, "application/json", len(b"got 8 bytes"))
    assert "pw-bob-99" not in repr(got) and "hunter2" not in repr(got)


# -- fuzzing ---------------------------------------------------------------------------

_pieces = st.sampled_from([
    b"GET / HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 100 Continue\r\n",
    b"HTTP/1.1 101 Switching\r\n", b"Content-Length: 3\r\n", b"Content-Length: 99999\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Host: h\r\n", b"Upgrade: x\r\nConnection: upgrade\r\n",
    b"\r\n", b"3\r\nabc\r\n", b"0\r\n\r\n", b"CONNECT a:1 HTTP/1.1\r\n", b"HEAD / HTTP/1.0\r\n",
    b"abc", b"\n", b" folded\r\n",
])
_chunk = st.one_of(st.binary(max_size=40), st.lists(_pieces, max_size=8).map(b"".join))
_op = st.tuples(st.sampled_from(["c", "s", "gap_c", "gap_s", "skip_s", "eof_c", "eof_s"]),
                _chunk, st.integers(0, 200000))


@settings(max_examples=400, deadline=None)
@given(st.lists(_op, max_size=30))
def test_fuzz_no_exception_and_bounded(ops):
    p = Http1Parser(max_header_bytes=256, max_outstanding=4)
    for kind, chunk, n in ops:
        if kind == "c":
            p.receive_data(C, chunk, 1)
        elif kind == "s":
            p.receive_data(S, chunk, 2)
        elif kind == "gap_c":
            p.receive_gap(C, n, 3)
        elif kind == "gap_s":
            p.receive_gap(S, n, 3)
        elif kind == "skip_s":
            p.receive_skip(S, p.skip_hint(S) or n, 3)
        elif kind == "eof_c":
            p.receive_eof(C, 4)
        else:
            p.receive_eof(S, 4)
        assert len(p._buf[0]) <= 256 + 40 and len(p._buf[1]) <= 256 + 40
        assert len(p._txns) <= 4 + 1
        while (ev := p.next_event()) is not NEED_DATA:
            assert isinstance(ev.detail, HttpEvent)
        assert p.state is ParserState.OK or p.state in (ParserState.ERROR, ParserState.DONE)
        assert (p.state is ParserState.ERROR) == bool(p.error)


@settings(max_examples=200, deadline=None)
@given(st.lists(_pieces, max_size=20).map(b"".join), st.lists(_pieces, max_size=20).map(b"".join),
       st.integers(1, 7))
def test_fuzz_split_points_do_not_change_results(req, resp, step):
    steps = [data(C, req, 1), data(S, resp, 2), eof(C, 3), eof(S, 3)]
    whole = drive(steps)
    pieces = []
    for d, blob, ts in ((C, req, 1), (S, resp, 2)):
        pieces += [data(d, blob[i:i + step], ts) for i in range(0, len(blob), step)]
    split = drive(pieces + [eof(C, 3), eof(S, 3)])
    assert split == whole


# -- through the reassembler ----------------------------------------------------------------

def _through_reassembler(steps, rnd) -> tuple:
    """Cut each data step into TCP segments, reorder and duplicate them within the step,
    run them through the reassembler, and feed its events to the parser, honouring
    skip_hint the way the engine does."""
    from sensor.engine.reassembly import Data, Eof, FlowReassembler, Gap, Skip
    from sensor.flow.semantics import TCP_ACK, TCP_FIN

    flow = FlowReassembler()
    parser = Http1Parser()
    seq = [(1 << 32) - 50, 7_000]  # the client's stream wraps around 2^32
    events = []

    def deliver(pairs):
        for d, ev in pairs:
            direction = C if d == 0 else S
            if type(ev) is Data:
                parser.receive_data(direction, ev.data, ev.ts_ns)
            elif type(ev) is Skip:
                parser.receive_skip(direction, ev.length, ev.ts_ns)
            elif type(ev) is Gap:
                parser.receive_gap(direction, ev.length, ev.ts_ns)
            elif type(ev) is Eof:
                parser.receive_eof(direction, ev.ts_ns)
            while (tx := parser.next_event()) is not NEED_DATA:
                events.append(tx)
        # Only after the whole batch: the parser has then consumed exactly what the
        # stream has accounted, so its hint is relative to the stream's position.
        for d in (0, 1):
            hint = parser.skip_hint(C if d == 0 else S)
            if hint and not flow.streams[d].eof:
                flow.streams[d].skip(hint)

    for step in steps:
        d = int(step.direction)
        if step.kind == "eof":
            deliver(flow.segment(d, seq[d], seq[1 - d], TCP_FIN | TCP_ACK, b"", step.ts))
            continue
        segs, pos = [], 0
        while pos < len(step.data):
            size = rnd.randint(1, 200)
            segs.append((seq[d] + pos, step.data[pos:pos + size]))
            pos += size
        first, rest = segs[0], segs[1:]
        rest += rnd.sample(rest, min(len(rest), 3))  # retransmissions
        rnd.shuffle(rest)
        for s, payload in [first] + rest:
            deliver(flow.segment(d, s % (1 << 32), 0, 0, payload, step.ts))
        seq[d] = (seq[d] + len(step.data)) % (1 << 32)
    return tuple(events), parser.state, flow


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 1 << 32))
def test_reassembled_segments_give_the_same_transactions(seed):
    rnd = random.Random(seed)
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + bytes(5000)
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"400\r\n" + b"c" * 1024 + b"\r\n0\r\n\r\n")
    steps = [data(C, GET + GET + GET, 10), data(S, big, 20), data(S, chunked, 30),
             data(S, OK_HTML, 40), eof(C, 50), eof(S, 50)]
    expected = drive(steps)
    events, state, flow = _through_reassembler(steps, rnd)
    assert events == expected.events and state is expected.state is ParserState.DONE
    assert [d.response_body_len for d in details(expected)] == [5000, 1024, 11]
    cov = flow.coverage()
    assert cov.gap_octets == 0
    assert cov.captured_octets + cov.skipped_octets == 3 * len(GET) + len(big) + len(chunked) \
        + len(OK_HTML)
