"""What `loupe top` shows, computed from records: records in, panel rows out (sans-I/O).

No gRPC, terminal or clock in here: the caller passes every record with the time it
arrived (`now_ns`) and asks for rows at a time of its choosing, so tests drive it with
real records and a made-up clock.

Rates and error shares are over *arrival* time, in one-second buckets over the last 10 s
and 60 s: a replayed capture or a sensor's spooled backlog carries old timestamps, and
the view answers "what is arriving now". Totals count everything since the view started.

Bounds. Every table holds at most `max_keys` keys. Past that, the quarter seen least
recently is dropped in one pass (amortised O(log n) per new key), except the `PROTECT`
heaviest keys by the table's main weight, so a burst of one-off keys (a scan) cannot push
the top talkers out of the view. Evicted keys are counted and shown in the panel title:
loss is data. Latency percentiles are over each key's last `LATENCY_SAMPLES` responses.
Endpoint paths are templated (ids become `:id`) and each host keeps at most
`PATHS_PER_HOST` of them; further paths of that host are counted under `(other paths)`.
"""

from __future__ import annotations

import collections
import heapq
import re
from dataclasses import dataclass, field
from typing import Callable

from sensor import model

NS = 1_000_000_000
SHORT_S = 10
LONG_S = 60

# 1000 keys per table: far more rows than a terminal shows, and the view's whole state
# stays around a few MiB (each key holds at most LONG_S buckets and LATENCY_SAMPLES ints).
MAX_KEYS = 1000
# Keys an eviction never drops: more than a full-screen panel shows.
PROTECT = 100
LATENCY_SAMPLES = 256
PATHS_PER_HOST = 100
PATH_CHARS = 80
OTHER_PATHS = "(other paths)"

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp"}
RCODE_NAMES = {-1: "no-response", 0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN",
               4: "NOTIMP", 5: "REFUSED", 6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET",
               9: "NOTAUTH", 10: "NOTZONE"}
# DNS answers in the services' 4xx and 5xx columns, by analogy with HTTP: the client
# asked for something wrong (NXDOMAIN ~ 404, FORMERR ~ 400, REFUSED ~ 403) or the server
# failed (SERVFAIL ~ 503, NOTIMP ~ 501, no response ~ 504, anything else).
DNS_CLIENT_ERRORS = frozenset((1, 3, 5))

_ID_SEGMENT = re.compile(
    r"^(\d+|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|(?=[^/]*\d)[0-9a-fA-F]{16,}|[A-Za-z0-9_-]{24,})$")


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def path_template(path: str) -> str:
    """/item/8812?x=1 -> /item/:id. Numbers, UUIDs, long hex and long tokens become :id,
    so one endpoint is one row however many ids it serves."""
    path = path.split("?", 1)[0].split("#", 1)[0] or "/"
    path = "/".join(":id" if _ID_SEGMENT.match(s) else s for s in path.split("/"))
    return path if len(path) <= PATH_CHARS else path[:PATH_CHARS - 1] + "…"


