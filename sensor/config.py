"""Configuration for both daemons: /etc/loupe/sensor.toml and /etc/loupe/collector.toml.

The schema is the dataclasses below. Each field's name is its TOML key, and its metadata
holds the spec that validates and converts the TOML value, so the schema, the checker,
`loupe config show` and the example files in systemd/ cannot drift apart (tests/ops
parses the examples and compares both key sets).

Values arrive in the dataclasses already converted: durations as integer nanoseconds,
sizes as integer bytes, protocols as IP protocol numbers. A bad value raises ConfigError
naming the dotted key and why ("sensor.toml: selection.ports[1]: 70000 is not a port
(1..65535)"); an unknown key is an error too, because a misspelt key silently falling
back to its default is the worst kind of misconfiguration.

Command-line flags override the file: they are dotted keys ("selection.ports") merged into
the TOML table before validation, so a flag is checked exactly like the file would be.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sensor import capfilter
from sensor.errors import ConfigError
from sensor.flow.semantics import Timeouts

SENSOR_CONFIG_PATH = Path("/etc/loupe/sensor.toml")
COLLECTOR_CONFIG_PATH = Path("/etc/loupe/collector.toml")

MS = 1_000_000
S = 1_000 * MS
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# A config file larger than this is not a config file; refuse before reading it whole.
MAX_CONFIG_FILE_BYTES = 1 * MIB


class _Invalid(Exception):
    """Raised by a spec with the reason; the loader prefixes the key and the source."""


# --- value specs --------------------------------------------------------------------------


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


@dataclass(frozen=True, slots=True)
class _Int:
    lo: int
    hi: int

    def parse(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {_type_name(value)}")
        if not self.lo <= value <= self.hi:
            raise _Invalid(f"{value} is outside {self.lo}..{self.hi}")
        return value

    def from_text(self, text: str) -> object:
        try:
            return int(text, 0)
        except ValueError:
            raise _Invalid(f"{text!r} is not an integer") from None

    def to_toml(self, value: int) -> object:
        return value


@dataclass(frozen=True, slots=True)
class _Bool:
    def parse(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise _Invalid(f"expected true or false, got {_type_name(value)}")
        return value

    def from_text(self, text: str) -> object:
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise _Invalid(f"{text!r} is not a boolean (true/false)")

    def to_toml(self, value: bool) -> object:
        return value


@dataclass(frozen=True, slots=True)
class _Str:
    max_len: int
    pattern: str = ""            # full-match regex; "" accepts any text
    what: str = "text"           # how the error names an acceptable value

    def parse(self, value: object) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {_type_name(value)}")
        if len(value) > self.max_len:
            raise _Invalid(f"{len(value)} characters is longer than {self.max_len}")
        if value and self.pattern and not re.fullmatch(self.pattern, value):
            raise _Invalid(f"{value!r} is not {self.what}")
        return value

    def from_text(self, text: str) -> object:
        return text

    def to_toml(self, value: str) -> object:
        return value


@dataclass(frozen=True, slots=True)
class _Path:
    """An absolute path, or "" where the key allows turning the feature off."""

    allow_empty: bool

    def parse(self, value: object) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected a path string, got {_type_name(value)}")
        if not value:
            if self.allow_empty:
                return value
            raise _Invalid("must not be empty")
        # Relative paths would depend on the daemon's working directory, which systemd sets
        # to / : say so now rather than write files somewhere surprising.
        if not value.startswith("/"):
            raise _Invalid(f"{value!r} is not an absolute path")
        if "\0" in value or len(value) > 4095:
            raise _Invalid("is not a usable path")
        return value

    def from_text(self, text: str) -> object:
        return text

    def to_toml(self, value: str) -> object:
        return value


_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_DURATION_UNITS = {"d": 86400 * S, "h": 3600 * S, "m": 60 * S, "s": S, "ms": MS}


@dataclass(frozen=True, slots=True)
class _Duration:
    """"300s", "5m", "1h", "7d", "250ms" -> integer nanoseconds."""

    lo_ns: int
    hi_ns: int

    def parse(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, str):
            raise _Invalid(
                f"expected a duration string such as \"300s\" or \"5m\", got {_type_name(value)}"
            )
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            raise _Invalid(f"{value!r} is not a duration (a number and one of ms, s, m, h, d)")
        ns = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
        if not self.lo_ns <= ns <= self.hi_ns:
            raise _Invalid(
                f"{value} is outside {format_duration(self.lo_ns)}..{format_duration(self.hi_ns)}"
            )
        return ns

    def from_text(self, text: str) -> object:
        return text

    def to_toml(self, value: int) -> object:
        return format_duration(value)


def format_duration(ns: int) -> str:
    """The largest unit that states `ns` exactly: 300 s -> "5m", 1.5 s -> "1500ms"."""
    for unit, size in _DURATION_UNITS.items():
        if ns % size == 0:
            return f"{ns // size}{unit}"
    return f"{ns // MS}ms"


_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|TiB|kB|KB|MB|GB|TB)?")
_SIZE_UNITS = {"B": 1, "KiB": KIB, "MiB": MIB, "GiB": GIB, "TiB": 1024 * GIB,
               "kB": 1000, "KB": 1000, "MB": 10**6, "GB": 10**9, "TB": 10**12}


@dataclass(frozen=True, slots=True)
class _Size:
    """An integer number of bytes, or "64KiB", "8MiB", "1GiB" (and kB/MB/GB, decimal)."""

    lo: int
    hi: int
    power_of_two: bool = False

    def parse(self, value: object) -> int:
        if isinstance(value, bool):
            raise _Invalid("expected a size, got a boolean")
        if isinstance(value, int):
            size = value
        elif isinstance(value, str):
            match = _SIZE.fullmatch(value.strip())
            if match is None:
                raise _Invalid(f"{value!r} is not a size (bytes, or a number with KiB, MiB, GiB)")
            size = int(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"]
        else:
            raise _Invalid(f"expected a size such as \"8MiB\", got {_type_name(value)}")
        if not self.lo <= size <= self.hi:
            raise _Invalid(f"{value} is outside {format_size(self.lo)}..{format_size(self.hi)}")
        if self.power_of_two and size & (size - 1):
            raise _Invalid(f"{value} is not a power of two")
        return size

    def from_text(self, text: str) -> object:
        return text

    def to_toml(self, value: int) -> object:
        return format_size(value)


def format_size(size: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


@dataclass(frozen=True, slots=True)
class _Address:
    """host:port, [v6]:port. `listen` addresses must be IP literals (what to bind), and
    may use port 0 (any free port, for tests); peer addresses may be host names."""

    listen: bool
    allow_empty: bool

    def parse(self, value: object) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected \"host:port\", got {_type_name(value)}")
        if not value:
            if self.allow_empty:
                return value
            raise _Invalid("must not be empty")
        host, port = split_host_port(value)
        if not 0 <= port <= 65535 or (port == 0 and not self.listen):
            raise _Invalid(f"port {port} in {value!r} is not a port (1..65535)")
        if self.listen:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise _Invalid(f"{host!r} in {value!r} is not an IP address to listen on") from None
        elif not re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", host):
            raise _Invalid(f"{host!r} in {value!r} is not a host name or IP address")
        return value

    def from_text(self, text: str) -> object:
        return text

    def to_toml(self, value: str) -> object:
        return value


def split_host_port(address: str) -> tuple[str, int]:
    """"127.0.0.1:9464" -> ("127.0.0.1", 9464); "[::1]:9464" -> ("::1", 9464)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", address)
    if match is None:
        raise _Invalid(f"{address!r} is not host:port (IPv6 as [addr]:port)")
    host = match.group(1) or match.group(3)
    return host, int(match.group(2) or match.group(4))


