"""The storage contract, on every backend: DuckDB, ClickHouse 18.16 (a real server, the
legacy DDL) and chDB (a current engine, the modern DDL). Whatever the engine, the
collector stores every record kind and reads it back unchanged, deduplicates
(sensor_id, batch_id) across a restart and a second store, serves since/until history
and exports, answers read-only SQL and refuses the rest, and ages rows out."""

from __future__ import annotations

import dataclasses
import time

import pytest

from collector import schema
from collector.ingest import decode_batch
from collector.storage.base import StoreStatus
from sensor import model
from sensor.errors import QueryError
from sensor.export import wire
from tests.export import records as R

DAY_NS = 86_400 * 10**9


def decoded(recs, batch_id: int, sensor_id: str = "s1"):
    return decode_batch(wire.batch_to_proto(recs, sensor_id=sensor_id, batch_id=batch_id,
                                            created_ns=1))


def as_stored(rec, sensor_id: str = "s1"):
    """A record as the store gives it back: the batch's sensor id where it had none."""
    return rec if rec.sensor_id else dataclasses.replace(rec, sensor_id=sensor_id)


def stored_kinds(store) -> dict[str, int]:
    return {k: v for k, v in store.counts().items() if v}


def test_every_kind_round_trips(backend):
    store = backend.open()
    now = time.time_ns()
    [result] = store.store_many([decoded(R.ALL_KINDS, 1)], now)
    assert result.status is StoreStatus.STORED and result.seq == store.last_seq()
    got = list(store.records_since(1, store.last_seq()))
    want = sorted((as_stored(r) for r in R.ALL_KINDS), key=repr)
    assert sorted(got, key=repr) == want
    assert stored_kinds(store) == {"flows": 2, "http": 1, "dns": 1, "tls": 1, "lost": 1}
    # In time order across tables (flow end, event time, loss interval end).
    times = [getattr(r, "flow_end_ns", None) or getattr(r, "ts_ns", None)
             or r.interval_end_ns for r in got]
    assert times == sorted(times)
    [summary] = store.sensors()
    assert (summary.sensor_id, summary.last_batch_id, summary.records) == ("s1", 1, 6)


def test_dedup_within_a_group_across_a_restart_and_a_second_store(backend):
    first = backend.open()
    b1, b2 = decoded([R.FLOW], 1), decoded([R.HTTP], 2)
    statuses = [r.status for r in first.store_many([b1, b1, b2], time.time_ns())]
    assert statuses == [StoreStatus.STORED, StoreStatus.DUPLICATE, StoreStatus.STORED]
    seq = first.last_seq()
    if not backend.shared:
        first.close()        # DuckDB: one collector at a time; this is its restart
    second = backend.open()
    assert second.last_seq() >= seq
    results = second.store_many([b1, decoded([R.DNS], 3), b2], time.time_ns())
    assert [r.status for r in results] == [StoreStatus.DUPLICATE, StoreStatus.STORED,
                                           StoreStatus.DUPLICATE]
    assert results[1].seq > seq      # commit order continues above what is stored
    assert stored_kinds(second) == {"flows": 1, "http": 1, "dns": 1}
    if backend.shared:
        # ... and the first store, still open, sees the second one's batch as stored.
        assert first.store_many([decoded([R.DNS], 3)], time.time_ns())[0].status \
            is StoreStatus.DUPLICATE


def _flow(i: int, end_ns: int) -> model.Flow:
    return dataclasses.replace(R.numbered_flow(i), flow_start_ns=end_ns - 1, flow_end_ns=end_ns)


def test_since_until_tables_and_the_commit_snapshot(backend):
    store = backend.open()
    base = 1_700_000_000_000_000_000
    store.store_many([decoded([_flow(i, base + i) for i in range(5)]
                              + [dataclasses.replace(R.HTTP, ts_ns=base + 2)], 1)],
                     time.time_ns())
    upto = store.last_seq()
    store.store_many([decoded([_flow(9, base + 9)], 2)], time.time_ns())

    def uids(**kw):
        return [(type(r).__name__, r.uid) for r in store.records_since(**kw)]

    # upto_seq: the later batch is not part of a snapshot taken before it.
    assert uids(since_ns=base + 2, upto_seq=upto) == [
        ("Flow", "F00000002"), ("L7Event", "Cx1"), ("Flow", "F00000003"), ("Flow", "F00000004")]
    assert uids(since_ns=base + 2, upto_seq=store.last_seq())[-1] == ("Flow", "F00000009")
    assert uids(since_ns=base + 1, upto_seq=store.last_seq(), until_ns=base + 3,
                tables=("flows",)) == [("Flow", "F00000001"), ("Flow", "F00000002")]
    assert uids(since_ns=base, upto_seq=store.last_seq(), tables=("http",)) == [
        ("L7Event", "Cx1")]
    # Lazy: a reader that stops early is closed without reading the rest.
    records = store.records_since(1, store.last_seq())
    next(records)
    records.close()


def test_read_only_sql_and_the_refusals(backend):
    store = backend.open()
    store.store_many([decoded([_flow(i, 10 + i) for i in range(3)], 1)], time.time_ns())
    result = store.query("SELECT uid FROM flows ORDER BY uid", 2, 10)
    assert result.columns == ["uid"] and result.rows == [("F00000000",), ("F00000001",)]
    assert result.truncated
    assert store.query("SELECT count(*) AS n FROM flows", 10, 10).rows == [(3,)]
    with pytest.raises(QueryError, match="only read-only queries .* got INSERT"):
        store.query("INSERT INTO flows (uid) VALUES ('x')", 10, 10)
    with pytest.raises(QueryError, match="exactly one statement, got 2"):
        store.query("SELECT 1; SELECT 2", 10, 10)
    with pytest.raises(QueryError, match="only read-only queries .* got DROP"):
        store.query("DROP TABLE flows", 10, 10)
    # A semicolon inside a string or a comment is not a second statement.
    assert store.query("SELECT 'a;b' AS s -- ;\n", 10, 10).rows == [("a;b",)]
    with pytest.raises(QueryError):
        store.query("SELECT * FROM no_such_table", 10, 10)
    assert store.counts()["flows"] == 3


def test_retention_deletes_what_was_received_before_the_cutoff(backend):
    store = backend.open()
    now = time.time_ns()
    # Old packet times received now are kept: retention ages rows by receipt.
    store.store_many([decoded([_flow(1, 5), R.HTTP], 1)], now - 3 * DAY_NS)
    store.store_many([decoded([_flow(2, 6)], 2)], now)
    assert store.delete_older_than(now - DAY_NS) == 2
    assert [r.uid for r in store.records_since(1, store.last_seq())] == ["F00000002"]
    # The dedup row of a deleted batch goes with it, as in DuckDB: a resend is new.
    assert store.store_many([decoded([_flow(1, 5)], 1)], now)[0].status is StoreStatus.STORED
    assert store.delete_older_than(now - DAY_NS) == 0


def test_every_table_of_the_schema_exists(backend):
    store = backend.open()
    assert set(store.counts()) == set(schema.TABLES)
