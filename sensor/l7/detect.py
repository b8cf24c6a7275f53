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

Every signature and port hint comes from the protocols' registrations
(sensor/l7/registry.py): this module only runs them, in registry order. The signature
texts above describe what the registered protocols declare today.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

from sensor.l7 import registry
from sensor.l7.base import Direction, L7Parser

PROTO_TCP = 6
PROTO_UDP = 17
UNKNOWN = ""


def sniff(data: bytes, *, protocol: int, to_server: bool, server_port: int = 0) -> str:
    """The protocol the first bytes of one direction show, or UNKNOWN."""
    if not data:
        return UNKNOWN
    direction = Direction.TO_SERVER if to_server else Direction.TO_CLIENT
    if protocol == PROTO_UDP:
        for p in registry.detection():
            if p.datagram_signature is not None and p.datagram_signature(data, direction):
                return p.name
        return UNKNOWN
    if protocol != PROTO_TCP:
        return UNKNOWN
    for p in registry.detection():
        if p.signature is None or p.signature_ports and server_port not in p.signature_ports:
            continue
        if p.signature(data, direction):
            return p.name
    return UNKNOWN


def port_hints(protocol: int) -> Mapping[int, str]:
    """Server port -> protocol name, from the registrations (first in detection order wins)."""
    hints: dict[int, str] = {}
    for p in registry.detection():
        ports = p.tcp_ports if protocol == PROTO_TCP else \
            p.udp_ports if protocol == PROTO_UDP else ()
        for port in ports:
            hints.setdefault(port, p.name)
    return hints


def detect(*, protocol: int, server_port: int, client_port: int = 0,
           to_server: bytes = b"", to_client: bytes = b"") -> str:
    """The protocol of a flow: content first (either direction), then port hints."""
    found = sniff(to_server, protocol=protocol, to_server=True, server_port=server_port)
    if found:
        return found
    found = sniff(to_client, protocol=protocol, to_server=False, server_port=server_port)
    if found:
        return found
    hints = _HINTS.get(protocol)
    if hints is None:
        hints = _HINTS[protocol] = port_hints(protocol)
    return hints.get(server_port) or hints.get(client_port) or UNKNOWN


# Port hints per IP protocol, built on first use (the registry is fixed once discovered).
_HINTS: dict[int, Mapping[int, str]] = {}


# -- parsers ------------------------------------------------------------------------------

def default_parsers() -> dict[str, tuple[str, str]]:
    """Every registered parser class as (module, class), by protocol name."""
    return {p.name: (p.parser.__module__, p.parser.__qualname__)
            for p in registry.protocols() if p.parser is not None}


class ParserRegistry:
    """Protocol name -> parser factory, with lazy imports. One per engine.

    By default the registered protocols' parsers; a mapping of (module, class) by name
    replaces them (benchmarks run one parser at a time, tests a missing module)."""

    def __init__(self, parsers: Mapping[str, tuple[str, str]] | None = None) -> None:
        self._specs = default_parsers() if parsers is None else dict(parsers)
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
        """A new parser for one flow, or None when there is none for `name`.

        `options` are the sensor's parser settings; each parser gets those its protocol
        registered (Protocol.options), so one call site serves every protocol."""
        factory = self.factory(name)
        if factory is None:
            return None
        spec = registry.get(name)
        if options and spec is not None:
            options = {k: v for k, v in options.items() if k in spec.options}
        return factory(**options)
