"""Collector and analyst commands: `loupe collector run|status`, `loupe export`,
`loupe certs init`, `loupe tail`, `loupe query`."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

# grpc's C core prints its own log line for a failed bind (and other failures we report
# in one line ourselves); it reads this once, when grpc is first imported.
# GRPC_VERBOSITY=debug in the environment still shows them.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402 - after GRPC_VERBOSITY

from collector import filters, render
from collector.client import QUERY_TIMEOUT_S, ClientTLS, open_channel, translate
from sensor import config as cfg
from sensor.errors import CollectorError, ConfigError
from sensor.export import wire
from sensor.l7 import registry
from sensor.output import add_output_arguments

DEFAULT_COLLECTOR = "127.0.0.1:50051"
SERVICE_DATA_DIR = "/var/lib/loupe"

_UNITS_NS = {"s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86_400 * 10**9,
             "w": 7 * 86_400 * 10**9}
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmp6": 58, "icmpv6": 58, "sctp": 132}

# `loupe tail` with none of --since, --first, --last and --follow shows the newest this
# many stored records, whatever their age, as `hubble observe` does by default.
DEFAULT_TAIL_LAST = 20


def parse_duration(text: str) -> int:
    """"7d", "12h", "10m", "30s", "2w" -> nanoseconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ConfigError(f"{text!r} is not a duration: use a number and s, m, h, d or w (e.g. 10m)")
    return int(m.group(1)) * _UNITS_NS[m.group(2)]


def parse_since(text: str, now_ns: int) -> int:
    """A duration ago ("1h") or an ISO 8601 time ("2024-05-01T12:00:00Z") -> epoch ns."""
    if _DURATION.match(text.strip()):
        return max(1, now_ns - parse_duration(text))
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{text!r} is neither a duration (10m, 1h, 7d) nor an ISO time (2024-05-01T12:00:00Z)"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return max(1, int(t.timestamp() * 10**9))


def _protocol(text: str) -> int:
    if text.lower() in _PROTOCOLS:
        return _PROTOCOLS[text.lower()]
    if text.isdigit() and int(text) <= 255:
        return int(text)
    raise ConfigError(f"{text!r} is not a protocol: use tcp, udp, icmp, icmp6 or a number 0-255")


def _port(text: str) -> int:
    if text.isdigit() and int(text) <= 65535:
        return int(text)
    raise ConfigError(f"{text!r} is not a port (0-65535)")


def _status(text: str) -> str:
    filters.parse_status(text)   # FilterError (a ConfigError) on a bad range
    return text


# A registered filter's value parser by its match kind, unless it brings its own.
_MATCH_PARSERS = {"upper": str.upper, "status": _status}


def _l7_parser(flt: registry.Filter):
    if flt.parse is None:
        return _MATCH_PARSERS.get(flt.match, str)

    def parse(text: str):
        try:
            return flt.parse(text)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return parse


def _country(text: str) -> str:
    if len(text) != 2 or not text.isalpha():
        raise ConfigError(f"--country {text!r}: give an ISO 3166-1 alpha-2 code, e.g. SE")
    return text.upper()


def _asn(text: str) -> int:
    digits = text[2:] if text[:2].upper() == "AS" else text
    if not digits.isdigit() or not 0 < int(digits) < 1 << 32:
        raise ConfigError(f"--asn {text!r}: give an AS number, e.g. 15169 or AS15169")
    return int(digits)


# flag -> (RecordFilter field, value parser). Every flag also exists as --not-<flag>.
FILTER_FLAGS: dict[str, tuple[str, object]] = {
    "type": ("record_kind", filters.parse_kind),
    "from-ip": ("source_ip", lambda v: str(filters.parse_cidr(v))),
    "to-ip": ("destination_ip", lambda v: str(filters.parse_cidr(v))),
    "ip": ("ip", lambda v: str(filters.parse_cidr(v))),
    "from-port": ("source_port", _port),
    "to-port": ("destination_port", _port),
    "port": ("port", _port),
    "protocol": ("protocol", _protocol),
    "app-proto": ("app_proto", str.lower),
    # Each registered protocol's criteria (sensor/l7/registry.py, Protocol.filters).
    **{f.tail_flag: (f.name, _l7_parser(f)) for spec in registry.kinds() for f in spec.filters},
    "sensor-id": ("sensor_id", str),
    "process": ("process", str),
    "container": ("container_id", str.lower),
    "alert-rule": ("alert_rule", str),
    "alert-action": ("alert_action", str.lower),
    "country": ("country", _country),
    "asn": ("asn", _asn),
}

