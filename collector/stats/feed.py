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

import math

import numpy as np
import pyarrow.compute as pc

from collector.inventory import templates
from collector.inventory.model import service_of
from collector.stats.model import _MAPPING, RESOLUTIONS, SMALL_GROUP, Bins, Event

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



# Per distinct key, not per record: the same groups Stats.add_many makes of events(), with
# the Python work (server names, path shapes, error classes, keys) done once per distinct
# tuple of the columns they come from, and the rows counted and their latencies binned by
# NumPy. Stats.add_groups adds them. Measured on this project's 2-core host, an Arrow or
# NumPy call costs 10-30 us whatever its size (batches are ~100-500 rows per table), so
# the distinct tuples are found with one dict over the zipped columns, not per-column
# dictionary encoding.

_ERROR_COLS = {"http": ("status", "grpc_status", "grpc_service"),
               "http2": ("status", "grpc_status", "grpc_service"), "dns": ("rcode",),
               "mysql": ("error_code",), "kafka": ("error_code",), "pgsql": ("severity",),
               "redis": ("error",), "mongodb": ("status",)}
_ERROR_CODE = {"": 0, "4xx": 1, "5xx": 2}
_LN2 = math.log(2)


def _ints(table, name: str) -> np.ndarray:
    return pc.fill_null(table.column(name), 0).to_numpy().astype(np.int64)


def sketch_keys(latency: np.ndarray) -> np.ndarray:
    """DDSketch bin keys of positive latencies, as LogarithmicMapping.key gives them
    (log(v, 2) * multiplier, rounded up): the vectorised log can differ from math.log in
    the last bits, so values within 1e-7 of a bin edge are keyed by the mapping itself."""
    x = np.log(latency.astype(np.float64)) / _LN2 * _MAPPING._multiplier
    keys = np.ceil(x).astype(np.int64)
    for i in np.nonzero(np.abs(x - np.rint(x)) < 1e-7)[0].tolist():
        keys[i] = _MAPPING.key(int(latency[i]))
    return keys


def groups(tables: dict) -> list[tuple]:
    """Stats.add_groups' input: (key, 10 s cell index, requests, 4xx, 5xx, Bins or None)
    for each (series key, cell) of the batch, in the order add_many(events(tables)) meets
    them, with the same counts, errors and latencies."""
    width0 = RESOLUTIONS[0][1]
    found: dict[tuple, list] = {}
    for name, table in tables.items():
        protocol = PROTOCOLS.get(name)
        names = table.schema.names
        if protocol is None or not all(n in names for n in _COMMON) or not table.num_rows:
            continue
        http = name in ("http", "http2")
        sni = name in ("tls", "quic") and "sni" in names
        grpc = name == "http2" and "grpc_service" in names   # only HTTP/2 carries gRPC
        cols = ["src_addr", "dst_addr", "dst_port"]
        if http:
            cols += ["host", "method", "path"]
            if grpc:
                cols.append("grpc_service")
        elif sni:
            cols.append("sni")
        cols += [c for c in _ERROR_COLS.get(name, ()) if c in names and c not in cols]
        cell = _ints(table, "ts_ns") // width0
        # the distinct tuple of each row, numbered in order of first appearance (dict and
        # map iterate in C: no Python frame per row)
        rows = list(zip(cell.tolist(), *(table.column(c).to_pylist() for c in cols)))
        distinct = dict.fromkeys(rows)
        for number, row in enumerate(distinct):
            distinct[row] = number
        inverse = np.fromiter(map(distinct.__getitem__, rows), np.int64, len(rows))
        r = {c: [] for c in cols}
        cells = []
        for row in distinct:
            cells.append(row[0])
            for c, v in zip(cols, row[1:]):
                r[c].append(v)
        index: list[dict] = [{}, {}, {}]
        slots: list[list] = [[], [], []]     # per slot, per distinct tuple: group or -1
        # Groups as they are first met: distinct tuples come in order of their first row
        # and a row's keys in slot order, which is the order add_many meets them
        made: list[tuple] = []
        errors = []
        for j in range(len(cells)):
            proto, endpoint = protocol, None
            if http:
                server = service_of(r["host"][j] or "", r["dst_addr"][j], r["dst_port"][j])
                method, path = r["method"][j], r["path"][j]
                if grpc and r["grpc_service"][j]:
                    proto = "grpc"
                    endpoint = ("rpc", server, method or "POST", path or "")
                elif method:
                    endpoint = ("endpoint", server, method, _path_key(path or "/"))
            elif sni and r["sni"][j]:
                server = f"{r['sni'][j].lower()}:{r['dst_port'][j]}"
            else:
                server = _addr(r["dst_addr"][j], r["dst_port"][j])
            for slot, key in enumerate((("service", proto, server),
                                        ("edge", proto, r["src_addr"][j], server), endpoint)):
                if key is None:
                    slots[slot].append(-1)
                    continue
                at = (key, cells[j])
                g = index[slot].get(at)
                if g is None:
                    g = index[slot][at] = len(index[slot])
                    made.append((slot, g, at))
                slots[slot].append(g)
            errors.append(_ERROR_CODE[_error(name, r, j)])
        err = np.array(errors, np.int64)[inverse]
        lat = _ints(table, "latency_ns") if "latency_ns" in names else None
        keys = None
        if lat is not None and (lat > 0).any():
            keys = np.zeros(len(lat), np.int64)
            keys[lat > 0] = sketch_keys(lat[lat > 0])
        counted: list = [None, None, None]
        for slot in range(3):
            ng = len(index[slot])
            if not ng:
                continue
            group = np.array(slots[slot], np.int64)[inverse]
            rows = np.nonzero(group >= 0)[0] if slot == 2 and min(slots[2]) < 0 else None
            e = err
            if rows is not None:
                group, e = group[rows], err[rows]
            requests = np.bincount(group, minlength=ng).tolist()
            e4 = np.bincount(group[e == 1], minlength=ng).tolist()
            e5 = np.bincount(group[e == 2], minlength=ng).tolist()
            if keys is None:
                bins = [None] * ng
            elif rows is None:
                bins = _bins(group, lat, keys, ng)
            else:
                bins = _bins(group, lat[rows], keys[rows], ng)
            counted[slot] = (requests, e4, e5, bins)
        for slot, g, at in made:
            requests, e4, e5, bins = counted[slot]
            have = found.get(at)
            if have is None:
                found[at] = [requests[g], e4[g], e5[g], bins[g]]
            else:   # the same series from another table: its records come after
                have[0] += requests[g]
                have[1] += e4[g]
                have[2] += e5[g]
                have[3] = _join(have[3], bins[g])
    return [(key, index0, *v) for (key, index0), v in found.items()]


