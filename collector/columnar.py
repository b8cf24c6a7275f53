"""Columnar batches at the collector: Arrow tables in, the same validated tables out.

A columnar RecordBatch (sensor/export/columnar.py) carries each table as an Arrow IPC
stream. Decoding one is reading the streams (no copy), bringing each table to the stored
shape, and checking it with vectorised Arrow kernels: the checks collector/ingest.py runs
on a row batch's columns (its rule tables are reused here), so a columnar batch and the
row batch of the same records store the same rows (tests/collector/test_columnar.py
compares every column, on DuckDB and ClickHouse). Python runs per distinct value (an
address, a counts text), not per record; kinds whose checks are not all column checks
(ingest._COLUMN_CHECKED) and alerts are checked record by record through the model, as
the row path does.

Shape. Columns are matched by name. A column the table does not have is ignored and a
missing one takes the field's zero value (what protobuf does with an unknown or absent
field of a row batch from a newer or older sensor); a column of another type is cast if
every value fits, and the batch is refused otherwise. Nulls are refused: no Loupe record
field is optional.

Whatever is wrong, the whole batch is REJECTED with one line saying what (ColumnarError),
before anything is stored.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from collector import ingest
from collector.storage.base import DecodedBatch
from sensor.errors import SchemaError
from sensor.export import columnar, tables, wire
from sensor.export.columnar import ColumnarError
from sensor.l7 import registry

__all__ = ["decode_columnar", "ColumnarError"]

_SHAPES: dict[str, pa.Schema] = {
    name: pa.schema([pa.field(n, t) for n, t in cols])
    for name, cols in tables.kind_columns().items()
}
_TYPES = {name: {f.name: f.type for f in shape} for name, shape in _SHAPES.items()}
# Table -> its counts columns (JSON text of registry.Counts), whose zero value is "{}".
_COUNTS = {k.table: k.counts for k in ingest._KINDS.values() if k.counts}
# Tables whose records are checked through the model one by one, as on the row path.
_PER_RECORD = frozenset(["alerts"] + [k.table for name, k in ingest._KINDS.items()
                                       if name not in ingest._COLUMN_CHECKED])


def _zero(type_: pa.DataType, n: int, counts: bool) -> pa.Array:
    if counts:
        return pa.repeat(pa.scalar("{}", pa.string()), n)
    if pa.types.is_string(type_):
        value = ""
    elif pa.types.is_boolean(type_):
        value = False
    elif pa.types.is_integer(type_):
        value = 0
    else:   # list or map: empty
        value = []
    return pa.repeat(pa.scalar(value, type_), n)


def _has_nulls(arr: pa.Array) -> bool:
    if arr.null_count:
        return True
    t = arr.type
    if pa.types.is_map(t):
        return _has_nulls(arr.keys) or _has_nulls(arr.items)
    if pa.types.is_list(t):
        return _has_nulls(arr.flatten())
    if pa.types.is_struct(t):
        return any(_has_nulls(arr.field(i)) for i in range(t.num_fields))
    return False


def _has_nulls_chunked(col: pa.ChunkedArray) -> bool:
    if col.null_count:
        return True
    t = col.type
    if pa.types.is_map(t) or pa.types.is_list(t) or pa.types.is_struct(t):
        return any(_has_nulls(chunk) for chunk in col.chunks)
    return False


def _expect(name: str, schema: pa.Schema) -> None:
    """Refuse a table this collector does not store, or a column of a type that cannot
    become its stored one, from the stream's schema, before its buffers are read."""
    shape = _SHAPES.get(name)
    if shape is None:
        raise ColumnarError(f"columnar batch: table {name!r} holds no record kind this "
                            f"collector knows ({', '.join(_SHAPES)})")
    if schema.equals(shape):
        return   # what a sensor of this version sends
    types = _TYPES[name]
    for field in schema:
        want = types.get(field.name)
        if want is None or field.type == want:
            continue   # an unknown column is ignored (a newer sensor's)
        try:
            pa.array([], field.type).cast(want)
        except (pa.ArrowException, TypeError, ValueError):
            raise ColumnarError(f"{name}: column {field.name} is {field.type}, which does "
                                f"not convert to {want}") from None


