"""End to end: GrpcExporter -> spool -> Ingest.Push -> a real collector process storing to
a real DuckDB file, checked by SQL through Observer.Query.

Every test counts records by uid at the collector: exactly once means count(*) equals
count(DISTINCT uid) equals what was submitted.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sensor import model
from sensor.export.grpc_client import GrpcExportConfig, GrpcExporter, TlsFiles
from sensor.export.spool import Spool
from tests.conftest import REPO
from tests.export.collector_proc import CollectorProcess, free_port, query, wait_for
from tests.export.records import ALL_KINDS, numbered_flow

FAST = dict(batch_delay_s=0.05, initial_backoff_s=0.05, max_backoff_s=0.5)


@pytest.fixture
def collector(tmp_path):
    proc = CollectorProcess(tmp_path / "db")
    yield proc
    proc.stop()


def exporter(address: str, spool_dir: Path, **kw) -> GrpcExporter:
    cfg = GrpcExportConfig(target=address, sensor_id=kw.pop("sensor_id", "s1"),
                           spool_dir=spool_dir, **{**FAST, **kw})
    return GrpcExporter(cfg)


def flow_counts(address: str, **kw) -> tuple[int, int]:
    ((n, distinct),) = query(address, "SELECT count(*), count(DISTINCT uid) FROM flows", **kw)
    return n, distinct


def spooled_ids(spool_dir: Path) -> list[int]:
    spool = Spool(spool_dir)
    ids, after = [], 0
    while (b := spool.next_unacked(after)) is not None:
        ids.append(b.batch_id)
        after = b.batch_id
    spool.close()
    return ids


def test_every_kind_is_stored_exactly_once_and_acked(collector, tmp_path):
    collector.start()
    ex = exporter(collector.address, tmp_path / "spool").start()
    for record in ALL_KINDS:
        assert ex.submit(record)
    for i in range(3000):
        assert ex.submit(numbered_flow(i))
    ex.close(10)
    c = ex.counters()
    assert c["records_queued"] == 3000 + len(ALL_KINDS)
    assert c["batches_acked"] == c["batches_spooled"] == c["batches_sent"] >= 3
    assert c["records_acked"] == 3000 + len(ALL_KINDS)
    assert (c["batches_duplicate"], c["batches_rejected"], c["spool_batches_unacked"]) == (0, 0, 0)
    assert c["spool_bytes"] == 0 and not list((tmp_path / "spool").glob("seg-*"))
    assert flow_counts(collector.address) == (3002, 3002)
    for table, kind in (("http", "http"), ("dns", "dns"), ("tls", "tls")):
        rows = query(collector.address, f"SELECT uid, sensor_id FROM {table}")
        expected = [r for r in ALL_KINDS if model.record_kind(r) == kind]
        assert [row[0] for row in rows] == [r.uid for r in expected]
    (answers,) = query(collector.address, "SELECT answers FROM dns")[0]
    assert [a["data"] for a in answers] == ["b.example.test", "198.18.0.9"]
    assert query(collector.address, "SELECT source, count FROM lost") == [["spool_full", 12]]
    lat = ex.latencies_ns()
    assert len(lat) == 3000 + len(ALL_KINDS) and min(lat) > 0


def test_collector_down_at_start_then_up(tmp_path):
    collector = CollectorProcess(tmp_path / "db")
    ex = exporter(collector.address, tmp_path / "spool").start()
    try:
        for i in range(1000):
            ex.submit(numbered_flow(i))
        wait_for(lambda: ex.counters()["spool_batches_appended"] >= 1
                 and ex.counters()["stream_errors"] >= 2, 10, "spooling while down")
        assert ex.counters()["batches_acked"] == 0
        collector.start()
        wait_for(lambda: ex.counters()["records_acked"] == 1000, 20, "delivery after start")
        ex.close(5)
        assert ex.counters()["reconnects"] >= 2
        assert flow_counts(collector.address) == (1000, 1000)
    finally:
        collector.stop()


def test_collector_sigkilled_mid_stream_loses_and_duplicates_nothing(collector, tmp_path):
    collector.start()
    ex = exporter(collector.address, tmp_path / "spool", batch_records=100).start()
    sent = 0
    stop = threading.Event()

    def feed():
        nonlocal sent
        while not stop.is_set():  # ~4000 records/s, bounded by the test's duration
            for _ in range(40):
                assert ex.submit(numbered_flow(sent))
                sent += 1
            time.sleep(0.01)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        wait_for(lambda: ex.counters()["records_acked"] > 2000, 20, "steady delivery")
        collector.kill()
        killed_at = ex.counters()["records_acked"]
        time.sleep(3)
        # Records kept coming and were spooled; nothing was acked meanwhile.
        assert ex.counters()["records_acked"] == killed_at
        assert ex.counters()["spool_batches_unacked"] > 10
        collector.start()
        time.sleep(1.5)
    finally:
        stop.set()
        feeder.join()
    ex.close(20)
    c = ex.counters()
    assert c["records_queued"] == sent and c["export_queue_full"] == 0
    assert c["spool_batches_unacked"] == 0 and c["reconnects"] >= 1
    assert flow_counts(collector.address) == (sent, sent)


def test_sensor_restart_while_collector_down(tmp_path):
    collector = CollectorProcess(tmp_path / "db")
    spool_dir = tmp_path / "spool"
    first = exporter(collector.address, spool_dir).start()
    for i in range(500):
        first.submit(numbered_flow(i))
    first.close(0.3)  # nobody to deliver to: everything stays spooled
    ids_a = spooled_ids(spool_dir)
    second = exporter(collector.address, spool_dir).start()
    for i in range(500, 1000):
        second.submit(numbered_flow(i))
    second.close(0.3)
    ids_b = spooled_ids(spool_dir)
    assert ids_b[:len(ids_a)] == ids_a
    new_ids = ids_b[len(ids_a):]
    assert new_ids and min(new_ids) > max(ids_a)  # never reused
    collector.start()
    try:
        third = exporter(collector.address, spool_dir).start()
        wait_for(lambda: third.counters()["spool_batches_unacked"] == 0, 20, "replay")
        third.close(5)
        # A reused id would have been answered DUPLICATE and its records not stored.
        assert third.counters()["batches_duplicate"] == 0
        assert third.counters()["batches_acked"] == len(ids_b)
        assert flow_counts(collector.address) == (1000, 1000)
    finally:
        collector.stop()


def test_full_spool_drops_oldest_and_the_loss_reaches_the_collector(tmp_path):
    collector = CollectorProcess(tmp_path / "db")
    spool_dir = tmp_path / "spool"
    small = dict(batch_records=50, spool_max_bytes=64 << 10, spool_segment_bytes=16 << 10)
    ex = exporter(collector.address, spool_dir, **small)
    for i in range(4000):   # threads not started yet: the queue just fills, in order
        assert ex.submit(numbered_flow(i))
    ex.start()
    ex.close(0.3)
    c = ex.counters()
    dropped = c["spool_records_dropped"]
    assert dropped > 0 and c["spool_batches_dropped"] > 0
    assert c["spool_bytes"] <= 64 << 10
    collector.start()
    try:
        again = exporter(collector.address, spool_dir, **small).start()
        wait_for(lambda: again.counters()["spool_batches_unacked"] == 0, 20, "replay")
        again.close(5)
        lost = query(collector.address,
                     "SELECT sum(count) FROM lost WHERE source = 'spool_full'")[0][0]
        stored, distinct = flow_counts(collector.address)
        assert stored == distinct
        # Exact accounting: every record is either stored or counted in a spool_full
        # LostEvent. (The dropped-records counter is a bit higher: it also counts the
        # LostEvent records of dropped batches, whose loss was re-reported.)
        assert 0 < lost <= dropped and stored + lost == 4000
        # The survivors are the newest records: the oldest were dropped.
        (min_uid,) = query(collector.address, "SELECT min(uid) FROM flows")[0]
        assert min_uid == f"F{4000 - stored:08d}"
    finally:
        collector.stop()


def test_corrupt_spool_tail_is_skipped_counted_and_reported(tmp_path):
    collector = CollectorProcess(tmp_path / "db")
    spool_dir = tmp_path / "spool"
    ex = exporter(collector.address, spool_dir, batch_records=100)
    for i in range(1000):
        ex.submit(numbered_flow(i))
    ex.start()
    ex.close(0.3)
    (seg,) = spool_dir.glob("seg-*.lsp")
    data = seg.read_bytes()
    seg.write_bytes(data[:-20])  # a torn last frame, as after a power cut
    collector.start()
    try:
        again = exporter(collector.address, spool_dir).start()
        wait_for(lambda: again.counters()["spool_batches_unacked"] == 0, 20, "replay")
        again.close(5)
        assert again.counters()["spool_corrupt_regions"] == 1
        assert flow_counts(collector.address) == (900, 900)
        assert query(collector.address, "SELECT source, count FROM lost") == [
            ["spool_corrupt", 1]]
    finally:
        collector.stop()


def test_rejected_batch_is_dropped_counted_and_the_rest_delivered(collector, tmp_path):
    collector.start()
    bad = numbered_flow(999_999)
    object.__setattr__(bad, "vlan_id", 5000)  # past 12 bits: the collector must refuse it
    ex = exporter(collector.address, tmp_path / "spool", batch_records=10)
    for i in range(10):
        ex.submit(numbered_flow(i))
    ex.submit(bad)
    for i in range(10, 19):
        ex.submit(numbered_flow(i))
    ex.start()
    ex.close(10)
    c = ex.counters()
    assert (c["batches_rejected"], c["records_rejected"], c["batches_acked"]) == (1, 10, 1)
    assert c["spool_batches_unacked"] == 0
    assert flow_counts(collector.address) == (10, 10)


def test_queue_overflow_is_counted_and_reported(collector, tmp_path):
    collector.start()
    ex = exporter(collector.address, tmp_path / "spool", queue_records=100)
    accepted = sum(ex.submit(numbered_flow(i)) for i in range(150))
    assert accepted == 100
    ex.start()
    ex.close(10)
    assert ex.counters()["export_queue_full"] == 50
    assert flow_counts(collector.address) == (100, 100)
    assert query(collector.address, "SELECT source, count, sensor_id FROM lost") == [
        ["export_queue_full", 50, "s1"]]


def test_mtls_push_with_loupe_certs_and_identity_from_the_certificate(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run(
        [sys.executable, "-m", "sensor.cli", "certs", "init", "--dir", str(certs),
         "--collector-name", "collector.loupe.test", "--sensor", "edge-7"],
        cwd=REPO, check=True, capture_output=True, timeout=60,
    )
    collector = CollectorProcess(
        tmp_path / "db",
        tls=(certs / "collector.pem", certs / "collector.key", certs / "ca.pem"),
    )
    collector.start()
    try:
        tls = TlsFiles(ca_cert=certs / "ca.pem", client_cert=certs / "edge-7.pem",
                       client_key=certs / "edge-7.key", server_name="collector.loupe.test")
        # The batch claims another sensor id; the collector must use the certificate's.
        ex = exporter(collector.address, tmp_path / "spool", sensor_id="spoofed", tls=tls)
        ex.start()
        for i in range(200):
            ex.submit(numbered_flow(i, sensor_id="spoofed"))
        ex.close(10)
        assert ex.counters()["records_acked"] == 200
        # Reading takes an analyst's certificate: a sensor's may only send.
        creds = TlsFiles(ca_cert=certs / "ca.pem", client_cert=certs / "analyst.pem",
                         client_key=certs / "analyst.key").credentials()
        rows = query(collector.address,
                     "SELECT sensor_id, count(DISTINCT uid) FROM flows GROUP BY 1",
                     credentials=creds, server_name="collector.loupe.test")
        assert rows == [["edge-7", 200]]
    finally:
        collector.stop()


def test_mtls_without_a_client_certificate_is_refused(tmp_path):
    from collector import certs as certs_mod

    certs = tmp_path / "certs"
    certs_mod.init(certs, collector_name="collector.loupe.test", sensors=["edge-7"],
                   analysts=[])
    collector = CollectorProcess(
        tmp_path / "db",
        tls=(certs / "collector.pem", certs / "collector.key", certs / "ca.pem"),
    ).start()
    try:
        # Plaintext against an mTLS collector: nothing is acked, everything stays spooled.
        ex = exporter(collector.address, tmp_path / "spool").start()
        for i in range(10):
            ex.submit(numbered_flow(i))
        wait_for(lambda: ex.counters()["stream_errors"] >= 2, 10, "refused streams")
        ex.close(0.2)
        assert ex.counters()["records_acked"] == 0
        assert ex.counters()["spool_batches_unacked"] == 1
    finally:
        collector.stop()


def test_missing_certificate_file_is_a_config_error(tmp_path):
    from sensor.errors import ConfigError

    tls = TlsFiles(ca_cert=tmp_path / "nope.pem", client_cert=tmp_path / "c.pem",
                   client_key=tmp_path / "c.key")
    with pytest.raises(ConfigError, match="loupe certs init"):
        exporter(f"127.0.0.1:{free_port()}", tmp_path / "spool", tls=tls)


def test_backoff_grows_is_capped_and_jittered(tmp_path):
    import random

    from sensor.export.grpc_client import backoff_delay

    cfg = GrpcExportConfig(target="127.0.0.1:1", sensor_id="s", spool_dir=tmp_path,
                           initial_backoff_s=0.2, max_backoff_s=10.0, backoff_jitter=0.2)
    rng = random.Random(7)
    for attempt, base in [(0, 0.2), (1, 0.4), (3, 1.6), (5, 6.4), (6, 10.0), (5000, 10.0)]:
        delays = [backoff_delay(cfg, attempt, rng) for _ in range(200)]
        assert base * 0.8 <= min(delays) and max(delays) <= base * 1.2
        assert max(delays) - min(delays) > base * 0.2  # really jittered


def test_hung_collector_triggers_ack_timeout_then_delivery(collector, tmp_path):
    import signal as sig

    collector.start()
    ex = exporter(collector.address, tmp_path / "spool", ack_timeout_s=1.0).start()
    try:
        for i in range(100):
            ex.submit(numbered_flow(i))
        wait_for(lambda: ex.counters()["records_acked"] == 100, 10, "first delivery")
        collector.proc.send_signal(sig.SIGSTOP)  # connection open, nobody answering
        for i in range(100, 200):
            ex.submit(numbered_flow(i))
        wait_for(lambda: ex.counters()["ack_timeouts"] >= 1, 10, "ack timeout")
        assert ex.counters()["records_acked"] == 100
    finally:
        collector.proc.send_signal(sig.SIGCONT)
    wait_for(lambda: ex.counters()["spool_batches_unacked"] == 0, 20, "delivery after resume")
    ex.close(5)
    assert flow_counts(collector.address) == (200, 200)
