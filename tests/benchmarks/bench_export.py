"""Export path benchmark: records through queue -> spool -> gRPC -> a real collector
process (DuckDB) -> ack.

Prints:
- throughput: records/s from the first submit until every record is acked, for a burst
  that fits the export queue;
- added latency (record enqueued -> its batch acked), p50/p99, at a steady paced rate
  below capacity (the latency a live sensor sees) and for the burst (queueing included);
- spool append cost per fsync policy, for batches of 1000 flow records.

Bounded: about 30 s of wall time in total. Run with `python -m tests.benchmarks.bench_export`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from sensor.export import wire
from sensor.export.grpc_client import GrpcExportConfig, GrpcExporter
from sensor.export.spool import FsyncPolicy, Spool
from tests.export.collector_proc import CollectorProcess, wait_for
from tests.export.records import numbered_flow

BURST = 50_000
PACED_RATE = 5_000      # records/s
PACED_SECONDS = 6


def pct(values: list[int], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] / 1e6


def run_burst(address: str, spool_dir: Path) -> None:
    records = [numbered_flow(i) for i in range(BURST)]
    ex = GrpcExporter(GrpcExportConfig(target=address, sensor_id="bench", spool_dir=spool_dir,
                                       queue_records=BURST)).start()
    t0 = time.perf_counter()
    for r in records:
        ex.submit(r)
    wait_for(lambda: ex.counters()["records_acked"] >= BURST, 120, "burst acked", 0.01)
    elapsed = time.perf_counter() - t0
    lat = ex.latencies_ns()
    c = ex.counters()
    ex.close(5)
    print(f"burst {BURST} flows: {BURST / elapsed:,.0f} records/s "
          f"({c['batches_acked']} batches, {c['spool_fsyncs']} fsyncs); "
          f"enqueue->ack p50 {pct(lat, .5):.0f} ms p99 {pct(lat, .99):.0f} ms")


def run_paced(address: str, spool_dir: Path) -> None:
    ex = GrpcExporter(GrpcExportConfig(target=address, sensor_id="bench-paced",
                                       spool_dir=spool_dir)).start()
    n = 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < PACED_SECONDS:
        due = int(elapsed * PACED_RATE)
        while n < due:
            ex.submit(numbered_flow(BURST + n))
            n += 1
        time.sleep(0.002)
    wait_for(lambda: ex.counters()["records_acked"] >= n, 30, "paced acked", 0.01)
    lat = ex.latencies_ns()
    ex.close(5)
    print(f"paced {PACED_RATE}/s for {PACED_SECONDS} s ({n} flows, batch_delay 0.2 s): "
          f"enqueue->ack p50 {pct(lat, .5):.0f} ms p99 {pct(lat, .99):.0f} ms "
          f"mean {statistics.mean(lat) / 1e6:.0f} ms")


def run_spool(base: Path) -> None:
    payload = wire.batch_to_proto([numbered_flow(i) for i in range(1000)], sensor_id="b",
                                  batch_id=1, created_ns=0).SerializeToString()
    for policy in FsyncPolicy:
        spool = Spool(base / policy.value, fsync=policy, max_bytes=1 << 30)
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            bid = spool.next_batch_id()
            spool.append(bid, payload, records=1000)
        per = (time.perf_counter() - t0) / n
        spool.close()
        print(f"spool append, fsync={policy.value}: {per * 1e3:.2f} ms per batch of 1000 "
              f"({len(payload) / 1024:.0f} KiB), {1000 / per:,.0f} records/s")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        run_spool(base / "spools")
        collector = CollectorProcess(base / "db").start()
        try:
            run_burst(collector.address, base / "spool-burst")
            run_paced(collector.address, base / "spool-paced")
        finally:
            collector.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