def is_loopback_address(address: str) -> bool:
    """True for addresses that never leave the host, so plaintext to them is acceptable."""
    host, _ = split_host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class _Cidr:
    def parse(self, value: object) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected a CIDR string such as \"10.0.0.0/8\", got {_type_name(value)}")
        try:
            return str(ipaddress.ip_network(value, strict=True))
        except ValueError as exc:
            if "has host bits set" in str(exc):
                fixed = ipaddress.ip_network(value, strict=False)
                raise _Invalid(f"{value!r} has host bits set; did you mean {str(fixed)!r}?") from None
            raise _Invalid(f"{value!r} is not a CIDR network") from None

    def from_text(self, text: str) -> object:
        return text

    def to_toml(self, value: str) -> object:
        return value


PROTOCOL_NAMES = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}


@dataclass(frozen=True, slots=True)
class _Protocol:
    def parse(self, value: object) -> int:
        if isinstance(value, str):
            if value.lower() in PROTOCOL_NAMES:
                return PROTOCOL_NAMES[value.lower()]
            raise _Invalid(f"{value!r} is not one of {', '.join(PROTOCOL_NAMES)} or 0..255")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise _Invalid(f"{value!r} is not an IP protocol (a name or 0..255)")
        return value

    def from_text(self, text: str) -> object:
        return int(text) if text.isdigit() else text

    def to_toml(self, value: int) -> object:
        names = {number: name for name, number in PROTOCOL_NAMES.items()}
        return names.get(value, value)


@dataclass(frozen=True, slots=True)
class _Filter:
    """A capture filter in tcpdump's syntax (sensor/capfilter.py), or "" for none."""

    def parse(self, value: object) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected a filter string such as \"host 10.0.0.1 and port 22\", "
                           f"got {_type_name(value)}")
        if value.strip():
            try:
                capfilter.parse(value)
            except capfilter.FilterError as exc:
                raise _Invalid(str(exc)) from None
        return value.strip()

    def from_text(self, text: str) -> object:
        return text

    def to_toml(self, value: str) -> object:
        return value


@dataclass(frozen=True, slots=True)
class _List:
    item: Any
    max_items: int
    unique: bool = True

    def parse(self, value: object) -> tuple:
        if not isinstance(value, list):
            raise _Invalid(f"expected a list, got {_type_name(value)}")
        if len(value) > self.max_items:
            raise _Invalid(f"{len(value)} entries is more than the {self.max_items} allowed")
        items = []
        for index, entry in enumerate(value):
            try:
                items.append(self.item.parse(entry))
            except _Invalid as exc:
                raise _Invalid(f"[{index}]: {exc}") from None
        if self.unique and len(set(items)) != len(items):
            seen = [x for i, x in enumerate(items) if x in items[:i]]
            raise _Invalid(f"{seen[0]!r} is listed twice")
        return tuple(items)

    def from_text(self, text: str) -> object:
        # On the command line a list is comma-separated: --set selection.ports=80,443
        parts = [part.strip() for part in text.split(",") if part.strip()]
        return [self.item.from_text(part) for part in parts]

    def to_toml(self, value: tuple) -> object:
        return [self.item.to_toml(item) for item in value]


