"""An idle GrpcExporter holds no connection: the Push stream and its channel close after
idle_close_s with nothing to send or ack (an open channel keeps grpc's threads waking
~25 times a second), and the next batch opens a new one, delivered exactly once and not
counted as a reconnect. Against a real collector process."""

from __future__ import annotations

import psutil

from sensor.export.grpc_client import GrpcExportConfig, GrpcExporter
from tests.export.collector_proc import CollectorProcess, query, wait_for
from tests.export.records import numbered_flow


def _connected(port: int) -> bool:
    """Whether this process has an established TCP connection to the collector."""
    return any(c.raddr and c.raddr[1] == port and c.status == psutil.CONN_ESTABLISHED
               for c in psutil.Process().net_connections("tcp"))


def test_idle_stream_closes_and_the_next_batch_reopens_it(tmp_path):
    collector = CollectorProcess(tmp_path / "db").start()
    ex = GrpcExporter(GrpcExportConfig(
        target=collector.address, sensor_id="idle", spool_dir=tmp_path / "spool",
        batch_delay_s=0.05, initial_backoff_s=0.05, idle_close_s=0.5)).start()
    try:
        for i in range(10):
            assert ex.submit(numbered_flow(i))
        wait_for(lambda: ex.counters()["records_acked"] == 10, 10, "the first batch's ack")
        assert _connected(collector.port)
        wait_for(lambda: not _connected(collector.port), 10, "the idle stream to close")
        assert ex.counters()["idle_closes"] == 1

        for i in range(10, 20):
            assert ex.submit(numbered_flow(i))
        wait_for(lambda: ex.counters()["records_acked"] == 20, 10, "the second batch's ack")
        c = ex.counters()
        assert (c["reconnects"], c["stream_errors"], c["spool_batches_unacked"]) == (0, 0, 0)
        assert query(collector.address,
                     "SELECT count(*), count(DISTINCT uid) FROM flows") == [[20, 20]]
    finally:
        ex.close(5)
        collector.stop()
