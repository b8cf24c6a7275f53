"""IPFIX export of Flow records (RFC 7011), biflows per RFC 5103.

Strategy: one Flow is one IPFIX Data Record. The initiator's direction uses the standard
Information Elements (octetDeltaCount, packetDeltaCount, ...); the responder's direction
uses the same IEs with the RFC 5103 reverse PEN 29305, and biflowDirection = initiator
(1), since Loupe's `src` is always the initiator. Everything with a standard IE uses it;
the L7 summary and Loupe's own flow fields are enterprise-specific IEs under a
configurable PEN (docs/export.md, "IPFIX", says why the default is 32473). Strings are
variable-length fields (RFC 7011 7.), cut to a per-field bound so that any record fits
in one message.

Two templates, IPv4 (256) and IPv6 (257). Timestamps go out as flowStartMilliseconds /
flowEndMilliseconds (IE 152/153): every collector reads them, the nanosecond IEs
(156/157) few do.

Transports (RFC 7011 10.): UDP, the default, in messages of at most `max_message`
octets (1400: under a 1500-octet path MTU with room for tunnels, so no IP fragments),
templates resent every `refresh_s` seconds or `refresh_messages` messages, whichever
comes first (RFC 7011 8.4; a collector that restarts learns them again); TCP, templates
once per connection (RFC 7011 8.), a new connection after an error. TLS is not offered:
use a TLS tunnel (stunnel) or a collector on the same host.

Sequence numbers count Data Records per Observation Domain (RFC 7011 3.1) and restart at
0 on every TCP connection. A message that fails to send still advances them, so the
collector sees the gap as loss; the exporter counts the records it dropped. One sink can
carry several Observation Domains over its one socket (the collector's exporter: one
domain per sensor, collector/ipfix.py): each has its own sequence numbers and its own
template timers, since templates are scoped to a domain (RFC 7011 8.); a message holds
one domain's records.

IpfixSink is synchronous (the RecordSink of replay); IpfixExporter puts the bounded
queue of sensor/export/exporter.py in front of it for the live sensor.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from sensor import model
from sensor.errors import ConfigError
from sensor.export.exporter import SinkExporter

__all__ = [
    "IpfixTarget", "IpfixSink", "IpfixExporter", "parse_target", "resolve_target",
    "encode_flow", "encode_uniflows", "FLOW_FIELDS",
    "template_set", "TEMPLATE_V4", "TEMPLATE_V6", "DEFAULT_PEN", "REVERSE_PEN",
]

log = logging.getLogger(__name__)

VERSION = 10
REVERSE_PEN = 29305          # RFC 5103 6.1: reverse Information Elements
# IANA's "example enterprise number for documentation use" (RFC 5612). Loupe has no
# PEN of its own; this one belongs to no vendor, so our IEs collide with nobody's.
DEFAULT_PEN = 32473
TEMPLATE_V4, TEMPLATE_V6 = 256, 257
BIFLOW_INITIATOR, BIFLOW_REVERSE_INITIATOR = 1, 2     # biflowDirection (RFC 5103 6.3)
SET_TEMPLATE = 2
HEADER = struct.Struct("!HHIII")          # version, length, export time, sequence, domain
SET_HEADER = struct.Struct("!HH")
VARLEN = 0xFFFF

# UDP payload bound: 1500-octet Ethernet MTU minus IPv6 (40) and UDP (8) headers and
# room for a tunnel or VLAN on the path. RFC 7011 10.3: avoid IP fragmentation.
DEFAULT_MESSAGE = 1400
# A TCP message may be up to 65535 octets (the length field); 16 KiB keeps one send
# small while cutting syscalls tenfold against 1400.
TCP_MESSAGE = 16384
REFRESH_S = 60.0             # RFC 7011's default is 600 s; a restarted collector waits less
REFRESH_MESSAGES = 1000
# Bound on one blocking send (TCP to a stalled collector): past it the message is
# dropped and counted, the connection reopened.
SEND_TIMEOUT_S = 5.0
# After a failed TCP connect, wait this long before trying again: records meanwhile are
# dropped and counted, never queued without bound. Each further failure doubles the wait
# up to RECONNECT_MAX_S: a connect to a host that does not answer blocks up to
# SEND_TIMEOUT_S, and a collector that stays down should cost that twice a minute, not
# every few seconds.
RECONNECT_S = 2.0
RECONNECT_MAX_S = 30.0
# Observation Domains one sink keeps state for (sequence number, template timers; a few
# dozen bytes each). Past it the least recently used one is forgotten: should it come
# back, it starts over with templates and sequence 0, which a collector reads as a
# restarted exporter.
MAX_DOMAINS = 4096
LOG_EVERY_S = 60.0


def _std(ie: int, length: int) -> tuple[int, int, int]:
    return (ie, length, 0)


def _rev(ie: int, length: int) -> tuple[int, int, int]:
    return (ie, length, REVERSE_PEN)


# (IE id, length, PEN or 0) -> the Flow field it carries. Order = record layout; the
# forward IEs are the initiator's direction, the reverse IEs (PEN 29305) the responder's.
_HEAD = (
    (_std(152, 8), "start_ms"),                 # flowStartMilliseconds
    (_std(153, 8), "end_ms"),                   # flowEndMilliseconds
)
_ADDRS = {
    4: ((_std(8, 4), "src_addr"), (_std(12, 4), "dst_addr")),    # source/destinationIPv4Address
    6: ((_std(27, 16), "src_addr"), (_std(28, 16), "dst_addr")),  # source/destinationIPv6Address
}
_FIXED = (
    (_std(7, 2), "src_port"),                   # sourceTransportPort
    (_std(11, 2), "dst_port"),                  # destinationTransportPort
    (_std(4, 1), "protocol"),                   # protocolIdentifier
    (_std(1, 8), "initiator_octets"),           # octetDeltaCount
    (_std(2, 8), "initiator_packets"),          # packetDeltaCount
    (_std(352, 8), "initiator_l2_octets"),      # layer2OctetDeltaCount
    (_std(6, 2), "initiator_tcp_flags"),        # tcpControlBits (RFC 7125: 16 bits)
    (_rev(1, 8), "responder_octets"),           # reverseOctetDeltaCount
    (_rev(2, 8), "responder_packets"),          # reversePacketDeltaCount
    (_rev(352, 8), "responder_l2_octets"),      # reverseLayer2OctetDeltaCount
    (_rev(6, 2), "responder_tcp_flags"),        # reverseTcpControlBits
    (_std(218, 8), "tcp_syn_count"),            # tcpSynTotalCount
    (_std(219, 8), "tcp_fin_count"),            # tcpFinTotalCount
    (_std(220, 8), "tcp_rst_count"),            # tcpRstTotalCount
    (_std(136, 1), "flow_end_reason"),          # flowEndReason
    (_std(239, 1), "biflow_direction"),         # biflowDirection: 1 src is the initiator
    (_std(58, 2), "vlan_id"),                   # vlanId
    (_std(245, 2), "inner_vlan_id"),            # dot1qCustomerVlanId (QinQ inner tag)
    (_std(10, 4), "ifindex"),                   # ingressInterface
)
_ICMP = {4: (_std(32, 2), "icmp"), 6: (_std(139, 2), "icmp")}   # icmpTypeCode{IPv4,IPv6}

# Loupe's enterprise-specific IEs: (id, Flow field, bound in octets, 0 = unsigned64).
# The bounds are the longest real value (a DNS name is at most 253 characters) so
# that the largest record still fits one 1400-octet message.
ENTERPRISE = (
    (1, "app_proto", 32),
    (2, "tls_sni", 253),
    (3, "http_host", 253),
    (4, "tls_ja4", 64),
    (5, "community_id", 64),
    (6, "dns_qname", 253),
    (7, "conn_state", 16),
    (8, "history", 32),
    (9, "uid", 64),
    (10, "sensor_id", 64),
    (11, "handshake_rtt_ns", 0),
)


# Every Flow attribute the encoder reads: what an object needs to be encoded (the
# collector encodes stored rows, collector/ipfix.py).
FLOW_FIELDS = (
    "flow_start_ns", "flow_end_ns", "src_addr", "dst_addr", "src_port", "dst_port",
    "protocol", "ip_version", "initiator_octets", "initiator_packets", "initiator_l2_octets",
    "initiator_tcp_flags", "responder_octets", "responder_packets", "responder_l2_octets",
    "responder_tcp_flags", "tcp_syn_count", "tcp_fin_count", "tcp_rst_count",
    "flow_end_reason", "vlan_id", "inner_vlan_id", "ifindex", "icmp_type", "icmp_code",
    *(name for _, name, _ in ENTERPRISE),
)


def _layout(version: int):
    return [*_HEAD, *_ADDRS[version], *_FIXED, _ICMP[version]]


def _template_record(template_id: int, version: int, pen: int) -> bytes:
    specs = [spec for spec, _ in _layout(version)]
    specs += [(ie, 8 if bound == 0 else VARLEN, pen) for ie, _, bound in ENTERPRISE]
    out = [struct.pack("!HH", template_id, len(specs))]
    for ie, length, enterprise in specs:
        if enterprise:
            out.append(struct.pack("!HHI", ie | 0x8000, length, enterprise))
        else:
            out.append(struct.pack("!HH", ie, length))
    return b"".join(out)


def template_set(pen: int = DEFAULT_PEN) -> bytes:
    """The Template Set announcing both templates (RFC 7011 3.4.1)."""
    body = _template_record(TEMPLATE_V4, 4, pen) + _template_record(TEMPLATE_V6, 6, pen)
    return SET_HEADER.pack(SET_TEMPLATE, SET_HEADER.size + len(body)) + body


# Fixed part of each record after the addresses: ports, protocol, counters, ... icmp.
_FIXED_FMT = struct.Struct("!HHBQQQHQQQHQQQBBHHIH")
_TIMES = struct.Struct("!QQ")
_RTT = struct.Struct("!Q")


def _varlen(text: str, bound: int) -> bytes:
    data = text.encode("utf-8", "replace")
    if len(data) > bound:
        # Cut on a character boundary: a collector must be able to decode the string.
        data = data[:bound].decode("utf-8", "ignore").encode("utf-8")
    if len(data) < 255:
        return bytes((len(data),)) + data
    return b"\xff" + struct.pack("!H", len(data)) + data   # RFC 7011 7., three-octet length


def encode_flow(flow: model.Flow) -> tuple[int, bytes]:
    """(template id, Data Record) for one Flow as a biflow."""
    return _encode(flow, flow.src_addr, flow.dst_addr, flow.src_port, flow.dst_port,
                   (flow.initiator_octets, flow.initiator_packets, flow.initiator_l2_octets,
                    flow.initiator_tcp_flags),
                   (flow.responder_octets, flow.responder_packets, flow.responder_l2_octets,
                    flow.responder_tcp_flags), BIFLOW_INITIATOR)


_NONE = (0, 0, 0, 0)


def encode_uniflows(flow: model.Flow) -> list[tuple[int, bytes]]:
    """One Flow as two uniflow records, initiator -> responder and back (the second only
    when the responder sent a packet), for collectors that ignore the RFC 5103 reverse
    IEs: each direction's counts in the forward IEs, the reverse ones zero, and
    biflowDirection saying which end is the initiator. YAF's --uniflow does the same."""
    out = [_encode(flow, flow.src_addr, flow.dst_addr, flow.src_port, flow.dst_port,
                   (flow.initiator_octets, flow.initiator_packets, flow.initiator_l2_octets,
                    flow.initiator_tcp_flags), _NONE, BIFLOW_INITIATOR)]
    if flow.responder_packets:
        out.append(_encode(flow, flow.dst_addr, flow.src_addr, flow.dst_port, flow.src_port,
                           (flow.responder_octets, flow.responder_packets,
                            flow.responder_l2_octets, flow.responder_tcp_flags), _NONE,
                           BIFLOW_REVERSE_INITIATOR))
    return out


