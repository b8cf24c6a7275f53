"""From a committed batch's Arrow tables to statistics events: which series each L7 event
counts in, its latency and its error class.

Series keys (tuples, stored as JSON):
  ("service", protocol, server)           every L7 kind
  ("edge", protocol, client, server)      every L7 kind: the service map
  ("endpoint", server, method, path)      HTTP/1 and HTTP/2: path with shape parameters
                                          (templates.classify); the inventory's learned
                                          templates are applied later (store.py)
  ("rpc", server, method, path)           gRPC: /package.Service/Method, kept exactly
The client is the client address; the server is host:port for HTTP (the inventory's
service), SNI:port for TLS and QUIC when there is one, address:port otherwise.

Errors: HTTP status 4xx / 5xx; a gRPC status counts 4xx when the caller's fault
(INVALID_ARGUMENT, NOT_FOUND, ...) and 5xx otherwise; DNS FORMERR and NXDOMAIN count 4xx
and other rcodes 5xx; a MySQL/Kafka error code, a PostgreSQL ERROR/FATAL/PANIC, a Redis
error reply and a MongoDB error reply count 5xx (the server said no). TLS and QUIC
handshakes have no error class here.
"""

from __future__ import annotations

from collector.inventory import templates
from collector.inventory.model import service_of
from collector.stats.model import Event

# The protocol of each table, as edges and services name it. Tables not named here
# (flows, lost, alerts, a kind added later) are not L7 transactions for the statistics.
PROTOCOLS = {"http": "http", "http2": "http2", "dns": "dns", "tls": "tls", "quic": "quic",
             "mysql": "mysql", "pgsql": "pgsql", "redis": "redis", "kafka": "kafka",
             "mongodb": "mongodb"}
# gRPC status codes that say the caller erred (grpc/doc/statuscodes.md).
_GRPC_4XX = {3, 5, 6, 7, 9, 11, 16}
_PG_ERRORS = {"ERROR", "FATAL", "PANIC"}
_COMMON = ("ts_ns", "src_addr", "dst_addr", "dst_port")
_OPTIONAL = ("latency_ns", "host", "method", "path", "status", "sni", "grpc_service",
             "grpc_status", "rcode", "error_code", "severity", "error", "request_content_type")


def _addr(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _error(table: str, c: dict, i: int) -> str:
    if table in ("http", "http2"):
        grpc = c.get("grpc_status")
        if grpc is not None and (c.get("grpc_service") or [""])[i] and grpc[i] and grpc[i] > 0:
            return "4xx" if grpc[i] in _GRPC_4XX else "5xx"
        status = c["status"][i] or 0
        return "5xx" if status >= 500 else "4xx" if 400 <= status < 500 else ""
    if table == "dns":
        rcode = c["rcode"][i]
        return "" if rcode is None or rcode <= 0 else "4xx" if rcode in (1, 3) else "5xx"
    if table in ("mysql", "kafka"):
        return "5xx" if c["error_code"][i] else ""
    if table == "pgsql":
        return "5xx" if c["severity"][i] in _PG_ERRORS else ""
    if table == "redis":
        return "5xx" if c["error"][i] else ""
    if table == "mongodb":
        return "5xx" if c["status"][i] == "error" else ""
    return ""


def _path_key(path: str) -> str:
    """The path with shape parameters ({id}, {uuid}, ...), depth-capped as the inventory."""
    out = []
    for n, seg in enumerate(templates.segments(templates.split_target(path)[0])):
        if n == templates.MAX_DEPTH:
            out.append(templates.REST)
            break
        out.append(templates.classify(seg) or seg)
    return "/" + "/".join(out)


def events(tables: dict) -> list[Event]:
    """The statistics events of a batch's tables (table name -> pyarrow.Table)."""
    out: list[Event] = []
    for name, table in tables.items():
        protocol = PROTOCOLS.get(name)
        names = table.schema.names
        if protocol is None or not all(n in names for n in _COMMON):
            continue
        c = {n: table.column(n).to_pylist() for n in _COMMON + _OPTIONAL if n in names}
        lat = c.get("latency_ns")
        for i in range(table.num_rows):
            proto, endpoint = protocol, None
            if name in ("http", "http2"):
                server = service_of(c["host"][i] or "", c["dst_addr"][i], c["dst_port"][i])
                method, path = c["method"][i], c["path"][i]
                if name == "http2" and (c.get("grpc_service") or [""] * (i + 1))[i]:
                    proto = "grpc"
                    endpoint = ("rpc", server, method or "POST", path or "")
                elif method:
                    endpoint = ("endpoint", server, method, _path_key(path or "/"))
            elif name in ("tls", "quic") and c.get("sni") and c["sni"][i]:
                server = f"{c['sni'][i].lower()}:{c['dst_port'][i]}"
            else:
                server = _addr(c["dst_addr"][i], c["dst_port"][i])
            keys = (("service", proto, server), ("edge", proto, c["src_addr"][i], server))
            if endpoint is not None:
                keys += (endpoint,)
            latency = (lat[i] or 0) if lat is not None else 0
            out.append(Event(keys=keys, ts_ns=c["ts_ns"][i], latency_ns=max(0, latency),
                             error=_error(name, c, i)))
    return out
