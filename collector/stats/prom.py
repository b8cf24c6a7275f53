"""The service statistics on the collector's /metrics, with bounded label cardinality.

sensor/metrics.py's snapshot families carry one label from code; these carry services,
endpoints and edges from traffic, so they are a prometheus_client collector of their own
registered on the same registry. Per kind the TOP_N series by requests since start keep
their labels; every other series is summed (sketches merged) under the value `other`.
So each traffic label has at most TOP_N + 1 values, whatever the traffic.

  loupe_service_requests_total{protocol,service}         and _errors_total{...,class}
  loupe_service_latency_seconds{protocol,service,quantile}   over the last LATENCY_WINDOW
  loupe_endpoint_*{endpoint}     endpoint = "METHOD service/path_template"
  loupe_edge_*{protocol,client,server}
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from collector.stats.model import Cell
from collector.stats.store import KINDS, _labels

TOP_N = 20
OTHER = "other"
QUANTILES = (0.5, 0.9, 0.99)
# Latency quantiles are over the last 5 minutes (1 min cells): recent, yet enough requests.
LATENCY_WINDOW = ("1m", 5 * 60 * 10**9)
_FAMILIES = {
    "services": ("service", ("protocol", "service")),
    "endpoints": ("endpoint", ("endpoint",)),
    "edges": ("edge", ("protocol", "client", "server")),
}


def _label_values(kind: str, key: tuple) -> tuple[str, ...]:
    d = _labels(key)
    if kind == "services":
        return (d["protocol"], d["service"])
    if kind == "endpoints":
        return (f"{d['method']} {d['service']}{d['path']}",)
    return (d["protocol"], d["client"], d["service"])


def _other(kind: str) -> tuple[str, ...]:
    return {"services": ("", OTHER), "endpoints": (OTHER,), "edges": ("", OTHER, OTHER)}[kind]


def fold(kind: str, totals: dict[tuple, Cell], recent: dict[tuple, Cell], top_n: int):
    """({labels: total Cell}, {labels: recent Cell}): the top_n keys by requests, the
    rest merged under `other` (the protocol label kept: it is bounded by the registry)."""
    ranked = sorted(totals, key=lambda k: (-totals[k].requests, k))
    kept = set(ranked[:top_n])

    def labels(key: tuple) -> tuple[str, ...]:
        if key in kept:
            return _label_values(kind, key)
        other = _other(kind)
        return (_label_values(kind, key)[0], *other[1:]) if kind != "endpoints" else other

    out_total: dict[tuple, Cell] = {}
    out_recent: dict[tuple, Cell] = {}
    for source, out in ((totals, out_total), (recent, out_recent)):
        for key, cell in source.items():
            merged = out.setdefault(labels(key), Cell())
            merged.merge(cell)
    return out_total, out_recent


class StatsMetrics:
    """prometheus_client collector over a StatsStore (read at scrape time)."""

    def __init__(self, store, top_n: int = TOP_N) -> None:
        self._store = store
        self.top_n = top_n

    def collect(self):
        stats = self._store.stats
        for kind, (prefix, names) in _FAMILIES.items():
            with stats.lock:
                totals = {k: Cell(s.total.requests, s.total.errors_4xx, s.total.errors_5xx)
                          for k, s in stats.series.items() if k[0] in KINDS[kind]}
            window, _, _ = stats.window(LATENCY_WINDOW[0], LATENCY_WINDOW[1], KINDS[kind])
            recent = {k: cell for k, (cell, _) in window.items()}
            total, latest = fold(kind, totals, recent, self.top_n)
            req = CounterMetricFamily(f"loupe_{prefix}_requests", f"L7 requests per {prefix} "
                                      f"(top {self.top_n} by requests, the rest as other)",
                                      labels=list(names))
            err = CounterMetricFamily(f"loupe_{prefix}_errors", f"Errors per {prefix}, by "
                                      "class (4xx client-side, 5xx server-side; docs/stats.md)",
                                      labels=[*names, "class"])
            lat = GaugeMetricFamily(f"loupe_{prefix}_latency_seconds", f"Latency quantiles per "
                                    f"{prefix} over the last 5 minutes (DDSketch, 1 % relative "
                                    "accuracy)", labels=[*names, "quantile"])
            for labels, cell in sorted(total.items()):
                req.add_metric(list(labels), cell.requests)
                err.add_metric([*labels, "4xx"], cell.errors_4xx)
                err.add_metric([*labels, "5xx"], cell.errors_5xx)
            for labels, cell in sorted(latest.items()):
                if cell.latency.count:
                    for q in QUANTILES:
                        lat.add_metric([*labels, str(q)], cell.latency.get_quantile_value(q) / 1e9)
            yield req
            yield err
            yield lat
