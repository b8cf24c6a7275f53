"""Terminal output of records: one line per record (table) or one JSON object per line.

Lines show what an analyst reads first: time, sensor, kind, the 5-tuple, then the L7
fields of the kind (method path -> status, qname -> rcode answers, SNI and JA4).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import json
from concurrent.futures import ThreadPoolExecutor

from sensor import model
from sensor.export import wire

_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp"}
_DNS_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
               5: "REFUSED", -1: "no-response"}
_DNS_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
              28: "AAAA", 33: "SRV", 65: "HTTPS"}

# Records a --print consumer writes per terminal write: large enough to amortise the
# write call at ingest rates, small enough that lines appear promptly.
_PRINT_CHUNK = 500


def _time(ns: int) -> str:
    if not ns:
        return "-"
    t = dt.datetime.fromtimestamp(ns / 1e9, tz=dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _tuple(rec) -> str:
    proto = _PROTO_NAMES.get(rec.protocol, str(rec.protocol))
    return f"{_endpoint(rec.src_addr, rec.src_port)} -> {_endpoint(rec.dst_addr, rec.dst_port)} {proto}"


def line(record: model.Record) -> str:
    kind = model.record_kind(record)
    sensor = record.sensor_id or "-"
    if isinstance(record, model.LostEvent):
        return (f"{_time(record.interval_end_ns)} {sensor} lost  {record.source} "
                f"count={record.count}")
    if isinstance(record, model.Flow):
        parts = [_time(record.flow_end_ns), sensor, "flow ", _tuple(record)]
        if record.app_proto:
            parts.append(record.app_proto)
        if record.conn_state:
            parts.append(record.conn_state)
        parts.append(f"pkts={record.initiator_packets}/{record.responder_packets}"
                     f" bytes={record.initiator_octets}/{record.responder_octets}")
        for label, value in (("host", record.http_host), ("qname", record.dns_qname),
                             ("sni", record.tls_sni), ("ja4", record.tls_ja4)):
            if value:
                parts.append(f"{label}={value}")
        return " ".join(parts)
    d = record.detail
    parts = [_time(record.ts_ns), sensor, f"{kind} ", _tuple(record)]
    if kind == "http":
        parts.append(f"{d.method or '-'} {d.host}{d.path} -> {d.status or '-'}")
        if d.latency_ns:
            parts.append(f"{d.latency_ns / 1e6:.1f}ms")
    elif kind == "dns":
        qtype = _DNS_TYPES.get(d.qtype, str(d.qtype))
        answers = ",".join(a.data for a in d.answers) or "-"
        parts.append(f"{d.qname} {qtype} -> {_DNS_RCODES.get(d.rcode, str(d.rcode))} {answers}")
    else:
        parts.append(f"sni={d.sni or '-'} ja4={d.ja4 or '-'}")
        if d.version:
            parts.append(f"version=0x{d.version:04x}")
    return " ".join(parts)


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def as_json(record: model.Record) -> str:
    """One JSON object: the record's fields plus "kind"."""
    data = {"kind": model.record_kind(record)}
    data.update(_plain(dataclasses.asdict(record)))
    return json.dumps(data, separators=(",", ":"))


def proto_line(rec) -> str:
    return line(wire.from_proto(rec))


async def print_live(hub, out) -> None:
    """`collector run --print`: every stored record, one line each, until cancelled.

    An ordinary hub subscriber, so a slow terminal loses lines (and says so with a
    LostEvent line) instead of stalling ingest. Writes happen on a thread: a blocked
    terminal must not block the event loop.
    """
    sub = hub.add(lambda rec: True)
    loop = asyncio.get_running_loop()
    writer = ThreadPoolExecutor(1, thread_name_prefix="loupe-print")
    try:
        while True:
            recs = [await sub.next()]
            while len(recs) < _PRINT_CHUNK and not sub.queue.empty():
                recs.append(sub.queue.get_nowait())
            text = "".join(proto_line(r) + "\n" for r in recs)
            await loop.run_in_executor(writer, _write, out, text)
    finally:
        hub.remove(sub)
        writer.shutdown(wait=False)


def _write(out, text: str) -> None:
    out.write(text)
    out.flush()
