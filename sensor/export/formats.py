"""Record encoders for every command that writes records: Loupe JSON, EVE and Zeek logs.

- json: JSON lines of the one record shape, jsonfmt.to_dict ("type", the model's fields in
  order, "detail" nested, then ISO 8601 companions of the times people read). `tail`,
  `replay`, `export`, `sensor flows` and `sensor run` all write it, so one jq script and
  jsonfmt.from_dict read them all.
- eve: Suricata's EVE JSON (event_type, timestamp, src_ip/src_port/dest_ip/dest_port/proto,
  community_id, flow_id, and flow/http/dns/tls objects with Suricata's field names where
  Suricata has the field; ours keep their Loupe names inside the same object).
- zeek: Zeek's TSV logs (conn, http, dns, ssl) with Zeek's #separator/#fields/#types header
  lines, Zeek's column names for the fields Loupe has, "-" for unset. One stream may mix
  kinds: a header block is written before the first record and again whenever the kind
  changes, so zeek-cut (which re-reads #fields) and per-kind greps read it correctly.

Times: JSON keeps the exact integer nanoseconds and adds ISO strings in UTC with
microseconds (what jq, pandas and Python's fromisoformat all parse). docs/export.md
documents every mode.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Iterable, TextIO

import orjson

from sensor import model
from sensor.l7 import registry

__all__ = [
    "iso", "COMPANIONS", "companions", "json_line", "eve", "ZeekWriter", "select_fields",
    "RecordWriter",
]

# kind -> (ISO companion key, the integer ns field it renders). Flows and loss intervals
# have a start and an end; an L7 event has one time, named "ts" as in Zeek.
COMPANIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "flow": (("start", "flow_start_ns"), ("end", "flow_end_ns")),
    **{name: (("ts", "ts_ns"),) for name in registry.kind_names()},
    "lost": (("start", "interval_start_ns"), ("end", "interval_end_ns")),
    "alert": (("ts", "ts_ns"),),
}

_second_cache: list = [None, ""]
_L7EVENT = model.L7Event


def iso(ns: int) -> str | None:
    """Epoch ns -> "2024-05-01T12:00:00.123456Z" (UTC, microseconds); None for 0 (unset)."""
    if not ns:
        return None
    sec, rest = divmod(ns, 1_000_000_000)
    # Records come in time order, many within one second: format the second once.
    if _second_cache[0] != sec:
        _second_cache[0] = sec
        _second_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second_cache[1]}.{rest // 1000:06d}Z"


def companions(record: model.Record, kind: str) -> dict[str, str | None]:
    return {key: iso(getattr(record, field)) for key, field in COMPANIONS[kind]}


def _orjson_default(value: Any) -> Any:
    if type(value) is registry.Counts:   # HTTP pii: an object, as jsonfmt writes it
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# record class (for an L7Event, its detail's class) -> (b'{"type":"<kind>",', the ISO
# companions as (b',"<key>":', ns field) pairs). Bounded by the registered record classes.
_LINE_SHAPES: dict[type, tuple[bytes, tuple[tuple[bytes, str], ...]]] = {}


def _line_shape(record: model.Record, key: type) -> tuple:
    kind = model.record_kind(record)
    shape = (b'{"type":"' + kind.encode() + b'",',
             tuple((b',"' + name.encode() + b'":', field) for name, field in COMPANIONS[kind]))
    _LINE_SHAPES[key] = shape
    return shape


def json_line(record: model.Record) -> bytes:
    """jsonfmt.to_dict(record) as one compact JSON line (no newline), encoded by orjson,
    which serializes slotted dataclasses natively: ~3 µs a record against ~30 µs for the
    generic walk, which matters at replay rates. A test holds the two equal. The "type"
    head and the ISO companions are written here as bytes (an ISO time needs no JSON
    escaping), so a line costs one orjson call and no dict."""
    cls = type(record)
    key = type(record.detail) if cls is _L7EVENT else cls
    shape = _LINE_SHAPES.get(key)
    if shape is None:
        shape = _line_shape(record, key)
    parts = [shape[0], orjson.dumps(record, default=_orjson_default)[1:-1]]
    for name, field in shape[1]:
        ns = getattr(record, field)
        parts.append(name + (b'"' + iso(ns).encode() + b'"' if ns else b"null"))
    parts.append(b"}")
    return b"".join(parts)


# -- EVE ------------------------------------------------------------------------------------

_EVE_PROTO = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "IPv6-ICMP", 132: "SCTP"}
_EVE_REASON = {1: "timeout", 2: "timeout", 3: "shutdown", 4: "forced", 5: "forced"}
_ENDED = ("SF", "S2", "S3", "RSTO", "RSTR", "RSTOS0", "RSTRH", "SH", "SHR", "OTH", "REJ")


def flow_id(uid: str) -> int:
    """EVE's flow_id is an integer that every event of one flow shares; Loupe's uid is a
    string, so flow_id is the first 63 bits of its BLAKE2b digest (stable across runs)."""
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "big") >> 1


def tls_version_name(version: int) -> str:
    return {0x0300: "SSLv3", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2",
            0x0304: "TLS 1.3"}.get(version, f"0x{version:04x}" if version else "")


def _eve_head(event_type: str, ts_ns: int, rec) -> dict[str, Any]:
    out: dict[str, Any] = {"timestamp": eve_time(ts_ns), "flow_id": flow_id(rec.uid),
                           "event_type": event_type}
    if rec.sensor_id:
        out["host"] = rec.sensor_id   # Suricata's sensor-name
    out.update(src_ip=rec.src_addr, src_port=rec.src_port, dest_ip=rec.dst_addr,
               dest_port=rec.dst_port,
               proto=_EVE_PROTO.get(rec.protocol, str(rec.protocol)))
    if rec.community_id:
        out["community_id"] = rec.community_id
    return out


def eve_time(ns: int) -> str | None:
    # Suricata writes "2024-05-01T12:00:00.123456+0000".
    text = iso(ns)
    return None if text is None else text[:-1] + "+0000"


def _eve_flow(f: model.Flow) -> dict[str, Any]:
    out = _eve_head("flow", f.flow_end_ns, f)
    if f.vlan_id:
        out["vlan"] = [f.vlan_id] + ([f.inner_vlan_id] if f.inner_vlan_id else [])
    if f.app_proto:
        out["app_proto"] = f.app_proto
    out["flow"] = {
        "pkts_toserver": f.initiator_packets, "pkts_toclient": f.responder_packets,
        "bytes_toserver": f.initiator_l2_octets or f.initiator_octets,
        "bytes_toclient": f.responder_l2_octets or f.responder_octets,
        "start": eve_time(f.flow_start_ns), "end": eve_time(f.flow_end_ns),
        "age": (f.flow_end_ns - f.flow_start_ns) // 1_000_000_000,
        "state": "closed" if f.conn_state in _ENDED else "established",
        "reason": _EVE_REASON.get(int(f.flow_end_reason), "unknown"),
        "alerted": False,
    }
    if f.protocol == 6:
        flags = f.initiator_tcp_flags | f.responder_tcp_flags
        out["tcp"] = {"tcp_flags": f"{flags & 0xFF:02x}",
                      "tcp_flags_ts": f"{f.initiator_tcp_flags & 0xFF:02x}",
                      "tcp_flags_tc": f"{f.responder_tcp_flags & 0xFF:02x}",
                      "state": f.conn_state or None}
    if f.protocol in (1, 58):
        out["icmp_type"], out["icmp_code"] = f.icmp_type, f.icmp_code
    if f.process is not None:
        out["process"] = {"pid": f.process.pid, "comm": f.process.comm, "exe": f.process.exe,
                          "container_id": f.process.container_id}
    if f.l7_summary:
        # Suricata has no such object: Loupe's name, beside app_proto it describes.
        out["l7_summary"] = dict(f.l7_summary)
    return out


def eve(record: model.Record) -> dict[str, Any]:
    """One EVE event for one record."""
    if isinstance(record, model.Flow):
        return _eve_flow(record)
    if isinstance(record, model.LostEvent):
        out = {"timestamp": eve_time(record.interval_end_ns), "event_type": "loss"}
        if record.sensor_id:
            out["host"] = record.sensor_id
        out["loss"] = {"source": record.source, "count": record.count,
                       "start": eve_time(record.interval_start_ns),
                       "end": eve_time(record.interval_end_ns)}
        return out
    if isinstance(record, model.Alert):
        return _eve_alert(record)
    spec = registry.of_event(type(record.detail))
    kind = spec.name
    out = _eve_head(kind, record.ts_ns, record)
    out["app_proto"] = kind
    # Suricata's own shape where the protocol registered one, else its fields as they are.
    out[kind] = spec.eve(record.detail) if spec.eve is not None else _eve_fields(record.detail)
    return out


_EVE_ACTION = {"block": "blocked", "allow": "allowed"}   # Suricata's words; else "allowed"
_EVE_SEVERITY = {"critical": 1, "high": 1, "medium": 2, "low": 3}


def _eve_alert(a: model.Alert) -> dict[str, Any]:
    """Suricata's `event_type: alert` shape; Loupe's own fields under alert.metadata."""
    out: dict[str, Any] = {"timestamp": eve_time(a.ts_ns), "flow_id": flow_id(a.uid) if a.uid else None,
                           "event_type": "alert"}
    if a.sensor_id:
        out["host"] = a.sensor_id
    if a.src_addr:
        # No proto: an Alert names the L7 event's kind (app_proto), not its transport.
        out.update(src_ip=a.src_addr, src_port=a.src_port, dest_ip=a.dst_addr,
                   dest_port=a.dst_port)
    if a.community_id:
        out["community_id"] = a.community_id
    if a.event_kind:
        out["app_proto"] = a.event_kind
    out["alert"] = {
        "action": _EVE_ACTION.get(a.action, "allowed"), "signature": a.reason or a.rule_id,
        "signature_id": a.rule_id, "category": a.category,
        "severity": _EVE_SEVERITY.get(a.severity, 2),
        "metadata": {"loupe_action": [a.action], "field": [a.field], "excerpt": [a.excerpt],
                     **({"count": [a.count]} if a.count else {}),
                     # DDoS detections (sensor/rules/ddos.py)
                     **({"rate": [a.rate], "top_sources": a.top_sources.split(),
                         "mitigation": [a.mitigation]} if a.mitigation else {})},
    }
    return out


def _eve_fields(d) -> dict[str, Any]:
    """A kind Suricata has no EVE shape for: its fields as they are (as JSON lines write)."""
    from sensor.export.jsonfmt import _plain

    return _plain(d)


# -- names shared by EVE, Zeek and the table ---------------------------------------------------

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp"}
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
               5: "REFUSED", 6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH",
               10: "NOTZONE"}
QTYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX",
               16: "TXT", 28: "AAAA", 33: "SRV", 35: "NAPTR", 39: "DNAME", 41: "OPT",
               43: "DS", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS",
               99: "SPF", 252: "AXFR", 255: "ANY", 257: "CAA"}


def rcode_name(rcode: int) -> str:
    return RCODE_NAMES.get(rcode, str(rcode))


def qtype_name(qtype: int) -> str:
    return QTYPE_NAMES.get(qtype, f"TYPE{qtype}")


# -- Zeek -----------------------------------------------------------------------------------

_ID = [("id.orig_h", "addr"), ("id.orig_p", "port"), ("id.resp_h", "addr"),
       ("id.resp_p", "port")]

# kind -> (Zeek log path, [(column, Zeek type)]): Zeek's columns that Loupe has a value
# for, in Zeek's order; Loupe-only columns (community_id, ja4) go last, as Zeek packages
# add them.
ZEEK_LOGS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "flow": ("conn", [("ts", "time"), ("uid", "string"), *_ID, ("proto", "enum"),
                      ("service", "string"), ("duration", "interval"),
                      ("orig_bytes", "count"), ("resp_bytes", "count"),
                      ("conn_state", "string"), ("missed_bytes", "count"),
                      ("history", "string"), ("orig_pkts", "count"),
                      ("orig_ip_bytes", "count"), ("resp_pkts", "count"),
                      ("resp_ip_bytes", "count"), ("community_id", "string"),
                      # Zeek logs no tables: the l7_summary map as key=value entries.
                      ("l7_summary", "vector[string]")]),
    # Each registered protocol's log (Protocol.zeek), with the same head columns.
    **{p.name: (p.zeek.path, [("ts", "time"), ("uid", "string"), *_ID, *p.zeek.columns])
       for p in registry.kinds() if p.zeek is not None},
}

def _secs(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000 // 1000:06d}"


def _zeek_values(record: model.Record) -> list[Any]:
    """The row's values in ZEEK_LOGS order; None is unset ("-")."""
    ids = [record.src_addr, record.src_port, record.dst_addr, record.dst_port]
    if isinstance(record, model.Flow):
        f = record
        gap = f.l7_coverage.gap_octets if f.l7_coverage.inspected else None
        return [_secs(f.flow_start_ns), f.uid, *ids,
                PROTO_NAMES.get(f.protocol, str(f.protocol)), f.app_proto or None,
                f"{(f.flow_end_ns - f.flow_start_ns) / 1e9:.6f}",
                None, None,   # Zeek's orig_bytes/resp_bytes are payload by sequence space
                f.conn_state or None, gap, f.history or None, f.initiator_packets,
                f.initiator_octets, f.responder_packets, f.responder_octets,
                f.community_id or None,
                [f"{k}={v}" for k, v in f.l7_summary.items()] or None]
    head = [_secs(record.ts_ns), record.uid, *ids]
    return head + registry.of_event(type(record.detail)).zeek.values(record)


