"""What the service statistics cost (collector/stats): CPU per 1000 events and memory.

Fed as the collector fed them record by record (feed.events, then Stats.add_many), and
as it feeds them now, per distinct key (feed.groups, then Stats.add_groups): Arrow tables
of committed batches of 1000 events. Each event counts in its
service, its client -> server edge and, for HTTP, its endpoint.

- http: 100,000 HTTP events, 20 services x 50 routes, 200 clients, latencies from a
  lognormal around 10 ms, 2 % 5xx, over 10 minutes of event time;
- mixed: 100,000 events over HTTP, DNS, PostgreSQL and Redis tables (a quarter each).

CPU is process time without tracemalloc; memory is what tracemalloc sees allocated by
the Stats after the feed, in a run of its own. One read is Stats.window over everything
at the 1 min resolution (what Observer.Stats and a scrape do per kind).

    .venv/bin/python -m tests.benchmarks stats
"""

from __future__ import annotations

import gc
import random
import time
import tracemalloc

import pyarrow as pa

from collector.stats import feed
from collector.stats.model import Stats

BATCH = 1000
EVENTS = 100_000
T0 = 1_800_000_000 * 10**9
SPAN_NS = 600 * 10**9


def _common(rng: random.Random, n: int, start: int, port: int, server: str) -> dict:
    return {"ts_ns": pa.array([T0 + (start + i) * SPAN_NS // EVENTS for i in range(n)], pa.uint64()),
            "src_addr": [f"198.18.1.{rng.randrange(200)}" for _ in range(n)],
            "dst_addr": [server] * n, "dst_port": pa.array([port] * n, pa.uint16()),
            "latency_ns": pa.array([round(rng.lognormvariate(16.1, 0.8)) for _ in range(n)],
                                   pa.uint64())}


def http_table(rng: random.Random, n: int, start: int) -> pa.Table:
    cols = _common(rng, n, start, 8080, "198.18.0.2")
    cols.update(method=["GET"] * n, host=[f"svc{rng.randrange(20)}.internal" for _ in range(n)],
                path=[f"/v1/res{rng.randrange(50)}/{rng.randrange(10**6)}" for _ in range(n)],
                status=pa.array([500 if rng.random() < 0.02 else 200 for _ in range(n)],
                                pa.uint16()))
    return pa.table(cols)


def other_table(name: str, rng: random.Random, n: int, start: int) -> pa.Table:
    port = {"dns": 53, "pgsql": 5432, "redis": 6379}[name]
    cols = _common(rng, n, start, port, f"198.18.0.{port % 200}")
    if name == "dns":
        cols["rcode"] = pa.array([rng.choice((0, 0, 0, 3)) for _ in range(n)], pa.int32())
    elif name == "pgsql":
        cols["severity"] = [rng.choice(("", "", "ERROR")) for _ in range(n)]
    else:
        cols["error"] = [rng.choice(("", "", "", "ERR x")) for _ in range(n)]
    return pa.table(cols)


def batches(mixed: bool) -> list[dict]:
    rng = random.Random(7)
    out = []
    for start in range(0, EVENTS, BATCH):
        if not mixed:
            out.append({"http": http_table(rng, BATCH, start)})
            continue
        q = BATCH // 4
        out.append({"http": http_table(rng, q, start), "dns": other_table("dns", rng, q, start),
                    "pgsql": other_table("pgsql", rng, q, start),
                    "redis": other_table("redis", rng, q, start)})
    return out


# Batches between two ticks (prune and freeze; every 10 s of wall time in the collector):
# 100 batches = 100,000 events every 10 s.
TICK = 100


def fill(bs: list[dict]) -> Stats:
    stats = Stats()
    for n, tables in enumerate(bs, 1):
        stats.add_many(feed.events(tables))
        if n % TICK == 0:
            stats.prune()
    return stats


def run(name: str, mixed: bool) -> None:
    bs = batches(mixed)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    stats = fill(bs)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    series, cells, dropped = len(stats.series), stats.cells, stats.dropped
    del stats
    gc.collect()

    t0 = time.process_time()
    evs = [feed.events(tables) for tables in bs]
    t1 = time.process_time()
    stats = Stats()
    for n, e in enumerate(evs, 1):
        stats.add_many(e)
        if n % TICK == 0:
            stats.prune()
    t2 = time.process_time()
    stats.window("1m", 3600 * 10**9, {"service", "endpoint", "rpc", "edge"})
    t3 = time.process_time()
    per = lambda s: 1000 * s / EVENTS * 1000  # noqa: E731 - ms per 1000 events
    print(f"{name}: {EVENTS:,} events -> {series:,} series, {cells:,} cells, {dropped} dropped")
    print(f"  CPU: {per(t2 - t0):.1f} ms per 1000 events (feed.events {per(t1 - t0):.1f}, "
          f"add_many {per(t2 - t1):.1f}); one read of every series {1000 * (t3 - t2):.0f} ms")
    del stats
    gc.collect()
    t4 = time.process_time()
    gs = [feed.groups(tables) for tables in bs]
    t5 = time.process_time()
    stats = Stats()
    for n, g in enumerate(gs, 1):
        stats.add_groups(g)
        if n % TICK == 0:
            stats.prune()
    t6 = time.process_time()
    print(f"  per distinct key, as the collector runs it: {per(t6 - t4):.1f} ms per 1000 "
          f"events (feed.groups {per(t5 - t4):.1f}, add_groups {per(t6 - t5):.1f})")
    print(f"  memory: {used / 2**20:.1f} MiB ({used / max(1, cells):,.0f} B per cell)")


def main() -> None:
    run("http (20 services x 50 routes, 200 clients)", mixed=False)
    run("mixed (HTTP, DNS, PostgreSQL, Redis)", mixed=True)


if __name__ == "__main__":
    main()
