"""What the console's pages read from a running collector: the statistics, the endpoint
inventory and its PII counts (the same objects the Observer API answers from), and the
stored alerts and flows (read-only SQL through the store, as `loupe query`).

Every function here blocks (locks, a queue flush, a query) and runs on the console's
reader thread, never on the event loop that carries ingest.
"""

from __future__ import annotations

import fnmatch
import re

from collector import schema
from collector.inventory import pii
from collector.stats.model import RESOLUTIONS, RES_INDEX, Cell, summary
from collector.stats.store import _labels

# Rows a table page shows: enough to scan, bounded so a page stays small and quick. A
# longer list is narrowed by the search box (and the CLI has every row).
MAX_ROWS = 500
# Alerts listed, newest first.
MAX_ALERTS = 200
# Cells a per-endpoint chart draws (back from the series' newest cell).
CHART_CELLS = 60
# A query the console runs is stopped after this: a page must not hold a reader for long.
QUERY_TIMEOUT_S = 10.0

# Flow columns of geo enrichment (sensor/enrich/geo.py): per end, country, city, ASN.
GEO_COLUMNS = ("src_country", "src_city", "src_asn", "dst_country", "dst_city", "dst_asn")
NO_GEO = ("no geo data: set [geoip] enabled = true (and a database) in the sensors' "
          "configuration (docs/geo.md); flows between private addresses never carry geo")


def matches(query: str, *fields: str) -> bool:
    """The search box: every word must occur in one of the fields (case-insensitive); a
    word with * or ? is a glob over a whole field."""
    for word in query.lower().split():
        if any(c in word for c in "*?["):
            if not any(fnmatch.fnmatchcase(f.lower(), word) for f in fields):
                return False
        elif not any(word in f.lower() for f in fields):
            return False
    return True


def service_map(collector, resolution: str = "1h") -> dict:
    """Edges and services over all the resolution keeps."""
    stats = collector.stats
    edges, start, end = stats.query("edges", resolution)
    services, _, _ = stats.query("services", resolution)
    edges.sort(key=lambda r: (-r["requests"], r["client"], r["service"]))
    services.sort(key=lambda r: (-r["requests"], r["service"]))
    return {"edges": edges, "services": services, "start_ns": start, "end_ns": end}


def endpoints(collector, query: str) -> dict:
    """Inventory endpoints matching the search, joined with their statistics (all the
    1 h resolution keeps: 30 days), busiest first."""
    snapshot = collector.inventory.snapshot()
    rows, _, _ = collector.stats.query("endpoints", "1h")
    stats = {(r["service"], r["method"], r["path"]): r for r in rows}
    out = []
    for ep in snapshot:
        if not matches(query, ep["service"], ep["method"], ep["path_template"]):
            continue
        st = stats.get((ep["service"], ep["method"], ep["path_template"]))
        out.append({**ep, "stats": st})
    out.sort(key=lambda e: (-e["requests"], e["service"], e["path_template"], e["method"]))
    return {"endpoints": out[:MAX_ROWS], "total": len(snapshot), "matched": len(out)}


def endpoint(collector, service: str, method: str, path: str, resolution: str = "") -> dict | None:
    """One endpoint's inventory facts and its time series (None: not in the inventory)."""
    ep = next((e for e in collector.inventory.snapshot()
               if (e["service"], e["method"], e["path_template"]) == (service, method, path)),
              None)
    if ep is None:
        return None
    cells, chosen = _cells(collector.stats, service, method, path, resolution)
    width_s = RESOLUTIONS[RES_INDEX[chosen]][1] / 1e9
    xs = [start for start, _ in cells]
    rows = [summary(cell, width_s) for _, cell in cells]
    return {"endpoint": ep, "resolution": chosen, "xs": xs, "cells": rows,
            "pii": pii.rows([ep])}


