"""`loupe clients`: per-client behaviour from a running collector (Observer.Clients), or
with --notices the new-client, new-country and unusual-volume notices (docs/clients.md)."""

from __future__ import annotations

import json
import sys

import grpc

from collector import cli as ccli
from collector.client import translate
from collector.clients.store import COLUMNS, NOTICE_COLUMNS
from collector.inventory import cli as icli
from sensor.export import wire
from sensor.output import add_output_arguments, resolve

TABLE_FIELDS = ["address", "principals", "requests", "error_rate", "request_rate",
                "octets_sent", "octets_received", "country", "asn", "last_seen_ns"]


def fetch(args, *, notices: bool = False) -> list[dict]:
    request = wire.observer_pb2.ClientsRequest(
        filter=icli._request(args), address=args.address or [],
        country=[c.upper() for c in (args.country or [])], notices=notices)
    try:
        resp = ccli._observer(args).Clients(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        raise translate(exc, args.collector) from None
    for peer in resp.unreachable_peers:
        print(f"loupe: peer {peer} unreachable: view is partial", file=sys.stderr)
    return [dict(zip(resp.columns, json.loads(r))) for r in resp.rows_json]


def cmd_clients(args) -> int:
    out = resolve(args, icli.FORMATS)
    if args.notices:
        icli._write(out, NOTICE_COLUMNS, fetch(args, notices=True), NOTICE_COLUMNS)
    else:
        icli._write(out, COLUMNS, fetch(args), TABLE_FIELDS)
    return 0


def register(tree) -> None:
    p = tree.command(
        "clients", help="per-client behaviour: requests, errors, bytes, endpoints, geo",
        description="One row per client (source address) merged across sensors: first and "
                    "last seen, flows, octets sent and received, requests, 4xx/5xx and "
                    "their rate, the endpoints it touched, its geo and ASN (when the sensors "
                    "enrich flows, [geoip]). --notices lists new-client, new-country and "
                    "unusual-volume notices instead (docs/clients.md).")
    icli._common(p)
    p.add_argument("--address", action="append", metavar="GLOB|CIDR",
                   help="only clients with this address: a glob or a CIDR; repeatable")
    p.add_argument("--country", action="append", metavar="CC",
                   help="only clients seen from this country (ISO code); repeatable")
    p.add_argument("--notices", action="store_true",
                   help="the notices (new_client, new_country, unusual_volume) instead")
    add_output_arguments(p, icli.FORMATS, output_help="write to FILE (- = stdout, the default)")
    p.set_defaults(func=cmd_clients)