def percentile(sorted_values: list[int], q: float) -> int | None:
    """Nearest-rank percentile of an ascending list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil
    return sorted_values[int(rank) - 1]


class Window:
    """Sums of a few counters over the last LONG_S seconds, in one-second buckets.
    Only seconds with activity hold a bucket, so an idle key costs nothing."""

    __slots__ = ("buckets", "width")

    def __init__(self, width: int) -> None:
        self.width = width
        self.buckets: collections.deque[list[int]] = collections.deque()

    def add(self, sec: int, *values: int) -> None:
        if self.buckets and self.buckets[-1][0] >= sec:
            bucket = self.buckets[-1]  # same second (or the clock stepped back)
        else:
            bucket = [sec] + [0] * self.width
            self.buckets.append(bucket)
            while self.buckets[0][0] <= sec - LONG_S:
                self.buckets.popleft()
        for i, v in enumerate(values, 1):
            bucket[i] += v

    def sums(self, now_sec: int, span_s: int) -> list[int]:
        out = [0] * self.width
        for bucket in reversed(self.buckets):
            if bucket[0] <= now_sec - span_s:
                break
            for i in range(self.width):
                out[i] += bucket[i + 1]
        return out


class Table:
    """A dict of entries with at most max_keys keys (see the module note on eviction)."""

    def __init__(self, max_keys: int, weight: Callable[[object], int],
                 on_evict: Callable[[object], None] | None = None) -> None:
        self.max_keys = max_keys
        self.weight = weight
        self.on_evict = on_evict
        self.entries: dict = {}
        self.evicted = 0

    def get(self, key, make: Callable[[], object]):
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.max_keys:
                self._evict()
            entry = self.entries[key] = make()
        return entry

    def _evict(self) -> None:
        keep = self.max_keys * 3 // 4
        protected = {id(e) for e in heapq.nlargest(
            min(PROTECT, keep), self.entries.values(), key=self.weight)}
        by_age = sorted(self.entries.items(), key=lambda kv: kv[1].last_ns)
        drop = len(self.entries) - keep
        for key, entry in by_age:
            if drop <= 0:
                break
            if id(entry) in protected:
                continue
            del self.entries[key]
            if self.on_evict is not None:
                self.on_evict(key)
            self.evicted += 1
            drop -= 1


@dataclass(slots=True)
class Talker:
    flows: int = 0
    packets: int = 0
    octets: int = 0
    last_ns: int = 0
    window: Window = field(default_factory=lambda: Window(2))  # octets, packets


@dataclass(slots=True)
class Service:
    requests: int = 0
    flows: int = 0
    last_ns: int = 0
    window: Window = field(default_factory=lambda: Window(3))  # requests, 4xx, 5xx
    latencies: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_SAMPLES))


@dataclass(slots=True)
class Endpoint:
    requests: int = 0
    status: int = 0
    last_ns: int = 0
    window: Window = field(default_factory=lambda: Window(1))
    latencies: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_SAMPLES))


@dataclass(slots=True)
class Counted:
    """A DNS error (qname, rcode) or a loss source (source, sensor)."""

    count: int = 0
    records: int = 0
    last_ns: int = 0
    window: Window = field(default_factory=lambda: Window(1))


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    # text | int | bytes | rate | bytes_rate | pct | ns: how to show it; text sorts
    # ascending, the rest descending.
    kind: str


@dataclass(frozen=True, slots=True)
class Panel:
    """One panel's rows, sorted and cut, values raw (format_cell shows them)."""

    name: str
    title: str
    columns: tuple[Column, ...]
    rows: list[tuple]
    sort: int
    keys: int
    evicted: int


PANELS = ("services", "talkers", "endpoints", "dns", "lost")

COLUMNS: dict[str, tuple[Column, ...]] = {
    "services": (Column("service", "text"), Column("proto", "text"),
                 Column("req", "int"), Column("req/s 10s", "rate"),
                 Column("req/s 60s", "rate"), Column("4xx 60s", "pct"),
                 Column("5xx 60s", "pct"), Column("p50", "ns"), Column("p95", "ns"),
                 Column("flows", "int")),
    "talkers": (Column("hosts", "text"), Column("flows", "int"), Column("packets", "int"),
                Column("bytes", "bytes"), Column("bytes/s 10s", "bytes_rate")),
    "endpoints": (Column("endpoint", "text"), Column("req", "int"),
                  Column("req/s 60s", "rate"), Column("p50", "ns"), Column("p95", "ns"),
                  Column("max", "ns"), Column("status", "int")),
    "dns": (Column("qname", "text"), Column("rcode", "text"), Column("count", "int"),
            Column("60s", "int")),
    "lost": (Column("source", "text"), Column("sensor", "text"), Column("lost", "int"),
             Column("60s", "int"), Column("reports", "int")),
}
# The column each panel sorts by until a key says otherwise.
DEFAULT_SORT = {"services": "req/s 60s", "talkers": "bytes", "endpoints": "p95",
                "dns": "count", "lost": "lost"}
TITLES = {"services": "Services", "talkers": "Top talkers", "endpoints": "Slowest endpoints",
          "dns": "DNS errors", "lost": "Lost events"}


def sort_choices(panel: str) -> list[int]:
    """Indexes of the columns a panel can be sorted by (every numeric one)."""
    return [i for i, c in enumerate(COLUMNS[panel]) if c.kind != "text"]


