"""A collector that dies between a batch's records and its commit row (SIGKILL, or the
server finishing an insert after its client died): the collector the sensor resends the
batch to takes it over without storing it twice, on a real two-shard ClickHouse cluster.

The death is injected at the one place it matters: the first collector's store writes the
claim and the records, and its commit-row insert fails as the connection of a killed
process would (the server never sees it)."""

from __future__ import annotations

import itertools
import time

import pytest

from collector.ingest import decode_batch
from collector.storage import clickhouse, open_storage
from collector.storage.base import StoreStatus
from sensor.config import ClickHouseConfig, StorageConfig
from sensor.export import wire
from tests.export.records import numbered_flow

pytestmark = pytest.mark.timeout(120)

_db = itertools.count(1)


def _batch(batch_id: int, n: int):
    recs = [numbered_flow(batch_id * 1000 + i, sensor_id="t") for i in range(n)]
    return decode_batch(wire.batch_to_proto(recs, sensor_id="t", batch_id=batch_id,
                                            created_ns=time.time_ns()))


class Killed(Exception):
    pass


@pytest.mark.parametrize("records_written", [True, False])
def test_a_claimed_batch_is_taken_over_once(clickhouse_cluster, tmp_path, monkeypatch,
                                            records_written):
    database = f"takeover{next(_db)}"

    def store(server):
        return open_storage(StorageConfig(backend="clickhouse", clickhouse=ClickHouseConfig(
            port=server.port, database=database, cluster="loupe")), tmp_path)

    a, b = store(clickhouse_cluster[0]), store(clickhouse_cluster[1])
    try:
        inserts = []
        real_insert = a._conn.insert

        def dying_insert(table, columns, data, settings=None):
            inserts.append(table)
            # The claim goes through; then either the records and no commit row, or
            # nothing more at all.
            if table == "batches" and len(inserts) > 1 or (
                    table != "batches" and not records_written):
                raise Killed(table)
            return real_insert(table, columns, data, settings=settings)

        monkeypatch.setattr(a._conn, "insert", dying_insert)
        with pytest.raises(Exception):
            a.store_many([_batch(1, 300)], time.time_ns())
        monkeypatch.setattr(clickhouse, "CLAIM_SETTLE_NS", 10**9)
        t0 = time.monotonic()
        (result,) = b.store_many([_batch(1, 300)], time.time_ns())
        took = time.monotonic() - t0
        assert result.status is (StoreStatus.DUPLICATE if records_written
                                 else StoreStatus.STORED)
        ((n, distinct),) = b.query("SELECT count(), uniqExact(uid) FROM flows", 10, 30).rows
        assert (n, distinct) == (300, 300)
        # Committed now: a third resend is a plain duplicate, at once.
        (again,) = b.store_many([_batch(1, 300)], time.time_ns())
        assert again.status is StoreStatus.DUPLICATE
        assert took < 5
        # New batches are unaffected.
        (fresh,) = b.store_many([_batch(2, 10)], time.time_ns())
        assert fresh.status is StoreStatus.STORED
    finally:
        a.close()
        b.close()