def _cells(store, service: str, method: str, path: str, wanted: str) -> tuple[list, str]:
    """The endpoint's cells at one resolution, gaps filled with empty cells, over the
    last CHART_CELLS of the series' own newest cell (a replayed capture of last year
    still draws). Without `wanted`: the finest resolution with at least 3 cells there."""
    store.flush()
    store.rekey()
    st = store.stats
    with st.lock:
        rings = [s.rings for key, s in st.series.items()
                 if key[0] in ("endpoint", "rpc")
                 and (lambda lab: (lab["service"], lab["method"], lab["path"]))(_labels(key))
                 == (service, method, path)]
        order = [wanted] if wanted in RES_INDEX else [name for name, _, _ in RESOLUTIONS]
        chosen, cells = order[-1], []
        for name in order:
            r = RES_INDEX[name]
            merged: dict[int, Cell] = {}
            newest = max((i for rs in rings for i in rs[r]), default=None)
            if newest is None:
                continue
            for rs in rings:
                for i, cell in rs[r].items():
                    if i > newest - CHART_CELLS:
                        merged.setdefault(i, Cell()).merge(cell)
            width = RESOLUTIONS[r][1]
            first = min(merged)
            chosen = name
            cells = [(i * width, merged.get(i, Cell())) for i in range(first, newest + 1)]
            if len(cells) >= 3:
                break
        return cells, chosen


def alerts(collector, rule: str = "") -> dict:
    """Newest alerts and the count per rule (rule: only that rule id)."""
    storage = collector.storage
    # Rule ids are names (letters, digits, . _ : -): anything else selects nothing
    # rather than reaching the SQL text.
    if rule and not re.fullmatch(r"[\w.:-]{1,128}", rule):
        return {"alerts": [], "rules": []}
    where = f" WHERE rule_id = '{rule}'" if rule else ""
    recent = storage.query(
        "SELECT ts_ns, rule_id, action, severity, category, reason, field, excerpt, "
        "src_addr, src_port, dst_addr, dst_port, sensor_id, enforced, count FROM alerts"
        f"{where} ORDER BY ts_ns DESC LIMIT {MAX_ALERTS}", MAX_ALERTS, QUERY_TIMEOUT_S)
    per_rule = storage.query(
        "SELECT rule_id, action, count(*) AS n, max(ts_ns) AS newest FROM alerts "
        "GROUP BY rule_id, action ORDER BY n DESC, rule_id", MAX_ROWS, QUERY_TIMEOUT_S)
    rows = [dict(zip(recent.columns, row)) for row in recent.rows]
    for r in rows:
        # BOOLEAN in DuckDB, UInt8 in a ClickHouse before 22.3 (the legacy DDL): one type.
        r["enforced"] = bool(r["enforced"])
    return {"alerts": rows, "rules": [dict(zip(per_rule.columns, row)) for row in per_rule.rows]}


def pii_rows(collector, query: str) -> dict:
    """PII counts per endpoint, type and direction, and totals per type."""
    rows = [r for r in pii.rows(collector.inventory.snapshot())
            if matches(query, r["service"], r["method"], r["path_template"], r["type"])]
    totals: dict[str, int] = {}
    for r in rows:
        totals[r["type"]] = totals.get(r["type"], 0) + r["count"]
    rows.sort(key=lambda r: (-r["count"], r["service"], r["path_template"], r["type"]))
    return {"rows": rows[:MAX_ROWS], "matched": len(rows),
            "totals": sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))}


def geo(collector) -> dict:
    """Flows and bytes per country and per ASN, both ends together; `missing` says why
    there is nothing to show."""
    columns = {f.name for f in schema.TABLES["flows"].schema}
    if not set(GEO_COLUMNS) <= columns:
        return {"missing": NO_GEO}
    storage = collector.storage

    def side(end: str, what: str) -> str:
        return (f"SELECT {end}_{what} AS k, initiator_octets + responder_octets AS b "
                f"FROM flows WHERE {end}_country <> ''")

    def grouped(what: str) -> list[dict]:
        res = storage.query(
            f"SELECT k, count(*) AS flows, sum(b) AS bytes FROM ({side('src', what)} UNION "
            f"ALL {side('dst', what)}) AS ends GROUP BY k ORDER BY flows DESC, k LIMIT 50",
            50, QUERY_TIMEOUT_S)
        return [dict(zip(("key", "flows", "bytes"), row)) for row in res.rows]

    countries, asns = grouped("country"), grouped("asn")
    cities = storage.query(
        "SELECT country, city, count(*) AS flows FROM (SELECT src_country AS country, "
        "src_city AS city FROM flows WHERE src_city <> '' UNION ALL SELECT dst_country, "
        "dst_city FROM flows WHERE dst_city <> '') AS ends GROUP BY country, city "
        "ORDER BY flows DESC, country, city LIMIT 50", 50, QUERY_TIMEOUT_S)
    if not countries:
        return {"missing": NO_GEO}
    return {"missing": "", "countries": countries,
            "asns": [a for a in asns if a["key"]],
            "cities": [dict(zip(("country", "city", "flows"), r)) for r in cities.rows]}
