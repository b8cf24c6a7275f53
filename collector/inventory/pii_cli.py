"""`loupe pii`: PII statistics per endpoint from a running collector (Observer.Pii):
counts per type and direction with first/last seen, never a value (docs/pii.md)."""

from __future__ import annotations

import json

import grpc

from collector import cli as ccli
from collector.client import translate
from collector.inventory import cli as icli
from collector.inventory.pii import COLUMNS
from sensor.l7.pii import DIRECTIONS, TYPES
from sensor.output import add_output_arguments, resolve

TABLE_FIELDS = ["service", "method", "path_template", "type", "direction", "count",
                "last_seen_ns", "auth"]


def fetch(args) -> list[dict]:
    """The PII rows the flags select, from the collector."""
    try:
        resp = ccli._observer(args).Pii(icli._request(args), timeout=args.timeout)
    except grpc.RpcError as exc:
        raise translate(exc, args.collector) from None
    rows = [dict(zip(resp.columns, json.loads(r))) for r in resp.rows_json]
    types, directions = set(args.type or ()), set(args.direction or ())
    if args.no_auth:
        rows = [r for r in rows if not r["auth"]]
    return [r for r in rows if (not types or r["type"] in types)
            and (not directions or r["direction"] in directions)]


def cmd_pii(args) -> int:
    out = resolve(args, icli.FORMATS)
    icli._write(out, COLUMNS, fetch(args), TABLE_FIELDS)
    return 0


def register(tree) -> None:
    p = tree.command(
        "pii", help="PII statistics per endpoint: counts by type and direction",
        description="How often each endpoint carried emails, payment card numbers, IBANs, "
                    "phone numbers, SSNs, IP addresses, JWTs, API keys and passwords, in "
                    "requests and in sampled responses, with first and last seen. Counts "
                    "only: no value is ever kept (docs/pii.md). Sensors count when PII "
                    "counting is on ([pii] enabled, `loupe replay --pii`).")
    icli._common(p)
    p.add_argument("--type", action="append", choices=TYPES, help="only this type (repeatable)")
    p.add_argument("--direction", action="append", choices=DIRECTIONS,
                   help="request or response")
    p.add_argument("--no-auth", action="store_true",
                   help="only endpoints where no authentication was seen")
    add_output_arguments(p, icli.FORMATS, output_help="write to FILE (- = stdout, the default)")
    p.set_defaults(func=cmd_pii)
