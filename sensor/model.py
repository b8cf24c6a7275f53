"""Loupe records as frozen dataclasses: the one shape every stage passes around.

The protobuf messages in protos/loupe/v1/records.proto mirror these field for field;
sensor/export/wire.py is the only place that converts between the two. Timestamps are
integer Unix epoch nanoseconds, durations integer nanoseconds, everywhere.

Constructors are keyword-only and validate ranges, so a bad value fails where it is made,
not three stages later in the collector.

Trusted construction (`trusted(cls)`, at the end of this file). The sensor's own L7
parsers and engine make one L7Event (and its detail, and an L7Coverage per flow) per
transaction from values they decoded and bounded themselves; on the replay hot path the
validating constructor cost more than the record is worth re-checking: a frozen slotted
dataclass sets each field through object.__setattr__ and then __post_init__ re-checks
ranges and parses both addresses (about 2.8 µs an L7Event, against 0.6 µs through the
slots' own descriptors, measured). So those call sites use `trusted(cls)`: the same
keyword-only signature, defaults and normalisations (Counts, tuples), no range or address
checks. The flow table's Flow records too (its own counters, ports and address texts
with the L7 stage's fields; 6.8 against 18.8 µs a record). Chosen over making validation
cheaper because the checks themselves are only part of the cost: the per-field
object.__setattr__ of the frozen __init__ is the larger part.
Everything built from outside input (config, the wire decoder, jsonfmt, the collector,
tests) keeps the validating constructor, and tests/replay/test_trusted_records.py
re-validates every record the golden and corpus captures produce and requires it equal.
"""

from __future__ import annotations

import enum
import re
import socket
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Union

from sensor.l7 import registry as _registry

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


class FlowEndReason(enum.IntEnum):
    """IPFIX flowEndReason, IE 136."""

    UNSPECIFIED = 0
    IDLE_TIMEOUT = 1
    ACTIVE_TIMEOUT = 2
    END_OF_FLOW = 3
    FORCED_END = 4
    LACK_OF_RESOURCES = 5


class LostSource(str, enum.Enum):
    """Every place where Loupe can drop data. Each has a counter and reaches analysts as
    a LostEvent with this value as its source."""

    KERNEL_FLOW_MAP_FULL = "kernel_flow_map_full"
    KERNEL_RINGBUF_FULL = "kernel_ringbuf_full"
    KERNEL_PARSE_ERROR = "kernel_parse_error"
    BUDGET_EXHAUSTED = "budget_exhausted"
    REASSEMBLY_GAP = "reassembly_gap"
    REASSEMBLY_MEMORY = "reassembly_memory"
    PARSER_ERROR = "parser_error"
    FLOW_TABLE_FULL = "flow_table_full"
    CAPTURE_ERROR = "capture_error"
    EXPORT_QUEUE_FULL = "export_queue_full"
    SPOOL_FULL = "spool_full"
    SPOOL_CORRUPT = "spool_corrupt"  # count: corrupt spool regions found at start-up
    SUBSCRIBER_SLOW = "subscriber_slow"
    IPFIX_SEND_ERROR = "ipfix_send_error"   # count: IPFIX data records not sent
    TLS_RINGBUF_FULL = "tls_ringbuf_full"   # count: TLS plaintext chunks lost in the kernel
    TLS_NO_SOCKET = "tls_no_socket"         # count: TLS objects whose socket was not found