# Old flag spellings, kept working but not shown: alias -> FILTER_FLAGS name.
FILTER_ALIASES = {"sensor": "sensor-id"}

FILTER_HELP = {
    "type": f"record kind: {', '.join(filters.RECORD_KINDS[:-1])} or alert",
    "from-ip": "initiator address or CIDR",
    "to-ip": "responder address or CIDR",
    "ip": "either end, address or CIDR",
    "from-port": "initiator port",
    "to-port": "responder port",
    "port": "either port",
    "protocol": "tcp, udp, icmp, icmpv6 or a number",
    "app-proto": "application protocol: http, dns, tls, ...",
    **{f.tail_flag: f.help for spec in registry.kinds() for f in spec.filters},
    "sensor-id": "sensor id",
    "process": "process name or executable glob (flows): 'curl', '*/python3*'",
    "container": "container id prefix (flows): 'a1b2c3d4e5f6'",
    "alert-rule": "alert rule id glob: 'loupe-sqli', 'login-*'",
    "alert-action": "alert action: count, alert, allow or block",
    "country": "ISO country code of either end of a flow: 'SE' (sensors with [geoip])",
    "asn": "autonomous system number of either end of a flow: 15169 or AS15169",
}


def _add_tls_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collector", default=DEFAULT_COLLECTOR, metavar="HOST:PORT",
                   help=f"collector address (default {DEFAULT_COLLECTOR})")
    p.add_argument("--tls-ca", type=Path, help="CA certificate: turns TLS on")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, help="client key (mTLS)")
    p.add_argument("--tls-server-name", help="name to verify in the collector's certificate")


def add_filter_flags(p: argparse.ArgumentParser) -> None:
    """The record filter flags of `tail` (and `top`), each also as --not-<flag>."""
    for flag in FILTER_FLAGS:
        p.add_argument(f"--{flag}", action="append", metavar="V", help=FILTER_HELP[flag])
        p.add_argument(f"--not-{flag}", action="append", metavar="V", help=argparse.SUPPRESS)
    for alias, flag in FILTER_ALIASES.items():
        dest = flag.replace("-", "_")
        p.add_argument(f"--{alias}", action="append", dest=dest, help=argparse.SUPPRESS)
        p.add_argument(f"--not-{alias}", action="append", dest="not_" + dest,
                       help=argparse.SUPPRESS)


def _tls(args) -> ClientTLS:
    return ClientTLS(args.tls_cert, args.tls_key, args.tls_ca, args.tls_server_name)


def _observer(args):
    from loupe.v1 import observer_pb2_grpc
    return observer_pb2_grpc.ObserverStub(open_channel(args.collector, _tls(args)))


# -- collector run / status ---------------------------------------------------------------

def _absolute(path: Path | None) -> str | None:
    # A path on the command line is relative to where the command runs; the config file
    # takes absolute paths only (a daemon's working directory is /).
    return None if path is None else str(path.absolute())