def _bins(group: np.ndarray, lat: np.ndarray, keys: np.ndarray, ng: int) -> list:
    """Per group, its positive latencies in record order: a list (None when it has none),
    or Bins when there are more than SMALL_GROUP of them (then a sketch is made of them,
    and adding by bin saves work; a few are added value by value, as a list)."""
    out: list = [None] * ng
    has = lat > 0
    if not has.all():
        group, lat, keys = group[has], lat[has], keys[has]
    if not len(lat):
        return out
    n = np.bincount(group, minlength=ng)
    by_group = np.argsort(group, kind="stable")
    values = lat[by_group].tolist()
    ends = np.cumsum(n).tolist()
    q = 0
    for g, end in enumerate(ends):
        if end > q:
            out[g] = values[q:end]
        q = end
    big = n > SMALL_GROUP
    if not big.any():
        return out
    rows = np.nonzero(big[group])[0]
    group, keys = group[rows], keys[rows]
    lo = int(keys.min())
    span = int(keys.max()) - lo + 1
    if span == 1:   # one bin: each group's is that key with its count
        for g in np.nonzero(big)[0].tolist():
            out[g] = Bins([lo], [len(out[g])], out[g])
        return out
    pairs, first, counts = np.unique(group * span + (keys - lo), return_index=True,
                                     return_counts=True)
    pair_group = pairs // span
    order = np.lexsort((first, pair_group))   # per group, its bins in first-seen order
    ordered_keys = ((pairs % span) + lo)[order].tolist()
    ordered_counts = counts[order].tolist()
    per = np.bincount(pair_group, minlength=ng).tolist()
    p = 0
    for g, np_ in enumerate(per):
        if np_:
            out[g] = Bins(ordered_keys[p:p + np_], ordered_counts[p:p + np_], out[g])
        p += np_
    return out


def _join(a, b):
    """The latencies of one series and cell from two tables: a plain list in record order
    (the first table's come first), which add_many's path takes as it would."""
    if a is None or b is None:
        return a if b is None else b
    return (a.values if isinstance(a, Bins) else a) + (b.values if isinstance(b, Bins) else b)