def _check_uint(name: str, value: int, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= limit:
        raise ValueError(f"{name}={value} is outside 0..{limit}")


def _check_uints(obj, spec: tuple[tuple[str, int], ...]) -> None:
    """_check_uint over (field, limit) pairs, with the common all-valid case inlined:
    a Flow has over twenty integer fields and is built once per flow record."""
    for name, limit in spec:
        value = getattr(obj, name)
        if type(value) is not int or value < 0 or value > limit:
            _check_uint(name, value, limit)


def _check_addr(name: str, value: str) -> None:
    # inet_pton rather than ipaddress.ip_address: the same answer for valid input and
    # ten times cheaper, and every Flow and L7Event checks two addresses.
    try:
        if ":" in value:
            socket.inet_pton(socket.AF_INET6, value)
        else:
            socket.inet_pton(socket.AF_INET, value)
    except (OSError, TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not an IP address") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class L7Coverage:
    """How much of a flow's payload userspace saw. Every payload octet of an inspected
    flow is counted in exactly one of captured, truncated, gap or skipped."""

    inspected: bool = False
    sampled: bool = False
    captured_octets: int = 0
    truncated_octets: int = 0
    gap_octets: int = 0
    skipped_octets: int = 0

    def __post_init__(self) -> None:
        for name in ("captured_octets", "truncated_octets", "gap_octets", "skipped_octets"):
            _check_uint(name, getattr(self, name), U64)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessInfo:
    pid: int = 0
    comm: str = ""
    exe: str = ""
    uid: int = 0
    user: str = ""
    cgroup_id: int = 0
    container_id: str = ""

    def __post_init__(self) -> None:
        _check_uint("pid", self.pid, U32)
        _check_uint("uid", self.uid, U32)
        _check_uint("cgroup_id", self.cgroup_id, U64)


class SummaryMap(dict):
    """Flow.l7_summary: a str -> str dict that cannot change after it is made, so the
    record stays immutable and hashable like its other fields. A dict subclass, so JSON
    (orjson, json), Arrow and protobuf maps take it as it is."""

    __slots__ = ()

    def _immutable(self, *args, **kwargs):
        raise TypeError("a Flow's l7_summary cannot be changed; make a new Flow")

    __setitem__ = __delitem__ = __ior__ = _immutable
    clear = pop = popitem = setdefault = update = _immutable

    def __hash__(self) -> int:   # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self):
        return (SummaryMap, (dict(self),))

    def __repr__(self) -> str:
        return f"SummaryMap({dict.__repr__(self)})"


NO_SUMMARY = SummaryMap()


def _check_summary(flow) -> None:
    raw = flow.l7_summary
    if raw is NO_SUMMARY:
        return
    items = raw.items() if hasattr(raw, "items") else raw
    pairs = sorted((k, v) for k, v in items)
    if len(pairs) > _registry.SUMMARY_KEYS_MAX:
        raise ValueError(f"l7_summary has {len(pairs)} keys; at most "
                         f"{_registry.SUMMARY_KEYS_MAX}")
    for i, (k, v) in enumerate(pairs):
        if not isinstance(k, str) or not k.isidentifier() or len(k) > _registry.SUMMARY_KEY_MAX:
            raise ValueError(f"l7_summary key {k!r} is not an identifier of up to "
                             f"{_registry.SUMMARY_KEY_MAX} characters")
        if i and pairs[i - 1][0] == k:
            raise ValueError(f"l7_summary key {k!r} appears twice")
        if not isinstance(v, str) or len(v) > _registry.SUMMARY_VALUE_MAX:
            raise ValueError(f"l7_summary[{k!r}] is not a string of up to "
                             f"{_registry.SUMMARY_VALUE_MAX} characters")
    if type(raw) is not SummaryMap or list(raw) != [k for k, _ in pairs]:
        object.__setattr__(flow, "l7_summary", SummaryMap(pairs) if pairs else NO_SUMMARY)


def _summary_of(raw) -> SummaryMap:
    """The l7_summary _check_summary leaves on a Flow, without its checks (trusted(Flow))."""
    if raw is NO_SUMMARY:
        return raw
    pairs = sorted((k, v) for k, v in (raw.items() if hasattr(raw, "items") else raw))
    if type(raw) is not SummaryMap or list(raw) != [k for k, _ in pairs]:
        return SummaryMap(pairs) if pairs else NO_SUMMARY
    return raw


_FLOW_UINTS = (
    ("flow_start_ns", U64), ("flow_end_ns", U64),
    ("src_port", 0xFFFF), ("dst_port", 0xFFFF), ("protocol", 0xFF),
    ("vlan_id", 0xFFF), ("inner_vlan_id", 0xFFF), ("ifindex", U32),
    ("initiator_octets", U64), ("responder_octets", U64),
    ("initiator_packets", U64), ("responder_packets", U64),
    ("initiator_l2_octets", U64), ("responder_l2_octets", U64),
    ("tcp_syn_count", U64), ("tcp_fin_count", U64), ("tcp_rst_count", U64),
    ("handshake_rtt_ns", U64),
    ("initiator_tcp_flags", 0xFFFF), ("responder_tcp_flags", 0xFFFF),
    ("icmp_type", 0xFF), ("icmp_code", 0xFF), ("src_asn", U32), ("dst_asn", U32),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Flow:
    """A bidirectional flow with IPFIX semantics (IE ids in records.proto)."""

    uid: str
    sensor_id: str = ""
    flow_start_ns: int
    flow_end_ns: int
    src_addr: str
    dst_addr: str
    src_port: int = 0
    dst_port: int = 0
    protocol: int
    ip_version: int
    vlan_id: int = 0
    inner_vlan_id: int = 0
    ifindex: int = 0
    initiator_octets: int = 0
    responder_octets: int = 0
    initiator_packets: int = 0
    responder_packets: int = 0
    initiator_l2_octets: int = 0
    responder_l2_octets: int = 0
    initiator_tcp_flags: int = 0
    responder_tcp_flags: int = 0
    tcp_syn_count: int = 0
    tcp_fin_count: int = 0
    tcp_rst_count: int = 0
    flow_end_reason: FlowEndReason = FlowEndReason.UNSPECIFIED
    conn_state: str = ""
    history: str = ""
    handshake_rtt_ns: int = 0
    community_id: str = ""
    app_proto: str = ""
    l7_coverage: L7Coverage = field(default_factory=L7Coverage)
    process: ProcessInfo | None = None
    http_host: str = ""
    dns_qname: str = ""
    tls_sni: str = ""
    tls_ja4: str = ""
    icmp_type: int = 0
    icmp_code: int = 0
    # The app_proto's own summary keys (registry Protocol.summary_keys) -> value, in key
    # order. Any mapping or (key, value) pairs are accepted and made a SummaryMap.
    l7_summary: SummaryMap = NO_SUMMARY
    # Geo and ASN of each end (sensor/enrich/geo.py): "" / 0 when unknown or not global.
    src_country: str = ""
    src_city: str = ""
    src_asn: int = 0
    dst_country: str = ""
    dst_city: str = ""
    dst_asn: int = 0

    def __post_init__(self) -> None:
        if not self.uid:
            raise ValueError("uid must not be empty")
        _check_uints(self, _FLOW_UINTS)
        _check_summary(self)
        if self.flow_end_ns < self.flow_start_ns:
            raise ValueError(
                f"flow_end_ns={self.flow_end_ns} is before flow_start_ns={self.flow_start_ns}"
            )
        _check_addr("src_addr", self.src_addr)
        _check_addr("dst_addr", self.dst_addr)
        if self.ip_version not in (4, 6):
            raise ValueError(f"ip_version={self.ip_version} is neither 4 nor 6")
        if not isinstance(self.flow_end_reason, FlowEndReason):
            object.__setattr__(self, "flow_end_reason", FlowEndReason(self.flow_end_reason))


_PRINCIPAL = re.compile(r"p:[0-9a-f]{16}\Z")


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpCredential:
    """One credential a request carried (sensor/l7/principal.py): its kind and, when one
    was found, the salted hash of its principal. The check on `principal` is the last
    guard that no credential value reaches a record: anything but the hash is refused."""

    kind: str
    principal: str = ""

    def __post_init__(self) -> None:
        if not self.kind or len(self.kind) > 16:
            raise ValueError(f"credential kind {self.kind!r} is empty or too long")
        if self.principal and not _PRINCIPAL.match(self.principal):
            raise ValueError("credential principal must be \"p:\" + 16 hex digits (a "
                             "salted hash), never a value")


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpEvent:
    method: str = ""
    host: str = ""
    path: str = ""
    version: str = ""
    status: int = 0
    reason: str = ""
    user_agent: str = ""
    request_content_type: str = ""
    response_content_type: str = ""
    request_body_len: int = 0
    response_body_len: int = 0
    latency_ns: int = 0
    # PII occurrences by "type.direction" (sensor/l7/pii.py): counts, never values. A
    # mapping is accepted and converted; dict(event.pii) reads it.
    pii: _registry.Counts = _registry.Counts()
    # Credentials of this request, one per kind in principal.KINDS order: kinds and
    # salted principal hashes, never a value.
    auth: tuple[HttpCredential, ...] = ()

    def __post_init__(self) -> None:
        _check_uint("status", self.status, 999)
        _check_uint("request_body_len", self.request_body_len, U64)
        _check_uint("response_body_len", self.response_body_len, U64)
        _check_uint("latency_ns", self.latency_ns, U64)
        if type(self.pii) is not _registry.Counts:
            object.__setattr__(self, "pii", _registry.Counts.of(self.pii))


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsAnswer:
    name: str
    rtype: int
    ttl: int = 0
    data: str = ""

    def __post_init__(self) -> None:
        _check_uint("rtype", self.rtype, 0xFFFF)
        _check_uint("ttl", self.ttl, U32)


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsEvent:
    id: int = 0
    qname: str = ""
    qtype: int = 0
    qclass: int = 1
    rcode: int = -1  # -1: no response seen
    answers: tuple[DnsAnswer, ...] = ()
    latency_ns: int = 0
    transport: str = "udp"
    truncated: bool = False

    def __post_init__(self) -> None:
        _check_uint("id", self.id, 0xFFFF)
        _check_uint("qtype", self.qtype, 0xFFFF)
        _check_uint("qclass", self.qclass, 0xFFFF)
        if not -1 <= self.rcode <= 0xFFF:
            raise ValueError(f"rcode={self.rcode} is outside -1..4095")
        if self.transport not in ("udp", "tcp"):
            raise ValueError(f"transport={self.transport!r} is neither 'udp' nor 'tcp'")
        if not isinstance(self.answers, tuple):
            object.__setattr__(self, "answers", tuple(self.answers))
        _check_uint("latency_ns", self.latency_ns, U64)


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsEvent:
    version: int = 0
    client_version: int = 0
    sni: str = ""
    alpn: tuple[str, ...] = ()
    alpn_selected: str = ""
    cipher: int = 0
    ja3: str = ""
    ja3s: str = ""
    ja4: str = ""
    cert_subject: str = ""
    cert_issuer: str = ""
    cert_san: tuple[str, ...] = ()
    cert_not_before_ns: int = 0
    cert_not_after_ns: int = 0

    def __post_init__(self) -> None:
        _check_uint("version", self.version, 0xFFFF)
        _check_uint("client_version", self.client_version, 0xFFFF)
        _check_uint("cipher", self.cipher, 0xFFFF)
        for name in ("alpn", "cert_san"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_uint("cert_not_before_ns", self.cert_not_before_ns, U64)
        _check_uint("cert_not_after_ns", self.cert_not_after_ns, U64)


# An L7Event's detail is the event dataclass of a registered protocol
# (sensor/l7/registry.py); the registry, not this module, knows which classes those are.
L7Detail = Any


L7_SOURCES = ("wire", "tls_plaintext")


@dataclass(frozen=True, slots=True, kw_only=True)
class L7Event:
    """One L7 transaction, linked to its Flow by uid and community_id."""

    uid: str
    sensor_id: str = ""
    community_id: str = ""
    ts_ns: int
    src_addr: str
    dst_addr: str
    src_port: int = 0
    dst_port: int = 0
    protocol: int
    detail: L7Detail
    # Where the bytes came from: "wire" (packets) or "tls_plaintext" (a TLS library's
    # read/write calls, bpf/tls_probe.c).
    source: str = "wire"

    def __post_init__(self) -> None:
        if not self.uid:
            raise ValueError("uid must not be empty")
        if self.source not in L7_SOURCES:
            raise ValueError(f"source must be one of {', '.join(L7_SOURCES)}, got {self.source!r}")
        _check_uint("ts_ns", self.ts_ns, U64)
        _check_addr("src_addr", self.src_addr)
        _check_addr("dst_addr", self.dst_addr)
        _check_uint("src_port", self.src_port, 0xFFFF)
        _check_uint("dst_port", self.dst_port, 0xFFFF)
        _check_uint("protocol", self.protocol, 0xFF)
        if _registry.of_event(type(self.detail)) is None:
            raise TypeError(
                f"detail must be a registered L7 event, got {type(self.detail).__name__}")

    @property
    def kind(self) -> str:
        """The protocol's registered name ("http", "dns", ...): the name used by filters,
        tables and the CLI."""
        return _registry.of_event(type(self.detail)).name


@dataclass(frozen=True, slots=True, kw_only=True)
class LostEvent:
    source: str
    count: int
    interval_start_ns: int = 0
    interval_end_ns: int = 0
    sensor_id: str = ""

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source must not be empty")
        _check_uint("count", self.count, U64)
        _check_uint("interval_start_ns", self.interval_start_ns, U64)
        _check_uint("interval_end_ns", self.interval_end_ns, U64)


ALERT_ACTIONS = ("count", "alert", "allow", "block")
SEVERITIES = ("low", "medium", "high", "critical")
MAX_TOP_SOURCES_CHARS = 32 * 40   # Alert.top_sources: 32 IPv6 addresses and separators
MAX_EXCERPT = 256   # characters of an Alert's excerpt: enough to read, too short to leak much


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """A rule matched an L7 event (sensor/rules/): what, where, and the flow it belongs to."""

    rule_id: str
    action: str
    field: str = ""
    excerpt: str = ""
    reason: str = ""
    severity: str = "medium"
    category: str = ""
    community_id: str = ""
    uid: str = ""
    ts_ns: int = 0
    event_kind: str = ""
    src_addr: str = ""
    dst_addr: str = ""
    src_port: int = 0
    dst_port: int = 0
    sensor_id: str = ""
    count: int = 0
    # What the kernel enforced for this alert's block (sensor/enforce/): the flow is
    # dropped (and the source banned, if the rule says) until block_expires_ns (Unix ns).
    # Always false in replay, which enforces nothing.
    enforced: bool = False
    block_expires_ns: int = 0
    # Hold mode (docs/rules.md "Hold mode"): the blocked request's response was held in
    # the kernel this long before the block was written, so none of it reached the
    # client; 0 when it was not held.
    held_ns: int = 0
    # DDoS detections (sensor/rules/ddos.py): the attack's rate, the sources it names
    # (busiest first, space-separated, at most MAX_TOP_SOURCES_CHARS), the configured mitigation,
    # the rate's window and the learned baseline (0 while learning). 0 / "" otherwise.
    rate: int = 0
    top_sources: str = ""
    mitigation: str = ""
    window_ns: int = 0
    baseline: int = 0

    def __post_init__(self) -> None:
        if not self.rule_id:
            raise ValueError("rule_id must not be empty")
        if self.action not in ALERT_ACTIONS:
            raise ValueError(f"action={self.action!r} is not one of {', '.join(ALERT_ACTIONS)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity={self.severity!r} is not one of {', '.join(SEVERITIES)}")
        if len(self.excerpt) > MAX_EXCERPT:
            raise ValueError(f"excerpt is longer than {MAX_EXCERPT} characters")
        _check_uint("ts_ns", self.ts_ns, U64)
        _check_uint("src_port", self.src_port, 0xFFFF)
        _check_uint("dst_port", self.dst_port, 0xFFFF)
        _check_uint("count", self.count, U64)
        _check_uint("block_expires_ns", self.block_expires_ns, U64)
        _check_uint("held_ns", self.held_ns, U64)
        for name in ("rate", "window_ns", "baseline"):
            _check_uint(name, getattr(self, name), U64)
        if self.mitigation not in ("", "count", "block", "ratelimit"):
            raise ValueError(f"mitigation={self.mitigation!r} is not count, block or ratelimit")
        if len(self.top_sources) > MAX_TOP_SOURCES_CHARS:
            raise ValueError(f"top_sources is longer than {MAX_TOP_SOURCES_CHARS} characters")
        if self.src_addr:
            _check_addr("src_addr", self.src_addr)
        if self.dst_addr:
            _check_addr("dst_addr", self.dst_addr)


Record = Union[Flow, L7Event, LostEvent, Alert]


def record_kind(record: Record) -> str:
    """"flow", "lost", "alert", or the L7 event's registered kind ("http", "dns", ...)."""
    if isinstance(record, Flow):
        return "flow"
    if isinstance(record, LostEvent):
        return "lost"
    if isinstance(record, Alert):
        return "alert"
    return record.kind


# -- trusted construction (see the module docstring) ---------------------------------------

_NORMALIZE = {
    # What each class's __post_init__ converts rather than checks: kept on the trusted path,
    # so a trusted record is the record the validating constructor makes from the same
    # arguments.
    "HttpEvent": "    if type(pii) is not _Counts:\n        pii = _Counts.of(pii)\n",
    "DnsEvent": "    if type(answers) is not tuple:\n        answers = tuple(answers)\n",
    "Flow": ("    if l7_summary is not _NO_SUMMARY:\n        l7_summary = _summary_of(l7_summary)\n"
             "    if type(flow_end_reason) is not _Reason:\n"
             "        flow_end_reason = _Reason(flow_end_reason)\n"),
}
_TRUSTED: dict[type, Any] = {}


def trusted(cls: type) -> Any:
    """A builder for records of `cls` (L7Event, HttpEvent, DnsEvent, DnsAnswer,
    L7Coverage, Flow) that skips __post_init__'s checks: for values the sensor's own
    parsers and flow table produced and bounded, never for outside input. Same keyword-only
    signature and defaults (a default factory is called per record) as the class, and the
    same conversions (Flow: l7_summary sorted into a SummaryMap, the end reason made a
    FlowEndReason); the fields are set through the slots' descriptors. TlsEvent has none:
    a certificate's dates are the peer's, not bounded by the parser (one that predates
    1970 must still be refused)."""
    made = _TRUSTED.get(cls)
    if made is not None:
        return made
    if cls.__name__ not in _TRUSTED_CLASSES:
        raise TypeError(f"{cls.__name__} has no trusted builder: its __post_init__ checks "
                        "values that are not the sensor's own")
    env: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_Counts": _registry.Counts,
                           "_NO_SUMMARY": NO_SUMMARY, "_summary_of": _summary_of,
                           "_Reason": FlowEndReason, "_unset": MISSING}
    params, sets, factories = [], [], []
    for i, f in enumerate(fields(cls)):
        if f.default is not MISSING:
            env[f"_d{i}"] = f.default
            params.append(f"{f.name}=_d{i}")
        elif f.default_factory is not MISSING:
            env[f"_f{i}"] = f.default_factory
            params.append(f"{f.name}=_unset")
            factories.append(f"    if {f.name} is _unset:\n        {f.name} = _f{i}()\n")
        else:
            params.append(f.name)
        env[f"_s{i}"] = cls.__dict__[f.name].__set__
        sets.append(f"    _s{i}(o, {f.name})\n")
    name = f"trusted_{cls.__name__}"
    src = (f"def {name}(*, {', '.join(params)}):\n" + "".join(factories)
           + _NORMALIZE.get(cls.__name__, "")
           + "    o = _new(_cls)\n" + "".join(sets) + "    return o\n")
    exec(compile(src, f"<model.trusted({cls.__name__})>", "exec"), env)
    made = _TRUSTED[cls] = env[name]
    return made


_TRUSTED_CLASSES = ("L7Event", "HttpEvent", "DnsEvent", "DnsAnswer", "L7Coverage", "Flow")