def collector_config(args):
    """collector.server.CollectorConfig from the config file (--config, else
    /etc/loupe/collector.toml if present), then --set, then the flags."""
    from collector.server import CollectorConfig

    overrides = {
        "listen": args.listen, "data_dir": _absolute(args.data_dir),
        "retention": args.retention, "insecure": True if args.insecure else None,
        "tls.cert_file": _absolute(args.tls_cert), "tls.key_file": _absolute(args.tls_key),
        "tls.client_ca_file": _absolute(args.tls_ca), "metrics.listen": args.metrics,
        "ui": args.ui, "ipfix.targets": args.ipfix, "ipfix.pen": args.ipfix_pen,
        "ipfix.uniflow": args.ipfix_uniflow,
    }
    if args.config is None and not cfg.COLLECTOR_CONFIG_PATH.exists():
        # No file at all: a development or test run. The store is ./data as always (the
        # file's /var/lib/loupe/collector is the service's), and metrics are off unless
        # asked for, so that several such collectors on one host do not fight over the
        # service's metrics port.
        if args.data_dir is None:
            overrides["data_dir"] = _absolute(Path("data"))
        if args.metrics is None:
            overrides["metrics.listen"] = ""
    c = cfg.config_from_args(args, "collector", overrides)
    tls = c.tls
    return CollectorConfig(
        listen=c.listen, data_dir=Path(c.data_dir), retention_ns=c.retention,
        tls_cert=Path(tls.cert_file) if tls.cert_file else None,
        tls_key=Path(tls.key_file) if tls.key_file else None,
        tls_ca=Path(tls.client_ca_file) if tls.client_ca_file else None,
        insecure=c.insecure, print_records=args.print, grace_s=args.grace,
        max_message_bytes=c.max_message_size, subscriber_queue=c.subscriber_queue_size,
        max_columnar_bytes=c.max_columnar_size,
        metrics_listen=c.metrics.listen, ui_listen=c.ui, storage=c.storage,
        peers=c.cluster.peers,
        peer_cert=Path(c.cluster.cert_file) if c.cluster.cert_file else None,
        peer_key=Path(c.cluster.key_file) if c.cluster.key_file else None,
        api=c.api,
        ipfix_targets=c.ipfix.targets, ipfix_pen=c.ipfix.pen, ipfix_uniflow=c.ipfix.uniflow,
        ipfix_queue=c.ipfix.queue_size,
    )


