"""The statistics without a collector: sketch accuracy and exact merges (sensors, windows,
a restart), error classes per protocol, retention and bounds, re-keying under the
inventory's learned templates, and the Prometheus families' bounded labels."""

from __future__ import annotations

import random
import urllib.request

import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector import schema
from collector.inventory.store import InventoryStore
from collector.stats import feed
from collector.stats.model import ALPHA, RESOLUTIONS, Event, Stats
from collector.stats.prom import OTHER, StatsMetrics
from collector.stats.store import StatsStore
from collector.storage.base import DecodedBatch
from sensor.metrics import MetricsRegistry

T0 = 1_800_000_000 * 10**9          # a minute boundary
KEY = ("service", "http", "api:80")


def exact(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def table(name: str, rows: list[dict]) -> pa.Table:
    """An Arrow table of the store's schema for `name`, unnamed columns at their zero."""
    fields = [f for f in schema.TABLES[name].schema if f.name not in ("received_ns", "batch_seq")]
    def zero(f):
        if pa.types.is_string(f.type):
            return ""
        if pa.types.is_boolean(f.type):
            return False
        return [] if pa.types.is_list(f.type) else 0
    cols = {f.name: [r.get(f.name, zero(f)) for r in rows] for f in fields}
    return pa.table(cols, schema=pa.schema(fields))


def http(path: str, *, ts: int = T0, latency: int = 10**6, status: int = 200,
         host: str = "api", client: str = "198.18.0.1") -> dict:
    return {"ts_ns": ts, "src_addr": client, "dst_addr": "198.18.0.2", "dst_port": 80,
            "method": "GET", "host": host, "path": path, "status": status,
            "latency_ns": latency, "sensor_id": "s"}


def batch(rows: list[dict], batch_id: int = 1) -> DecodedBatch:
    return DecodedBatch(sensor_id="s", batch_id=batch_id, tables={"http": table("http", rows)},
                        records=len(rows))


def test_sketch_within_alpha_and_sensor_merge_is_exact():
    rng = random.Random(15)
    values = [rng.lognormvariate(16, 1.2) for _ in range(20_000)]   # ~9 ms, heavy tail
    one, a, b = Stats(), Stats(), Stats()
    one.add_many(Event(keys=(KEY,), ts_ns=T0, latency_ns=round(v)) for v in values)
    a.add_many(Event(keys=(KEY,), ts_ns=T0, latency_ns=round(v)) for v in values[::2])
    b.add_many(Event(keys=(KEY,), ts_ns=T0, latency_ns=round(v)) for v in values[1::2])
    for series in b.series.values():
        a.merge_series(KEY, series)
    whole, _, _ = one.window("1m", 60 * 10**9, {"service"})
    merged, _, _ = a.window("1m", 60 * 10**9, {"service"})
    for q in (0.5, 0.9, 0.99):
        got = whole[KEY][0].latency.get_quantile_value(q)
        true = exact([round(v) for v in values], q)
        assert abs(got - true) <= ALPHA * true
        assert merged[KEY][0].latency.get_quantile_value(q) == got   # bin for bin


def test_ten_second_cells_merge_into_the_minute():
    stats = Stats()
    rng = random.Random(3)
    stats.add_many(Event(keys=(KEY,), ts_ns=T0 + rng.randrange(60 * 10**9),
                         latency_ns=rng.randrange(10**5, 10**8),
                         error=rng.choice(("", "", "4xx", "5xx"))) for _ in range(3000))
    tens, _, _ = stats.window("10s", 60 * 10**9, {"service"})
    minute, _, _ = stats.window("1m", 60 * 10**9, {"service"})
    ten, one = tens[KEY][0], minute[KEY][0]
    assert len(stats.series[KEY].rings[0]) == 6
    assert (ten.requests, ten.errors_4xx, ten.errors_5xx) == (one.requests, one.errors_4xx,
                                                              one.errors_5xx) != (3000, 0, 0)
    for q in (0.5, 0.9, 0.99):
        assert ten.latency.get_quantile_value(q) == one.latency.get_quantile_value(q)


def test_retention_and_bounds():
    stats = Stats()
    width, keep = RESOLUTIONS[0][1], RESOLUTIONS[0][2]
    stats.add_many([Event(keys=(KEY,), ts_ns=T0, latency_ns=1)])
    stats.add_many([Event(keys=(KEY,), ts_ns=T0 + keep * width, latency_ns=1)])
    assert T0 // width in stats.series[KEY].rings[0]
    stats.prune()   # the first 10 s cell is now more than an hour behind the newest
    assert T0 // width not in stats.series[KEY].rings[0]
    assert stats.cells == sum(len(r) for r in stats.series[KEY].rings)
    assert stats.series[KEY].total.requests == 2 and stats.dropped == 0

    small = Stats(max_series=2, max_cells=4)
    small.add_many([Event(keys=(("service", "dns", f"d{i}:53"),), ts_ns=T0, latency_ns=5)
                    for i in range(3)])
    # Two series of 3 cells would be 6: the second gets one cell, the third no series.
    assert len(small.series) == 2 and small.cells == 4 and small.dropped == 2 + 1


def test_error_classes_per_protocol():
    tables = {
        "http": table("http", [http("/a", status=503), http("/a", status=404), http("/a")]),
        "dns": table("dns", [{"ts_ns": T0, "src_addr": "c", "dst_addr": "198.18.0.9",
                              "dst_port": 53, "rcode": r, "latency_ns": 10} for r in (0, 3, 2)]),
        "redis": table("redis", [{"ts_ns": T0, "src_addr": "c", "dst_addr": "fc00::1",
                                  "dst_port": 6379, "error": e} for e in ("", "ERR x")]),
        "tls": table("tls", [{"ts_ns": T0, "src_addr": "c", "dst_addr": "198.18.0.3",
                              "dst_port": 443, "sni": "Api.Example"}]),
    }
    evs = feed.events(tables)
    assert [(e.keys[1][1], e.error) for e in evs] == [
        ("http", "5xx"), ("http", "4xx"), ("http", ""), ("dns", ""), ("dns", "4xx"),
        ("dns", "5xx"), ("redis", ""), ("redis", "5xx"), ("tls", "")]
    assert evs[0].keys == (("service", "http", "api:80"), ("edge", "http", "198.18.0.1", "api:80"),
                           ("endpoint", "api:80", "GET", "/a"))
    assert evs[6].keys[0] == ("service", "redis", "[fc00::1]:6379")
    assert evs[8].keys[1] == ("edge", "tls", "c", "api.example:443")


def test_stored_and_rekeyed_under_learned_templates(tmp_path):
    inventory = InventoryStore(tmp_path)
    store = StatsStore(tmp_path, inventory)
    users = [f"user{chr(97 + i)}{chr(97 + j)}" for i in range(6) for j in range(5)]
    rows = [http(f"/users/{u}", latency=10**6 * (1 + n % 7)) for n, u in enumerate(users)]
    for target in (inventory, store):
        target.on_stored(batch(rows))
    before, _, _ = store.query("endpoints", "10s")
    # 30 distinct names, each seen once: the inventory learns /users/{name} and the 30
    # series of the statistics merge into it.
    assert [(r["path"], r["requests"]) for r in before] == [("/users/{name}", 30)]
    store.close()
    inventory.close()

    again = StatsStore(tmp_path, InventoryStore(tmp_path))
    after, _, _ = again.query("endpoints", "10s")
    assert after == before
    assert again.query("services", "1h")[0][0]["p50_ns"] == before[0]["p50_ns"]
    again.close()


@pytest.fixture
def scrape(tmp_path):
    registry = MetricsRegistry("collector")
    store = StatsStore(tmp_path)
    metrics = StatsMetrics(store, top_n=3)
    registry.registry.register(metrics)
    server = registry.serve("127.0.0.1:0")
    host, port = server.address

    def get() -> dict:
        body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
        return {f.name: f for f in text_string_to_metric_families(body)}

    yield store, get
    server.close()
    store.close()


def test_prometheus_labels_are_top_n_plus_other(scrape):
    store, get = scrape
    rows = [http(f"/p{i}", host=f"svc{i}", client=f"198.18.1.{i}", latency=10**6 * (i + 1))
            for i in range(10) for _ in range(i + 1)]       # svc9 busiest, svc0 quietest
    store.on_stored(batch(rows))
    store.flush()
    families = get()
    for name, labels in (("loupe_service_requests", ("service",)),
                         ("loupe_endpoint_requests", ("endpoint",)),
                         ("loupe_edge_requests", ("client", "server"))):
        samples = [s for s in families[name].samples if s.name.endswith("_total")]
        for label in labels:
            values = {s.labels[label] for s in samples}
            assert len(values) == 3 + 1 and OTHER in values, (name, label, values)
        assert sum(s.value for s in samples) == len(rows)
        (other,) = [s for s in samples if s.labels[labels[0]] == OTHER]
        assert other.value == sum(range(1, 8))              # svc0..svc6: 1 + ... + 7
    lat = {s.labels["service"]: s.value for s in families["loupe_service_latency_seconds"].samples
           if s.labels["quantile"] == "0.5"}
    assert set(lat) == {"svc7:80", "svc8:80", "svc9:80", OTHER}
    assert abs(lat["svc9:80"] - 0.010) <= ALPHA * 0.010