def _encode(flow: model.Flow, src: str, dst: str, sport: int, dport: int, fwd: tuple,
            rev: tuple, direction: int) -> tuple[int, bytes]:
    v6 = flow.ip_version == 6
    family = socket.AF_INET6 if v6 else socket.AF_INET
    parts = [
        _TIMES.pack(flow.flow_start_ns // 1_000_000, flow.flow_end_ns // 1_000_000),
        socket.inet_pton(family, src),
        socket.inet_pton(family, dst),
        _FIXED_FMT.pack(
            sport, dport, flow.protocol, *fwd, *rev,
            flow.tcp_syn_count, flow.tcp_fin_count, flow.tcp_rst_count,
            int(flow.flow_end_reason), direction, flow.vlan_id, flow.inner_vlan_id,
            flow.ifindex, (flow.icmp_type << 8) | flow.icmp_code),
    ]
    for _, name, bound in ENTERPRISE:
        value = getattr(flow, name)
        parts.append(_RTT.pack(value) if bound == 0 else _varlen(value, bound))
    return (TEMPLATE_V6 if v6 else TEMPLATE_V4), b"".join(parts)


# The largest Data Record: IPv6, every string at its bound (3-octet lengths where > 254).
MAX_RECORD = (_TIMES.size + 32 + _FIXED_FMT.size
              + sum(8 if b == 0 else b + (3 if b >= 255 else 1) for _, _, b in ENTERPRISE))
# The smallest message that holds the largest record with its headers.
MIN_MESSAGE = HEADER.size + SET_HEADER.size + MAX_RECORD


@dataclass(slots=True)
class _Domain:
    """Per Observation Domain: its sequence number and when its templates last went."""

    sequence: int = 0
    send_templates: bool = True
    last_templates: float = 0.0
    since_templates: int = 0


@dataclass(frozen=True, slots=True)
class IpfixTarget:
    host: str
    port: int
    transport: str          # "udp" or "tcp"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}://{host}:{self.port}"


def parse_target(text: str) -> IpfixTarget:
    """"HOST:PORT" (UDP), "udp://HOST:PORT" or "tcp://HOST:PORT"; IPv6 as [addr]:port."""
    from sensor.config import _Invalid, split_host_port  # noqa: PLC0415

    transport, sep, rest = text.partition("://")
    if not sep:
        transport, rest = "udp", text
    transport = transport.lower()
    if transport not in ("udp", "tcp"):
        raise ConfigError(f"IPFIX target {text!r}: transport {transport!r} is neither udp "
                          "nor tcp; give HOST:PORT, udp://HOST:PORT or tcp://HOST:PORT")
    try:
        host, port = split_host_port(rest)
    except _Invalid as exc:
        raise ConfigError(f"IPFIX target: {exc}; give HOST:PORT, udp://HOST:PORT or "
                          "tcp://HOST:PORT") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"IPFIX target {text!r}: port {port} is not 1..65535")
    return IpfixTarget(host, port, transport)


