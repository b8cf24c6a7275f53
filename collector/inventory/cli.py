"""`loupe endpoints` (the inventory), `loupe api spec` (OpenAPI 3.1 from it) and
`loupe api diff --spec FILE` (shadow, zombie, unused endpoints and drift), all asking a
running collector (Observer.Endpoints)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import grpc

from collector import cli as ccli
from collector.client import translate
from sensor.errors import ConfigError
from sensor.export import wire
from sensor.output import add_output_arguments, open_text, resolve

FORMATS = ("table", "json", "csv")
# Columns of the table when --fields does not choose: the rest are in json and csv.
TABLE_FIELDS = ["service", "method", "path_template", "requests", "status_classes",
                "last_seen_ns", "auth_counts", "unauthenticated", "query_params"]
COLUMNS = ["service", "method", "path_template", "template", "first_seen_ns",
           "last_seen_ns", "requests", "status_classes", "request_content_types",
           "response_content_types", "auth", "auth_counts", "authenticated",
           "unauthenticated", "query_params", "request_fields",
           "response_fields", "sensors"]
FINDING_COLUMNS = ["kind", "method", "path", "service", "detail"]
# Exit status of `api diff` with --fail when it found shadow, zombie or drift.
EXIT_FINDINGS = 3


def _request(args):
    now = time.time_ns()
    services = list(args.service or [])
    # --http-host names the host; the inventory's service is host:port.
    services += [h if ":" in h else f"{h}:*" for h in (getattr(args, "http_host", None) or [])]
    since = ccli.parse_since(args.since, now) if getattr(args, "since", None) else 0
    until = ccli.parse_since(args.until, now) if getattr(args, "until", None) else 0
    return wire.observer_pb2.EndpointsRequest(
        service=services, method=[m.upper() for m in (getattr(args, "http_method", None) or [])],
        path=getattr(args, "http_path", None) or [], sensor_id=getattr(args, "sensor_id", None) or [],
        since_ns=since, until_ns=until)


def fetch(args) -> list[dict]:
    """The endpoints the flags select, from the collector, as dicts."""
    from collector.inventory.store import from_proto

    try:
        resp = ccli._observer(args).Endpoints(_request(args), timeout=args.timeout)
    except grpc.RpcError as exc:
        raise translate(exc, args.collector) from None
    if resp.dropped:
        print(f"loupe: the collector's inventory is full; {resp.dropped} requests of new "
              "endpoints were not kept", file=sys.stderr)
    for peer in resp.unreachable_peers:
        print(f"loupe: peer {peer} unreachable: view is partial", file=sys.stderr)
    return [from_proto(e) for e in resp.endpoints]


def _cell(column: str, value):
    """A table cell: lists joined, status classes as 2xx:5, times through humanize."""
    from sensor.export.table import humanize

    if isinstance(value, dict):
        return ",".join(f"{k}:{'|'.join(v) if isinstance(v, list) else v}"
                        for k, v in value.items())
    if isinstance(value, list):
        return ",".join(map(str, value))
    return humanize(column, value)


def _write(out, columns: list[str], rows: list[dict], table_fields: list[str]) -> None:
    if out.fmt == "table":
        fields = out.fields or table_fields
        missing = [f for f in fields if f not in columns]
        if missing:
            raise ConfigError(f"--fields names {', '.join(missing)}, not a column "
                              f"({', '.join(columns)})")
        ccli.write_rows(out, fields, [[_cell(f, r[f]) for f in fields] for r in rows])
        return
    if out.fmt == "json" and not out.fields:
        stream, owned = open_text(out)
        try:
            for r in rows:
                stream.write(json.dumps(r) + "\n")
        finally:
            stream.flush()
            if owned:
                stream.close()
        return
    ccli.write_rows(out, columns, [[r[c] for c in columns] for r in rows])


def cmd_endpoints(args) -> int:
    out = resolve(args, FORMATS)
    _write(out, COLUMNS, fetch(args), TABLE_FIELDS)
    return 0


def cmd_api_spec(args) -> int:
    from collector.inventory import openapi

    fmt = args.format or ("json" if args.output and args.output.endswith(".json") else "yaml")
    if fmt not in ("yaml", "json"):
        raise ConfigError(f"--format {fmt}: a spec is written as yaml or json")
    endpoints = fetch(args)
    if not endpoints:
        raise ConfigError("the collector has seen no endpoints"
                          + (" of that service" if args.service else "")
                          + ": send it HTTP traffic first (or check --service)")
    title = f"{args.service[0]} (observed)" if args.service and len(args.service) == 1 else "Observed API"
    doc = openapi.spec(endpoints, title=title)
    if fmt == "json":
        text = json.dumps(doc, indent=2) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    return 0


def load_spec(path: Path) -> dict:
    """An OpenAPI document from YAML or JSON (JSON is YAML), or ConfigError."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the spec {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not YAML or JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("paths"), dict):
        raise ConfigError(f"{path} is not an OpenAPI document (no paths object)")
    return doc


