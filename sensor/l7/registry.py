"""The registry of L7 protocols: each protocol module declares itself once, here is the list.

A protocol module under sensor/l7/ (a module, or a package whose __init__ does it) sets a
module-level `PROTOCOL = Protocol(...)`. Nothing else names the protocol: detection, the
parsers the engine creates, the wire conversion (the L7Event oneof field), JSON, the
collector's table and its columns, ingest, filters and the table line all read these
specs. Adding a protocol is therefore its module plus its message in records.proto.

Discovery walks sensor/l7/ once, on first use, and imports every module there; one that
declares no PROTOCOL is a helper (redact, fingerprints, x509). It is lazy because protocol
modules import sensor.model, and sensor.model asks this registry what an event's kind is.

Storage types. The collector derives a table's columns from the event dataclass: str ->
string, bool -> bool, int -> u64, tuple[str, ...] -> list of strings, tuple[<dataclass>,
...] -> list of structs, Counts -> counts (a str -> count map stored as JSON text).
`column_types` overrides one column ("status": "u16") or one
struct member ("answers.rtype": "u16"), with the type names of TYPE_NAMES. Sensor code
never imports pyarrow: these are names, collector/schema.py maps them.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

# Storage type names column_types may use (collector/schema.py maps each to Arrow).
TYPE_NAMES = frozenset(("u8", "u16", "u32", "u64", "i32", "i64", "str", "bool"))

# The Flow's l7_summary map (protos/loupe/v1/records.proto, Flow field 39): one protocol's
# keys per flow, so 16 covers any protocol's "what was this" (user, database, topic...);
# a value is a name or the start of a statement, and 256 characters identify either
# without letting a bulk INSERT's text into every flow row. sensor/model.py checks both.
SUMMARY_KEYS_MAX = 16
SUMMARY_KEY_MAX = 64
SUMMARY_VALUE_MAX = 256

# Detection order ties: a lower priority is sniffed first. Signatures are meant to be
# disjoint; the order only matters for a first segment that two of them accept.
DEFAULT_PRIORITY = 50

Segment = tuple[str, "str | None"]  # (text, style) of one table-line segment

# How a Filter compares its values with the event's field (collector/filters.py):
# glob: fnmatch, case-folded, a trailing dot ignored (host names); glob_case: fnmatch as
# is (paths); upper: one of the values, case-insensitively (methods); exact: one of the
# values; status: within one of the HTTP status ranges ("404", "5xx", "500+", "200-299");
# contains: holds one of the values, case-insensitively (statement text).
# Several protocols may declare one filter name (sql_query_contains: MySQL and
# PostgreSQL); it then matches the events of any of them, so they must agree on its flag,
# match and help.
FILTER_MATCHES = frozenset(("glob", "glob_case", "upper", "exact", "status", "contains"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Filter:
    """One subscription criterion over a field of the protocol's event (tail's --<flag>).
    `name` is its loupe.v1.RecordFilter field (protos/loupe/v1/observer.proto)."""

    name: str
    field: str
    match: str
    # The Flow summary field (Protocol.summary) or l7_summary key (Protocol.summary_keys)
    # the criterion also matches flows on; "" matches L7 events only.
    flow_field: str = ""
    flag: str = ""          # tail's flag, when not `name` with dashes
    help: str = ""
    # tail's value parser (text -> the RecordFilter value; ValueError names the problem).
    parse: Callable[[str], Any] | None = None

    def __post_init__(self) -> None:
        if self.match not in FILTER_MATCHES:
            raise ValueError(f"filter {self.name}: match {self.match!r} is not one of "
                             f"{sorted(FILTER_MATCHES)}")

    @property
    def tail_flag(self) -> str:
        return self.flag or self.name.replace("_", "-")


@dataclass(frozen=True, slots=True, kw_only=True)
class ZeekLog:
    """The protocol's Zeek log (sensor/export/formats.py writes it as TSV): its path, its
    columns after the shared head (ts, uid, id.orig_h, id.orig_p, id.resp_h, id.resp_p)
    as (name, Zeek type), and the values of one L7Event for them (None is unset)."""

    path: str
    columns: tuple[tuple[str, str], ...]
    values: Callable[[Any], list]


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelWalk:
    """A length-framed protocol the kernel follows frame by frame (bpf/frames.h), so that
    its bulk frames are left out without a userspace round trip per frame. The loader
    writes it into the kernel's frame_cfg (sensor/kernel/frames.py).

    match/mask: the client's first eight payload octets (big-endian, masked) that arm the
    walk; server_match/server_mask the same for a server that speaks first (its client
    must then match too). start: octets of each side's first payload before its first frame, by Direction
    (client, server), None for a side not walked. A frame is `header` octets with a
    big-endian length field at length_at (length_size octets); it spans header + length +
    length_adjust octets. Frames whose type octet (at type_at) is in `elide` are left out:
    whole (header too) unless the flags octet (flags_at) has one of body_flags (then only
    the payload) or keep_flags (then nothing); frames of keep_type keep their header and
    keep_octets payload octets instead. The parser must accept a Skip that starts and
    ends on frame boundaries in place of frames left out whole."""

    match: bytes
    mask: bytes = b"\xff" * 8
    server_match: bytes = b""
    server_mask: bytes = b""
    start: tuple[int | None, int | None]
    header: int
    length_at: int
    length_size: int
    length_adjust: int = 0
    type_at: int
    flags_at: int = 0
    elide: bytes
    keep_flags: int = 0
    body_flags: int = 0
    keep_type: int = 0
    keep_octets: int = 0

    def __post_init__(self) -> None:
        if len(self.match) != 8 or len(self.mask) != 8 or not any(self.mask):
            raise ValueError("kernel walk: match and mask are eight octets, mask not zero")
        if len(self.server_match) != len(self.server_mask) or \
                len(self.server_mask) not in (0, 8):
            raise ValueError("kernel walk: server_match and server_mask are eight octets")
        if not 1 <= self.header <= 16 or not 1 <= self.length_size <= 4 or \
                self.length_at + self.length_size > self.header or \
                not (self.type_at < self.header and self.flags_at < self.header):
            raise ValueError("kernel walk: the header's fields must lie in 1..16 octets")
        if any(s is not None and not 0 <= s < 0xFFFF for s in self.start):
            raise ValueError("kernel walk: start is 0..65534 octets or None")


@dataclass(frozen=True, slots=True, kw_only=True)
class FramingHints:
    """What the live engine (sensor/engine/live.py) needs to know of the protocol's
    messages on a TCP stream to spend the kernel's copy budget well. The parser's own
    hints (skip_hint, DONE) need no declaration; these are the rules that hold before a
    parser exists or after it failed.

    message_starts: first bytes of a segment that begins a message (a request or status
    line). With `head_end`, the engine measures each message head (up to and including
    head_end) and keeps room for the next head of that direction in the allowance.
    resync: after a parser error, wait for the next segment that begins a message and
    start a fresh parser there, so a lost head costs one message, not the connection.
    done_after(detail): over TCP, after such an event nothing more of the flow is needed
    and the kernel stops copying it (DNS over TCP, RFC 7766: one query per connection as
    a rule)."""

    message_starts: tuple[bytes, ...] = ()
    head_end: bytes = b""
    resync: bool = False
    done_after: Callable[[Any], bool] | None = None
    # Frames the kernel follows and leaves out by itself (KernelWalk), or None.
    kernel_walk: KernelWalk | None = None

    def __post_init__(self) -> None:
        if self.resync and not self.message_starts:
            raise ValueError("resync needs message_starts: where a message begins")


@dataclass(frozen=True, slots=True, kw_only=True)
class Protocol:
    """One L7 protocol as every consumer sees it. `name` is the Flow's app_proto, the
    record kind (JSON "type", tail's kind column), and by default the L7Event oneof field
    and the collector table."""

    name: str
    # The detail dataclass of its L7Event; None for a protocol only detected so far
    # (flows carry its app_proto, no parser makes events).
    event: type | None = None
    # The sans-I/O parser class (sensor/l7/base.py L7Parser), None for detection only.
    parser: Callable[..., Any] | None = None
    # Event classes of other protocols a parser without an event of its own makes (the
    # STARTTLS parsers make TlsEvents after the upgrade): their kinds name the records.
    emits: tuple[type, ...] = ()
    # Keyword options the parser takes from the sensor's configuration ("redact").
    options: tuple[str, ...] = ()
    # Detection (sensor/l7/detect.py): content first, ports only hint.
    tcp_ports: tuple[int, ...] = ()
    udp_ports: tuple[int, ...] = ()
    # (first bytes of one direction, its Direction) -> does this look like the protocol.
    signature: Callable[[bytes, Any], bool] | None = None
    # The TCP signature is trusted only on these server ports (empty: on any port).
    signature_ports: tuple[int, ...] = ()
    datagram_signature: Callable[[bytes, Any], bool] | None = None
    # First four bytes of a TCP client's first payload that the kernel's content sniffer
    # (bpf/flow.c, sniff()) selects a flow on; each costs the verifier one compare, so
    # only the common openings. The loader compiles them in (kernel_sniff_prefixes()).
    kernel_prefixes: tuple[bytes, ...] = ()
    # The same for a UDP client's first datagram: (mask, value, min_len), the first eight
    # payload bytes as a big-endian 64-bit word masked and compared, in a datagram of at
    # least min_len bytes (QUIC Initials). The loader compiles them in
    # (kernel_datagram_words()).
    kernel_datagram_words: tuple[tuple[int, int, int], ...] = ()
    priority: int = DEFAULT_PRIORITY
    # Where the kind is listed (CLI help, error messages, export files, tables): lower
    # first, then by name.
    listing: int = 100
    # Flow fields its parser's summary() fills (Flow.http_host ...).
    summary: tuple[str, ...] = ()
    # Its own summary() keys that go into the Flow's l7_summary map ("mysql_user",
    # "kafka_topic"): at most SUMMARY_KEYS_MAX, values cut at SUMMARY_VALUE_MAX characters
    # (sensor/engine/l7engine.py). A key in neither tuple is dropped. Never a secret: the
    # parsers redact at parse time, and a password is no summary key.
    summary_keys: tuple[str, ...] = ()
    # Wire and storage names; "" means `name` (message: the event class's name).
    message: str = ""
    field: str = ""
    table: str = ""
    column_types: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))
    # The table line's summary segments for one detail; None: generic "field=value" pairs.
    line: Callable[[Any], list[Segment]] | None = None
    # The table's colour for its kind column (a sensor/export/table.py style name).
    style: str = ""
    # Subscription criteria (tail flags) over its events.
    filters: tuple[Filter, ...] = ()
    # The collector's columnar fast path (collector/ingest.py). `column_ranges` (field,
    # low, high) and `column_values` (field, allowed values) are the event's checks that
    # its column types do not already make; `columns_checked` says they, with the types,
    # are ALL of its dataclass's checks, so ingest may skip building the dataclasses
    # (tests/collector/test_tls_storage.py proves the two agree). Otherwise every event of
    # the kind is validated by building it (~30 us a record).
    column_ranges: tuple[tuple[str, int, int], ...] = ()
    column_values: tuple[tuple[str, frozenset], ...] = ()
    columns_checked: bool = False
    # Suricata EVE: the object under the event's key; None writes the fields as they are.
    eve: Callable[[Any], dict] | None = None
    # Its Zeek log; None: `--format zeek` skips its events (counted).
    zeek: ZeekLog | None = None
    # Live budget rules over its TCP messages (FramingHints); None: the parser's own
    # skip hints and DONE are all the engine uses.
    framing: FramingHints | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"protocol name {self.name!r} is not an identifier")
        if (self.event is None) != (self.parser is None) and not (self.parser and self.emits):
            raise ValueError(f"{self.name}: event and parser come together")
        bad = set(self.column_types.values()) - TYPE_NAMES
        if bad:
            raise ValueError(f"{self.name}: unknown column types {sorted(bad)}")
        if len(self.summary_keys) > SUMMARY_KEYS_MAX or len(set(self.summary_keys)) != len(
                self.summary_keys) or not all(k.isidentifier() and len(k) <= SUMMARY_KEY_MAX
                                              for k in self.summary_keys):
            raise ValueError(f"{self.name}: summary_keys are up to {SUMMARY_KEYS_MAX} distinct "
                             f"identifiers of up to {SUMMARY_KEY_MAX} characters")
        if set(self.summary_keys) & set(self.summary):
            raise ValueError(f"{self.name}: a key is both a Flow field and an l7_summary key")
        for flt in self.filters:
            if flt.flow_field and flt.flow_field not in self.summary + self.summary_keys:
                raise ValueError(f"{self.name}: filter {flt.name}'s flow_field "
                                 f"{flt.flow_field!r} is not in its summary or summary_keys")
        if any(len(p) != 4 for p in self.kernel_prefixes):
            raise ValueError(f"{self.name}: kernel_prefixes are four bytes each")
        if not isinstance(self.column_types, MappingProxyType):
            object.__setattr__(self, "column_types", MappingProxyType(dict(self.column_types)))

    @property
    def oneof(self) -> str:
        return self.field or self.name

    @property
    def table_name(self) -> str:
        return self.table or self.name

    @property
    def message_name(self) -> str:
        return self.message or (self.event.__name__ if self.event is not None else "")


class UnknownKind(LookupError):
    """A record kind no registered protocol declares."""


@dataclass(frozen=True, slots=True)
class Registry:
    """The protocols found, in listing order, with the lookups consumers need."""

    protocols: tuple[Protocol, ...]
    detection: tuple[Protocol, ...]   # the same, in the order signatures are tried
    by_name: Mapping[str, Protocol]
    by_event: Mapping[type, Protocol]
    by_oneof: Mapping[str, Protocol]

    @classmethod
    def of(cls, protocols) -> "Registry":
        ordered = tuple(sorted(protocols, key=lambda p: (p.listing, p.name)))
        by_name: dict[str, Protocol] = {}
        for p in ordered:
            if p.name in by_name:
                raise ValueError(f"protocol {p.name!r} is declared twice")
            by_name[p.name] = p
        kinds = [p for p in ordered if p.event is not None]
        for names, what in (([p.oneof for p in kinds], "oneof field"),
                            ([p.table_name for p in kinds], "table")):
            clash = {n for n in names if names.count(n) > 1}
            if clash:
                raise ValueError(f"two protocols share the {what} {sorted(clash)}")
        return cls(ordered, tuple(sorted(ordered, key=lambda p: (p.priority, p.name))),
                   MappingProxyType(by_name),
                   MappingProxyType({p.event: p for p in kinds}),
                   MappingProxyType({p.oneof: p for p in kinds}))

    def kinds(self) -> tuple[Protocol, ...]:
        """The protocols that make L7Events (have an event class), in registry order."""
        return tuple(p for p in self.protocols if p.event is not None)

    def kind(self, name: str) -> Protocol:
        p = self.by_name.get(name)
        if p is None or p.event is None:
            raise UnknownKind(f"unknown L7 record kind {name!r}; known: "
                              f"{', '.join(k.name for k in self.kinds())}")
        return p


_found: list[Registry] = []  # filled once by registry(); a list so no `global` is needed


def discover(package: str = "sensor.l7") -> Registry:
    """Import every module of `package` and collect their PROTOCOL declarations."""
    pkg = importlib.import_module(package)
    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "registry" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        spec = getattr(module, "PROTOCOL", None)
        if isinstance(spec, Protocol):
            found.append(spec)
        # A module may declare several related protocols (starttls.py: smtp, imap, ...).
        found.extend(p for p in getattr(module, "PROTOCOLS", ()) if isinstance(p, Protocol))
    return Registry.of(found)


def registry() -> Registry:
    """The process's registry (discovered on first call)."""
    if not _found:
        _found.append(discover())
    return _found[0]


def protocols() -> tuple[Protocol, ...]:
    return registry().protocols


def detection() -> tuple[Protocol, ...]:
    return registry().detection


def kinds() -> tuple[Protocol, ...]:
    return registry().kinds()


def kind_names() -> tuple[str, ...]:
    return tuple(p.name for p in kinds())


def get(name: str) -> Protocol | None:
    return registry().by_name.get(name)


def kind(name: str) -> Protocol:
    return registry().kind(name)


def of_event(cls: type) -> Protocol | None:
    return registry().by_event.get(cls)


def kernel_sniff_prefixes() -> tuple[int, ...]:
    """Every registered kernel prefix as a big-endian 32-bit word, sorted, once each."""
    return tuple(sorted({int.from_bytes(p, "big") for spec in protocols()
                         for p in spec.kernel_prefixes}))


def kernel_walks() -> tuple[KernelWalk, ...]:
    """Every registered KernelWalk, in registry order (the kernel holds four)."""
    return tuple(spec.framing.kernel_walk for spec in protocols()
                 if spec.framing is not None and spec.framing.kernel_walk is not None)


def kernel_datagram_words() -> tuple[tuple[int, int, int], ...]:
    """Every registered (mask, value, min_len) datagram test, sorted, once each."""
    return tuple(sorted({w for spec in protocols() for w in spec.kernel_datagram_words}))


# -- the event dataclass, described for wire and storage --------------------------------------

@dataclass(frozen=True, slots=True)
class Column:
    """One field of an event dataclass: its storage type name, or its members for a list
    of structs (then `type` is "struct" and `of` is the nested dataclass)."""

    name: str
    type: str                      # a TYPE_NAMES entry, "list<str>", "list<struct>", "counts"
    of: type | None = None
    members: tuple["Column", ...] = ()


class Counts(dict):
    """A small str -> count mapping in key order that cannot change after it is made (the
    PII counts of an HTTP event, sensor/l7/pii.py): hashable like the rest of a record,
    and a dict subclass, so JSON encoders (orjson, json) and protobuf maps take it as it
    is. On the wire a map<string, uint32>; stored as JSON text ("counts" column type),
    which DuckDB, ClickHouse 18.16, Parquet and CSV all hold as a plain string."""

    __slots__ = ()

    def _immutable(self, *args, **kwargs):
        raise TypeError("an event's counts cannot be changed; make a new event")

    __setitem__ = __delitem__ = __ior__ = _immutable
    clear = pop = popitem = setdefault = update = _immutable

    def __hash__(self) -> int:   # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self):
        return (Counts, (dict(self),))

    def __repr__(self) -> str:
        return f"Counts({dict.__repr__(self)})"
    MAX_KEYS = 64          # more keys than pii.KEYS: a sender cannot grow a row unbounded
    MAX_KEY = 64
    MAX_COUNT = (1 << 32) - 1

    @classmethod
    def of(cls, value: Any) -> "Counts":
        """From a mapping, (key, count) pairs, or JSON text (a stored row's column; None
        or "" in a row stored before the column existed); ValueError names the problem."""
        if isinstance(value, Counts):
            return value
        if value is None:
            return _EMPTY_COUNTS
        if isinstance(value, str):
            import json
            value = json.loads(value) if value else {}
        items = value.items() if hasattr(value, "items") else value
        pairs = tuple(sorted((k, v) for k, v in items))
        if len(pairs) > cls.MAX_KEYS:
            raise ValueError(f"{len(pairs)} counts; at most {cls.MAX_KEYS}")
        for i, (k, v) in enumerate(pairs):
            if not isinstance(k, str) or not k or len(k) > cls.MAX_KEY:
                raise ValueError(f"count key {k!r} is not a string of 1..{cls.MAX_KEY}")
            if i and pairs[i - 1][0] == k:
                raise ValueError(f"count key {k!r} appears twice")
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= cls.MAX_COUNT:
                raise ValueError(f"count {k!r}={v!r} is not in 0..{cls.MAX_COUNT}")
        return cls(pairs)

    def json(self) -> str:
        import json
        return json.dumps(dict(self), separators=(",", ":"))


_EMPTY_COUNTS = Counts()


def _type_name(hint: Any, default_int: str = "u64") -> str:
    if hint is str:
        return "str"
    if hint is bool:
        return "bool"
    if hint is int:
        return default_int
    raise TypeError(f"no storage type for {hint!r}")


def columns(cls: type, overrides: Mapping[str, str] = MappingProxyType({}),
            prefix: str = "") -> tuple[Column, ...]:
    """The storage columns of a dataclass, in field order (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        key = prefix + f.name
        if hint is Counts:
            out.append(Column(f.name, "counts"))
            continue
        if typing.get_origin(hint) is tuple:
            inner = typing.get_args(hint)[0]
            if dataclasses.is_dataclass(inner):
                out.append(Column(f.name, "list<struct>", inner,
                                  columns(inner, overrides, key + ".")))
            else:
                _type_name(inner)
                out.append(Column(f.name, "list<str>"))
            continue
        out.append(Column(f.name, overrides.get(key) or _type_name(hint)))
    return tuple(out)
