"""File sinks: JSON lines (to a file or stdout; sensor/export/jsonlines.py, which needs no
Arrow), Parquet and CSV.

JSON lines carry one record per line in the shape of sensor/export/jsonfmt.py, every kind
in one stream, each line tagged with "type".

Parquet and CSV are tables, one per record kind, with exactly the collector's columns
(sensor/export/tables.py; the collector adds only its own received_ns and batch_seq): nested model
values are flattened into prefixed columns (l7_coverage_*, process_*), an L7 event's
detail fields sit beside its envelope, and lists stay lists (in CSV a list cell is JSON
text; the l7_summary map is its [key, value] pairs, as Arrow lists a map). So a replayed
capture and a collector export load into the same queries. A flow without process
attribution has the zero values the collector stores for it.

One file per table: the path given holds the flows, and every other kind goes beside it
as <stem>.<table><suffix> (flows.parquet -> flows.http.parquet, flows.dns.parquet, ...),
created when the first record of that kind arrives. The flows file is always written,
empty if no flow came.

The files of one path form a set, and a run replaces the whole set: a table this run does
not write is removed, so flows.dns.parquet from an earlier run never sits beside the
flows of this one. Parquet files cannot be read before their footer is written at close,
so each table is written under a hidden temporary name (.<name>.partial) and the set is
replaced at close: until then the earlier set stays whole. CSV can be read while it
grows, so the earlier set is removed when the sink opens and the tables are written in
place.

Memory is bounded: Parquet rows are buffered per table up to ROW_GROUP_ROWS and then
written as one row group; CSV rows go straight to the file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sensor import model
from sensor.errors import ConfigError
from sensor.export import tables
from sensor.export.jsonlines import JsonLinesSink, storage_error as _storage_error
from sensor.l7 import registry

__all__ = [
    "JsonLinesSink", "ParquetSink", "CsvSink", "open_sink", "flatten", "table_schema",
    "table_path", "ROW_GROUP_ROWS",
]

# Rows buffered per table before a Parquet row group is written: large enough for good
# compression and fast scans, small enough (tens of MiB for flows) to bound memory.
ROW_GROUP_ROWS = 65_536

_EMPTY_PROCESS = model.ProcessInfo()
_COLUMNS = tables.kind_columns()
_KIND_TABLE = tables.kind_tables()


def table_schema(table: str) -> pa.Schema:
    """The collector's table schema without the collector-only columns."""
    return pa.schema([pa.field(n, t) for n, t in _COLUMNS[table]])


def _value(value: Any) -> Any:
    if type(value) is registry.Counts:   # HTTP pii: the column is JSON text
        return value.json()
    if dataclasses.is_dataclass(value):  # a member of a list of structs (a DNS answer)
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_value(v) for v in value]
    if isinstance(value, model.FlowEndReason):
        return int(value)
    return value


def flatten(record: model.Record) -> dict[str, Any]:
    """One table row: column name -> value, in the collector's flattening."""
    row: dict[str, Any] = {}
    if isinstance(record, model.L7Event):
        for f in dataclasses.fields(record):
            if f.name != "detail":
                row[f.name] = getattr(record, f.name)
        for f in dataclasses.fields(record.detail):
            row[f.name] = _value(getattr(record.detail, f.name))
        return row
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name == "process" and value is None:
            value = _EMPTY_PROCESS
        if f.name == "l7_summary":
            # The MAP column as Arrow gives it back (to_pylist, pandas): (key, value) pairs.
            row[f.name] = list(value.items())
            continue
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                row[f"{f.name}_{sub.name}"] = getattr(value, sub.name)
        else:
            row[f.name] = _value(value)
    return row


def table_path(path: Path, table: str) -> Path:
    """Where one table's rows go: the flows at `path`, others beside it."""
    if table == "flows":
        return path
    return path.with_name(f"{path.stem}.{table}{path.suffix}")


# Every table a file sink can write: the files one output path may own.
_TABLES = tuple(dict.fromkeys(["flows", *_KIND_TABLE.values()]))


def _partial(path: Path) -> Path:
    """Where a table is written before it replaces `path` (hidden, same directory, so
    the rename is atomic)."""
    return path.with_name(f".{path.name}.partial")