def _tune_gc() -> None:
    """The analytics state (endpoint inventory, statistics, clients) is millions of small
    objects that live as long as the collector, and every stored batch allocates tens of
    thousands more. At the default thresholds the cyclic collector ran every few hundred
    allocations and took ~40% of the analytics' CPU (bench_analytics: 142-164 -> 102-115 ms
    per 1000 events with these). As replay does: freeze what start-up made, collect less
    often; cycles are still freed, and the state's own limits bound its memory."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def cmd_collector_run(args) -> int:
    from collector.server import serve

    _tune_gc()
    # SIGHUP re-reads the same sources (file, --set, flags).
    asyncio.run(serve(collector_config(args), reload=lambda: collector_config(args)))
    return 0


def cmd_collector_status(args) -> int:
    try:
        status = _observer(args).Status(wire.observer_pb2.StatusRequest(), timeout=10)
    except grpc.RpcError as exc:
        raise translate(exc, args.collector) from None
    print(f"collector {status.version} at {args.collector}, storage {status.storage}")
    print("stored: " + ", ".join(f"{k}={v}" for k, v in sorted(status.stored.items())))
    print("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(status.counters.items())))
    print(f"subscribers: {status.subscribers}")
    for s in status.sensors:
        print(f"sensor {s.sensor_id}: last batch {s.last_batch_id}, {s.records} records, "
              f"last seen {render._time(s.last_seen_ns)}")
    return 0


# -- export ---------------------------------------------------------------------------------

EXPORT_FORMATS = ("json", "eve", "csv", "parquet")
# Flows, each registered L7 kind's table (sensor/l7/registry.py), loss.
EXPORT_TABLES = ("flows", *(p.table_name for p in registry.kinds()), "lost", "alerts")


def _stored_records(args, since_ns: int, until_ns: int, tables: tuple[str, ...]):
    """The stored records, in time order across tables: through the running collector
    (Observer.Export), or with --data-dir straight from a stopped collector's store
    (DuckDB lets one process open the file, and a running collector is that process)."""
    if args.data_dir is not None:
        from collector.storage import open_storage
        from sensor.config import StorageConfig

        storage = open_storage(StorageConfig(backend="duckdb"), args.data_dir, read_only=True)
        try:
            yield from storage.records_since(since_ns, storage.last_seq(), until_ns=until_ns,
                                             tables=tables)
        finally:
            storage.close()
        return
    req = wire.observer_pb2.ExportRequest(since_ns=since_ns, until_ns=until_ns, tables=tables)
    received = 0
    try:
        for chunk in _observer(args).Export(req):
            for rec in chunk.records:
                received += 1
                yield wire.from_proto(rec)
    except grpc.RpcError as exc:
        if not received and exc.code() == grpc.StatusCode.UNAVAILABLE:
            raise CollectorError(
                f"cannot reach the collector at {args.collector}: is `loupe collector run` "
                "running there? To export a stopped collector's store, give --data-dir DIR"
            ) from None
        raise translate(exc, args.collector, received=received) from None


def _export_sink(out):
    from sensor.output import RecordOut

    if out.fmt in ("json", "eve"):
        return RecordOut(out)   # every kind in one stream, in the one record shape
    if out.fields:
        raise ConfigError(f"--fields applies to json and eve; for {out.fmt}, pick columns "
                          "with `loupe query --format csv \"SELECT ...\"`")
    from sensor.export.sinks import open_sink

    return open_sink(out.path, out.fmt)   # one file per table: X.csv, X.http.csv, ...


def _abandon(sink, out, tables) -> None:
    """After a failed export: Parquet tables are written under hidden temporary names
    and replace the earlier set only at close, so not closing keeps that set whole; the
    temporary files go. JSON and CSV, written in place, are closed as far as they got."""
    if out.fmt != "parquet":
        sink.close()
        return
    from sensor.export import sinks

    for table in tables:
        sinks._partial(sinks.table_path(Path(out.path), table)).unlink(missing_ok=True)


def cmd_export(args) -> int:
    from sensor import model
    from sensor.output import resolve

    out = resolve(args, EXPORT_FORMATS)
    now = time.time_ns()
    since_ns = parse_since(args.since, now) if args.since else 0
    until_ns = parse_since(args.until, now) if args.until else 0
    if until_ns and until_ns <= since_ns:
        raise ConfigError(f"--until {args.until} is not after --since {args.since}")
    tables = tuple(dict.fromkeys(args.table or EXPORT_TABLES))
    counts: dict[str, int] = {}
    sink = _export_sink(out)
    try:
        for rec in _stored_records(args, since_ns, until_ns, tables):
            sink.write(rec)
            kind = model.record_kind(rec)
            counts[kind] = counts.get(kind, 0) + 1
    except BaseException:
        _abandon(sink, out, EXPORT_TABLES)
        raise
    sink.close()
    where = out.path if out.fmt in ("json", "eve") or out.to_stdout else ", ".join(
        str(p) for p in _table_files(out.path, counts))
    kinds = ", ".join(f"{k} {n}" for k, n in counts.items()) or "none matched"
    print(f"wrote {sum(counts.values())} records ({kinds}) to {where}", file=sys.stderr)
    return 0


def _table_files(path: str, counts: dict[str, int]) -> list[Path]:
    """The files of a Parquet or CSV set: the flows file (always written) and one per
    kind that had records."""
    from collector import schema
    from sensor.export.sinks import table_path

    written = {schema.KIND_TABLE[k] for k in counts} | {"flows"}
    return [table_path(Path(path), t) for t in EXPORT_TABLES if t in written]


# -- certs ----------------------------------------------------------------------------------

def cmd_certs_init(args) -> int:
    from collector import certs

    analysts = args.analyst if args.analyst is not None else ([] if args.admin else ["analyst"])
    files = certs.init(args.dir, collector_name=args.collector_name, sensors=args.sensor or [],
                       analysts=analysts, admins=args.admin or [], extra_sans=args.san or [])
    print(f"CA: {files.ca_cert} (key {files.ca_key}: keep it offline)")
    print(f"collector: {files.collector[0]} {files.collector[1]}")
    for name, (cert, key) in files.clients.items():
        print(f"{files.roles[name]} {name}: {cert} {key}")
    return 0


# -- tail -----------------------------------------------------------------------------------

def filter_from(args, prefix: str):
    """One RecordFilter from parsed filter flags (add_filter_flags): prefix "" reads
    --FLAG, "not_" reads --not-FLAG."""
    flt = wire.observer_pb2.RecordFilter()
    for flag, (field, parse) in FILTER_FLAGS.items():
        values = getattr(args, prefix + flag.replace("-", "_")) or []
        getattr(flt, field).extend(parse(v) for v in values)
    return flt


def filter_lists(args) -> tuple[list, list]:
    """(allow, deny) lists of a subscription from parsed filter flags, as `loupe tail`
    sends them: one entry each, or none when no flag of that side is given."""
    allow, deny = filter_from(args, ""), filter_from(args, "not_")
    return ([allow] if allow.ByteSize() else []), ([deny] if deny.ByteSize() else [])


def build_subscribe_request(args, now_ns: int):
    """tail's flags -> SubscribeRequest, with hubble observe's meaning: --since/--until
    bound the stored records by their own time, --first/--last take the oldest/newest N
    that match (whatever their age), -f then streams live records. With none of --since,
    --first, --last and -f: the newest DEFAULT_TAIL_LAST."""
    since, until = getattr(args, "since", None), getattr(args, "until", None)
    first, last = getattr(args, "first", None), getattr(args, "last", None)
    if first is not None and last is not None:
        raise ConfigError("--first and --last exclude each other: give one")
    if until is not None and args.follow:
        raise ConfigError("--until ends the stream; drop it, or drop --follow")
    if first is not None and args.follow:
        raise ConfigError("--first reads the oldest stored records; with --follow use "
                          "--since or --last")
    for name, n in (("--first", first), ("--last", last)):
        if n is not None and n < 1:
            raise ConfigError(f"{name} needs a number of records, 1 or more")
    if last is None and first is None and since is None and not args.follow:
        last = DEFAULT_TAIL_LAST
    req = wire.observer_pb2.SubscribeRequest(follow=args.follow, number=args.number or 0,
                                             first=first or 0, last=last or 0)
    allow, deny = filter_lists(args)
    req.allow.extend(allow)
    req.deny.extend(deny)
    if since is not None:
        req.since_ns = parse_since(since, now_ns)
    if until is not None:
        req.until_ns = parse_since(until, now_ns)
        if req.until_ns <= req.since_ns:
            raise ConfigError(f"--until {until} is not after --since {since}")
    return req


TAIL_FORMATS = ("table", "json", "eve", "zeek")


def cmd_tail(args) -> int:
    from sensor.output import RecordOut, resolve

    out = RecordOut(resolve(args, TAIL_FORMATS))
    req = build_subscribe_request(args, time.time_ns())
    received = 0
    # Without --follow, stored records come in one burst: the first TAIL_PRIME are held so
    # the table sizes its columns on them and lines up from the first line.
    held = None if args.follow else []
    try:
        for resp in _observer(args).Subscribe(req):
            received += 1
            record = wire.from_proto(resp.record)
            if held is not None and len(held) < TAIL_PRIME:
                held.append(record)
                continue
            _write_held(out, held)
            held = None
            out.write(record)
            out.flush()
    except grpc.RpcError as exc:
        # After the first record, UNAVAILABLE means it went away, not that it was never there.
        raise translate(exc, args.collector, received=received) from None
    finally:
        _write_held(out, held)
        out.close()
    return 0


TAIL_PRIME = 500


def _write_held(out, held) -> None:
    if held:
        out.prime(held)
        for record in held:
            out.write(record)
        out.flush()
        held.clear()


# -- query ----------------------------------------------------------------------------------

QUERY_FORMATS = ("table", "json", "csv")


def write_rows(out, columns: list[str], rows: list[list]) -> None:
    """Query rows as an aligned table, JSON objects or CSV, with --fields picking and
    ordering columns as zeek-cut does."""
    import csv

    from sensor.output import open_text

    if out.fields:
        missing = [f for f in out.fields if f not in columns]
        if missing:
            raise ConfigError(f"--fields names {', '.join(missing)}, not in the result "
                              f"(columns: {', '.join(columns)})")
        pick = [columns.index(f) for f in out.fields]
        columns, rows = list(out.fields), [[row[i] for i in pick] for row in rows]
    stream, owned = open_text(out)
    try:
        if out.fmt == "json":
            for row in rows:
                stream.write(json.dumps(dict(zip(columns, row))) + "\n")
        elif out.fmt == "csv":
            w = csv.writer(stream, lineterminator="\n")
            w.writerow(columns)
            w.writerows([_csv_cell(v) for v in row] for row in rows)
        else:
            from sensor.export.table import humanize

            cells = [columns] + [[humanize(c, v) for c, v in zip(columns, row)] for row in rows]
            widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
            for i, row in enumerate(cells):
                stream.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
                if i == 0:
                    stream.write("  ".join("-" * w for w in widths) + "\n")
    finally:
        stream.flush()
        if owned:
            stream.close()


def _csv_cell(value):
    # Lists and structs (DNS answers, TLS ALPN) as JSON text, as `replay -o x.csv` writes them.
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else value


def cmd_query(args) -> int:
    from sensor.output import resolve

    out = resolve(args, QUERY_FORMATS)
    req = wire.observer_pb2.QueryRequest(sql=args.sql, max_rows=args.max_rows)
    try:
        resp = _observer(args).Query(req, timeout=args.timeout)
    except grpc.RpcError as exc:
        raise translate(exc, args.collector) from None
    rows = [json.loads(r) for r in resp.rows_json]
    write_rows(out, list(resp.columns), rows)
    if resp.truncated:
        print(f"loupe: more rows than --max-rows {len(rows)}; add LIMIT or use `loupe export`",
              file=sys.stderr)
    return 0


def cmd_top(args) -> int:
    from collector import top  # textual loads only for `loupe top`
    return top.cmd_top(args)


# -- registration ---------------------------------------------------------------------------

def register(tree) -> None:
    p = tree.command(
        "collector run", help="run the collector: gRPC ingest, storage, live streams",
        description="Settings come from the configuration file (collector.toml), then --set, "
                    "then the flags below, each naming its key. SIGHUP re-reads them: the "
                    "retention applies at once, other changes at the next start.")
    cfg.add_config_arguments(p, "collector")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="address to listen on (listen; default 127.0.0.1:50051; port 0 picks one)")
    p.add_argument("--data-dir", type=Path,
                   help="where loupe.duckdb lives (data_dir; default ./data without a config "
                        f"file; the service uses {SERVICE_DATA_DIR}/collector)")
    p.add_argument("--retention", help="delete records older than this (retention; default 7d)")
    p.add_argument("--tls-cert", type=Path, help="collector certificate (mTLS; tls.cert_file)")
    p.add_argument("--tls-key", type=Path, help="collector key (mTLS; tls.key_file)")
    p.add_argument("--tls-ca", type=Path,
                   help="CA that signed the sensors' certificates (mTLS; tls.client_ca_file)")
    p.add_argument("--insecure", action="store_true",
                   help="allow plaintext on a non-loopback address (insecure)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help='Prometheus /metrics address (metrics.listen; default 127.0.0.1:9465 '
                        'with a config file, else off; "" turns it off)')
    p.add_argument("--ui", metavar="HOST:PORT",
                   help='serve the web console here (ui; default off; docs/console.md). Under '
                        'mTLS it is HTTPS and asks for an analyst or admin certificate')
    p.add_argument("--ipfix", action="append", metavar="TARGET",
                   help="also export every stored flow as IPFIX to HOST:PORT (UDP) or "
                        "tcp://HOST:PORT; repeat for more targets (ipfix.targets; "
                        "docs/export.md)")
    p.add_argument("--ipfix-pen", type=int, metavar="N",
                   help="enterprise number of Loupe's own IPFIX IEs (ipfix.pen; default 32473)")
    p.add_argument("--ipfix-uniflow", action="store_const", const=True, default=None,
                   help="export each flow as two one-way IPFIX records, for collectors "
                        "that skip RFC 5103 reverse IEs (ipfix.uniflow)")
    p.add_argument("--print", action="store_true", help="print every received record, one line each")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds open streams get on shutdown (default 5)")
    p.set_defaults(func=cmd_collector_run)

    p = tree.command("collector status", help="counts, sensors and counters of a running collector")
    _add_tls_client_flags(p)
    p.set_defaults(func=cmd_collector_status)

    p = tree.command(
        "export", help="write stored records to JSON lines, Parquet or CSV",
        description="Every record kind in one call: JSON lines (and eve) hold all kinds in "
                    "one file, in time order; Parquet and CSV write one file per kind "
                    "(X.parquet holds the flows, X.http.parquet the HTTP events, ...), and "
                    "replace the whole set an earlier export left. Reads through the "
                    "running collector; with --data-dir, straight from a stopped "
                    "collector's store instead.")
    _add_tls_client_flags(p)
    add_output_arguments(p, EXPORT_FORMATS)
    p.add_argument("--data-dir", type=Path,
                   help="read this store directory directly (the collector must be stopped: "
                        "DuckDB has one writer)")
    p.add_argument("--since", metavar="T", help="only records from T on: 1h, 7d or an ISO time")
    p.add_argument("--until", metavar="T", help="only records before T")
    p.add_argument("--table", action="append", choices=EXPORT_TABLES,
                   help="only this kind (repeatable; default every kind)")
    p.set_defaults(func=cmd_export)

    p = tree.command("certs init", help="make a CA plus collector and client certificates")
    p.add_argument("--dir", type=Path, required=True, help="directory for the files (must hold none)")
    p.add_argument("--collector-name", default="loupe-collector",
                   help="DNS name of the collector (also valid: localhost, 127.0.0.1, ::1)")
    p.add_argument("--san", action="append", help="another DNS name or IP of the collector")
    p.add_argument("--sensor", action="append",
                   help="a sensor name (its identity; may only send records); repeatable")
    p.add_argument("--analyst", action="append",
                   help="an analyst name (may only read records; default: one named analyst, "
                        "unless --admin is given)")
    p.add_argument("--admin", action="append", help="an admin name (may send and read records)")
    p.set_defaults(func=cmd_certs_init)

    p = tree.command(
        "tail", help="stream records from the collector, with filters",
        description="Flags of the same name are alternatives (OR); different flags must all "
                    "match (AND), as in hubble observe. --not-<flag> excludes. Without "
                    f"--since, --first, --last and -f, shows the newest {DEFAULT_TAIL_LAST} "
                    "stored records, whatever their age.",
    )
    _add_tls_client_flags(p)
    add_filter_flags(p)
    p.add_argument("--since", metavar="T",
                   help="stored records from T: 10m, 1h, 7d ago or an ISO time")
    p.add_argument("--until", metavar="T", help="stored records before T (not with -f)")
    p.add_argument("--first", type=int, metavar="N", help="the oldest N matching stored records")
    p.add_argument("--last", type=int, metavar="N",
                   help=f"the newest N matching stored records, whatever their age "
                        f"(default {DEFAULT_TAIL_LAST} without --since, --first and -f)")
    p.add_argument("-f", "--follow", action="store_true", help="then keep streaming live records")
    p.add_argument("-n", "--number", type=int, help="stop after N records")
    add_output_arguments(p, TAIL_FORMATS)
    p.set_defaults(func=cmd_tail)

    p = tree.command("query", help="read-only SQL over the collector's store")
    _add_tls_client_flags(p)
    p.add_argument("sql", help='one SELECT, e.g. "SELECT host, count(*) FROM http GROUP BY 1"')
    p.add_argument("--max-rows", type=int, default=1000, help="row cap (default 1000)")
    p.add_argument("--timeout", type=float, default=QUERY_TIMEOUT_S,
                   help=f"seconds to wait; the collector stops the query then (default and "
                        f"the collector's own cap: {QUERY_TIMEOUT_S:g})")
    add_output_arguments(p, QUERY_FORMATS)
    p.set_defaults(func=cmd_query)

    p = tree.command(
        "top", help="full-screen live view: services, talkers, slow endpoints, DNS errors, loss",
        description="Follows the collector's live records (the filter flags are tail's) and\n"
                    "redraws every second. Rates are per second over the last 10 s or 60 s.\n"
                    "Keys: s sort column, r reverse, 1-5 or Tab pick a panel, t talkers by\n"
                    "host pair or by address, p pause, q quit.")
    _add_tls_client_flags(p)
    add_filter_flags(p)
    p.set_defaults(func=cmd_top)