def resolve_target(target: IpfixTarget) -> tuple:
    """(family, type, proto, address), once at start: a name that does not resolve is a
    configuration error then, not a silent loss later."""
    kind = socket.SOCK_STREAM if target.transport == "tcp" else socket.SOCK_DGRAM
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=kind)
    except socket.gaierror as exc:
        raise ConfigError(f"IPFIX target {target}: cannot resolve {target.host!r} "
                          f"({exc.strerror}); give an IP address or a name this host "
                          "resolves") from None
    family, _, proto, _, addr = infos[0]
    return family, kind, proto, addr


class IpfixSink:
    """A RecordSink sending Flow records as IPFIX; other records are ignored (an L7
    event's summary is already on its Flow).

    Bounded: at most one message is buffered. A send that fails drops that message and
    counts its records (records_dropped, send_errors); nothing is retried, so a dead
    collector costs nothing but the count.
    """

    def __init__(self, target: IpfixTarget | str, *, domain: int = 0, pen: int = DEFAULT_PEN,
                 max_message: int | None = None, refresh_s: float = REFRESH_S,
                 refresh_messages: int = REFRESH_MESSAGES, uniflow: bool = False,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.target = parse_target(target) if isinstance(target, str) else target
        if not 0 <= domain <= 0xFFFFFFFF:
            raise ConfigError(f"IPFIX observation domain {domain} is outside 0..4294967295")
        if not 1 <= pen <= 0xFFFFFFFF:
            raise ConfigError(f"IPFIX enterprise number {pen} is outside 1..4294967295")
        tcp = self.target.transport == "tcp"
        self.max_message = max_message or (TCP_MESSAGE if tcp else DEFAULT_MESSAGE)
        if not MIN_MESSAGE <= self.max_message <= 0xFFFF:
            raise ConfigError(f"IPFIX message size {self.max_message} is outside "
                              f"{MIN_MESSAGE}..65535 (the largest record must fit one)")
        self.domain = domain
        self.uniflow = uniflow
        self.refresh_s = refresh_s
        self.refresh_messages = refresh_messages
        self._clock = clock
        self._mono = monotonic
        self._templates = template_set(pen)
        self._addr = resolve_target(self.target)
        self._sock: socket.socket | None = None
        self._next_connect = 0.0
        self._backoff = RECONNECT_S
        self._domains: OrderedDict[int, _Domain] = OrderedDict({domain: _Domain()})
        # The message being filled: its domain, template id and records in write order.
        self._msg_domain = domain
        self._set_id = 0
        self._records: list[bytes] = []
        self._size = 0
        self.records_sent = 0
        self.records_dropped = 0
        self.messages_sent = 0
        self.send_errors = 0
        self.last_error = ""
        self._next_log = 0.0
        self._connect()

    # -- RecordSink ------------------------------------------------------------------------

    def write(self, record: model.Record) -> None:
        if isinstance(record, model.Flow):
            self.write_flow(record)

    def write_flow(self, flow, domain: int | None = None) -> None:
        """One flow (a model.Flow, or any object with its attributes, such as a stored
        row) into Observation Domain `domain` (None: the sink's own)."""
        domain = self.domain if domain is None else domain
        if self.uniflow:
            for set_id, data in encode_uniflows(flow):
                self._add(set_id, data, domain)
        else:
            self._add(*encode_flow(flow), domain)

    def _add(self, set_id: int, data: bytes, domain: int) -> None:
        if self._records and (set_id != self._set_id or domain != self._msg_domain
                              or self._size + len(data) > self._room()):
            self._send_data()
        self._msg_domain = domain
        self._set_id = set_id
        self._records.append(data)
        self._size += len(data)

    def flush(self) -> None:
        if self._records:
            self._send_data()

    def close(self) -> None:
        self.flush()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def sequence(self) -> int:
        """The next sequence number of the sink's own Observation Domain."""
        state = self._domains.get(self.domain)
        return state.sequence if state is not None else 0

    def counters(self) -> dict[str, int]:
        return {"ipfix_records_sent": self.records_sent,
                "ipfix_records_dropped": self.records_dropped,
                "ipfix_messages_sent": self.messages_sent,
                "ipfix_send_errors": self.send_errors}

    # -- messages ---------------------------------------------------------------------------

    def _state(self, domain: int) -> _Domain:
        state = self._domains.get(domain)
        if state is None:
            state = self._domains[domain] = _Domain()
            if len(self._domains) > MAX_DOMAINS:
                self._domains.popitem(last=False)
        else:
            self._domains.move_to_end(domain)
        return state

    def _templates_due(self, state: _Domain) -> bool:
        if state.send_templates:
            return True
        if self.target.transport == "tcp":
            return False            # once per connection (RFC 7011 8.)
        return (self._mono() - state.last_templates >= self.refresh_s
                or state.since_templates >= self.refresh_messages)

    def _room(self) -> int:
        """Octets for Data Records in one message. Due templates ride in front of them
        when both fit, else they go in a message of their own (_send_data)."""
        return self.max_message - HEADER.size - SET_HEADER.size

    def _send_data(self) -> None:
        records, set_id = self._records, self._set_id
        self._records, self._size = [], 0
        body = b"".join(records)
        data_set = SET_HEADER.pack(set_id, SET_HEADER.size + len(body)) + body
        if self._sock is None:
            self._connect()
        domain = self._msg_domain
        state = self._state(domain)
        prefix = b""
        if self._templates_due(state):
            if len(self._templates) + len(data_set) + HEADER.size <= self.max_message:
                prefix = self._templates
            else:
                self._send(self._templates, domain, state, templates=True)
        if self._send(prefix + data_set, domain, state, templates=bool(prefix)):
            self.records_sent += len(records)
        else:
            self.records_dropped += len(records)
        # RFC 7011 3.1: the next message's sequence number counts these records whether
        # or not they arrived, so the collector sees a gap where we dropped.
        state.sequence = (state.sequence + len(records)) & 0xFFFFFFFF

    def _send(self, sets: bytes, domain: int, state: _Domain, *, templates: bool) -> bool:
        message = HEADER.pack(VERSION, HEADER.size + len(sets), int(self._clock()),
                              state.sequence, domain) + sets
        if self._sock is None:
            self.send_errors += 1
            return False
        try:
            if self.target.transport == "tcp":
                self._sock.sendall(message)
            else:
                self._sock.send(message)
        except OSError as exc:
            self.send_errors += 1
            self.last_error = exc.strerror or str(exc)
            now = self._mono()
            if now >= self._next_log:
                # At most once a minute, not per message: the counters tell how much.
                log.warning("IPFIX send to %s failed: %s", self.target, self.last_error)
                self._next_log = now + LOG_EVERY_S
            if self.target.transport == "tcp":
                # Part of a message may be in the stream: only a new connection (with
                # its own templates and sequence) puts the collector back in step.
                self._disconnect()
            return False
        self.messages_sent += 1
        state.since_templates += 1
        if templates:
            # This message counts as the first of the next refresh_messages.
            state.send_templates = False
            state.last_templates = self._mono()
            state.since_templates = 1
        return True

    # -- transport --------------------------------------------------------------------------

    def _connect(self) -> None:
        now = self._mono()
        if now < self._next_connect:
            return
        family, kind, proto, addr = self._addr
        sock = socket.socket(family, kind, proto)
        sock.settimeout(SEND_TIMEOUT_S)
        try:
            # UDP too: a connected socket reports the collector's port unreachable
            # (ECONNREFUSED) on the next send, so a missing collector is counted.
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            self.last_error = exc.strerror or str(exc)
            self._next_connect = now + self._backoff
            log.warning("IPFIX: cannot connect to %s: %s; next try in %.0f s", self.target,
                        self.last_error, self._backoff)
            self._backoff = min(self._backoff * 2, RECONNECT_MAX_S)
            return
        self._sock = sock
        self._backoff = RECONNECT_S
        for state in self._domains.values():
            state.send_templates = True
            if self.target.transport == "tcp":
                state.sequence = 0      # a new Transport Session (RFC 7011 3.1)

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._next_connect = self._mono() + self._backoff


class IpfixExporter(SinkExporter):
    """The live sensor's IPFIX exporter: the bounded queue and writer thread of
    SinkExporter, with the sink's send counters added to its own."""

    def __init__(self, sink: IpfixSink, *, sensor_id: str = "",
                 queue_records: int = 65536) -> None:
        self.ipfix = sink
        super().__init__(sink, sensor_id=sensor_id, queue_records=queue_records)

    def counters(self) -> dict[str, int]:
        out = super().counters()
        out.update(self.ipfix.counters())
        return out


# The record layout and its struct must agree field for field (a test can't forget this).
assert _FIXED_FMT.size == sum(spec[1] for spec, _ in (*_FIXED, _ICMP[4]))