def _conform(name: str, sent: pa.Table) -> pa.Table:
    """`sent` in the stored shape of `name`: its columns, in order, of their types."""
    names = sent.column_names
    if len(set(names)) != len(names):
        raise ColumnarError(f"{name}: a column appears twice")
    shape = _SHAPES[name]
    if sent.schema.equals(shape):
        # What a sensor of this version sends: only nulls to look for.
        for field, col in zip(shape, sent.columns):
            if _has_nulls_chunked(col):
                raise ColumnarError(f"{name}: column {field.name} has null values (no Loupe "
                                    "record field is optional)")
        return sent
    counts = _COUNTS.get(name, ())
    arrays = []
    for field in shape:
        if field.name not in names:
            arrays.append(_zero(field.type, sent.num_rows, field.name in counts))
            continue
        col = sent.column(field.name).combine_chunks()
        if col.type != field.type:
            try:
                col = col.cast(field.type, safe=True)
            except (pa.ArrowException, TypeError, ValueError):
                raise ColumnarError(f"{name}: column {field.name} is {col.type}, which does "
                                    f"not convert to {field.type}") from None
        if _has_nulls(col):
            raise ColumnarError(f"{name}: column {field.name} has null values (no Loupe "
                                "record field is optional)")
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=shape)


def _distinct(col) -> list:
    return pc.unique(col).to_pylist()


def _check(name: str, t: pa.Table) -> str | None:
    """The first rule a column breaks, or None: ingest._check, on Arrow columns."""
    if not t.num_rows:
        return None
    key = ingest._NON_EMPTY[name]
    if pc.any(pc.equal(t[key], "")).as_py():
        return f"{name}: {key} must not be empty"
    for col, low, high in ingest._RANGE_RULES.get(name, ()):
        bounds = pc.min_max(t[col])
        if bounds["min"].as_py() < low or bounds["max"].as_py() > high:
            return f"{name}: {col} is outside {low}..{high}"
    for col, allowed in ingest._ALLOWED_VALUES.get(name, ()):
        if not set(_distinct(t[col])) <= allowed:
            return f"{name}: {col} has a value outside {sorted(allowed)}"
    if "src_addr" in t.column_names:
        addresses = set(_distinct(t["src_addr"])).union(_distinct(t["dst_addr"]))
        if name == "alerts":
            addresses.discard("")   # as model.Alert: an alert may name no address
        bad = ingest._first_invalid_address(addresses)
        if bad is not None:
            return f"{name}: {bad!r} is not an IP address"
    if name == "flows":
        if pc.any(pc.less(t["flow_end_ns"], t["flow_start_ns"])).as_py():
            return "flows: flow_end_ns is before flow_start_ns"
        if _summary_problem(t["l7_summary"].combine_chunks()):
            return "flows: an l7_summary is outside its bounds"
    return None


def _summary_problem(maps: pa.MapArray) -> bool:
    """sensor/model.py's l7_summary bounds (ingest._summary_problem), and no key twice in
    one map, which a protobuf map cannot carry but an Arrow one can."""
    if not len(maps.keys):
        return False
    offsets = maps.offsets
    lengths = pc.subtract(offsets[1:], offsets[:-1])   # entries per map
    if pc.max(lengths).as_py() > registry.SUMMARY_KEYS_MAX:
        return True
    if not all(k.isidentifier() and len(k) <= registry.SUMMARY_KEY_MAX
               for k in _distinct(maps.keys)):
        return True
    if pc.max(pc.utf8_length(maps.items)).as_py() > registry.SUMMARY_VALUE_MAX:
        return True
    several = pc.greater(lengths, 1)
    if pc.any(several).as_py():   # the few flows with two keys or more
        for pairs in maps.filter(several).to_pylist():
            if len({k for k, _ in pairs}) != len(pairs):
                return True
    return False