def _replace_set(path: Path, written: dict[str, Path]) -> None:
    """Make the set of `path` exactly the tables in `written` (table -> the file holding
    its new contents, moved into place); every other table of the set is removed."""
    # Stale tables go first: a crash between the steps leaves part of one run's set,
    # never two runs' tables side by side.
    for table in _TABLES:
        final = table_path(path, table)
        try:
            if table in written:
                continue
            final.unlink(missing_ok=True)
        except OSError as exc:
            raise _storage_error(final, exc) from None
    for table, source in written.items():
        final = table_path(path, table)
        if source == final:
            continue
        try:
            os.replace(source, final)
        except OSError as exc:
            raise _storage_error(final, exc) from None


class ParquetSink:
    """One Parquet file per record kind (see the module docstring for the names)."""

    def __init__(self, path: str | Path, *, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.path = Path(path)
        self.written = 0
        self._group_rows = row_group_rows
        self._rows: dict[str, list[dict]] = {}
        self._writers: dict[str, pq.ParquetWriter] = {}

    def write(self, record: model.Record) -> None:
        table = _KIND_TABLE[model.record_kind(record)]
        rows = self._rows.setdefault(table, [])
        rows.append(flatten(record))
        self.written += 1
        if len(rows) >= self._group_rows:
            self._write_group(table)

    def _write_group(self, table: str) -> None:
        rows = self._rows.get(table, [])
        sch = table_schema(table)
        writer = self._writers.get(table)
        path = table_path(self.path, table)
        try:
            if writer is None:
                writer = self._writers[table] = pq.ParquetWriter(_partial(path), sch)
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=sch))
        except OSError as exc:
            raise _storage_error(path, exc) from None
        rows.clear()

    def flush(self) -> None:
        # Parquet row groups are written when full; writing a tiny group on every flush
        # would make files of thousands of one-row groups. close() writes the rest.
        pass

    def close(self) -> None:
        for table in set(self._rows) | {"flows"}:
            self._write_group(table)
        for writer in self._writers.values():
            writer.close()
        _replace_set(self.path, {table: _partial(table_path(self.path, table))
                                 for table in self._writers})
        self._writers.clear()

    def abort(self) -> None:
        """The run failed or was interrupted: drop what this sink wrote (the earlier set
        stays as it was)."""
        for table, writer in self._writers.items():
            try:
                writer.close()
            except OSError:
                pass   # the file goes anyway
            _partial(table_path(self.path, table)).unlink(missing_ok=True)
        self._writers.clear()


def _csv_cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))
    return value


class CsvSink:
    """One CSV file per record kind, with a header row of the column names."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.written = 0
        self._files: dict[str, tuple[io.TextIOBase, Any, list[str]]] = {}
        # The earlier run's tables go now (the flows file is rewritten by _open).
        _replace_set(self.path, {"flows": self.path})
        self._open("flows")

    def _open(self, table: str):
        path = table_path(self.path, table)
        names = table_schema(table).names
        try:
            f = open(path, "w", newline="", encoding="utf-8")
        except OSError as exc:
            raise _storage_error(path, exc) from None
        writer = csv.writer(f)
        writer.writerow(names)
        self._files[table] = (f, writer, names)
        return self._files[table]

    def write(self, record: model.Record) -> None:
        table = _KIND_TABLE[model.record_kind(record)]
        entry = self._files.get(table) or self._open(table)
        _, writer, names = entry
        row = flatten(record)
        writer.writerow([_csv_cell(row[n]) for n in names])
        self.written += 1

    def flush(self) -> None:
        for f, _, _ in self._files.values():
            f.flush()

    def close(self) -> None:
        for f, _, _ in self._files.values():
            f.close()
        self._files.clear()


_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
              ".csv": "csv"}


def open_sink(path: str | Path, fmt: str | None = None):
    """A sink for `path` ("-" is stdout) in `fmt` ("jsonl", "parquet", "csv"), or the
    format its suffix names."""
    text = str(path)
    if fmt is None:
        fmt = "jsonl" if text == "-" else _BY_SUFFIX.get(Path(text).suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"cannot tell the output format of {text!r} from its suffix; name it .jsonl, "
            ".parquet or .csv, or give the format explicitly"
        )
    if fmt == "jsonl":
        return JsonLinesSink(text)
    if text == "-":
        raise ConfigError(f"{fmt} cannot go to stdout; give a file name, or use jsonl")
    if fmt == "parquet":
        return ParquetSink(text)
    if fmt == "csv":
        return CsvSink(text)
    raise ConfigError(f"unknown output format {fmt!r}; use jsonl, parquet or csv")
