"""Columnar batches: the records of a RecordBatch as one Arrow IPC stream per table.

Why. A row batch costs the collector a protobuf parse and one attribute read per field
per record before its columns exist (collector/ingest.py, ~9 of its ~18 ms of CPU per
1000 records). A columnar batch arrives as the columns themselves: the collector maps the
Arrow buffers without copying, checks them with vectorised kernels and hands the same
Arrow tables to storage. Arrow IPC rather than packed repeated protobuf fields, by
measurement (docs/scaling.md, "Columnar batches"): a packed field still becomes one Python
object per value when the collector reads it, so the collector's decode kept most of its
per-record cost; an IPC stream is read in microseconds whatever its length. The tables'
shapes are the storage shapes (sensor/export/tables.py), so what the sensor encodes is
what DuckDB and ClickHouse insert.

Wire shape (protos/loupe/v1/ingest.proto): RecordBatch.tables holds one ColumnTable per
table present in the batch (name, Arrow IPC stream) and RecordBatch.order one byte per
record, in the order the sensor had them: the index of the record's table in `tables`.
The collector counts records from it and live subscribers get the records back in that
order (proto_records).

A sensor sends columnar batches only to a collector that lists BATCH_ENCODING_ARROW in
Ingest.Options (sensor/export/grpc_client.py); an older collector would find no records
in one and store an empty batch. Spooled columnar batches bound for such a collector are
turned back into rows (to_rows).
"""

from __future__ import annotations

import array
import functools
import itertools
import json
from dataclasses import dataclass
from operator import attrgetter
from typing import Iterable

import pyarrow as pa
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from sensor import model
from sensor.errors import SchemaError
from sensor.export import arrow_ipc, tables, wire
from sensor.l7 import registry

__all__ = ["ColumnarError", "encode", "is_columnar", "read_tables", "proto_records", "to_rows"]

ingest_pb2 = wire.ingest_pb2
records_pb2 = wire.records_pb2

# A batch names a record's table in one byte of RecordBatch.order.
MAX_TABLES = 256
# The default bound on a batch's Arrow buffers once decompressed (the collector's
# max_columnar_size). Uncompressed, a batch is at most the gRPC message limit (16 MiB by
# default); measured LZ4 shrinks Loupe's tables about 3x (docs/scaling.md), so 64 MiB
# takes any batch a sensor makes under that limit and keeps a decoder process's peak
# near a hundred megabytes.
MAX_DECODED_BYTES = 64 * 1024 * 1024


class ColumnarError(SchemaError):
    """A columnar batch that cannot be read: not Arrow IPC, an unknown table, columns of
    the wrong type, counts that disagree. The peer sent garbage; the batch is refused."""


# Integer Arrow types -> the array.array typecode of the same width and signedness:
# array.array packs a sequence of ints in C about three times faster than pa.array
# converts it, and raises OverflowError for a value that does not fit.
_PACKED = {pa.uint8(): "B", pa.uint16(): "H", pa.uint32(): "I", pa.uint64(): "Q",
           pa.int32(): "i", pa.int64(): "q"}


def _array(values, type_: pa.DataType) -> pa.Array:
    code = _PACKED.get(type_)
    if code is not None:
        return pa.Array.from_buffers(type_, len(values),
                                     [None, pa.py_buffer(array.array(code, values))])
    return pa.array(values, type=type_)


def _offsets(lists) -> pa.Array:
    return pa.array(array.array("i", itertools.accumulate(map(len, lists), initial=0)),
                    pa.int32())


def _list_of_str(lists, type_: pa.DataType) -> pa.Array:
    flat = list(itertools.chain.from_iterable(lists))
    return pa.ListArray.from_arrays(_offsets(lists), pa.array(flat, pa.string()), type=type_)


def _list_of_struct(lists, type_: pa.DataType) -> pa.Array:
    items = list(itertools.chain.from_iterable(lists))
    struct = type_.value_type
    members = [struct.field(i) for i in range(struct.num_fields)]
    values = pa.StructArray.from_arrays(
        [_array(tuple(map(attrgetter(m.name), items)), m.type) for m in members],
        fields=members)
    return pa.ListArray.from_arrays(_offsets(lists), values, type=type_)


