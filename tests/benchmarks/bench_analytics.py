"""What the collector's analytics stage costs, per 1000 events.

Every committed batch goes to the endpoint inventory, the statistics and the client
store (Collector._on_stored), each of which does its work on a thread of its own. Here
they are fed one after the other, in one thread, from the DecodedBatches the collector
hands them: collector.ingest.decode_batch of real RecordBatches (sensor.export.wire)
of HTTP events and the flows they ride on. bench_inventory and bench_stats measure the
inventory and the statistics alone, with memory; this is the sum, with the clients.

Workload: 100,000 HTTP events in batches of 1000 (50 services x 200 routes with a
numeric id, 500 client addresses, 2 % 5xx, over 10 minutes of event time), and one flow
per 10 events.

    .venv/bin/python -m tests.benchmarks analytics
"""

from __future__ import annotations

import gc
import os
import random
import time

from collector.cli import _tune_gc
from collector.clients.model import Clients
from collector.clients.store import _feed as clients_feed
from collector.ingest import decode_batch
from collector.inventory.model import Inventory
from collector.inventory.store import http_tables, transactions
from collector.stats import feed
from collector.stats.model import Stats
from sensor import model
from sensor.export import wire

EVENTS = 100_000
BATCH = 1000
T0 = 1_800_000_000 * 10**9
SPAN_NS = 600 * 10**9
TICK = 100   # batches between the statistics' prunes, as bench_stats


def _records(rng: random.Random, start: int) -> list:
    out = []
    for i in range(start, start + BATCH):
        ts = T0 + i * SPAN_NS // EVENTS
        client = f"198.18.{rng.randrange(2)}.{1 + rng.randrange(250)}"
        s, r = rng.randrange(50), rng.randrange(200)
        status = 500 if rng.random() < 0.02 else 200
        out.append(model.L7Event(
            uid=f"F{i // 10}", ts_ns=ts, src_addr=client, dst_addr=f"198.19.0.{1 + s}",
            src_port=40000 + i % 20000, dst_port=8080, protocol=6,
            detail=model.HttpEvent(
                method=("GET", "POST")[r % 2], host=f"svc{s}.internal",
                path=f"/v1/res{r // 10}/{rng.randrange(10**6)}/act{r % 10}?page=2",
                version="1.1", status=status, reason="X", user_agent="bench/1",
                response_body_len=512, latency_ns=round(rng.lognormvariate(16.1, 0.8)))))
        if i % 10 == 9:
            out.append(model.Flow(
                uid=f"F{i // 10}", sensor_id="", flow_start_ns=ts - 10**9, flow_end_ns=ts,
                src_addr=client, dst_addr=f"198.19.0.{1 + s}", src_port=40000 + i % 20000,
                dst_port=8080, protocol=6, ip_version=4, initiator_octets=4000,
                responder_octets=9000, initiator_packets=12, responder_packets=10,
                flow_end_reason=model.FlowEndReason.END_OF_FLOW, app_proto="http"))
    return out


def batches() -> list:
    rng = random.Random(7)
    return [decode_batch(wire.batch_to_proto(_records(rng, start), sensor_id="s1",
                                             batch_id=start + 1, created_ns=T0))
            for start in range(0, EVENTS, BATCH)]


def run(bs: list) -> dict[str, float]:
    """Process seconds of each consumer over every batch."""
    inv, stats, clients = Inventory(), Stats(), Clients()
    spent = {"inventory": 0.0, "stats": 0.0, "clients": 0.0}
    for n, b in enumerate(bs, 1):
        t0 = time.process_time()
        inv.add_many(transactions(b))
        t1 = time.process_time()
        stats.add_groups(feed.groups(b.tables))   # as collector/stats/store.py
        if n % TICK == 0:
            stats.prune()
        t2 = time.process_time()
        flows = b.tables.get("flows")
        clients_feed(clients, ([flows] if flows is not None else []) + http_tables(b))
        t3 = time.process_time()
        spent["inventory"] += t1 - t0
        spent["stats"] += t2 - t1
        spent["clients"] += t3 - t2
    assert len(inv) and len(stats.series) and clients.snapshot()
    return spent


def main() -> None:
    bs = batches()
    # The collector's garbage-collector settings (collector/cli.py), or the figure would
    # be ~40% a cost the collector does not pay.
    _tune_gc()
    best = None
    for _ in range(3):   # best of 3: the host is shared
        spent = run(bs)
        if best is None or sum(spent.values()) < sum(best.values()):
            best = spent
    per = {k: 1000 * v / EVENTS * 1000 for k, v in best.items()}
    print(f"analytics stage, {EVENTS:,} HTTP events (+{EVENTS // 10:,} flows), best of 3, "
          f"load average {os.getloadavg()[0]:.1f}:")
    print(f"  CPU: {sum(per.values()):.1f} ms per 1000 events (inventory {per['inventory']:.1f}, "
          f"statistics {per['stats']:.1f}, clients {per['clients']:.1f})")


if __name__ == "__main__":
    main()
