"""ClickHouse specifics: the DDL generation each server gets, TTL, the server-side
read-only guard, query timeouts and cancels, and collectors on a shared server."""

from __future__ import annotations

import threading
import time

import pytest

from collector.storage import open_storage
from collector.storage.base import Cancel
from collector.storage.clickhouse import ClickHouseStorage
from sensor.config import ClickHouseConfig, StorageConfig
from sensor.errors import QueryError, StorageError
from sensor.export import wire
from tests.collector.conftest import batch, flow, http, push, query, subscribe, start_collector  # noqa: F401

from .chdb_conn import ChdbConn
from .test_contract import DAY_NS, _flow, decoded


def config(server, database: str) -> StorageConfig:
    return StorageConfig(backend="clickhouse", clickhouse=ClickHouseConfig(
        port=server.port, database=database))


def show(store, table: str) -> str:
    return store._conn.execute(f"SHOW CREATE TABLE {table}")[0][0]


def test_the_server_version_picks_the_ddl(clickhouse_server, chdb_session, tmp_path):
    legacy = open_storage(config(clickhouse_server, "ddl"), tmp_path)
    modern = ClickHouseStorage(ChdbConn(chdb_session, "ddl"))
    try:
        assert not legacy.modern and "ClickHouse 18.16" in legacy.description
        assert modern.modern
        old, new = show(legacy, "flows"), show(modern, "flows")
        for text in (old, new):
            assert "PARTITION BY toYYYYMMDD(toDateTime(intDiv(received_ns, 1000000000), 'UTC'))" in text
            assert "ORDER BY (intDiv(flow_end_ns, 3600000000000), app_proto, dst_port" in text
        assert "LowCardinality" not in old and "IPv6" not in old and "CODEC" not in old
        assert "`app_proto` LowCardinality(String)" in new
        assert "`src_addr` IPv6" in new
        assert "`flow_end_ns` UInt64 CODEC(DoubleDelta, LZ4)" in new
        assert "`l7_coverage_inspected` Bool" in new
        assert "`answers.name` Array(String)" in show(modern, "dns")
    finally:
        legacy.close()
        modern.close()


def test_ttl_expires_rows_on_a_modern_engine(chdb_session):
    store = ClickHouseStorage(ChdbConn(chdb_session, "ttl"))
    now = time.time_ns()
    store.store_many([decoded([_flow(1, 5)], 1)], now - 3 * DAY_NS)
    store.store_many([decoded([_flow(2, 6)], 2)], now)
    store.set_retention(DAY_NS)
    assert "TTL toDateTime(intDiv(received_ns, 1000000000)) + toIntervalSecond(86400)" \
        in show(store, "flows")
    # The TTL, not delete_older_than, removes the old row (at a merge).
    store._conn.execute("OPTIMIZE TABLE flows FINAL")
    assert [r.uid for r in store.records_since(1, store.last_seq())] == ["F00000002"]


def test_the_server_keeps_analysts_read_only(clickhouse_server, tmp_path):
    store = open_storage(config(clickhouse_server, "ro"), tmp_path)
    try:
        # Past the statement check, the server's readonly=1 still refuses table
        # functions (files, URLs, other servers) and any attempt to lift it.
        with pytest.raises(QueryError, match="Table functions are forbidden in readonly"):
            store.query("SELECT * FROM file('/etc/passwd', 'CSV', 'a String')", 10, 10)
        with pytest.raises(QueryError, match="readonly"):
            store.query("SELECT 1 SETTINGS readonly = 0", 10, 10)
    finally:
        store.close()


def test_a_query_is_stopped_at_its_timeout_and_on_cancel(clickhouse_server, tmp_path):
    store = open_storage(config(clickhouse_server, "slow"), tmp_path)
    slow = "SELECT count() FROM system.numbers WHERE number % 7 = 1000000007"
    try:
        with pytest.raises(QueryError, match="ran longer than 1 s and was stopped"):
            store.query(slow, 10, 1)
        cancel = Cancel()
        threading.Timer(0.3, cancel).start()
        with pytest.raises(QueryError, match="cancelled by its client"):
            store.query(slow, 10, 60, cancel)
    finally:
        store.close()


