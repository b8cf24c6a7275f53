"""Which L7 protocol a flow speaks, and the parser for it.

Strategy (as nDPI and Zeek's DPD do): the content decides, ports only hint. The first
payload bytes of either direction are sniffed with cheap, conservative signatures; only
when no signature matches (or there is no payload yet) does a well-known port name the
protocol. A wrong port hint costs little: the parser it selects meets garbage, goes to
ERROR and is counted.

Signatures
- HTTP/1: a known method token followed by a space (RFC 9110 §9, plus WebDAV), or a
  response starting "HTTP/1." (a capture that begins mid-connection).
- HTTP/2 with prior knowledge: the client preface "PRI * HTTP/2.0" (RFC 9113 §3.4).
- TLS: a handshake record header (type 22, version 3.0-3.4, length <= 2^14 + 2048,
  RFC 8446 §5.1) whose first message is a ClientHello or ServerHello.
- DNS over UDP: a header whose counts and flags are sane plus one well-formed question
  (RFC 1035 §4.1), without looking at ports; over TCP, the same behind the two-byte
  length prefix (RFC 1035 §4.2.2), on port 53 only.
- Later protocols are recognised by name (a port hint, plus the cheapest unambiguous
  signatures: PostgreSQL startup/SSLRequest, MySQL server greeting, RESP arrays, MongoDB
  OP_MSG), so flows carry app_proto before their parsers exist.

The registry maps a protocol name to its parser class, imported lazily: a protocol whose
module is not installed has no parser, and detection still works.
"""

from __future__ import annotations

import importlib
import struct
from types import MappingProxyType
from typing import Any, Callable, Mapping

from sensor.l7.base import L7Parser

PROTO_TCP = 6
PROTO_UDP = 17
UNKNOWN = ""

HTTP_METHODS = frozenset((
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"REPORT",
    b"SEARCH", b"MKCALENDAR", b"ACL", b"BIND", b"UNBIND", b"REBIND", b"LINK", b"UNLINK",
))
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Well-known ports (IANA; 8080/8000 are HTTP by overwhelming convention).
TCP_PORT_HINTS: Mapping[int, str] = MappingProxyType({
    80: "http", 8080: "http", 8000: "http", 3128: "http",
    443: "tls", 8443: "tls", 853: "tls", 993: "tls", 995: "tls", 465: "tls",
    53: "dns",
    5432: "postgres", 3306: "mysql", 6379: "redis", 9092: "kafka", 27017: "mongodb",
})
UDP_PORT_HINTS: Mapping[int, str] = MappingProxyType({53: "dns", 5353: "dns"})

# Parser classes by protocol name, as (module, class). Imported on first use only.
DEFAULT_PARSERS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "http": ("sensor.l7.http1", "Http1Parser"),
    "dns": ("sensor.l7.dns", "DnsParser"),
    "tls": ("sensor.l7.tls", "TlsParser"),
})

PROTOCOLS = ("http", "http2", "tls", "dns", "postgres", "mysql", "redis", "kafka", "mongodb")


# -- signatures ---------------------------------------------------------------------------

def _is_http_request(data: bytes) -> bool:
    space = data.find(b" ", 0, 12)
    return space > 0 and data[:space] in HTTP_METHODS


def _is_tls_hello(data: bytes) -> bool:
    if len(data) < 6 or data[0] != 0x16 or data[1] != 3 or data[2] > 4:
        return False
    length = (data[3] << 8) | data[4]
    return 4 <= length <= (1 << 14) + 2048 and data[5] in (1, 2)


def _dns_name_end(msg: bytes, pos: int) -> int:
    """Offset after an uncompressed question name, or -1 (RFC 1035 §3.1 limits)."""
    total = 0
    while pos < len(msg):
        n = msg[pos]
        if n == 0:
            return pos + 1
        if n > 63:
            return -1  # a pointer cannot start the first question; 0x40/0x80 are unused
        total += n + 1
        if total > 255:
            return -1
        pos += n + 1
    return -1


def is_dns_message(msg: bytes) -> bool:
    """A DNS header that is sane plus one well-formed first question."""
    if len(msg) < 17:
        return False
    _, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", msg)
    opcode = (flags >> 11) & 0xF
    if opcode not in (0, 1, 2, 4, 5, 6) or flags & 0x0040:  # Z bit must be zero
        return False
    if not 1 <= qd <= 4 or ns > 64 or ar > 64 or an > 256:
        return False
    if not flags & 0x8000 and (an > 16 or flags & 0x000F):  # a query carries no rcode
        return False
    end = _dns_name_end(msg, 12)
    if end < 0 or end + 4 > len(msg):
        return False
    qclass = struct.unpack_from("!H", msg, end + 2)[0] & 0x7FFF  # mDNS unicast bit
    return qclass in (1, 3, 4, 254, 255)


