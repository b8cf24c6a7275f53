"""Protocol detection on real first bytes, port hints, and the parser registry."""

from __future__ import annotations

import importlib.util
import ssl
import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensor.l7.base import NEED_DATA, Direction, ParserState
from sensor.l7.detect import (
    PROTO_TCP,
    PROTO_UDP,
    UNKNOWN,
    ParserRegistry,
    detect,
    sniff,
)
from sensor.l7.dns import is_dns_message
from sensor.l7.http1 import Http1Parser


def real_client_hello(server_name: str = "example.com") -> bytes:
    """The exact bytes Python's OpenSSL sends to open a TLS connection."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def dns_query(name: str = "www.example.com", qtype: int = dpkt.dns.DNS_A) -> bytes:
    msg = dpkt.dns.DNS(id=0x1234, op=dpkt.dns.DNS_RD)
    msg.qd = [dpkt.dns.DNS.Q(name=name, type=qtype)]
    return bytes(msg)


def dns_response() -> bytes:
    msg = dpkt.dns.DNS(id=0x1234, op=dpkt.dns.DNS_RD | dpkt.dns.DNS_RA)
    msg.qr = dpkt.dns.DNS_R
    msg.qd = [dpkt.dns.DNS.Q(name="www.example.com", type=dpkt.dns.DNS_A)]
    msg.an = [dpkt.dns.DNS.RR(name="www.example.com", type=dpkt.dns.DNS_A, ttl=60,
                              rdata=bytes([198, 18, 0, 1]))]
    return bytes(msg)


def test_http_request_and_response():
    assert detect(protocol=PROTO_TCP, server_port=5555,
                  to_server=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == "http"
    assert detect(protocol=PROTO_TCP, server_port=5555,
                  to_server=b"PROPFIND /dav HTTP/1.1\r\n") == "http"
    # Mid-stream pickup: only the server's response was seen.
    assert detect(protocol=PROTO_TCP, server_port=5555, to_client=b"HTTP/1.1 200 OK\r\n") == "http"


def test_http2_preface_is_not_http1():
    assert detect(protocol=PROTO_TCP, server_port=80,
                  to_server=b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04") == "http2"


def test_tls_client_hello_from_openssl_on_any_port():
    hello = real_client_hello()
    assert detect(protocol=PROTO_TCP, server_port=80, to_server=hello) == "tls"
    assert sniff(hello[:5], protocol=PROTO_TCP, to_server=True) == UNKNOWN  # too short yet


def test_tls_server_hello_from_openssl():
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = real_client_hello()
    bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    # No certificate is loaded, so the server fails, but not before its first record:
    # a handshake failure alert. That must not look like a ServerHello.
    server = server_ctx.wrap_bio(bio_in, bio_out, server_side=True)
    bio_in.write(client)
    with pytest.raises(ssl.SSLError):
        server.do_handshake()
    alert = bio_out.read()
    assert alert[:1] == b"\x15"
    assert sniff(alert, protocol=PROTO_TCP, to_server=False) == UNKNOWN


def test_dns_over_udp_without_ports():
    assert detect(protocol=PROTO_UDP, server_port=40000, to_server=dns_query()) == "dns"
    assert detect(protocol=PROTO_UDP, server_port=40000, to_client=dns_response()) == "dns"
    assert is_dns_message(dns_query("a.b", dpkt.dns.DNS_AAAA))


def test_dns_over_tcp_length_prefixed_on_53():
    q = dns_query()
    framed = struct.pack("!H", len(q)) + q
    assert detect(protocol=PROTO_TCP, server_port=53, to_server=framed) == "dns"
    # The same bytes on another TCP port are not claimed as DNS by content.
    assert sniff(framed, protocol=PROTO_TCP, to_server=True, server_port=5300) == UNKNOWN


@pytest.mark.parametrize("payload", [
    b"\x00" * 40,
    b"\xff" * 40,
    bytes(range(64)),
    b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
])
def test_not_dns(payload):
    assert not is_dns_message(payload)
    assert detect(protocol=PROTO_UDP, server_port=40000, to_server=payload) == UNKNOWN


def test_later_protocols_by_signature():
    # The signatures are the protocol modules' own (looks_like); see their tests too.
    startup = struct.pack("!II", 41, 0x00030000) + b"user\x00bob\x00database\x00db\x00\x00"
    assert detect(protocol=PROTO_TCP, server_port=15432, to_server=startup) == "pgsql"
    ssl_request = struct.pack("!II", 8, 80877103)
    assert detect(protocol=PROTO_TCP, server_port=1, to_server=ssl_request) == "pgsql"
    # HandshakeV10 (a real greeting is 40 bytes or more): version, thread id, salt, ...
    greeting_body = (b"\x0a8.0.36\x00" + b"\x01\x00\x00\x00" + b"abcdefgh\x00"
                     + b"\xff\xf7\x21\x02\x00\xff\xdf\x15" + b"\x00" * 10 + b"ijklmnopqrst\x00")
    greeting = len(greeting_body).to_bytes(3, "little") + b"\x00" + greeting_body
    assert detect(protocol=PROTO_TCP, server_port=13306, to_client=greeting) == "mysql"
    assert detect(protocol=PROTO_TCP, server_port=16379,
                  to_server=b"*1\r\n$4\r\nPING\r\n") == "redis"
    # OP_MSG: header, flags, a kind 0 section holding {ping: 1} (its length must fit).
    op_msg = struct.pack("<iiiiIBi", 36, 7, 0, 2013, 0, 0, 15) + b"\x10ping\x00\x01\0\0\0\0"
    assert detect(protocol=PROTO_TCP, server_port=1, to_server=op_msg) == "mongodb"


@pytest.mark.parametrize("port, name", [
    (80, "http"), (443, "tls"), (5432, "pgsql"), (3306, "mysql"), (6379, "redis"),
    (9092, "kafka"), (27017, "mongodb"), (53, "dns"),
])
def test_port_hints_when_content_is_absent_or_unknown(port, name):
    assert detect(protocol=PROTO_TCP, server_port=port) == name
    assert detect(protocol=PROTO_TCP, server_port=port, to_server=b"\x01\x02\x03") == name
    # The client's port is a hint too (the initiator may be unknown mid-stream).
    assert detect(protocol=PROTO_TCP, server_port=50000, client_port=port) == name


def test_content_beats_port():
    assert detect(protocol=PROTO_TCP, server_port=443,
                  to_server=b"GET / HTTP/1.1\r\n\r\n") == "http"
    assert detect(protocol=PROTO_UDP, server_port=53, to_server=b"\x00" * 40) == "dns"
    assert detect(protocol=PROTO_UDP, server_port=9999, to_server=b"\x00" * 40) == UNKNOWN
    assert detect(protocol=1, server_port=0, to_server=b"GET / HTTP/1.1\r\n") == UNKNOWN


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=80), st.sampled_from([PROTO_TCP, PROTO_UDP, 1]),
       st.integers(0, 65535))
def test_fuzz_detect_never_raises(a, b, proto, port):
    name = detect(protocol=proto, server_port=port, to_server=a, to_client=b)
    assert name == UNKNOWN or isinstance(name, str)


# -- registry ---------------------------------------------------------------------------------

def test_registry_creates_a_working_http_parser():
    registry = ParserRegistry()
    name = detect(protocol=PROTO_TCP, server_port=8080, to_server=b"GET /x HTTP/1.1\r\n")
    parser = registry.create(name)
    assert isinstance(parser, Http1Parser) and parser.name == "http"
    parser.receive_data(Direction.TO_SERVER, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n", 1)
    parser.receive_data(Direction.TO_CLIENT, b"HTTP/1.1 204 No Content\r\n\r\n", 2)
    ev = parser.next_event()
    assert ev is not NEED_DATA and ev.detail.status == 204
    assert registry.create("http", redact=False).redact is False
    assert registry.create("http") is not parser


def test_registry_has_no_parser_for_hint_only_protocols():
    registry = ParserRegistry()
    for name in (UNKNOWN, "nonsense"):
        assert registry.create(name) is None
    assert registry.names() >= {"http", "dns", "tls"}


def test_registry_missing_module_means_no_parser_but_broken_module_raises(tmp_path, monkeypatch):
    registry = ParserRegistry({"x": ("sensor.l7.no_such_protocol", "Parser"),
                               "http": ("sensor.l7.http1", "Http1Parser")})
    assert registry.create("x") is None
    assert registry.factory("http") is Http1Parser
    (tmp_path / "loupe_broken_parser_mod.py").write_text("import loupe_dependency_absent\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    broken = ParserRegistry({"b": ("loupe_broken_parser_mod", "P")})
    with pytest.raises(ModuleNotFoundError):
        broken.create("b")


@pytest.mark.parametrize("name, module", [("dns", "sensor.l7.dns"), ("tls", "sensor.l7.tls")])
def test_registry_loads_dns_and_tls_when_present(name, module):
    parser = ParserRegistry().create(name)
    if importlib.util.find_spec(module) is None:
        assert parser is None
    else:
        assert parser is not None and parser.name == name and parser.state is ParserState.OK