def _opt(default: Any, spec: Any) -> Any:
    return field(default=default, metadata={"spec": spec})


def _section(cls: type) -> Any:
    return field(default_factory=cls, metadata={"section": cls})


_IFNAME = _Str(15, r"[^/\s:]+", "an interface name")  # IFNAMSIZ is 16 with the NUL
_HEADER = _Str(64, r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", "an HTTP header name (RFC 9110 token)")
_QUERY_KEY = _Str(64, r"[^&=#\s]+", "a URL query key")
_SERVER_NAME = _Str(253, r"[A-Za-z0-9.-]+", "a DNS name")


# --- sensor.toml ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SelectionConfig:
    """Which flows userspace sees payload of; every flow is counted regardless.

    These are THE selection defaults: docs (docs/sensor.md "Defaults"), systemd/sensor.toml
    and --help are checked against them (tests/ops/test_defaults.py)."""

    # Bounds: the kernel keeps ports in a fixed-size map and CIDRs in an LPM trie whose
    # max_entries is fixed at load time; these are those sizes.
    ports: tuple[int, ...] = _opt((53, 80, 443, 8080), _List(_Int(1, 65535), 256))
    cidrs: tuple[str, ...] = _opt((), _List(_Cidr(), 1024))
    protocols: tuple[int, ...] = _opt((), _List(_Protocol(), 8))
    sample_one_in: int = _opt(1, _Int(1, 1_000_000))
    # On: HTTP, TLS and DNS on any port are parsed (an app on :18080 is what users try
    # first), for one ring-buffer copy of the first payload of each unselected flow.
    sniff: bool = _opt(True, _Bool())
    # Flows whose first packet matches this filter (tcpdump's host/net/port/proto syntax,
    # docs/sensor.md "Excluding traffic") are counted but never selected: no payload copy.
    exclude: str = _opt("", _Filter())
    # Also exclude the sensor's own TCP flows to collector.address and metrics.listen, so
    # it never parses its own export.
    exclude_own_traffic: bool = _opt(True, _Bool())


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetConfig:
    # At least 512 bytes: a budget of 0 copies no payload, so every selected flow would
    # be counted "inspected" and yield nothing (to turn L7 off, use --no-l7 or an empty
    # selection). 512 is the largest classic DNS message over UDP (RFC 1035 4.2.1), the
    # smallest transaction any parser reads whole, and holds a typical HTTP request head.
    per_direction_bytes: int = _opt(32 * KIB, _Size(512, 16 * MIB))
    max_in_flight_bytes: int = _opt(64 * MIB, _Size(1 * MIB, 4 * GIB))


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsConfig:
    tcp_idle: int = _opt(300 * S, _Duration(1 * S, 7 * 86400 * S))
    other_idle: int = _opt(60 * S, _Duration(1 * S, 7 * 86400 * S))
    active: int = _opt(1800 * S, _Duration(1 * S, 7 * 86400 * S))
    # At least 1 s: the linger after FIN both ways (or RST) catches the last ACK one RTT
    # later and a retransmitted FIN (Linux's smallest RTO is 200 ms); with 0 s those
    # packets start a new flow of their own, a phantom half-connection. The live reader
    # waits RETIRE_GUARD_NS (0.5 s) after the end anyway, so less would not be honoured.
    tcp_linger: int = _opt(5 * S, _Duration(1 * S, 300 * S))

    def to_timeouts(self) -> Timeouts:
        return Timeouts(tcp_idle_ns=self.tcp_idle, other_idle_ns=self.other_idle,
                        active_ns=self.active, tcp_end_linger_ns=self.tcp_linger)


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectorClientConfig:
    address: str = _opt("127.0.0.1:50051", _Address(listen=False, allow_empty=True))
    # Several collectors (in front of one shared ClickHouse, docs/scaling.md): batches are
    # spread over them and fail over; when not empty this list is used instead of address.
    # At most 16: each costs a thread, a channel and a window of batches.
    addresses: tuple[str, ...] = _opt((), _List(_Address(listen=False, allow_empty=False), 16))
    ca_file: str = _opt("", _Path(allow_empty=True))
    cert_file: str = _opt("", _Path(allow_empty=True))
    key_file: str = _opt("", _Path(allow_empty=True))
    server_name: str = _opt("", _SERVER_NAME)
    insecure: bool = _opt(False, _Bool())

    def targets(self) -> tuple[str, ...]:
        """The collectors records go to: addresses, else address; () for none."""
        return self.addresses or ((self.address,) if self.address else ())


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolConfig:
    dir: str = _opt("/var/lib/loupe/spool", _Path(allow_empty=False))
    max_bytes: int = _opt(1 * GIB, _Size(1 * MIB, 1024 * GIB))


_IPFIX_TARGET = _Str(300, r"((?i:udp|tcp)://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):\d{1,5}",
                     "HOST:PORT, udp://HOST:PORT or tcp://HOST:PORT")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportConfig:
    queue_size: int = _opt(10_000, _Int(100, 10_000_000))
    batch_size: int = _opt(500, _Int(1, 100_000))
    batch_delay: int = _opt(1 * S, _Duration(10 * MS, 60 * S))
    jsonl: str = _opt("", _Path(allow_empty=True))
    # IPFIX (sensor/export/ipfix.py): the target, "" = off; the checks here are the
    # syntax, the exporter checks the port and resolves the name at start.
    ipfix: str = _opt("", _IPFIX_TARGET)
    ipfix_domain: int = _opt(0, _Int(0, 0xFFFFFFFF))
    ipfix_pen: int = _opt(32473, _Int(1, 0xFFFFFFFF))
    ipfix_uniflow: bool = _opt(False, _Bool())


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    listen: str = _opt("127.0.0.1:9464", _Address(listen=True, allow_empty=True))


@dataclass(frozen=True, slots=True, kw_only=True)
class RedactionConfig:
    enabled: bool = _opt(True, _Bool())
    extra_headers: tuple[str, ...] = _opt((), _List(_HEADER, 64))
    extra_query_keys: tuple[str, ...] = _opt((), _List(_QUERY_KEY, 64))


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessConfig:
    attribution: bool = _opt(True, _Bool())
    cache_ttl: int = _opt(30 * S, _Duration(1 * S, 3600 * S))
    cache_size: int = _opt(4096, _Int(16, 1_000_000))


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelConfig:
    flow_map_size: int = _opt(65536, _Int(1024, 16 * 1024 * 1024))
    # BPF_MAP_TYPE_RINGBUF requires a power-of-two multiple of the page size.
    ringbuf_size: int = _opt(8 * MIB, _Size(64 * KIB, 1 * GIB, power_of_two=True))


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsPlaintextConfig:
    """Plaintext of TLS connections at the TLS libraries' calls (docs/tls-plaintext.md).
    Off by default: it sees secrets ([redaction] applies as on the wire)."""

    enabled: bool = _opt(False, _Bool())
    # Octets copied per connection and direction before userspace grants more; at least
    # 512 as budget.per_direction_bytes. 16 KiB: a dozen HTTP heads, room for the grants
    # of a userspace a few ms behind a fast keep-alive connection.
    budget_bytes: int = _opt(16 * KIB, _Size(512, 16 * MIB))
    # Selection (each empty: all). Process names as the kernel's comm (15 characters);
    # cgroup v2 directories (absolute, or under the v2 mount); ports of either end.
    # Bounds: the kernel's selection maps hold 1024 entries.
    processes: tuple[str, ...] = _opt((), _List(_Str(15, r"[^\x00]+", "a process name"), 1024))
    cgroups: tuple[str, ...] = _opt((), _List(_Str(4095, r"[^\x00]+", "a cgroup directory"),
                                              1024))
    ports: tuple[int, ...] = _opt((), _List(_Int(1, 65535), 256))
    # How often the maps of new processes are read for TLS libraries of other inodes.
    rescan: int = _opt(5 * S, _Duration(1 * S, 3600 * S))


@dataclass(frozen=True, slots=True, kw_only=True)
class RulesConfig:
    """The rules engine (docs/rules.md): Alerts from every L7 event. Off by default: it
    reads request contents (bounded) and costs CPU per event. SIGHUP re-reads the files."""

    enabled: bool = _opt(False, _Bool())
    # A directory of *.toml rule files (read in name order), one file, or "default" (the
    # built-in managed groups in alert mode and the behaviour rules).
    path: str = _opt("/etc/loupe/rules.d", _Str(4095, r"[^\x00]+", "a path or 'default'"))


@dataclass(frozen=True, slots=True, kw_only=True)
class PiiConfig:
    """PII statistics (docs/pii.md): occurrences per type in HTTP requests and sampled
    responses, counted in the sensor; no value ever leaves it. Off by default: it keeps
    request heads and body prefixes and costs CPU per HTTP event."""

    enabled: bool = _opt(False, _Bool())
    # Request body prefix counted (form and JSON bodies of methods with a body).
    body_bytes: int = _opt(8192, _Int(0, 1 << 20))
    # Response body prefix sampled (JSON, form, XML and text responses); 0 is none.
    response_bytes: int = _opt(4096, _Int(0, 1 << 20))
    # Every Nth such response of a connection is sampled (1: every one).
    response_every: int = _opt(1, _Int(1, 1_000_000))


@dataclass(frozen=True, slots=True, kw_only=True)
class GeoipConfig:
    """Geo and ASN of each flow end (sensor/enrich/geo.py, docs/geo.md) from MaxMind-format
    databases. Off by default: the packaged database is a 2018 build, so an estate that
    wants geo names its own current file."""

    enabled: bool = _opt(False, _Bool())
    # A .mmdb with country and city (GeoLite2/GeoIP2 City, DB-IP City Lite, ...); "" is
    # the GeoLite2 City file the maxminddb-geolite2 package ships.
    database: str = _opt("", _Path(allow_empty=True))
    # A .mmdb with autonomous_system_number (GeoLite2 ASN) when the ASN comes in a second
    # file; "" reads the ASN from `database`, if it has one.
    asn_database: str = _opt("", _Path(allow_empty=True))


@dataclass(frozen=True, slots=True, kw_only=True)
class EnforceConfig:
    """Kernel enforcement of the rules' block verdicts (docs/rules.md, "Enforcement"): the
    flow is dropped both ways and both ends reset; a rule may ban the source for a TTL;
    `loupe block` adds, lists and deletes bans. Fails open: a dead sensor's blocks stop
    within 3 s (docs/ops.md)."""

    enabled: bool = _opt(True, _Bool())
    # bpffs directory where the verdict maps are pinned for `loupe block` (mounted at
    # /sys/fs/bpf if nothing is). One sensor per directory.
    pin_dir: str = _opt("/sys/fs/bpf/loupe", _Str(4095, r"/[^\x00]*", "an absolute path"))
    # Hold mode (docs/rules.md, "Hold mode"): services, "ADDRESS:PORT" (IPv6 as
    # "[ADDRESS]:PORT"), whose responses the kernel holds back until their request's
    # verdict, so that nothing of a blocked response leaks; empty: none. Their requests
    # must be HTTP/1 in the selection: an unjudged request waits hold_max.
    hold: tuple[str, ...] = _opt((), _List(_Address(listen=True, allow_empty=False), 256))
    # The longest a held response waits after its request's last packet; then it passes
    # (fail open).
    hold_max: int = _opt(1 * S, _Duration(10 * MS, 10 * S))
    # After an allow, send the server a duplicate ACK as from the client, so its TCP
    # sends the held response now instead of at its next retransmission (>= 200 ms).
    hold_nudge: bool = _opt(True, _Bool())


@dataclass(frozen=True, slots=True, kw_only=True)
class DdosConfig:
    """L7 DDoS detection and mitigation (docs/rules.md, "DDoS"): request, error and new-flow
    rates per source and service, a learned baseline, HTTP floods, flow/SYN floods and slow
    requests. Off by default. Mitigations ("block", "ratelimit") need [enforce]."""

    enabled: bool = _opt(False, _Bool())
    # Rates are averaged over this sliding window; the baseline takes one sample a window.
    window: int = _opt(5 * S, _Duration(1 * S, 300 * S))
    # The baseline applies once it holds this much history (absolute floors until then).
    learn: int = _opt(600 * S, _Duration(0, 7 * 86400 * S))
    # How much history the baseline keeps (its percentiles are over this).
    history: int = _opt(3600 * S, _Duration(1 * S, 7 * 86400 * S))
    # A learned threshold is factor x the baseline's p99 (never below the floors below).
    factor: int = _opt(4, _Int(1, 1000))
    # Floors, per second: one source's requests; one service's requests from all sources;
    # the rate from which a flood names a source; one service's new flows.
    source_rps: int = _opt(50, _Int(1, 10_000_000))
    service_rps: int = _opt(500, _Int(1, 100_000_000))
    source_floor_rps: int = _opt(5, _Int(1, 10_000_000))
    flows_ps: int = _opt(200, _Int(1, 100_000_000))
    # Slow requests: this many incomplete request heads to one service, each this old.
    slow_heads: int = _opt(50, _Int(1, 1_000_000))
    slow_head_age: int = _opt(5 * S, _Duration(1 * S, 3600 * S))
    # Sources named (and mitigated) per alert, busiest first.
    top: int = _opt(10, _Int(1, 32))
    # What happens to the named sources: "count" (the alert only), "block" (a source ban
    # for ttl) or "ratelimit" (a token bucket per source in the kernel for ttl).
    mitigation: str = _opt("count", _Str(9, r"count|block|ratelimit",
                                         "count, block or ratelimit"))
    ttl: int = _opt(300 * S, _Duration(1 * S, 7 * 86400 * S))
    # ratelimit: packets a second per source that open a connection or carry payload,
    # and the bucket's size.
    rate: int = _opt(20, _Int(1, 1_000_000))
    burst: int = _opt(40, _Int(1, 10_000_000))


@dataclass(frozen=True, slots=True, kw_only=True)
class SensorConfig:
    sensor_id: str = _opt("", _Str(64, r"[A-Za-z0-9._-]+", "letters, digits, '.', '_' or '-'"))
    interfaces: tuple[str, ...] = _opt((), _List(_IFNAME, 64))
    selection: SelectionConfig = _section(SelectionConfig)
    budget: BudgetConfig = _section(BudgetConfig)
    timeouts: TimeoutsConfig = _section(TimeoutsConfig)
    collector: CollectorClientConfig = _section(CollectorClientConfig)
    spool: SpoolConfig = _section(SpoolConfig)
    export: ExportConfig = _section(ExportConfig)
    metrics: MetricsConfig = _section(MetricsConfig)
    redaction: RedactionConfig = _section(RedactionConfig)
    process: ProcessConfig = _section(ProcessConfig)
    kernel: KernelConfig = _section(KernelConfig)
    tls_plaintext: TlsPlaintextConfig = _section(TlsPlaintextConfig)
    rules: RulesConfig = _section(RulesConfig)
    pii: PiiConfig = _section(PiiConfig)
    enforce: EnforceConfig = _section(EnforceConfig)
    ddos: DdosConfig = _section(DdosConfig)
    geoip: GeoipConfig = _section(GeoipConfig)

    def effective_sensor_id(self) -> str:
        """sensor_id, or the host name when it is empty (the documented default)."""
        return self.sensor_id or socket.gethostname()


# --- collector.toml ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTlsConfig:
    cert_file: str = _opt("", _Path(allow_empty=True))
    key_file: str = _opt("", _Path(allow_empty=True))
    client_ca_file: str = _opt("", _Path(allow_empty=True))


@dataclass(frozen=True, slots=True, kw_only=True)
class ClickHouseConfig:
    # The native protocol (clickhouse-driver), not HTTP: 9000 is the server's tcp_port.
    host: str = _opt("127.0.0.1", _Str(253, r"[A-Za-z0-9.:_-]+", "a host name or IP address"))
    port: int = _opt(9000, _Int(1, 65535))
    database: str = _opt("loupe", _Str(64, r"[A-Za-z_][A-Za-z0-9_]*", "a database name"))
    user: str = _opt("default", _Str(64, r"[A-Za-z0-9._-]+", "a user name"))
    password: str = _opt("", _Str(256))
    # A remote_servers cluster name: tables are made ON CLUSTER, sharded under a
    # Distributed table of the same name (docs/scaling.md). "" = one server.
    cluster: str = _opt("", _Str(64, r"[A-Za-z_][A-Za-z0-9_]*", "a cluster name"))


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    # "duckdb": one embedded file in data_dir; "clickhouse": a server shared by collectors.
    backend: str = _opt("duckdb", _Str(16, r"duckdb|clickhouse", "duckdb or clickhouse"))
    clickhouse: ClickHouseConfig = _section(ClickHouseConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    # The other collectors in front of the same store: live streams (`loupe tail`) here
    # also carry the records they receive (collector/fanout.py, docs/scaling.md). List
    # every other collector on each one. At most 64, the subscriber bound of a collector.
    peers: tuple[str, ...] = _opt((), _List(_Address(listen=False, allow_empty=False), 64))
    # Under mTLS: the client certificate and key presented to the peers (an analyst
    # certificate from `loupe certs init`); their CA is tls.client_ca_file.
    cert_file: str = _opt("", _Path(allow_empty=True))
    key_file: str = _opt("", _Path(allow_empty=True))


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectorIpfixConfig:
    # IPFIX export of every stored flow (collector/ipfix.py, docs/export.md), to each
    # target spelled as the sensor's export.ipfix; [] = off. At most 8: each costs the
    # export thread one encode and send per flow.
    targets: tuple[str, ...] = _opt((), _List(_IPFIX_TARGET, 8))
    pen: int = _opt(32473, _Int(1, 0xFFFFFFFF))
    uniflow: bool = _opt(False, _Bool())
    # Flows waiting for the export thread; past it they are dropped and counted.
    queue_size: int = _opt(65536, _Int(1000, 10_000_000))


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    # A reference OpenAPI document (YAML or JSON) the collector checks its endpoint
    # inventory against every minute; each new finding (shadow, zombie, unused, drift,
    # as `loupe api diff`) becomes an Alert (collector/inventory/api_alerts.py,
    # docs/inventory.md). "" = off.
    spec: str = _opt("", _Path(allow_empty=True))
    # The services (host:port globs, as `loupe api diff --service`) the spec describes;
    # [] = every service the inventory holds.
    services: tuple[str, ...] = _opt((), _List(_Str(260, r"[^\s]+", "a host:port glob"), 64))
    # The finding kinds that become Alerts.
    alert: tuple[str, ...] = _opt(("shadow", "zombie", "unused", "drift"), _List(
        _Str(6, r"shadow|zombie|unused|drift", "shadow, zombie, unused or drift"), 4))
    # An operation of the spec is an "unused" finding only after it has been watched
    # this long without traffic matching it (a new inventory has seen nothing yet).
    unused_after: int = _opt(7 * 86400 * S, _Duration(0, 3650 * 86400 * S))


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectorConfig:
    listen: str = _opt("127.0.0.1:50051", _Address(listen=True, allow_empty=False))
    insecure: bool = _opt(False, _Bool())
    data_dir: str = _opt("/var/lib/loupe/collector", _Path(allow_empty=False))
    retention: int = _opt(7 * 86400 * S, _Duration(1 * S, 3650 * 86400 * S))
    max_message_size: int = _opt(16 * MIB, _Size(64 * KIB, 1 * GIB))
    # A columnar batch's Arrow buffers once decompressed, at most: a compressed stream
    # declares its own size, so this is checked from its metadata before anything is
    # allocated (sensor/export/arrow_ipc.py). Never below max_message_size.
    max_columnar_size: int = _opt(64 * MIB, _Size(1 * MIB, 4 * GIB))
    subscriber_queue_size: int = _opt(4096, _Int(16, 1_000_000))
    # The web console (collector/ui, docs/console.md): HOST:PORT, "" = off. Under mTLS
    # it is HTTPS with the gRPC API's certificates and roles.
    ui: str = _opt("", _Address(listen=True, allow_empty=True))
    tls: ServerTlsConfig = _section(ServerTlsConfig)
    storage: StorageConfig = _section(StorageConfig)
    cluster: ClusterConfig = _section(ClusterConfig)
    api: ApiConfig = _section(ApiConfig)
    ipfix: CollectorIpfixConfig = _section(CollectorIpfixConfig)
    metrics: MetricsConfig = field(
        default_factory=lambda: MetricsConfig(listen="127.0.0.1:9465"),
        metadata={"section": MetricsConfig},
    )


CONFIG_KINDS: dict[str, type] = {"sensor": SensorConfig, "collector": CollectorConfig}
DEFAULT_PATHS: dict[str, Path] = {"sensor": SENSOR_CONFIG_PATH, "collector": COLLECTOR_CONFIG_PATH}


# --- building and checking ----------------------------------------------------------------------


class ConfigProblems(ConfigError):
    """Every problem found in one configuration, in file order. `loupe config check`
    prints one per line; a daemon's one-line error joins them with "; "."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def _build(cls: type, table: Mapping[str, Any], prefix: str, source: str,
           problems: dict[str, str]) -> Any:
    """The config dataclass; a bad key is recorded in `problems` (key -> message) and
    takes its default, so that one pass finds every bad key of a file."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            known = ", ".join(fields)
            problems[prefix + key] = f"{source}: {prefix}{key}: unknown key (known here: {known})"
    defaults = cls()
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        values[name] = getattr(defaults, name)
        if name not in table:
            continue
        if "section" in f.metadata:
            sub = table[name]
            if not isinstance(sub, dict):
                problems[key] = f"{source}: {key}: expected a [{key}] table, got {_type_name(sub)}"
                continue
            merged = {**_as_table(getattr(defaults, name)), **sub}
            values[name] = _build(f.metadata["section"], merged, key + ".", source, problems)
        else:
            try:
                values[name] = f.metadata["spec"].parse(table[name])
            except _Invalid as exc:
                # A list item's reason starts with its index: "ports[1]: ...".
                sep = "" if str(exc).startswith("[") else ": "
                problems[key] = f"{source}: {key}{sep}{exc}"
    return cls(**values)


def _as_table(config: Any) -> dict[str, Any]:
    """A config dataclass back into its TOML table (durations and sizes as strings)."""
    table: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if "section" in f.metadata:
            table[f.name] = _as_table(value)
        else:
            table[f.name] = f.metadata["spec"].to_toml(value)
    return table


# Checks across keys yield (the keys they read, the message). One whose keys already had
# a problem of their own is skipped: it would judge a default, not the file.

def _check_sensor(config: SensorConfig, source: str):
    client = config.collector
    tls = {"ca_file": client.ca_file, "cert_file": client.cert_file, "key_file": client.key_file}
    tls_keys = [f"collector.{k}" for k in tls]
    if any(tls.values()) and not all(tls.values()):
        missing = ", ".join(f"collector.{k}" for k, v in tls.items() if not v)
        yield tls_keys, (f"{source}: {missing}: mutual TLS needs ca_file, cert_file and "
                         "key_file together; set the missing ones or clear all three")
    key = "collector.addresses" if client.addresses else "collector.address"
    for address in client.targets():
        if not any(tls.values()) and not client.insecure and not is_loopback_address(address):
            yield [key, "collector.insecure", *tls_keys], (
                f"{source}: {key}: {address} is not a loopback address and no TLS is "
                "configured; set collector.ca_file/cert_file/key_file, or insecure = true")
            break
    if config.export.batch_size > config.export.queue_size:
        yield ["export.batch_size", "export.queue_size"], (
            f"{source}: export.batch_size: {config.export.batch_size} is larger "
            f"than export.queue_size ({config.export.queue_size})")
    if config.budget.per_direction_bytes > config.budget.max_in_flight_bytes:
        yield ["budget.per_direction_bytes", "budget.max_in_flight_bytes"], (
            f"{source}: budget.per_direction_bytes: larger than "
            "budget.max_in_flight_bytes, so no flow could ever be inspected whole")


def _check_collector(config: CollectorConfig, source: str):
    tls = {"cert_file": config.tls.cert_file, "key_file": config.tls.key_file,
           "client_ca_file": config.tls.client_ca_file}
    tls_keys = [f"tls.{k}" for k in tls]
    if any(tls.values()) and not all(tls.values()):
        missing = ", ".join(f"tls.{k}" for k, v in tls.items() if not v)
        yield tls_keys, (f"{source}: {missing}: mutual TLS needs cert_file, key_file and "
                         "client_ca_file together; set the missing ones or clear all three")
    if not any(tls.values()) and not config.insecure and not is_loopback_address(config.listen):
        yield ["listen", "insecure", *tls_keys], (
            f"{source}: listen: {config.listen} is not a loopback address and no TLS is "
            "configured; set tls.cert_file/key_file/client_ca_file, or insecure = true")


_CHECKS = {SensorConfig: _check_sensor, CollectorConfig: _check_collector}


def _apply_overrides(cls: type, table: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Merge dotted-key overrides into `table` in place. String values from the command
    line are converted to the key's TOML type first (lists are comma-separated)."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        target_cls, target = cls, table
        for depth, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(target_cls)}
            f = fields.get(part)
            if f is None:
                raise ConfigError(f"command line: {dotted}: unknown key "
                                  f"(known here: {', '.join(fields)})")
            if "section" in f.metadata:
                if depth == len(parts) - 1:
                    raise ConfigError(f"command line: {dotted}: is a section; name a key in it")
                target_cls = f.metadata["section"]
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target = target[part]
                continue
            if depth != len(parts) - 1:
                raise ConfigError(f"command line: {dotted}: {part} is not a section")
            if isinstance(value, str):
                try:
                    value = f.metadata["spec"].from_text(value)
                except _Invalid as exc:
                    raise ConfigError(f"command line: {dotted}: {exc}") from None
            elif isinstance(value, tuple):
                value = list(value)
            target[part] = value


def parse_config(kind: str, table: Mapping[str, Any], *, source: str,
                 overrides: Mapping[str, Any] | None = None) -> Any:
    """Validate a TOML table (plus overrides) into SensorConfig or CollectorConfig."""
    cls = CONFIG_KINDS[kind]
    merged = _deep_copy(table)
    if overrides:
        _apply_overrides(cls, merged, overrides)
        source = f"{source} (with command-line overrides)"
    problems: dict[str, str] = {}
    config = _build(cls, merged, "", source, problems)
    messages = list(problems.values())
    for keys, message in _CHECKS[cls](config, source):
        if not any(k in problems or k.split(".")[0] in problems for k in keys):
            messages.append(message)
    if messages:
        raise ConfigProblems(messages)
    return config


def _deep_copy(table: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in table.items()}


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {format_size(MAX_CONFIG_FILE_BYTES)}; "
                          "not a Loupe config file")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; TOML files must be UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(kind: str, path: Path | None = None, *,
                overrides: Mapping[str, Any] | None = None) -> Any:
    """Load /etc/loupe/{kind}.toml (or `path`), with overrides. A missing default file
    means all defaults, so the daemon runs unconfigured; a missing explicit file is an
    error, because the user asked for that file."""
    if path is None:
        path = DEFAULT_PATHS[kind]
        if not path.exists():
            return parse_config(kind, {}, source=f"defaults ({path} absent)", overrides=overrides)
    return parse_config(kind, read_toml(path), source=str(path), overrides=overrides)


def load_sensor_config(path: Path | None = None, *,
                       overrides: Mapping[str, Any] | None = None) -> SensorConfig:
    return load_config("sensor", path, overrides=overrides)


def load_collector_config(path: Path | None = None, *,
                          overrides: Mapping[str, Any] | None = None) -> CollectorConfig:
    return load_config("collector", path, overrides=overrides)


def schema_keys(kind: str) -> set[str]:
    """Every dotted key the schema accepts ("selection.ports", "sensor_id")."""
    keys: set[str] = set()

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            if "section" in f.metadata:
                walk(f.metadata["section"], f"{prefix}{f.name}.")
            else:
                keys.add(prefix + f.name)

    walk(CONFIG_KINDS[kind], "")
    return keys


# --- rendering ------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


# Keys whose values `loupe config show` does not print (a password set in the file).
SECRET_KEYS = frozenset(("password",))
HIDDEN = "(set; hidden)"


def config_to_toml(config: Any, *, hide_secrets: bool = False) -> str:
    """The effective configuration as TOML that parses back to the same config; with
    hide_secrets, a set SECRET_KEYS value is replaced by HIDDEN (which does not)."""
    table = _as_table(config)
    if hide_secrets:
        table = _hidden(table)
    return "\n".join(_toml_lines(table, "")) + "\n"


def _hidden(table: dict[str, Any]) -> dict[str, Any]:
    return {k: _hidden(v) if isinstance(v, dict) else
            (HIDDEN if k in SECRET_KEYS and v else v) for k, v in table.items()}


def _toml_lines(table: dict[str, Any], prefix: str) -> list[str]:
    """A table's keys, then each sub-table as [prefix.name] ([storage.clickhouse])."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for name, sub in table.items():
        if isinstance(sub, dict):
            lines += ["", f"[{prefix}{name}]"] + _toml_lines(sub, f"{prefix}{name}.")
    return lines


# --- command line ---------------------------------------------------------------------------------


# The --set example each daemon's --help shows: a key of that daemon's own schema
# (tests/ops/test_config.py parses each one with it).
SET_EXAMPLES = {"sensor": "selection.ports=80,443", "collector": "retention=3d"}


def add_config_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """--config and --set for a daemon's parser; config_from_args() reads them back."""
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help=f"configuration file (default {DEFAULT_PATHS[kind]}; all defaults if absent)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="config_set",
        help=f"override one key, e.g. --set {SET_EXAMPLES[kind]} (repeatable; wins over the file)")


def parse_set_arguments(items: list[str]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"command line: --set {item!r}: expected KEY=VALUE, "
                              "e.g. --set timeouts.tcp_idle=10m")
        overrides[key.strip()] = value.strip()
    return overrides


def config_from_args(args: argparse.Namespace, kind: str,
                     extra_overrides: Mapping[str, Any] | None = None) -> Any:
    """The config a daemon should run with: file, then --set, then its own flags
    (`extra_overrides`, dotted keys; None values are flags the user did not give)."""
    overrides: dict[str, Any] = parse_set_arguments(getattr(args, "config_set", []) or [])
    for key, value in (extra_overrides or {}).items():
        if value is not None:
            overrides[key] = value
    return load_config(kind, getattr(args, "config", None), overrides=overrides)