def _canonical_counts(name: str, t: pa.Table) -> pa.Table:
    """Counts columns as the row path stores them: registry.Counts' JSON text (sorted
    keys, no spaces), checked against its bounds; once per distinct text."""
    for col in _COUNTS.get(name, ()):
        values = t[col].combine_chunks()
        distinct = _distinct(values)
        try:
            canon = [registry.Counts.of(v).json() if v != "{}" else v for v in distinct]
        except ValueError as exc:
            raise ColumnarError(f"{name}: {col}: {exc}") from None
        if canon != distinct:
            fixed = pa.array(canon, pa.string()).take(pc.index_in(values, pa.array(distinct)))
            t = t.set_column(t.schema.get_field_index(col), col, fixed)
    return t


def _record_index(order: bytes, table_index: int, row: int) -> int:
    """Which record of the batch (by the sensor's order) row `row` of a table is."""
    seen = -1
    for i, t in enumerate(order):
        if t == table_index:
            seen += 1
            if seen == row:
                return i
    return -1


def _first_model_error(named: list[tuple[int, str, pa.Table]], order: bytes) -> str | None:
    """The model's own words for the first record it refuses, as `record N: ...`."""
    for index, name, t in named:
        try:
            records = columnar.table_records(name, t)
        except (ValueError, TypeError) as exc:   # a value its message field cannot hold
            return f"{name}: {exc}"
        for row, rec in enumerate(records):
            try:
                wire.from_proto(rec)
            except SchemaError as exc:
                return f"record {_record_index(order, index, row)}: {exc}"
    return None


def _decode(batch, identity: str | None,
            max_bytes: int | None = None) -> tuple[DecodedBatch, dict[str, bytes]]:
    """The decoded batch, and the tables that are stored exactly as sent (their IPC
    bytes, which the decoder then hands on without writing them again). max_bytes: the
    bound on the tables' buffers once decompressed (columnar.read_tables)."""
    sensor_id = identity or batch.sensor_id
    if not sensor_id:
        raise SchemaError(
            "RecordBatch.sensor_id is empty: the collector deduplicates on (sensor_id, "
            "batch_id), so every sensor must name itself (or use mTLS)")
    if len(batch.records):
        raise ColumnarError("a batch carries both records and tables: one encoding per "
                            "batch (RecordBatch.records, or tables and order)")
    named = []
    for index, (name, sent) in enumerate(columnar.read_tables(
            batch, columnar.MAX_DECODED_BYTES if max_bytes is None else max_bytes,
            _expect)):
        if sent.num_rows:
            named.append((index, name, sent, _conform(name, sent)))
    out: dict[str, pa.Table] = {}
    unchanged: dict[str, bytes] = {}
    for index, name, sent, t in named:
        problem = _check(name, t)
        if problem is not None:
            raise ColumnarError(_first_model_error([(index, name, t)], batch.order) or problem)
        t = _canonical_counts(name, t)
        if name in _PER_RECORD:
            problem = _first_model_error([(index, name, t)], batch.order)
            if problem is not None:
                raise ColumnarError(problem)
        col = t.schema.get_field_index("sensor_id")
        if identity:
            t = t.set_column(col, "sensor_id", pa.repeat(pa.scalar(identity), t.num_rows))
        else:
            ids = t.column(col)
            if pc.any(pc.equal(ids, "")).as_py():
                t = t.set_column(col, "sensor_id",
                                 pc.if_else(pc.equal(ids, ""), sensor_id, ids))
        out[name] = t
        if t is sent:
            unchanged[name] = batch.tables[index].arrow
    decoded = DecodedBatch(sensor_id=sensor_id, batch_id=batch.batch_id, tables=out,
                           records=len(batch.order))
    return decoded, unchanged