def test_an_unreachable_server_is_one_line(tmp_path):
    from tests.storage.clickhouse_proc import free_port

    with pytest.raises(StorageError, match=r"cannot reach ClickHouse at 127.0.0.1:\d+: .*"
                                           r"check \[storage.clickhouse\]"):
        open_storage(StorageConfig(backend="clickhouse", clickhouse=ClickHouseConfig(
            port=free_port())), tmp_path)


def test_two_collectors_on_one_server(clickhouse_server, start_collector, tmp_path):  # noqa: F811
    storage = config(clickhouse_server, "two")
    # Each collector keeps its local state (not the records) in a directory of its own,
    # made at start as with DuckDB (the endpoint inventory failed on a missing one).
    a = start_collector(storage=storage, data_dir=tmp_path / "a")
    b = start_collector(storage=storage, data_dir=tmp_path / "b")
    one = batch([flow(1), http(2)], 1)
    [ack] = push(a.address, [one])
    assert ack.status == wire.ingest_pb2.ACK_STATUS_STORED
    # The sensor failed over and resent its spool to the other collector.
    acks = push(b.address, [one, batch([flow(3)], 2)])
    assert [x.status for x in acks] == [wire.ingest_pb2.ACK_STATUS_DUPLICATE,
                                        wire.ingest_pb2.ACK_STATUS_STORED]
    for c in (a, b):
        assert query(c.address, "SELECT uid FROM flows ORDER BY uid") == [("F1",), ("F3",)]
    # History (since) through the collector that stored the later batch.
    got = subscribe(b.address, since_ns=1)
    assert sorted(r.uid for r in got) == ["F1", "F3", "H2"]
    # Export through the collector that did not store it: every record, once.
    from tests.collector.conftest import observer_stub

    chunks = observer_stub(a.address).Export(wire.observer_pb2.ExportRequest(since_ns=1))
    assert sorted(wire.from_proto(r).uid for c in chunks for r in c.records) == ["F1", "F3", "H2"]


def test_a_cluster_spreads_rows_over_both_shards(clickhouse_cluster, tmp_path):
    from collector.storage.clickhouse import Native

    first, second = clickhouse_cluster
    stores = [open_storage(StorageConfig(backend="clickhouse", clickhouse=ClickHouseConfig(
        port=s.port, database="spread", cluster="loupe")), tmp_path) for s in clickhouse_cluster]
    try:
        assert "cluster loupe of 2" in stores[0].description
        for i in range(4):
            stores[i % 2].store_many(
                [decoded([_flow(i * 50 + j, 10 + j) for j in range(50)], i)], time.time_ns())
        local = []
        for server in clickhouse_cluster:
            conn = Native("127.0.0.1", server.port, "spread", "default", "")
            local.append(conn.execute("SELECT count() FROM flows_local")[0][0])
            assert conn.execute("SELECT count() FROM batches_local")[0][0] >= 1
            conn.close()
        assert all(n > 0 for n in local) and sum(local) == 200
        # Either server answers for the whole cluster.
        for store in stores:
            assert store.query("SELECT count() FROM flows", 10, 10).rows == [(200,)]
    finally:
        for store in stores:
            store.close()


def test_an_unknown_cluster_is_one_line(clickhouse_server, tmp_path):
    with pytest.raises(StorageError, match="has no cluster 'nope' in its remote_servers"):
        open_storage(StorageConfig(backend="clickhouse", clickhouse=ClickHouseConfig(
            port=clickhouse_server.port, cluster="nope")), tmp_path)


def test_retention_keeps_rows_received_after_the_cutoff_whatever_the_server_zone(
        clickhouse_server, tmp_path):
    # The test server runs on America/Los_Angeles time (UTC-8). Partitions named by the
    # server's local day put a row received at 03:00 UTC into the previous day, which
    # ended (read as UTC) before a 01:00 UTC cutoff: the row was dropped two hours early.
    store = open_storage(config(clickhouse_server, "zone"), tmp_path)
    try:
        midnight = (time.time_ns() // DAY_NS - 2) * DAY_NS
        hour = 3600 * 10**9
        store.store_many([decoded([_flow(1, 5)], 1)], midnight + 3 * hour)
        store.store_many([decoded([_flow(2, 6)], 2)], midnight - 3 * hour)
        assert store.delete_older_than(midnight + hour) == 1
        assert [r.uid for r in store.records_since(1, store.last_seq())] == ["F00000001"]
    finally:
        store.close()