def cmd_api_diff(args) -> int:
    from collector.inventory import openapi

    out = resolve(args, FORMATS)
    doc = load_spec(args.spec)
    findings = openapi.diff(doc, fetch(args))
    if args.kind:
        findings = [f for f in findings if f["kind"] in args.kind]
    _write(out, FINDING_COLUMNS, findings, FINDING_COLUMNS)
    if args.fail and any(f["kind"] != "unused" for f in findings):
        return EXIT_FINDINGS
    return 0


def _common(p, *, filters: bool = True) -> None:
    ccli._add_tls_client_flags(p)
    p.add_argument("--service", action="append", metavar="GLOB",
                   help="only this service, host:port glob ('api.example.com:*'); repeatable")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    if not filters:
        return
    p.add_argument("--http-method", action="append", metavar="M", help="GET, POST, ...")
    p.add_argument("--http-host", action="append", metavar="GLOB", help="host glob: '*.example.com'")
    p.add_argument("--http-path", action="append", metavar="GLOB",
                   help="path template glob: '/users/*'")
    p.add_argument("--sensor-id", action="append", metavar="ID",
                   help="endpoints this sensor saw (their facts are merged across sensors)")
    p.add_argument("--since", metavar="T", help="last seen at or after T: 10m, 1h, 7d or ISO")
    p.add_argument("--until", metavar="T", help="first seen before T")


def register(tree) -> None:
    p = tree.command(
        "endpoints", help="the endpoint inventory: service, method, learned path template",
        description="Every (service, method, path template) the collector has seen, merged "
                    "across sensors, with first/last seen, status classes, content types, "
                    "auth kinds, query parameter names and JSON body fields. Path templates "
                    "are learned from traffic (docs/inventory.md).")
    _common(p)
    add_output_arguments(p, FORMATS, output_help="write to FILE (- = stdout, the default)")
    p.set_defaults(func=cmd_endpoints)

    p = tree.command(
        "api spec", help="write an OpenAPI 3.1 document of the observed endpoints",
        description="loupe api spec [--service S] > openapi.yaml")
    _common(p)
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (- = stdout, the default)")
    p.add_argument("--format", type=str.lower, metavar="FMT", help="yaml (default) or json")
    p.set_defaults(func=cmd_api_spec)

    p = tree.command(
        "api diff", help="compare observed endpoints with an OpenAPI spec",
        description="Lists shadow endpoints (seen, not in the spec), zombie ones (deprecated "
                    "in the spec, still called), unused ones (in the spec, never seen) and "
                    "drift (query parameters or body fields the spec does not declare). "
                    "With [api] spec in collector.toml the collector itself checks every "
                    "minute and stores each new finding as an Alert (docs/inventory.md).")
    p.add_argument("--spec", type=Path, required=True, help="the OpenAPI document (YAML or JSON)")
    p.add_argument("--kind", action="append", choices=("shadow", "zombie", "unused", "drift"),
                   help="only these findings (repeatable)")
    p.add_argument("--fail", action="store_true",
                   help=f"exit {EXIT_FINDINGS} when there is a shadow, zombie or drift finding")
    _common(p)
    add_output_arguments(p, FORMATS, output_help="write to FILE (- = stdout, the default)")
    p.set_defaults(func=cmd_api_diff)
