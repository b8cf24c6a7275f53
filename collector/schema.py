"""The stored shape of Loupe records: one table per record kind, one column per model field.

The columns follow sensor/model.py field for field. Nested values are flattened into
prefixed columns (Flow.l7_coverage -> l7_coverage_*, Flow.process -> process_*), lists
stay lists (DNS answers as LIST(STRUCT), TLS ALPN and SANs as LIST(VARCHAR)), and
Flow.l7_summary is a MAP(VARCHAR, VARCHAR), so SQL needs no JSON functions. Every table
also carries two collector columns:

- received_ns: when the collector stored the row (wall clock). Retention ages rows by it,
  so replayed captures with old packet times are kept for the full retention period.
- batch_seq: the collector's commit sequence number of the batch the row came in. Live
  subscriptions use it to stitch stored history and the live stream without a gap or a
  duplicate (see collector/observer.py).

The record kinds' columns are sensor/export/tables.py's (L7 tables from the protocol
registry, sensor/l7/registry.py); this module adds the collector's columns and the
DuckDB DDL, which is derived from the Arrow types. A kind no registered protocol declares
has no table: ingest refuses it (INVALID_ARGUMENT naming it), never stores it as another.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from sensor.export.tables import (  # noqa: F401  (re-exported: the collector's names)
    ALERT_COLUMNS, BOOL, FLOW_COLUMNS, I32, I64, L7_COLUMNS, LOST_COLUMNS, STR, U8, U16, U32, U64,
    kind_columns, kind_tables,
)
from sensor.l7 import registry

COLLECTOR_COLUMNS = [("received_ns", U64), ("batch_seq", U64)]


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    schema: pa.Schema
    time_column: str  # the record's own time: `since` filters and ordering use it


def _schema(*groups) -> pa.Schema:
    return pa.schema([pa.field(n, t) for group in groups for n, t in group])


def _tables() -> dict[str, Table]:
    out = {}
    for name, columns in kind_columns().items():
        time_column = {"flows": "flow_end_ns", "lost": "interval_end_ns"}.get(name, "ts_ns")
        out[name] = Table(name, _schema(columns, COLLECTOR_COLUMNS), time_column)
    return out


TABLES: dict[str, Table] = _tables()

# Record kind (as sensor.model.record_kind names it) -> table.
KIND_TABLE = kind_tables()

# Table -> the registered protocol whose events it stores.
_TABLE_KIND = {spec.table_name: spec for spec in registry.kinds()}

_DUCKDB_TYPES = {
    U8: "UTINYINT", U16: "USMALLINT", U32: "UINTEGER", U64: "UBIGINT",
    I32: "INTEGER", I64: "BIGINT", STR: "VARCHAR", BOOL: "BOOLEAN",
}


def duckdb_type(arrow_type: pa.DataType) -> str:
    if pa.types.is_map(arrow_type):
        return f"MAP({duckdb_type(arrow_type.key_type)}, {duckdb_type(arrow_type.item_type)})"
    if pa.types.is_list(arrow_type):
        return duckdb_type(arrow_type.value_type) + "[]"
    if pa.types.is_struct(arrow_type):
        inner = ", ".join(
            f"{arrow_type.field(i).name} {duckdb_type(arrow_type.field(i).type)}"
            for i in range(arrow_type.num_fields)
        )
        return f"STRUCT({inner})"
    return _DUCKDB_TYPES[arrow_type]


def create_table_sql(table: Table) -> str:
    cols = ", ".join(f'"{f.name}" {duckdb_type(f.type)}' for f in table.schema)
    return f"CREATE TABLE IF NOT EXISTS {table.name} ({cols})"


def _strip(row: dict, prefix: str) -> dict:
    return {k[len(prefix):]: row.pop(k) for k in [k for k in row if k.startswith(prefix)]}


def record_from_row(table: str, row: dict):
    """A stored row (column -> value, collector columns included) back to a model record."""
    from sensor import model  # the model is only needed on the read side

    row = {k: v for k, v in row.items() if k not in ("received_ns", "batch_seq")}
    if table == "flows":
        coverage = _strip(row, "l7_coverage_")
        process = _strip(row, "process_")
        row["l7_coverage"] = model.L7Coverage(**coverage)
        if any(process.values()):
            row["process"] = model.ProcessInfo(**process)
        # A key -> value dict from either engine (ClickHouse's reader zips its Nested
        # columns into one); NULL in rows stored before the column existed.
        row["l7_summary"] = row.get("l7_summary") or {}
        return model.Flow(**row)
    if table == "lost":
        return model.LostEvent(**row)
    if table == "alerts":
        # NULL in rows stored before enforcement existed.
        row["enforced"] = bool(row.get("enforced"))
        row["block_expires_ns"] = row.get("block_expires_ns") or 0
        row["held_ns"] = row.get("held_ns") or 0
        return model.Alert(**row)
    spec = _TABLE_KIND.get(table)
    if spec is None:
        raise KeyError(f"no record kind is stored in table {table!r}")
    # A column an older store lacks (read without migrating: `loupe export --data-dir`)
    # takes the model's default.
    envelope = {n: row.pop(n) for n, _ in L7_COLUMNS if n in row}
    for col in registry.columns(spec.event):
        if col.type == "list<str>":
            row[col.name] = tuple(row[col.name] or ())
        elif col.type == "list<struct>":
            row[col.name] = tuple(col.of(**item) for item in row[col.name] or ())
    return model.L7Event(**envelope, detail=spec.event(**row))
