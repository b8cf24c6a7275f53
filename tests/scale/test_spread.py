"""One exporter, two real collector processes: batches are spread over both, a SIGKILLed
collector's share goes to the other, and once it is back it takes its share again.

Each collector has its own DuckDB file here (the exactly-once across collectors needs the
shared store; tests/scale/test_many_collectors.py checks that on ClickHouse), so what is
checked is delivery: every record reaches at least one collector, each collector holds
each record at most once, and the counters say what moved."""

from __future__ import annotations

import threading
import time

import pytest

from sensor.export.grpc_client import GrpcExportConfig, GrpcExporter
from tests.export.collector_proc import CollectorProcess, query, wait_for
from tests.export.records import numbered_flow

pytestmark = pytest.mark.timeout(120)

FAST = dict(batch_delay_s=0.02, batch_records=50, initial_backoff_s=0.05, max_backoff_s=0.5)


def warm_up(address: str, spool_dir) -> None:
    """One batch through a collector of its own: a fresh collector's first batch waits for
    its decoder processes (seconds on a busy host), and the spreading rightly gives a
    collector that slow less, which is not what this test looks at."""
    ex = GrpcExporter(GrpcExportConfig(target=address, sensor_id="warm", spool_dir=spool_dir,
                                       **FAST)).start()
    ex.submit(numbered_flow(0, sensor_id="warm"))
    ex.close(20)
    assert ex.counters()["records_acked"] == 1


def uids(address: str) -> list[str]:
    return [r[0] for r in query(address, "SELECT uid FROM flows WHERE sensor_id = 'spread'")]


def test_spread_failover_and_back_into_rotation(tmp_path):
    a = CollectorProcess(tmp_path / "a").start()
    b = CollectorProcess(tmp_path / "b").start()
    warm_up(a.address, tmp_path / "warm-a")
    warm_up(b.address, tmp_path / "warm-b")
    ex = GrpcExporter(GrpcExportConfig(
        target=f"{a.address},{b.address}", sensor_id="spread", spool_dir=tmp_path / "spool",
        **FAST)).start()
    try:
        # 1. Spread: 1000 flows in 20 batches, both collectors get a share. (Paced: in
        # a burst right at start, a collector whose connection is slower to come up is
        # rightly given less, and the burst is over before it is.)
        for i in range(1000):
            assert ex.submit(numbered_flow(i))
            if i % 50 == 0:
                time.sleep(0.02)
        wait_for(lambda: ex.counters()["records_acked"] == 1000, 20, "the first 1000 acked")
        first_a, first_b = len(uids(a.address)), len(uids(b.address))
        assert first_a + first_b == 1000 and first_a >= 200 and first_b >= 200

        # 2. A is SIGKILLed while records keep coming: everything still gets acked.
        stop = threading.Event()

        def feed(start: int, n: int) -> None:
            for i in range(start, start + n):
                ex.submit(numbered_flow(i))
                if i % 50 == 0:
                    time.sleep(0.01)

        feeder = threading.Thread(target=feed, args=(1000, 2000))
        feeder.start()
        time.sleep(0.1)
        a.kill()
        feeder.join()
        wait_for(lambda: ex.counters()["records_acked"] >= 3000, 30, "all 3000 acked")
        c = ex.counters()
        assert c["collectors"] == 2 and c["collectors_connected"] == 1
        assert c["stream_errors"] >= 1
        # What A had in flight when it died went again, to B.
        assert c["batches_resent"] == c["batches_released"]
        stop.set()

        # 3. A comes back on its address: its stream reconnects and takes a share again.
        a.start()
        wait_for(lambda: ex.counters()["collectors_connected"] == 2, 20, "A reconnected")
        for i in range(3000, 4000):
            assert ex.submit(numbered_flow(i))
        wait_for(lambda: ex.counters()["records_acked"] >= 4000, 20, "all 4000 acked")
        got_a, got_b = uids(a.address), uids(b.address)
        assert len(got_a) > first_a     # A is back in rotation
        assert len(got_a) == len(set(got_a)) and len(got_b) == len(set(got_b))
        assert set(got_a) | set(got_b) == {numbered_flow(i).uid for i in range(4000)}
        print(f"\nA {len(got_a)}, B {len(got_b)} flows; released {c['batches_released']}, "
              f"resent {c['batches_resent']}, failover {c['failover_ms_max']} ms")
    finally:
        ex.close(5)
        a.stop()
        b.stop()