def _summary(maps) -> pa.Array:
    # Nearly every flow has none: the keys and values of the few that do, flattened.
    pairs = list(itertools.chain.from_iterable(m.items() for m in maps if m))
    return pa.MapArray.from_arrays(
        _offsets(maps), pa.array([k for k, _ in pairs], pa.string()),
        pa.array([v for _, v in pairs], pa.string()), type=tables.SUMMARY)


_EMPTY_PROCESS = model.ProcessInfo()
_get_detail = attrgetter("detail")


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one table's columns are taken from its records: (column, Arrow type, how)."""

    schema: pa.Schema
    columns: tuple[tuple[str, pa.DataType, str], ...]

    def table(self, records: list, sensor_id: str = "") -> pa.Table:
        details = processes = coverages = None
        arrays = []
        for name, type_, how in self.columns:
            if how == "detail" or how.startswith("detail:"):
                if details is None:
                    details = list(map(_get_detail, records))
                values = tuple(map(attrgetter(name), details))
                how = how.partition(":")[2]
            elif how == "process":
                if processes is None:
                    processes = [r.process or _EMPTY_PROCESS for r in records]
                values = tuple(map(attrgetter(name[len("process_"):]), processes))
            elif how == "sensor":
                # The collector fills an empty sensor_id with the batch's; done here, the
                # column reaches storage as sent.
                values = tuple(s or sensor_id for s in map(attrgetter(name), records))
                how = ""
            elif how == "coverage":
                if coverages is None:
                    coverages = [r.l7_coverage for r in records]
                values = tuple(map(attrgetter(name[len("l7_coverage_"):]), coverages))
            else:
                values = tuple(map(attrgetter(name), records))
            if how == "list<str>":
                arrays.append(_list_of_str(values, type_))
            elif how == "list<struct>":
                arrays.append(_list_of_struct(values, type_))
            elif how == "counts":
                arrays.append(pa.array([c.json() if c else "{}" for c in values], pa.string()))
            elif how == "summary":
                arrays.append(_summary(values))
            else:
                arrays.append(_array(values, type_))
        return pa.Table.from_arrays(arrays, schema=self.schema)


@functools.cache
def _plans() -> dict[str, _Plan]:
    out = {}
    detail_types = {spec.table_name: {c.name: c.type for c in registry.columns(
        spec.event, spec.column_types)} for spec in registry.kinds()}
    for table, cols in tables.kind_columns().items():
        plan = []
        details = detail_types.get(table)
        envelope = {n for n, _ in tables.L7_COLUMNS} if details is not None else set()
        for name, type_ in cols:
            if details is not None and name not in envelope:
                kind = details[name]
                how = "detail:" + (kind if kind in ("list<str>", "list<struct>", "counts")
                                   else "")
            elif table == "flows" and name.startswith("l7_coverage_"):
                how = "coverage"
            elif table == "flows" and name.startswith("process_"):
                how = "process"
            elif table == "flows" and name == "l7_summary":
                how = "summary"
            elif name == "sensor_id":
                how = "sensor"
            else:
                how = ""
            plan.append((name, type_, how.rstrip(":")))
        out[table] = _Plan(pa.schema([pa.field(n, t) for n, t in cols]), tuple(plan))
    return out


def _ipc(table: pa.Table, options: pa.ipc.IpcWriteOptions | None) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=options) as out:
        out.write_table(table)
    return sink.getvalue().to_pybytes()


