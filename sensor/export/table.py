"""The human-readable table: one aligned line per record, for a terminal.

What an analyst reads first: time (ISO, ms, UTC), sensor, kind, the two endpoints and the
protocol, then the kind's summary (flow: service, state, duration, packets and bytes each
way, the L7 summary fields, process and container; an L7 event: what its protocol's
registration renders (sensor/l7/registry.py, Protocol.line), e.g. HTTP: method host+path ->
status, latency; loss: source and count). Names, not numbers
(tcp, NXDOMAIN, AAAA, TLS 1.3); durations as 35ms or 1.2s. Exact integers stay in the
machine formats (json, parquet, csv).

A stream cannot know its widest value in advance, so columns widen as wider values arrive
and never shrink (lines seldom move after the first few). Colour only on a terminal and
not when NO_COLOR is set (no-color.org); lines are cut to the terminal's width there.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, TextIO

from sensor import model
from sensor.export import formats
from sensor.l7 import registry

# Minimum widths (time is fixed: 2024-05-01T12:00:00.123Z); a column starts empty and
# grows, so an all-empty column (sensor, in a single-sensor stream) takes no room.
_MIN = {"time": 24, "sensor": 0, "kind": 4, "src": 15, "dst": 15, "proto": 4}
_ORDER = ("time", "sensor", "kind", "src", "arrow", "dst", "proto")

_RESET = "\x1b[0m"
_STYLE = {"dim": "\x1b[2m", "red": "\x1b[31m", "yellow": "\x1b[33m", "green": "\x1b[32m",
          "cyan": "\x1b[36m", "magenta": "\x1b[35m", "bold": "\x1b[1m", "blue": "\x1b[34m"}
_KIND_STYLE = {"flow": "blue", "lost": "red", "alert": "magenta",
               **{p.name: p.style for p in registry.kinds() if p.style}}
# The Flow summary fields the protocols fill (Flow.http_host ...), once each, shown as
# label=value with the field's prefix dropped (host=, qname=, sni=, ja4=): several
# protocols fill the TLS ones (tls, quic, the STARTTLS and SQL hand-overs).
_SUMMARY_LABELS = tuple((f, f.partition("_")[2]) for f in dict.fromkeys(
    f for p in registry.protocols() for f in p.summary))


def use_color(out: TextIO) -> bool:
    """Colour on a terminal, unless NO_COLOR is set (to anything) or TERM is dumb."""
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    return hasattr(out, "isatty") and out.isatty()


def terminal_width(out: TextIO) -> int | None:
    if not (hasattr(out, "isatty") and out.isatty()):
        return None
    return shutil.get_terminal_size((120, 24)).columns


def duration(ns: int) -> str:
    """35ms, 1.2s, 2m03s, 1h02m, 850us."""
    if ns < 1_000_000:
        return f"{ns // 1000}us"
    if ns < 10_000_000:
        return f"{ns / 1e6:.1f}ms"
    if ns < 1_000_000_000:
        return f"{ns // 1_000_000}ms"
    if ns < 60_000_000_000:
        return f"{ns / 1e9:.1f}s"
    secs = ns // 1_000_000_000
    if secs < 3600:
        return f"{secs // 60}m{secs % 60:02d}s"
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m"


def time_ms(ns: int) -> str:
    text = formats.iso(ns)
    return "-" if text is None else text[:23] + "Z"


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


# Characters of one l7_summary value on a line: a statement's start says what it was.
_SUMMARY_CUT = 60


def _flow_summary(f: model.Flow) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    if f.app_proto:
        out.append((f.app_proto, "bold"))
    if f.conn_state:
        out.append((f.conn_state, "red" if f.conn_state in ("REJ", "RSTO", "RSTR") else None))
    out.append((duration(f.flow_end_ns - f.flow_start_ns), None))
    out.append((f"pkts {f.initiator_packets}/{f.responder_packets}"
                f" bytes {f.initiator_octets}/{f.responder_octets}", None))
    for name, label in _SUMMARY_LABELS:
        value = getattr(f, name)
        if value:
            out.append((f"{label}={value}", None))
    # Then the protocol's own keys (l7_summary), its name's prefix dropped (user=, topic=),
    # in key order; a long value (a statement) is cut here, whole in the machine formats.
    prefix = f.app_proto + "_"
    for key, value in f.l7_summary.items():
        text = " ".join(value.split())   # a statement's newlines would break the line
        text = text if len(text) <= _SUMMARY_CUT else text[:_SUMMARY_CUT - 3] + "..."
        out.append((f"{key.removeprefix(prefix)}={text}", None))
    if f.process is not None:
        p = f.process
        if p.comm or p.pid:
            out.append((f"proc={p.comm or '?'}[{p.pid}]", "dim"))
        if p.container_id:
            out.append((f"ctr={p.container_id[:12]}", "dim"))
    return out


# Fields a generic line leaves out: envelope-like or not worth a terminal column.
_GENERIC_MAX = 6


def _generic(d) -> list[tuple[str, str | None]]:
    """field=value for the first non-empty scalar fields, for a protocol that registered
    no line of its own; latency as a duration."""
    out: list[tuple[str, str | None]] = []
    for f in dataclasses.fields(d):
        value = getattr(d, f.name)
        if f.name == "latency_ns" or isinstance(value, tuple) or value in ("", 0, False):
            continue
        out.append((f"{f.name}={value}", None))
        if len(out) == _GENERIC_MAX:
            break
    latency = getattr(d, "latency_ns", 0)
    if latency:
        out.append((duration(latency), None))
    return out


def _l7_summary(e: model.L7Event) -> list[tuple[str, str | None]]:
    spec = registry.of_event(type(e.detail))
    return spec.line(e.detail) if spec.line is not None else _generic(e.detail)


def cells(record: model.Record) -> tuple[dict[str, str], list[tuple[str, str | None]]]:
    """The fixed columns and the summary segments (text, style) of one record."""
    kind = model.record_kind(record)
    if isinstance(record, model.LostEvent):
        cols = {"time": time_ms(record.interval_end_ns), "sensor": record.sensor_id,
                "kind": kind, "src": "", "arrow": "", "dst": "", "proto": ""}
        return cols, [(f"{record.source} count={record.count}", "red")]
    if isinstance(record, model.Alert):
        cols = {"time": time_ms(record.ts_ns), "sensor": record.sensor_id, "kind": kind,
                "src": _endpoint(record.src_addr, record.src_port) if record.src_addr else "",
                "arrow": "->" if record.src_addr else "",
                "dst": _endpoint(record.dst_addr, record.dst_port) if record.dst_addr else "",
                "proto": record.event_kind}
        style = "red" if record.action == "block" else "yellow"
        out = [(record.action.upper(), style), (record.rule_id, "bold"),
               (f"{record.field}: {record.reason}", None)]
        if record.excerpt:
            out.append((repr(record.excerpt[:80]), "dim"))
        if record.count:
            out.append((f"count={record.count}", None))
        if record.mitigation:   # a DDoS detection (sensor/rules/ddos.py)
            out.append((f"rate={record.rate} mitigation={record.mitigation} "
                        f"sources={record.top_sources or '-'}", None))
        return cols, out
    ts = record.flow_end_ns if isinstance(record, model.Flow) else record.ts_ns
    cols = {"time": time_ms(ts), "sensor": record.sensor_id, "kind": kind,
            "src": _endpoint(record.src_addr, record.src_port), "arrow": "->",
            "dst": _endpoint(record.dst_addr, record.dst_port),
            "proto": formats.PROTO_NAMES.get(record.protocol, str(record.protocol))}
    summary = _flow_summary(record) if isinstance(record, model.Flow) else _l7_summary(record)
    return cols, summary


class TableWriter:
    """Aligned lines on a text stream; `fields` switches to zeek-cut style columns of the
    JSON shape's fields (dotted names reach into detail), with a header line."""

    def __init__(self, out: TextIO, *, color: bool | None = None, width: int | None = -1,
                 fields: list[str] | None = None) -> None:
        self.out = out
        self.color = use_color(out) if color is None else color
        self.width = terminal_width(out) if width == -1 else width
        self.fields = fields
        self.widths = dict(_MIN, arrow=2)
        self.written = 0
        self._header = False

    def _paint(self, text: str, style: str | None) -> str:
        if not self.color or not style or not text:
            return text
        return _STYLE[style] + text + _RESET

    def line(self, record: model.Record) -> str:
        if self.fields:
            return self._field_line(record)
        cols, summary = cells(record)
        segments: list[tuple[str, str | None]] = []
        for name in _ORDER:
            text = cols[name]
            self.widths[name] = max(self.widths[name], len(text))
            if not self.widths[name]:
                continue
            style = ("dim" if name == "time" else
                     _KIND_STYLE.get(text) if name == "kind" else None)
            pad = text.rjust(self.widths[name]) if name == "src" else text.ljust(self.widths[name])
            segments.append((pad, style))
        segments.extend(summary)
        return self._join(segments)

    def _join(self, segments: list[tuple[str, str | None]]) -> str:
        # Cut by visible characters, then colour what is left: escape codes take no room.
        parts, used = [], 0
        for i, (text, style) in enumerate(segments):
            sep = 1 if i else 0
            if self.width is not None and used + sep + len(text) > self.width:
                room = self.width - used - sep
                if room > 1:
                    parts.append(" " * sep + self._paint(text[:room - 1] + "…", style))
                elif room == 1:
                    parts.append(" " * sep + "…")
                break
            parts.append(" " * sep + self._paint(text, style))
            used += sep + len(text)
        return "".join(parts).rstrip()

    def _field_line(self, record: model.Record) -> str:
        from sensor.export import jsonfmt

        values = formats.select_fields(jsonfmt.to_dict(record), self.fields)
        texts = [_cell(v) for v in values.values()]
        head = ""
        if not self._header:
            self._header = True
            for name in self.fields:
                self.widths[name] = max(self.widths.get(name, 0), len(name))
            head = self._join([(n.ljust(self.widths[n]), "bold") for n in self.fields]) + "\n"
        segments = []
        for name, text in zip(self.fields, texts):
            self.widths[name] = max(self.widths.get(name, 0), len(text))
            segments.append((text.ljust(self.widths[name]), None))
        return head + self._join(segments)

    def prime(self, records) -> None:
        """Widen the columns for records about to be written, so that a batch known in
        advance (a bounded tail, a query) lines up from its first line."""
        for record in records:
            if self.fields:
                from sensor.export import jsonfmt

                values = formats.select_fields(jsonfmt.to_dict(record), self.fields)
                for name, value in values.items():
                    self.widths[name] = max(self.widths.get(name, len(name)), len(_cell(value)))
                continue
            cols, _ = cells(record)
            for name, text in cols.items():
                self.widths[name] = max(self.widths[name], len(text))

    def write(self, record: model.Record) -> None:
        self.out.write(self.line(record) + "\n")
        self.written += 1

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.flush()


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (dict, list)):
        import json
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# Epoch ns from 1973 on read as times; smaller *_ns values are durations (latency, RTT).
_EPOCH_NS = 10**17


def humanize(column: str, value: Any) -> str:
    """A query result cell for people: *_ns as an ISO time or a duration, protocol, DNS
    rcode/qtype and TLS version numbers as names. The machine formats keep the integers."""
    if value is None:
        return "NULL"
    if isinstance(value, int) and not isinstance(value, bool):
        if column.endswith("_ns"):
            return time_ms(value) if value >= _EPOCH_NS else duration(value) if value else "0"
        if column == "protocol":
            return formats.PROTO_NAMES.get(value, str(value))
        if column == "rcode":
            return "no-response" if value < 0 else formats.rcode_name(value)
        if column in ("qtype", "rtype"):
            return formats.qtype_name(value)
        if column in ("version", "client_version") and value >= 0x0300:
            return formats.tls_version_name(value)
    return str(value)