class TopModel:
    """Aggregates records into the five panels. Not thread-safe: one feeder, and the
    caller serialises reads (collector/top.py holds a lock)."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.records = 0
        # Records the collector dropped for this view because it fell behind: the
        # numbers on screen undercount by this much.
        self.view_lost = 0
        self.rate = Window(1)
        self.by_pair = True  # talkers by host pair, else by address
        self._paths_per_host: collections.Counter = collections.Counter()
        self.tables = {
            "services": Table(max_keys, lambda e: e.requests + e.flows),
            "pairs": Table(max_keys, lambda e: e.octets),
            "addrs": Table(max_keys, lambda e: e.octets),
            "endpoints": Table(max_keys, lambda e: e.requests, self._forget_path),
            "dns": Table(max_keys, lambda e: e.count),
            "lost": Table(max_keys, lambda e: e.count),
        }

    # -- feeding ------------------------------------------------------------------------

    def add(self, record: model.Record, now_ns: int) -> None:
        sec = now_ns // NS
        self.records += 1
        self.rate.add(sec, 1)
        if isinstance(record, model.Flow):
            self._flow(record, now_ns, sec)
        elif isinstance(record, model.LostEvent):
            e = self.tables["lost"].get((record.source, record.sensor_id), Counted)
            e.count += record.count
            e.records += 1
            e.last_ns = now_ns
            e.window.add(sec, record.count)
            if record.source == model.LostSource.SUBSCRIBER_SLOW.value:
                self.view_lost += record.count
        elif isinstance(record, model.L7Event):
            self._l7(record, now_ns, sec)

    def _flow(self, f: model.Flow, now_ns: int, sec: int) -> None:
        octets = f.initiator_octets + f.responder_octets
        packets = f.initiator_packets + f.responder_packets
        for table, key in (("pairs", (f.src_addr, f.dst_addr)), ("addrs", f.src_addr),
                           ("addrs", f.dst_addr)):
            t = self.tables[table].get(key, Talker)
            t.flows += 1
            t.packets += packets
            t.octets += octets
            t.last_ns = now_ns
            t.window.add(sec, octets, packets)
        if f.protocol not in (6, 17, 132):
            return  # ICMP has no server to call a service
        s = self.tables["services"].get(_flow_service(f), Service)
        s.flows += 1
        s.last_ns = now_ns

    def _l7(self, ev: model.L7Event, now_ns: int, sec: int) -> None:
        d = ev.detail
        server = endpoint(ev.dst_addr, ev.dst_port)
        c4 = c5 = 0
        if isinstance(d, model.HttpEvent):
            key = (d.host.lower() or server, "http")
            c4, c5 = int(400 <= d.status < 500), int(500 <= d.status < 600)
            self._endpoint(d, server, now_ns, sec)
        elif isinstance(d, model.DnsEvent):
            key = (server, "dns")
            if d.rcode:
                c4 = int(d.rcode in DNS_CLIENT_ERRORS)
                c5 = 1 - c4
                e = self.tables["dns"].get((d.qname.lower().rstrip(".") or ".", d.rcode), Counted)
                e.count += 1
                e.last_ns = now_ns
                e.window.add(sec, 1)
        elif isinstance(d, model.TlsEvent):
            key = (d.sni.lower() or server, "tls")
        else:
            # Any other registered kind: its server, keyed as its flows are (app_proto).
            key = (server, ev.kind)
        s = self.tables["services"].get(key, Service)
        s.requests += 1
        s.last_ns = now_ns
        s.window.add(sec, 1, c4, c5)
        latency = getattr(d, "latency_ns", 0)
        if latency:
            s.latencies.append(latency)

    def _endpoint(self, d: model.HttpEvent, server: str, now_ns: int, sec: int) -> None:
        host = d.host.lower() or server
        path = path_template(d.path)
        key = (d.method or "-", host, path)
        table = self.tables["endpoints"]
        if key not in table.entries:
            if self._paths_per_host[host] >= PATHS_PER_HOST:
                key = (d.method or "-", host, OTHER_PATHS)
            if key not in table.entries:
                self._paths_per_host[host] += 1
        e = table.get(key, Endpoint)
        e.requests += 1
        e.last_ns = now_ns
        e.window.add(sec, 1)
        if d.status:
            e.status = d.status
        if d.latency_ns:
            e.latencies.append(d.latency_ns)

    def _forget_path(self, key) -> None:
        host = key[1]
        self._paths_per_host[host] -= 1
        if self._paths_per_host[host] <= 0:
            del self._paths_per_host[host]

    # -- reading ------------------------------------------------------------------------

    def records_per_s(self, now_ns: int) -> float:
        return self.rate.sums(now_ns // NS, SHORT_S)[0] / SHORT_S

    def panel(self, name: str, now_ns: int, sort: int | None = None, reverse: bool = False,
              limit: int = 50) -> Panel:
        """Rows of one panel sorted by column `sort` (default DEFAULT_SORT[name]): largest
        first for numbers (None last), A-Z for text; `reverse` flips that."""
        now_sec = now_ns // NS
        columns = COLUMNS[name]
        table_name = ("pairs" if self.by_pair else "addrs") if name == "talkers" else name
        table = self.tables[table_name]
        rows = [getattr(self, "_row_" + name)(key, e, now_sec) for key, e in table.entries.items()]
        if sort is None:
            sort = [c.name for c in columns].index(DEFAULT_SORT[name])
        text = columns[sort].kind == "text"
        present = [r for r in rows if r[sort] is not None]
        present.sort(key=lambda r: (r[sort], r[0]) if text else (-r[sort], r[0]),
                     reverse=reverse)
        rows = present + [r for r in rows if r[sort] is None]
        title = TITLES[name] + ("" if name != "talkers" else
                                " by host pair" if self.by_pair else " by address")
        return Panel(name, title, columns, rows[:limit], sort, len(table.entries), table.evicted)

    @staticmethod
    def _row_services(key, s: Service, now_sec: int) -> tuple:
        req10, _, _ = s.window.sums(now_sec, SHORT_S)
        req60, c4, c5 = s.window.sums(now_sec, LONG_S)
        lat = sorted(s.latencies)
        return (key[0], key[1], s.requests, req10 / SHORT_S, req60 / LONG_S,
                c4 / req60 * 100 if req60 else None, c5 / req60 * 100 if req60 else None,
                percentile(lat, 50), percentile(lat, 95), s.flows)

    @staticmethod
    def _row_talkers(key, t: Talker, now_sec: int) -> tuple:
        name = f"{key[0]} → {key[1]}" if isinstance(key, tuple) else key
        return (name, t.flows, t.packets, t.octets, t.window.sums(now_sec, SHORT_S)[0] / SHORT_S)

    @staticmethod
    def _row_endpoints(key, e: Endpoint, now_sec: int) -> tuple:
        lat = sorted(e.latencies)
        return (f"{key[0]} {key[1]}{key[2] if key[2].startswith('/') else ' ' + key[2]}",
                e.requests, e.window.sums(now_sec, LONG_S)[0] / LONG_S, percentile(lat, 50),
                percentile(lat, 95), lat[-1] if lat else None, e.status or None)

    @staticmethod
    def _row_dns(key, e: Counted, now_sec: int) -> tuple:
        return (key[0], RCODE_NAMES.get(key[1], str(key[1])), e.count,
                e.window.sums(now_sec, LONG_S)[0])

    @staticmethod
    def _row_lost(key, e: Counted, now_sec: int) -> tuple:
        return (key[0], key[1] or "-", e.count, e.window.sums(now_sec, LONG_S)[0], e.records)


def _flow_service(f: model.Flow) -> tuple[str, str]:
    """The service a flow belongs to, keyed as its L7 events are, so both land on one row."""
    if f.http_host:
        return f.http_host.lower(), "http"
    if f.tls_sni:
        return f.tls_sni.lower(), "tls"
    return endpoint(f.dst_addr, f.dst_port), f.app_proto or PROTO_NAMES.get(f.protocol, str(f.protocol))


def format_cell(value, kind: str) -> str:
    """A raw panel value as the view shows it."""
    if value is None:
        return "-"
    if kind == "text":
        return str(value)
    if kind == "int":
        return f"{value:,}"
    if kind == "pct":
        return f"{value:.1f}%"
    if kind == "rate":
        # Two decimals below 1/s: one request a minute is 0.02/s, not "0.0/s".
        return "0/s" if not value else f"{value:.2f}/s" if value < 1 else f"{value:.1f}/s"
    if kind in ("bytes", "bytes_rate"):
        suffix = "/s" if kind == "bytes_rate" else ""
        for unit in ("B", "KiB", "MiB", "GiB"):
            if value < 1024 or unit == "GiB":
                text = f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
                return text + suffix
            value /= 1024
    if kind == "ns":
        if value >= NS:
            return f"{value / NS:.2f} s"
        if value >= 1_000_000:
            return f"{value / 1e6:.1f} ms"
        return f"{value / 1e3:.0f} µs"
    raise ValueError(f"unknown column kind {kind!r}")