def encode(records: Iterable[model.Record], *, sensor_id: str, batch_id: int,
           created_ns: int, compression: str | None = None) -> ingest_pb2.RecordBatch:
    """A columnar RecordBatch of `records`. compression: None, "lz4" or "zstd" (Arrow IPC
    buffer compression; the collector reads any). Raises TypeError, ValueError or
    OverflowError (pyarrow's ArrowInvalid is a ValueError) for a record whose value does
    not fit its column, which the model's own checks make a bug."""
    kind_table = tables.kind_tables()
    plans = _plans()
    grouped: dict[str, list] = {}
    order = bytearray()
    index: dict[str, int] = {}
    for record in records:
        table = kind_table[model.record_kind(record)]
        i = index.get(table)
        if i is None:
            i = index[table] = len(index)
            grouped[table] = []
        grouped[table].append(record)
        order.append(i)
    options = pa.ipc.IpcWriteOptions(compression=compression) if compression else None
    batch = ingest_pb2.RecordBatch(sensor_id=sensor_id, batch_id=batch_id,
                                   created_ns=created_ns, order=bytes(order))
    for table, recs in grouped.items():
        batch.tables.add(name=table, arrow=_ipc(plans[table].table(recs, sensor_id), options))
    return batch


def _probe_class():
    """A message type with RecordBatch's header fields and `order`, but not `records` or
    `tables`: parsing a spooled batch with it skips those (an unknown length-delimited
    field is jumped over), so telling the two encodings apart costs microseconds."""
    source = ingest_pb2.RecordBatch.DESCRIPTOR
    proto = descriptor_pb2.FileDescriptorProto(
        name="loupe/v1/record_batch_probe.proto",
        package=source.full_name.rpartition(".")[0], syntax="proto3")
    full = descriptor_pb2.DescriptorProto()
    source.CopyToProto(full)
    probe = proto.message_type.add(name=source.name)
    probe.field.extend(f for f in full.field if f.name in ("sensor_id", "batch_id", "order"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(source.full_name))


_Probe = _probe_class()


def is_columnar(payload: bytes) -> bool:
    """Whether a serialized RecordBatch is columnar (a batch always has a record, and a
    columnar one names each in `order`)."""
    try:
        return bool(_Probe.FromString(payload).order)
    except DecodeError:
        return False


def read_tables(batch: ingest_pb2.RecordBatch, max_bytes: int = MAX_DECODED_BYTES,
                expect=None) -> list[tuple[str, pa.Table]]:
    """The (name, Arrow table) pairs of a columnar batch, as sent; ColumnarError if a
    table is not a well-formed Arrow IPC stream, the tables disagree with `order`, or
    their buffers would take more than `max_bytes` once decompressed. Every table's
    size and row count are checked from its message metadata before any is read
    (arrow_ipc), so a small compressed batch cannot make the reader allocate gigabytes.
    expect(name, schema), if given, is called with each table's schema before any table
    is read, and raises ColumnarError for a table or schema the caller does not take."""
    if len(batch.tables) > MAX_TABLES:
        raise ColumnarError(f"columnar batch has {len(batch.tables)} tables; at most "
                            f"{MAX_TABLES} (RecordBatch.order names a table in one byte)")
    counts = [0] * len(batch.tables)
    for i, n in _order_counts(batch.order).items():
        if i >= len(counts):
            raise ColumnarError(f"columnar batch: order names table {i}, but the batch has "
                                f"{len(counts)} tables")
        counts[i] = n
    measured = []
    seen = set()
    left = max_bytes
    for i, part in enumerate(batch.tables):
        name = part.name
        if name in seen:
            raise ColumnarError(f"columnar batch: table {name!r} appears twice")
        seen.add(name)
        try:
            m = arrow_ipc.measure(part.arrow, left)
        except arrow_ipc.IpcTooLarge as exc:
            raise ColumnarError(
                f"columnar batch: its Arrow tables declare at least "
                f"{max_bytes - left + exc.nbytes:,} bytes once decompressed (table {i}, "
                f"{name!r}), over the collector's max_columnar_size of {max_bytes:,} bytes; "
                "the whole batch is refused") from None
        except arrow_ipc.IpcRefused as exc:
            raise ColumnarError(f"columnar batch: table {i} ({name!r}) is not a valid Arrow "
                                f"IPC stream: {exc}") from None
        if m.rows != counts[i]:
            raise ColumnarError(f"columnar batch: table {name!r} has {m.rows} rows, "
                                f"but order names {counts[i]} records of it")
        if expect is not None:
            expect(name, m.schema)
        left -= m.nbytes
        measured.append((i, name, m))
    out = []
    for i, name, m in measured:
        try:
            out.append((name, arrow_ipc.read(m)))
        except arrow_ipc.IpcRefused as exc:
            raise ColumnarError(f"columnar batch: table {i} ({name!r}) is not a valid Arrow "
                                f"IPC stream: {exc}") from None
    return out


def _order_counts(order: bytes) -> dict[int, int]:
    # bytes.count runs in C: one pass per table index present, at most MAX_TABLES.
    return {i: order.count(i) for i in set(order)}


def _json_map(text: str) -> dict:
    return json.loads(text) if text else {}


def _prefixed(table: pa.Table, prefix: str) -> list[dict]:
    names = [n for n in table.column_names if n.startswith(prefix)]
    return table.select(names).rename_columns([n[len(prefix):] for n in names]).to_pylist()


def table_records(name: str, table: pa.Table) -> list:
    """The rows of one stored-shape table as loupe.v1.Record messages. Each nested
    message's columns become Python values in one to_pylist call per group of columns."""
    Record = records_pb2.Record
    if name == "flows":
        top = [n for n in table.column_names
               if not n.startswith(("l7_coverage_", "process_")) and n != "l7_summary"]
        out = []
        for row, cov, proc, summary in zip(
                table.select(top).to_pylist(), _prefixed(table, "l7_coverage_"),
                _prefixed(table, "process_"), table["l7_summary"].to_pylist()):
            row["l7_coverage"] = cov
            if summary:
                row["l7_summary"] = dict(summary)
            if any(proc.values()):   # as stored: an all-empty process is no process
                row["process"] = proc
            out.append(Record(flow=row))
        return out
    if name == "lost":
        return [Record(lost=row) for row in table.to_pylist()]
    if name == "alerts":
        return [Record(alert=row) for row in table.to_pylist()]
    spec = next((s for s in registry.kinds() if s.table_name == name), None)
    if spec is None:
        raise ColumnarError(f"columnar batch: no record kind is stored in table {name!r} "
                            f"(known: {', '.join(tables.kind_columns())})")
    envelope = [n for n, _ in tables.L7_COLUMNS if n in table.column_names]
    details = table.select([n for n in table.column_names if n not in envelope]).to_pylist()
    counts = [c.name for c in registry.columns(spec.event) if c.type == "counts"]
    out = []
    for row, detail in zip(table.select(envelope).to_pylist(), details):
        for c in counts:
            detail[c] = _json_map(detail[c])
        row[spec.oneof] = detail
        out.append(Record(l7=row))
    return out


def proto_records(named: list[tuple[str, pa.Table]], order: bytes) -> list:
    """The records of a columnar batch as loupe.v1.Record messages, in the sensor's order.
    Python per record: for live subscribers and old collectors, not for storage."""
    per_table = [iter(table_records(name, table)) for name, table in named]
    try:
        return [next(per_table[i]) for i in order]
    except (IndexError, StopIteration):
        raise ColumnarError("columnar batch: order does not match its tables") from None


def to_rows(payload: bytes) -> bytes:
    """A serialized columnar RecordBatch as the row batch of the same records (same
    sensor_id, batch_id and created_ns), for a collector that accepts rows only."""
    batch = ingest_pb2.RecordBatch.FromString(payload)
    out = ingest_pb2.RecordBatch(sensor_id=batch.sensor_id, batch_id=batch.batch_id,
                                 created_ns=batch.created_ns)
    # No size bound: what is turned back into rows is the sensor's own spool, or a batch
    # the collector's decoder has already read under max_columnar_size (Received.records).
    out.records.extend(proto_records(read_tables(batch, max_bytes=1 << 62), batch.order))
    return out.SerializeToString()
