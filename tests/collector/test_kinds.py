"""Record kinds at the collector come from the protocol registry: each kind has its own
table, and a kind the collector does not know is refused, never stored as another."""

from __future__ import annotations

import pytest

from collector import ingest, schema
from collector.ingest import decode_batch
from collector.storage.duckdb import DuckDBStorage
from sensor.errors import SchemaError
from sensor.l7 import registry

from .conftest import batch, mixed, tls


def test_every_registered_kind_has_its_table():
    for spec in registry.kinds():
        assert schema.KIND_TABLE[spec.name] == spec.table_name
        table = schema.TABLES[spec.table_name]
        assert table.time_column == "ts_ns"
        assert table.schema.names[:9] == [n for n, _ in schema.L7_COLUMNS]


def test_a_table_of_no_kind_is_not_read_as_another_kind():
    # Before the registry, an unknown L7 table name was read back as TLS.
    row = {n: None for n in schema.TABLES["tls"].schema.names}
    with pytest.raises(KeyError, match="no record kind is stored in table 'smtp'"):
        schema.record_from_row("smtp", row)


def test_an_unknown_kind_is_refused_naming_it(monkeypatch, tmp_path):
    # A collector that does not know "tls" (its registry lacks it) while the batch carries
    # one: the batch is refused with the kind named, and nothing of it is stored.
    known = {k: v for k, v in ingest._KINDS.items() if k != "tls"}
    monkeypatch.setattr(ingest, "_KINDS", known)
    b = batch(mixed(6) + [tls(7)], 1)
    with pytest.raises(SchemaError, match=r"record 6: L7Event of kind 'tls', which this "
                                          r"collector does not know"):
        decode_batch(b)
    monkeypatch.undo()
    store = DuckDBStorage(tmp_path)
    store.store_many([decode_batch(b)], 1)
    assert store.counts()["tls"] == 1
    store.close()
