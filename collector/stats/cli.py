"""`loupe services` (per-service statistics), `--endpoints` (per endpoint) and `--edges`
(the service map), asking a running collector (Observer.Stats)."""

from __future__ import annotations

import sys

import grpc

from collector import cli as ccli
from collector.client import translate
from collector.inventory.cli import _common, _write
from collector.stats.model import RES_INDEX
from collector.stats.store import FIELDS
from sensor.export import wire
from sensor.output import add_output_arguments, resolve

FORMATS = ("table", "json", "csv")
TABLE_FIELDS = {
    "services": ["protocol", "service", "requests", "rate", "error_rate_4xx",
                 "error_rate_5xx", "p50_ns", "p90_ns", "p99_ns"],
    "endpoints": ["service", "method", "path", "requests", "rate", "error_rate_4xx",
                  "error_rate_5xx", "p50_ns", "p90_ns", "p99_ns"],
    "edges": ["protocol", "client", "service", "requests", "rate", "error_rate_5xx",
              "p50_ns", "p99_ns"],
}


def fetch(args, kind: str) -> list[dict]:
    from collector.stats.store import from_proto

    request = wire.observer_pb2.StatsRequest(
        kind=kind, resolution=args.resolution,
        last_ns=ccli.parse_duration(args.last) if args.last else 0,
        service=args.service or [], protocol=args.protocol or [], client=args.client or [])
    try:
        resp = ccli._observer(args).Stats(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        raise translate(exc, args.collector) from None
    if resp.dropped:
        print(f"loupe: the collector's statistics are full or were behind; {resp.dropped} "
              "events were not counted", file=sys.stderr)
    return [from_proto(s) for s in resp.stats]


def cmd_services(args) -> int:
    kind = "edges" if args.edges else "endpoints" if args.endpoints else "services"
    out = resolve(args, FORMATS)
    _write(out, list(FIELDS), fetch(args, kind), TABLE_FIELDS[kind])
    return 0


def register(tree) -> None:
    p = tree.command(
        "services", help="service statistics: rate, errors, latency p50/p90/p99; --edges: the map",
        description="Requests, rate, 4xx/5xx error rates and latency quantiles (DDSketch, "
                    "1 % relative accuracy) per service, per endpoint (--endpoints) or per "
                    "service-map edge, client -> server per protocol (--edges), merged "
                    "across sensors over the last --last of one --resolution (docs/stats.md).")
    _common(p, filters=False)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--edges", action="store_true", help="the service map: client -> server")
    which.add_argument("--endpoints", action="store_true", help="per (service, method, path)")
    p.add_argument("--resolution", choices=tuple(RES_INDEX), default="1m",
                   help="cell width: 10s (kept 1 h), 1m (1 day, the default), 1h (30 days)")
    p.add_argument("--last", metavar="D", help="window up to the newest cell: 5m, 1h, 7d "
                   "(default: all the resolution keeps)")
    p.add_argument("--protocol", action="append", metavar="P",
                   help="http, http2, grpc, dns, tls, quic, mysql, pgsql, redis, kafka, mongodb")
    p.add_argument("--client", action="append", metavar="GLOB", help="edges from this client")
    add_output_arguments(p, FORMATS, output_help="write to FILE (- = stdout, the default)")
    p.set_defaults(func=cmd_services)
