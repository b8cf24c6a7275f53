"""Schema migration, on every backend (DuckDB, ClickHouse 18.16, a cluster of two, chDB).

A store made by the previous Loupe (today's tables without the columns added since: the
L7 tables' `source` and the flows' `l7_summary`) holds rows; the current collector opens
it, adds the columns with one log line each, keeps every stored row as it was, and stores
and answers records with the new fields. A column of another type is refused in one line.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest

from collector import schema
from collector.storage.base import DecodedBatch, StoreStatus
from collector.storage.duckdb import DuckDBStorage
from sensor import model
from sensor.errors import StorageError
from tests.export import records as R

from .test_contract import as_stored, decoded

# The columns added since the previous schema, per table.
NEW = {"flows": ("l7_summary",), **{spec.table_name: ("source",)
                                   for spec in schema.registry.kinds()}}


def _old_tables() -> dict[str, schema.Table]:
    out = {}
    for name, table in schema.TABLES.items():
        drop = [table.schema.get_field_index(c) for c in NEW.get(name, ())]
        sch = table.schema
        for i in sorted(drop, reverse=True):
            sch = sch.remove(i)
        out[name] = schema.Table(name, sch, table.time_column)
    return out


def _old_batch(batch: DecodedBatch) -> DecodedBatch:
    """What the previous collector stored of a batch: its tables without the new columns."""
    tables = {name: t.drop_columns([c for c in NEW.get(name, ()) if c in t.column_names])
              for name, t in batch.tables.items()}
    return dataclasses.replace(batch, tables=tables)


OLD_RECORDS = [R.FLOW, R.HTTP, R.DNS]
SUMMARY = {"kafka_topic": "orders.eu", "kafka_client_id": "billing"}
NEW_FLOW = dataclasses.replace(R.numbered_flow(7, sensor_id="s1"), app_proto="kafka",
                               l7_summary=SUMMARY)
NEW_HTTP = dataclasses.replace(R.HTTP, uid="C9", source="tls_plaintext")


def _query_summary(store, backend_name: str) -> list:
    sql = ("SELECT uid, l7_summary['kafka_topic'] FROM flows ORDER BY uid"
           if backend_name == "duckdb" else
           "SELECT uid, l7_summary.value[indexOf(l7_summary.key, 'kafka_topic')] FROM flows "
           "ORDER BY uid")
    return [tuple(r) for r in store.query(sql, 10, 10).rows]


def test_an_older_store_gets_the_new_columns_and_keeps_its_rows(backend, monkeypatch, caplog):
    # The previous collector: today's code over the previous tables.
    with monkeypatch.context() as m:
        m.setattr(schema, "TABLES", _old_tables())
        old = backend.open()
        [res] = old.store_many([_old_batch(decoded(OLD_RECORDS, 1))], time.time_ns())
        assert res.status is StoreStatus.STORED
        old_seq = old.last_seq()
        if not backend.shared:
            old.close()

    if backend.name == "duckdb":
        # `loupe export --data-dir`: an old store is read as it is, and left unchanged.
        reader = DuckDBStorage(old.path.parent, read_only=True)
        try:
            assert sorted(reader.records_since(1, reader.last_seq()), key=repr) == \
                sorted((as_stored(r) for r in OLD_RECORDS), key=repr)
        finally:
            reader.close()

    caplog.set_level(logging.INFO, logger="collector.storage")
    store = backend.open()
    added = [r.getMessage() for r in caplog.records if "added column" in r.getMessage()]
    # One line per column and table (a cluster: on each server, local and Distributed).
    for table, cols in NEW.items():
        for col in cols:
            assert any(re.search(rf" {table}(_local)?\.{col}[ .]", line) for line in added), \
                (table, col, added)
    per_server = sum(len(c) for c in NEW.values()) + 1   # l7_summary is two arrays on ClickHouse
    assert len(added) == {"duckdb": per_server - 1, "cluster": 4 * per_server}.get(
        backend.name, per_server)

    # The stored rows are intact; the new columns read as a record without the field.
    got = sorted(store.records_since(1, store.last_seq()), key=repr)
    assert got == sorted((as_stored(r) for r in OLD_RECORDS), key=repr)
    assert {r.source for r in got if isinstance(r, model.L7Event)} == {"wire"}
    assert all(r.l7_summary == {} for r in got if isinstance(r, model.Flow))
    assert store.counts()["flows"] == 1 and store.counts()["dns"] == 1

    # New records with the new fields are stored, read back and queried.
    [res] = store.store_many([decoded([NEW_FLOW, NEW_HTTP], 2)], time.time_ns())
    assert res.status is StoreStatus.STORED and res.seq > old_seq
    new = [r for r in store.records_since(1, store.last_seq()) if r.uid in ("F00000007", "C9")]
    assert sorted(new, key=repr) == sorted([NEW_FLOW, as_stored(NEW_HTTP)], key=repr)
    assert _query_summary(store, backend.name) == [("Cx1", ""), ("F00000007", "orders.eu")] \
        if backend.name != "duckdb" else [("Cx1", None), ("F00000007", "orders.eu")]

    # Opened again: nothing more to add.
    caplog.clear()
    if not backend.shared:
        store.close()
    backend.open()
    assert not [r for r in caplog.records if "added column" in r.getMessage()]


def test_a_column_of_another_type_is_refused_in_one_line(backend, monkeypatch):
    tables = _old_tables()
    flows = tables["flows"]
    tables["flows"] = schema.Table("flows", flows.schema.insert(
        flows.schema.get_field_index("received_ns"), pa.field("l7_summary", pa.string())),
        flows.time_column)
    with monkeypatch.context() as m:
        m.setattr(schema, "TABLES", tables)
        first = backend.open()
        if not backend.shared:
            first.close()
    with pytest.raises(StorageError) as err:
        backend.open()
    text = str(err.value)
    assert "\n" not in text
    assert "flows" in text and "column l7_summary is" in text and "export" in text


def test_collectors_opening_an_older_store_at_once(backend, monkeypatch):
    """Stateless collectors in front of one ClickHouse start together, and each may find a
    column missing. Modern servers: ADD COLUMN IF NOT EXISTS, all start. 18.16 has no IF
    NOT EXISTS: a slower one stops with one line (the column exists now) and starts on
    its next try; the rows are intact either way."""
    if not backend.shared:
        pytest.skip("DuckDB: one collector per file")
    with monkeypatch.context() as m:
        m.setattr(schema, "TABLES", _old_tables())
        backend.open().store_many([_old_batch(decoded(OLD_RECORDS, 1))], time.time_ns())
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(backend.open) for _ in range(3)]
    failed = []
    for f in futures:
        try:
            f.result()
        except StorageError as exc:
            failed.append(str(exc))
    assert len(failed) < 3
    assert all("already exists" in text and "\n" not in text for text in failed)
    if backend.name == "chdb":
        assert not failed
    store = backend.open()   # the restart
    assert sorted(store.records_since(1, store.last_seq()), key=repr) == \
        sorted((as_stored(r) for r in OLD_RECORDS), key=repr)
