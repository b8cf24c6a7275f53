"""What the endpoint inventory costs (collector/inventory): memory and CPU.

Two workloads, each fed as the collector feeds it (Arrow columns of committed batches of
1000 HTTP events through store.transactions, then Inventory.add_many):

- collapse: 100,000 distinct raw paths that collapse into 100 templates (10 groups x
  10 resources, each with 1000 distinct values: learned names, numbers, UUIDs);
- real: 10,000 real endpoints (50 services x 200 routes), 10 requests each, with query
  parameters and JSON body fields.

Memory is what tracemalloc sees allocated by the inventory (learner and endpoints) after
the feed, in a run of its own; CPU is process time per 1000 events without tracemalloc,
for the feed and for one read of the whole inventory (endpoints(), what
Observer.Endpoints does).

    .venv/bin/python -m tests.benchmarks inventory
"""

from __future__ import annotations

import gc
import random
import string
import time
import tracemalloc
import uuid

import pyarrow as pa

from collector.inventory.model import Inventory
from collector.inventory.store import transactions
from collector.storage.base import DecodedBatch

BATCH = 1000


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(10))


def collapse_paths(rng: random.Random) -> list[tuple[str, str, str]]:
    """(service, method, target): 100 templates x 1000 distinct values, shuffled."""
    out = []
    for g in range(10):
        for r in range(10):
            for _ in range(1000):
                kind = (g * 10 + r) % 3
                value = (_word(rng), str(rng.randrange(10**9)), str(uuid.UUID(int=rng.getrandbits(128))))[kind]
                out.append(("shop.example:443", "GET", f"/api/g{g}/res{r}/{value}"))
    rng.shuffle(out)
    return out


def real_paths(rng: random.Random) -> list[tuple[str, str, str]]:
    """50 services x 200 routes (20 resources x 10 actions, with an id), 10 requests each."""
    out = []
    for s in range(50):
        for r in range(20):
            for a in range(10):
                for i in range(10):
                    q = f"?page={i}&sort=name&f{a}=1" if i % 2 else ""
                    out.append((f"svc{s}.internal:8080", ("GET", "POST")[a % 2],
                                f"/v1/{('users', 'orders', 'items', 'carts', 'tags')[r % 5]}{r}/"
                                f"{rng.randrange(10**6)}/act{a}{q}"))
    rng.shuffle(out)
    return out


def batches(paths) -> list[DecodedBatch]:
    out = []
    for start in range(0, len(paths), BATCH):
        chunk = paths[start:start + BATCH]
        n = len(chunk)
        table = pa.table({
            "ts_ns": pa.array([1_700_000_000_000_000_000 + start + i for i in range(n)], pa.uint64()),
            "sensor_id": ["s1"] * n, "dst_addr": ["198.18.0.2"] * n,
            "dst_port": pa.array([443] * n, pa.uint16()),
            "method": [m for _, m, _ in chunk], "host": [s for s, _, _ in chunk],
            "path": [p for _, _, p in chunk], "status": pa.array([200] * n, pa.uint16()),
            "request_content_type": ["application/json"] * n,
            "response_content_type": ["application/json; charset=utf-8"] * n,
        })
        out.append(DecodedBatch(sensor_id="s1", batch_id=start, tables={"http": table}, records=n))
    return out


def feed(batches_) -> Inventory:
    inv = Inventory()
    for b in batches_:
        inv.add_many(transactions(b))
    return inv


def run(name: str, paths) -> None:
    bs = batches(paths)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    inv = feed(bs)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    templates = inv.endpoints()
    keys = len(inv)
    del inv
    gc.collect()

    t0 = time.process_time()
    inv = feed(bs)
    t1 = time.process_time()
    inv.endpoints()
    t2 = time.process_time()
    n = len(paths)
    print(f"{name}: {n:,} events, {len(templates):,} endpoints listed ({keys:,} kept keys, "
          f"{inv.learner.nodes:,} learner nodes, {inv.dropped} dropped)")
    print(f"  memory: {used / 2**20:.1f} MiB ({used / max(1, len(templates)):,.0f} B per listed endpoint)")
    print(f"  CPU: feed {1000 * (t1 - t0) / n * 1000:.2f} ms per 1000 events; "
          f"one read of the inventory {1000 * (t2 - t1):.0f} ms")


def main() -> None:
    rng = random.Random(7)
    run("collapse (100,000 raw paths -> 100 templates)", collapse_paths(rng))
    run("real (10,000 endpoints)", real_paths(rng))


if __name__ == "__main__":
    main()
