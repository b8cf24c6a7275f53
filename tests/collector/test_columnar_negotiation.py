"""Columnar batches: negotiation both ways through Ingest.Options. A new collector gets
columns (and its live subscribers the records, in the sensor's order); one from before
columnar batches gets rows, even for batches already spooled as columns; a sensor told
rows only never asks."""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import pytest

from collector.ingest import COLUMNAR_REFUSED
from sensor import model
from sensor.export import columnar, wire
from sensor.export.grpc_client import GrpcExportConfig, GrpcExporter

from .conftest import (  # noqa: F401  (start_collector: a fixture)
    flow, ingest_stub, observer_stub, push, query, start_collector)
from .test_columnar import every_kind, shared_collector  # noqa: F401  (a fixture)

pb = wire.ingest_pb2


def _exporter(address: str, tmp_path, name: str, sensor_id: str = "s1",
              **kw) -> GrpcExporter:
    return GrpcExporter(GrpcExportConfig(
        target=address, sensor_id=sensor_id, spool_dir=tmp_path / name, batch_records=50,
        batch_delay_s=0.05, initial_backoff_s=0.05, max_backoff_s=0.2, **kw)).start()


def _deliver(exporter: GrpcExporter, records, timeout: float = 20.0) -> dict:
    for r in records:
        assert exporter.submit(r)
    deadline = time.monotonic() + timeout
    while exporter.counters()["records_acked"] < len(records) and time.monotonic() < deadline:
        time.sleep(0.05)
    return exporter.counters()


def _uids(address: str, sensor_id: str = "s1") -> list[str]:
    return sorted(u for (u,) in query(
        address, f"SELECT uid FROM flows WHERE sensor_id = '{sensor_id}'"))


def test_a_new_collector_gets_columns_and_live_subscribers_the_records(shared_collector,
                                                                      tmp_path):
    c = shared_collector
    first = [flow(i) for i in range(30)]   # the stream is up (Options answered) after these
    exporter = _exporter(c.address, tmp_path, "spool", sensor_id="new")
    try:
        _deliver(exporter, first)
        records = every_kind(5)
        # As stored: an empty sensor id takes the batch's ("new"); ALL_KINDS' name "s1".
        mine = [dataclasses.replace(r, sensor_id="new") for r in records if not r.sensor_id]
        got: list = []
        ready = threading.Event()

        def follow():
            call = observer_stub(c.address).Subscribe(wire.observer_pb2.SubscribeRequest(
                follow=True, number=len(mine),
                allow=[wire.observer_pb2.RecordFilter(sensor_id=["new"])]), timeout=30)
            ready.set()
            got.extend(wire.from_proto(r.record) for r in call)

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        ready.wait(10)
        time.sleep(0.3)   # the subscription is registered before the batch arrives
        counters = _deliver(exporter, records)
        reader.join(20)
    finally:
        exporter.close()
    assert counters["batches_columnar"] >= 1 and counters["batches_transcoded"] == 0
    assert counters["batches_rejected"] == 0
    # Live: every record, as stored, in the sensor's order.
    assert got == mine
    assert _uids(c.address, "new") == sorted(
        [r.uid for r in first] + [r.uid for r in records
                                  if isinstance(r, model.Flow) and r.sensor_id != "s1"])


def test_an_old_collector_gets_rows_even_for_spooled_columns(start_collector, tmp_path):
    new = start_collector()
    port = new.port
    exporter = _exporter(new.address, tmp_path, "spool")
    try:
        warm = [flow(i) for i in range(20)]
        _deliver(exporter, warm)
        columns = _deliver(exporter, [flow(100 + i) for i in range(20)])["batches_columnar"]
        assert columns >= 1
        # The collector is replaced by one from before columnar batches, on the same port
        # and store; meanwhile the sensor spools columns, as its collector took them.
        new.stop()
        spooled = [flow(200 + i) for i in range(120)]
        for r in spooled:
            assert exporter.submit(r)
        deadline = time.monotonic() + 10
        while exporter.counters()["batches_spooled"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exporter.counters()["batches_columnar"] > columns
        old = start_collector(listen=f"127.0.0.1:{port}", columnar=False)
        deadline = time.monotonic() + 20
        while (exporter.counters()["records_acked"] < 160 and time.monotonic() < deadline):
            time.sleep(0.05)
        after = exporter.counters()
        # Rows from now on: nothing more spooled as columns.
        more = _deliver(exporter, [flow(400 + i) for i in range(30)])
    finally:
        exporter.close()
    assert after["batches_transcoded"] >= 1 and after["batches_rejected"] == 0
    assert more["batches_columnar"] == after["batches_columnar"]
    want = sorted(f"F{i}" for i in [*range(20), *range(100, 120), *range(200, 320),
                                    *range(400, 430)])
    assert _uids(old.address) == want     # every record once
    # The old collector advertises nothing and refuses a columnar batch outright.
    stub = ingest_stub(old.address)
    with pytest.raises(grpc.RpcError) as err:
        stub.Options(pb.IngestOptionsRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    [ack] = push(old.address, [columnar.encode([flow(999)], sensor_id="s1", batch_id=1,
                                               created_ns=1)])
    assert (ack.status, ack.message) == (pb.ACK_STATUS_REJECTED, COLUMNAR_REFUSED)


def test_a_sensor_told_rows_only_never_asks(shared_collector, tmp_path):
    c = shared_collector
    exporter = _exporter(c.address, tmp_path, "spool", sensor_id="rows", columnar=False)
    try:
        counters = _deliver(exporter, [flow(i) for i in range(120)])
    finally:
        exporter.close()
    assert counters["batches_columnar"] == 0 and counters["records_acked"] == 120
    assert [a.encodings for a in [ingest_stub(c.address).Options(
        pb.IngestOptionsRequest(), timeout=5)]] == [[pb.BATCH_ENCODING_ROWS,
                                                     pb.BATCH_ENCODING_ARROW]]