def _is_dns_tcp(data: bytes) -> bool:
    if len(data) < 2:
        return False
    length = (data[0] << 8) | data[1]
    return length >= 17 and is_dns_message(data[2:2 + length])


def _is_postgres(data: bytes) -> bool:
    if len(data) < 8:
        return False
    length, code = struct.unpack_from("!II", data)
    # StartupMessage protocol 3.0, or SSLRequest / GSSENCRequest (PostgreSQL §55.7).
    return 8 <= length <= 10000 and code in (0x00030000, 80877103, 80877104)


def _is_mysql_greeting(data: bytes) -> bool:
    # Protocol::HandshakeV10: 3-byte length, sequence 0, protocol version 10, version text.
    return len(data) > 6 and data[3] == 0 and data[4] == 10 and \
        (data[0] | data[1] << 8 | data[2] << 16) == len(data) - 4


def _is_redis(data: bytes) -> bool:
    # A RESP array of bulk strings: "*<n>\r\n$<len>\r\n".
    if len(data) < 8 or data[0] != 0x2A:
        return False
    crlf = data.find(b"\r\n", 1, 12)
    return crlf > 1 and data[1:crlf].isdigit() and data[crlf + 2:crlf + 3] == b"$"


def _is_mongodb(data: bytes) -> bool:
    if len(data) < 16:
        return False
    length, _, response_to, opcode = struct.unpack_from("<iiii", data)
    return 16 <= length <= 48_000_000 and response_to == 0 and opcode in (2013, 2004)


def sniff(data: bytes, *, protocol: int, to_server: bool, server_port: int = 0) -> str:
    """The protocol the first bytes of one direction show, or UNKNOWN."""
    if not data:
        return UNKNOWN
    if protocol == PROTO_UDP:
        return "dns" if is_dns_message(data) else UNKNOWN
    if protocol != PROTO_TCP:
        return UNKNOWN
    if data.startswith(H2_PREFACE[:len(data)]) and len(data) >= 14:
        return "http2"
    if _is_tls_hello(data):
        return "tls"
    if to_server:
        if _is_http_request(data):
            return "http"
        if _is_postgres(data):
            return "postgres"
        if _is_redis(data):
            return "redis"
        if _is_mongodb(data):
            return "mongodb"
    else:
        if data.startswith(b"HTTP/1."):
            return "http"
        if _is_mysql_greeting(data):
            return "mysql"
    if server_port == 53 and _is_dns_tcp(data):
        return "dns"
    return UNKNOWN


def detect(*, protocol: int, server_port: int, client_port: int = 0,
           to_server: bytes = b"", to_client: bytes = b"") -> str:
    """The protocol of a flow: content first (either direction), then port hints."""
    found = sniff(to_server, protocol=protocol, to_server=True, server_port=server_port)
    if found:
        return found
    found = sniff(to_client, protocol=protocol, to_server=False, server_port=server_port)
    if found:
        return found
    hints = TCP_PORT_HINTS if protocol == PROTO_TCP else UDP_PORT_HINTS \
        if protocol == PROTO_UDP else {}
    return hints.get(server_port) or hints.get(client_port) or UNKNOWN


# -- registry -----------------------------------------------------------------------------

class ParserRegistry:
    """Protocol name -> parser factory, with lazy imports. One per engine."""

    def __init__(self, parsers: Mapping[str, tuple[str, str]] = DEFAULT_PARSERS) -> None:
        self._specs = dict(parsers)
        self._factories: dict[str, Callable[..., L7Parser] | None] = {}

    def names(self) -> frozenset[str]:
        """Protocols that have a parser module configured (installed or not)."""
        return frozenset(self._specs)

    def factory(self, name: str) -> Callable[..., L7Parser] | None:
        """The parser class for `name`, or None when no parser exists for it (a hint-only
        protocol, or its module is not installed)."""
        if name in self._factories:
            return self._factories[name]
        spec = self._specs.get(name)
        found: Callable[..., L7Parser] | None = None
        if spec is not None:
            module_name, class_name = spec
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise  # the module exists but is broken: a bug, not an absence
                module = None
            if module is not None:
                found = getattr(module, class_name)
        self._factories[name] = found
        return found

    def create(self, name: str, **options: Any) -> L7Parser | None:
        """A new parser for one flow, or None when there is none for `name`."""
        factory = self.factory(name)
        return factory(**options) if factory is not None else None