def _zeek_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(_zeek_text(v) for v in value) if value else "(empty)"
    text = _zeek_text(value)
    return text if text else "(empty)"


def _zeek_text(value: Any) -> str:
    # Zeek escapes the separators and non-printable bytes as \xHH.
    text = str(value)
    if any(c in text for c in "\t\n,\\") or not text.isprintable():
        text = "".join(c if c.isprintable() and c not in "\t,\\" else f"\\x{ord(c):02x}"
                       for c in text)
    return text


def zeek_header(kind: str, now_ns: int | None = None) -> str:
    path, columns = ZEEK_LOGS[kind]
    opened = time.strftime("%Y-%m-%d-%H-%M-%S",
                           time.gmtime((now_ns or time.time_ns()) // 1_000_000_000))
    return ("#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n"
            f"#path\t{path}\n#open\t{opened}\n"
            "#fields\t" + "\t".join(c for c, _ in columns) + "\n"
            "#types\t" + "\t".join(t for _, t in columns) + "\n")


class ZeekWriter:
    """Zeek TSV for a stream of mixed kinds: a header block before the first record and
    whenever the kind changes (lost events have no Zeek log and are skipped: they are
    counted in `skipped`)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.kind: str | None = None
        self.skipped = 0

    def write(self, record: model.Record) -> None:
        kind = model.record_kind(record)
        if kind not in ZEEK_LOGS:
            self.skipped += 1
            return
        if kind != self.kind:
            self.out.write(zeek_header(kind))
            self.kind = kind
        self.out.write("\t".join(_zeek_cell(v) for v in _zeek_values(record)) + "\n")

    def close(self) -> None:
        if self.kind is not None:
            self.out.write("#close\t" + time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime()) + "\n")


# -- column selection (zeek-cut style) --------------------------------------------------------

def _get(d: dict, dotted: str) -> Any:
    value: Any = d
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def select_fields(d: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """Only the named keys, in the order named; a dotted name reaches into nested
    objects ("detail.status"); a missing one is null, as zeek-cut prints "-"."""
    return {name: (d[name] if name in d else _get(d, name)) for name in fields}


# -- one writer for the record-stream commands ----------------------------------------------

class RecordWriter:
    """Writes records as json, eve or zeek to a text stream (a file or stdout), with an
    optional --fields selection for json and eve. The table lives in export/table.py."""

    def __init__(self, out: TextIO, fmt: str, fields: list[str] | None = None) -> None:
        from sensor.export import jsonfmt

        if fmt == "zeek" and fields:
            from sensor.errors import ConfigError
            raise ConfigError("--fields does not apply to --format zeek; pipe it to zeek-cut")
        self.out, self.fmt, self.fields = out, fmt, fields
        self._to_dict = jsonfmt.to_dict
        self._zeek = ZeekWriter(out) if fmt == "zeek" else None
        self.written = 0

    def write(self, record: model.Record) -> None:
        self.written += 1
        if self._zeek is not None:
            self._zeek.write(record)
            return
        d = eve(record) if self.fmt == "eve" else self._to_dict(record)
        if self.fields:
            d = select_fields(d, self.fields)
        self.out.write(json.dumps(d, separators=(",", ":"), ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        if self._zeek is not None:
            self._zeek.close()
        self.flush()