def decode_columnar(batch, identity: str | None = None,
                    max_bytes: int | None = None) -> DecodedBatch:
    """Columns of every table of a columnar RecordBatch, or SchemaError (ColumnarError).
    identity: as ingest.decode_batch; max_bytes: as _decode."""
    return _decode(batch, identity, max_bytes)[0]


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise ValueError("truncated varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _skip(raw: bytes, pos: int, wire_type: int, end: int) -> int:
    """Past one field's value (after its tag), or ValueError if it runs past `end`."""
    if wire_type == 0:
        pos = _varint(raw, pos)[1]
    elif wire_type == 1:
        pos += 8
    elif wire_type == 2:
        length, pos = _varint(raw, pos)
        pos += length
    elif wire_type == 5:
        pos += 4
    else:
        raise ValueError(f"wire type {wire_type}")
    if pos > end:
        raise ValueError("a field runs past its message")
    return pos


def arrow_spans(raw: bytes, batch) -> list[tuple[int, int]] | None:
    """Where each table's Arrow stream (RecordBatch.tables[i].arrow) lies in the
    serialized batch `raw`, as (offset, length); None if that cannot be told.

    Why: the collector holds these bytes already, so a decoder process that validated a
    table sent as is answers with its place instead of the 260 KB of a 1000-record batch
    pickled back through a pipe; the writer then reads the table from its own copy
    without copying (ingest.Shipped.unpack). Walks the protobuf framing of field 5
    (ColumnTable) and, inside each, field 2 (arrow; the last one wins, as in a parse).
    Every span is compared with the parsed field, so whatever this walk gets wrong
    comes back None and the bytes are shipped as before."""
    spans = []
    try:
        pos, end = 0, len(raw)
        while pos < end:
            tag, pos = _varint(raw, pos)
            if tag == (5 << 3) | 2:
                length, pos = _varint(raw, pos)
                inner_end = pos + length
                if inner_end > end:
                    return None
                span = None
                while pos < inner_end:
                    inner_tag, pos = _varint(raw, pos)
                    start = pos
                    pos = _skip(raw, pos, inner_tag & 7, inner_end)
                    if inner_tag == (2 << 3) | 2:
                        n, start = _varint(raw, start)
                        span = (start, n)
                spans.append(span or (0, 0))
                pos = inner_end
            else:
                pos = _skip(raw, pos, tag & 7, end)
    except ValueError:
        return None
    if len(spans) != len(batch.tables):
        return None
    for (offset, length), part in zip(spans, batch.tables):
        arrow = part.arrow
        # startswith at an offset: one memcmp, no slice copied (a memoryview compare
        # goes item by item, ~0.5 ms for a 1000-record batch).
        if len(arrow) != length or not raw.startswith(arrow, offset):
            return None
    return spans


def shipped(batch, identity: str | None, rows: bool,
            max_bytes: int | None = None, raw: bytes | None = None) -> ingest.Shipped:
    """Decoder-process work for a columnar batch (ingest.decode_message): its tables as
    Arrow IPC for the writer, and with `rows` its records for live subscribers. Given
    `raw` (the serialized batch, which the writer holds too), a table stored as sent is
    answered with its (offset, length) in raw (arrow_spans) instead of its bytes."""
    decoded, unchanged = _decode(batch, identity, max_bytes)
    packed = ingest.Shipped.pack(DecodedBatch(
        sensor_id=decoded.sensor_id, batch_id=decoded.batch_id, records=decoded.records,
        tables={n: t for n, t in decoded.tables.items() if n not in unchanged}))
    if raw is not None and unchanged:
        spans = arrow_spans(raw, batch)
        if spans is not None:
            index = {part.name: i for i, part in enumerate(batch.tables)}
            unchanged = {name: spans[index[name]] for name in unchanged}
    return ingest.Shipped(decoded.sensor_id, decoded.batch_id, decoded.records,
                          {**packed.tables, **unchanged},
                          rows_of(batch, decoded) if rows else None)


def rows_of(batch, decoded: DecodedBatch) -> bytes:
    """A decoded columnar batch's records, as stored (sensor ids filled in), as a
    serialized row RecordBatch in the sensor's order: what live subscribers read."""
    named = [(part.name, decoded.tables.get(part.name) or _SHAPES[part.name].empty_table())
             for part in batch.tables]
    out = wire.ingest_pb2.RecordBatch(sensor_id=decoded.sensor_id, batch_id=batch.batch_id,
                                      created_ns=batch.created_ns)
    out.records.extend(columnar.proto_records(named, batch.order))
    return out.SerializeToString()
