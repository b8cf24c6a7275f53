"""Ingest.Push: decode a RecordBatch into columns, validate it, commit it, then ack.

Strategy. A batch is decoded straight from protobuf into one Arrow table per record kind
(collector/schema.py), never through one dataclass per record: the dataclass path
(sensor.export.wire.batch_from_proto) costs about 30 us per record, which would cap a
2-core collector near 30,000 records/s. Here each column is pulled out with one C-level
attrgetter pass and validated as a column (max/min over a list, a set of distinct
addresses), which keeps the per-record Python work to a few attribute reads. That work
runs in decoder processes (see Writer), off the collector's GIL and on every core.

The rules checked are the ones sensor/model.py and the protocols' event classes enforce
(_RANGE_RULES and friends below, from the protocols' registrations, mirror their
__post_init__ checks, and tests/collector/test_tls_storage.py proves the two
agree record by record). When a column check fails, the batch is decoded once more
through wire.batch_from_proto so that the REJECTED ack names the first bad record and
field exactly as the model words it.

Order of events per batch (the durability contract in protos/loupe/v1/ingest.proto):
decode + validate -> one storage transaction (dedup row + records) -> live fan-out -> ack.
A batch is acked only after its transaction committed; acks on a stream keep the order
of its batches, while up to IngestService.PIPELINE of them are decoded and committed.
"""

from __future__ import annotations

import array
import asyncio
import collections
import functools
import ipaddress
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from operator import attrgetter
from typing import Callable

import grpc
import pyarrow as pa
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from collector import schema
from collector.storage.base import DecodedBatch, Storage, StoreStatus
from sensor.errors import SchemaError
from sensor.export import wire
from sensor.l7 import registry

log = logging.getLogger(__name__)

ingest_pb2 = wire.ingest_pb2


def _header_class():
    """A message type with RecordBatch's header fields (1-3) and `order` (6), without the
    records (4) or a columnar batch's tables (5).

    Parsing a batch with it skips the records (an unknown length-delimited field is
    jumped over, not parsed): ~15 us instead of ~0.5 ms for 1000 records, on the event
    loop that every stream and the writer's Python share. It checks the framing of the
    whole message but not the bytes inside the records; the decoder processes parse those.
    It lives in a private pool under RecordBatch's own name, so that a parse error reads
    the same as one from the full type."""
    source = ingest_pb2.RecordBatch.DESCRIPTOR
    proto = descriptor_pb2.FileDescriptorProto(
        name="loupe/v1/record_batch_header.proto", package=source.full_name.rpartition(".")[0],
        syntax="proto3",
    )
    full = descriptor_pb2.DescriptorProto()
    source.CopyToProto(full)
    header = proto.message_type.add(name=source.name)
    header.field.extend(f for f in full.field if f.number in (1, 2, 3, 6))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(source.full_name))


RecordBatchHeader = _header_class()

# Column name -> attribute path on the protobuf message, per table.
# (The l7_summary map is not a path: _summaries converts it.)
_FLOW_NAMES = [n for n, _ in schema.FLOW_COLUMNS if n != "l7_summary"]
_FLOW_PATHS = [
    n.replace("l7_coverage_", "l7_coverage.", 1).replace("process_", "process.", 1)
    for n in _FLOW_NAMES
]
_L7_PATHS = [n for n, _ in schema.L7_COLUMNS]
_LOST_PATHS = [n for n, _ in schema.LOST_COLUMNS]
_ALERT_PATHS = [n for n, _ in schema.ALERT_COLUMNS]


@dataclass(frozen=True, slots=True)
class _Kind:
    """How one registered L7 kind's messages become columns: scalar columns by attribute
    path; list columns need a per-record conversion and are filled in separately."""

    oneof: str
    table: str
    paths: list[str]
    names: list[str]
    strings: tuple[str, ...]                          # repeated string fields
    structs: tuple[tuple[str, tuple[str, ...]], ...]  # repeated message fields, members
    counts: tuple[str, ...] = ()                      # map<string, uint32> -> JSON text


def _kind(spec) -> _Kind:
    cols = registry.columns(spec.event, spec.column_types)
    scalars = [c.name for c in cols if not c.type.startswith("list<") and c.type != "counts"]
    return _Kind(
        spec.oneof, spec.table_name,
        _L7_PATHS + [f"{spec.oneof}.{n}" for n in scalars],
        [n for n, _ in schema.L7_COLUMNS] + scalars,
        tuple(c.name for c in cols if c.type == "list<str>"),
        tuple((c.name, tuple(m.name for m in c.members))
              for c in cols if c.type == "list<struct>"),
        tuple(c.name for c in cols if c.type == "counts"),
    )


# L7Event oneof field -> its kind, for every registered protocol.
_KINDS = {spec.oneof: _kind(spec) for spec in registry.kinds()}

# Bounds from sensor/model.py that the Arrow column types do not already enforce
# (ports are uint16, protocol uint8, ... so an out-of-range value fails the conversion).
_RANGE_RULES: dict[str, tuple[tuple[str, int, int], ...]] = {
    "flows": (("vlan_id", 0, 0xFFF), ("inner_vlan_id", 0, 0xFFF)),
    **{spec.table_name: spec.column_ranges for spec in registry.kinds()},
}
_ALLOWED_VALUES: dict[str, tuple[tuple[str, frozenset], ...]] = {
    "flows": (
        ("ip_version", frozenset((4, 6))),
        ("flow_end_reason", frozenset(range(6))),  # sensor.model.FlowEndReason
    ),
    **{spec.table_name: spec.column_values for spec in registry.kinds()},
}
_NON_EMPTY = {"flows": "uid", "lost": "source", "alerts": "rule_id", **{k.table: "uid" for k in _KINDS.values()}}

# The L7 kinds whose event checks are all mirrored above as column checks (their
# registrations say so: Protocol.columns_checked, proved record by record in
# tests/collector/test_tls_storage.py). Events of any other kind are validated by
# building them (wire.from_proto, the event dataclass's own checks): correct for any
# kind by construction, at ~30 us per record.
_COLUMN_CHECKED = frozenset(spec.oneof for spec in registry.kinds() if spec.columns_checked)


def _columns(messages: list, paths: list[str]) -> list[tuple]:
    """One tuple per path, in path order. Nested paths ("http.method") fetch each parent
    submessage once per record, not once per field: upb builds a wrapper per access.
    Each column is one C-level pass over the messages (measured ~20% faster than one
    multi-field attrgetter per record and a zip(*) to transpose)."""
    if not messages:
        return [() for _ in paths]
    groups: dict[str, list[str]] = {}
    for path in paths:
        parent, _, name = path.rpartition(".")
        groups.setdefault(parent, []).append(name)
    out: dict[str, tuple] = {}
    for parent, names in groups.items():
        objs = messages if not parent else list(map(attrgetter(parent), messages))
        for name in names:
            out[f"{parent}.{name}" if parent else name] = tuple(map(attrgetter(name), objs))
    return [out[path] for path in paths]


# Addresses already validated, per process. Traffic repeats hosts, so most of a batch's
# distinct addresses were seen before and cost a cache hit instead of an ipaddress parse.
# Bounded (least recently used out) at ~100 bytes an entry: ~10 MiB per decoder process.
@functools.lru_cache(maxsize=100_000)
def _valid_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _first_invalid_address(addresses: set[str]) -> str | None:
    for addr in addresses:
        if not _valid_address(addr):
            return addr
    return None


def _check(table: str, cols: dict[str, tuple]) -> str | None:
    """The first rule a column breaks, or None. Mirrors sensor/model.py."""
    if not cols[next(iter(cols))]:
        return None
    key = _NON_EMPTY[table]
    if "" in cols[key]:
        return f"{table}: {key} must not be empty"
    for name, low, high in _RANGE_RULES.get(table, ()):
        if min(cols[name]) < low or max(cols[name]) > high:
            return f"{table}: {name} is outside {low}..{high}"
    for name, allowed in _ALLOWED_VALUES.get(table, ()):
        if not set(cols[name]) <= allowed:
            return f"{table}: {name} has a value outside {sorted(allowed)}"
    if "src_addr" in cols:
        addresses = set(cols["src_addr"]).union(cols["dst_addr"])
        if table == "alerts":
            addresses.discard("")   # as model.Alert: an alert may name no address
        bad = _first_invalid_address(addresses)
        if bad is not None:
            return f"{table}: {bad!r} is not an IP address"
    if table == "flows" and any(e < s for s, e in zip(cols["flow_start_ns"], cols["flow_end_ns"])):
        return "flows: flow_end_ns is before flow_start_ns"
    if table == "flows" and _summary_problem(cols["l7_summary"]):
        return "flows: an l7_summary is outside its bounds"
    return None


_NO_SUMMARY: dict = {}   # shared by every flow without one; never changed
_get_summary = attrgetter("l7_summary")


def _summaries(flows: list) -> tuple:
    """The l7_summary column: one key -> value dict per flow (proto maps are unordered)."""
    return tuple(dict(m) if m else _NO_SUMMARY for m in map(_get_summary, flows))


def _summary_problem(maps: tuple) -> bool:
    """Does any map break sensor/model.py's bounds (keys, their shape, value lengths)?"""
    present = [m for m in maps if m]
    if not present:
        return False
    if max(map(len, present)) > registry.SUMMARY_KEYS_MAX:
        return True
    # A batch holds a handful of distinct keys: each is checked once.
    if not all(k.isidentifier() and len(k) <= registry.SUMMARY_KEY_MAX
               for k in set().union(*present)):
        return True
    return max(len(v) for m in present for v in m.values()) > registry.SUMMARY_VALUE_MAX


# Integer Arrow types -> the array.array typecode of the same width and signedness.
# array.array packs a tuple of ints in C about three times faster than pa.array converts
# it, and raises OverflowError for a value that does not fit, as pa.array does.
_PACKED = {schema.U8: "B", schema.U16: "H", schema.U32: "I", schema.U64: "Q", schema.I32: "i"}
assert all(array.array(code).itemsize * 8 == t.bit_width for t, code in _PACKED.items())


def _column(values: tuple, type_: pa.DataType) -> pa.Array:
    code = _PACKED.get(type_)
    if code is None:
        return pa.array(values, type=type_)
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(array.array(code, values))])


def _arrow(table: str, cols: dict[str, tuple]) -> pa.Table:
    fields = [f for f in schema.TABLES[table].schema if f.name in cols]
    return pa.Table.from_arrays(
        [_column(cols[f.name], f.type) for f in fields], schema=pa.schema(fields)
    )


def _reject(batch, reason: str) -> SchemaError:
    """The SchemaError for a batch that failed a column check, worded by the model."""
    try:
        wire.batch_from_proto(batch)
    except SchemaError as exc:
        return exc
    return SchemaError(reason)


def decode_batch(batch, identity: str | None = None) -> DecodedBatch:
    """Columns of every table for one RecordBatch, or SchemaError.

    identity is the sensor name from the client certificate under mTLS: it overrides
    both the batch's and each record's sensor_id. Without mTLS a record with an empty
    sensor_id takes the batch's.
    """
    sensor_id = identity or batch.sensor_id
    if not sensor_id:
        raise SchemaError(
            "RecordBatch.sensor_id is empty: the collector deduplicates on (sensor_id, "
            "batch_id), so every sensor must name itself (or use mTLS)"
        )
    flows, lost, alerts = [], [], []
    by_detail: dict[str, list] = {name: [] for name in _KINDS}
    for i, rec in enumerate(batch.records):
        kind = rec.WhichOneof("kind")
        if kind == "flow":
            flows.append(rec.flow)
        elif kind == "l7":
            detail = rec.l7.WhichOneof("detail")
            if detail is None:
                raise SchemaError(f"record {i}: L7Event without detail "
                                  f"({', '.join(_KINDS)})")
            messages = by_detail.get(detail)
            if messages is None:
                # In records.proto but claimed by no registered protocol: there is no
                # table for it, and it is never stored as another kind.
                raise SchemaError(f"record {i}: L7Event of kind {detail!r}, which this "
                                  f"collector does not know ({', '.join(_KINDS)})")
            if detail not in _COLUMN_CHECKED:
                try:
                    wire.from_proto(rec)
                except SchemaError as exc:
                    raise SchemaError(f"record {i}: {exc}") from None
            messages.append(rec.l7)
        elif kind == "lost":
            lost.append(rec.lost)
        elif kind == "alert":
            try:
                wire.from_proto(rec)   # action, severity and excerpt bounds: the model's
            except SchemaError as exc:
                raise SchemaError(f"record {i}: {exc}") from None
            alerts.append(rec.alert)
        else:
            raise SchemaError(f"record {i}: empty Record (no flow, l7, lost or alert)")

    raw: dict[str, dict[str, tuple]] = {}
    if flows:
        raw["flows"] = dict(zip(_FLOW_NAMES, _columns(flows, _FLOW_PATHS)))
        raw["flows"]["l7_summary"] = _summaries(flows)
    for name, messages in by_detail.items():
        if not messages:
            continue
        k = _KINDS[name]
        cols = raw[k.table] = dict(zip(k.names, _columns(messages, k.paths)))
        subs = [getattr(m, name) for m in messages] if k.strings or k.structs or k.counts \
            else ()
        for field in k.counts:
            try:   # the model's bounds (registry.Counts); nearly always an empty map
                cols[field] = tuple(registry.Counts.of(getattr(sub, field)).json()
                                    if getattr(sub, field) else "{}" for sub in subs)
            except ValueError as exc:
                raise _reject(batch, f"{k.table}: {field}: {exc}") from None
        for field in k.strings:
            cols[field] = tuple(list(getattr(sub, field)) for sub in subs)
        for field, members in k.structs:
            get = attrgetter(*members)
            cols[field] = tuple(
                [get(item) if len(members) > 1 else (get(item),) for item in getattr(sub, field)]
                for sub in subs)
    if lost:
        raw["lost"] = dict(zip([n for n, _ in schema.LOST_COLUMNS], _columns(lost, _LOST_PATHS)))
    if alerts:
        raw["alerts"] = dict(zip(_ALERT_PATHS, _columns(alerts, _ALERT_PATHS)))

    tables: dict[str, pa.Table] = {}
    for table, cols in raw.items():
        problem = _check(table, cols)
        if problem is not None:
            raise _reject(batch, problem)
        n = len(cols["sensor_id"])
        if identity:
            cols["sensor_id"] = (identity,) * n
        elif "" in cols["sensor_id"]:
            cols["sensor_id"] = tuple(s or sensor_id for s in cols["sensor_id"])
        try:
            tables[table] = _arrow(table, cols)
        except (pa.ArrowInvalid, OverflowError) as exc:
            raise _reject(batch, f"{table}: {exc}") from None
    return DecodedBatch(
        sensor_id=sensor_id, batch_id=batch.batch_id, tables=tables,
        records=len(batch.records),
    )


@dataclass(slots=True)
class IngestCounters:
    """Ingest counters, reported by Observer.Status. Touched only on the event loop."""

    batches_stored: int = 0
    batches_duplicate: int = 0
    batches_rejected: int = 0
    records_stored: int = 0
    undecodable_messages: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class StreamState:
    """What the writer knows of one Push stream. Once one of its messages turned out not
    to be a RecordBatch, none of its later batches is committed: the stream ends there,
    as it would had the event loop parsed the message whole."""

    broken: bool = False


@dataclass(slots=True)
class Received:
    """A batch as the event loop holds it: its serialized bytes and header fields. The
    records are parsed only if live subscribers want them (records)."""

    raw: bytes
    sensor_id: str
    batch_id: int
    stream: StreamState
    columnar: bool = False   # tables and order (sensor/export/columnar.py), not records
    # A columnar batch's records as a serialized row RecordBatch, made by the decoder
    # when live subscribers were waiting (want_rows; collector/columnar.py)
    rows: bytes | None = None
    want_rows: bool = False
    _full: object = None

    @classmethod
    def parse(cls, raw: bytes, stream: StreamState) -> "Received":
        """The header of raw, or DecodeError if raw is not a RecordBatch's framing."""
        header = RecordBatchHeader.FromString(raw)
        return cls(raw, header.sensor_id, header.batch_id, stream, bool(header.order))

    @property
    def records(self):
        if self._full is None:
            if self.rows is not None:
                self._full = ingest_pb2.RecordBatch.FromString(self.rows)
            elif self.columnar:
                # A subscriber that came after the batch was handed to a decoder: the
                # rows are made here, once, on the event loop.
                from sensor.export import columnar
                self._full = ingest_pb2.RecordBatch.FromString(columnar.to_rows(self.raw))
            else:
                self._full = ingest_pb2.RecordBatch.FromString(self.raw)
        return self._full.records


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A decoder's answer for bytes that parse as a batch header but not as a batch (the
    records inside are not Record messages): the stream gets INVALID_ARGUMENT."""

    reason: str


@dataclass(frozen=True, slots=True)
class Stored:
    """What the writer returns for one batch: the ack, and what the hub fans out."""

    ack: object
    seq: int
    batch: object  # the Received batch (or RecordBatch message), for live subscribers
    identity: str | None


@dataclass(frozen=True, slots=True)
class Shipped:
    """A DecodedBatch on its way back from a decoder process: each table as an Arrow IPC
    stream. Pickling the Arrow tables of 1000 records costs ~1.8 ms of CPU between the
    two ends (measured; the unpickling holds the collector's GIL); IPC bytes cost ~0.3 ms
    and are read back without copying. A columnar table stored as sent is not shipped at
    all: its value is its (offset, length) in the serialized batch, which the writer
    holds (collector/columnar.py arrow_spans)."""

    sensor_id: str
    batch_id: int
    records: int
    tables: dict[str, bytes | tuple[int, int]]
    rows: bytes | None = None   # see Received.rows

    @classmethod
    def pack(cls, decoded: DecodedBatch) -> "Shipped":
        tables = {}
        for name, table in decoded.tables.items():
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as out:
                out.write_table(table)
            tables[name] = sink.getvalue().to_pybytes()
        return cls(decoded.sensor_id, decoded.batch_id, decoded.records, tables)

    def unpack(self, raw: bytes | None = None) -> DecodedBatch:
        """The tables; raw: the serialized batch, needed when a table is a span of it."""
        whole = None
        tables = {}
        for name, data in self.tables.items():
            if isinstance(data, tuple):
                if whole is None:
                    if raw is None:
                        raise ValueError("Shipped.unpack: a table is a span of the batch; "
                                         "pass the serialized batch")
                    whole = pa.py_buffer(raw)
                data = whole.slice(*data)
            tables[name] = pa.ipc.open_stream(data).read_all()
        return DecodedBatch(sensor_id=self.sensor_id, batch_id=self.batch_id,
                            records=self.records, tables=tables)


def decode_message(raw: bytes, identity: str | None, rows: bool = False,
                   max_columnar: int | None = None,
                   spans: bool = False) -> Shipped | str | Undecodable:
    """Decoder-process entry point: a serialized RecordBatch to its columns, the reason
    it is rejected, or Undecodable. Runs in a worker process (see Writer), so it takes and
    returns only picklable values; the caller has checked only the header (Received).
    rows: for a columnar batch, also its records as a row batch (Received.rows).
    max_columnar: bound on a columnar batch's Arrow buffers once decompressed (the
    collector's max_columnar_size; None: sensor/export/columnar.MAX_DECODED_BYTES).
    spans: the caller keeps raw, so columnar tables stored as sent may come back as
    their place in it (Shipped; unpack then needs raw)."""
    try:
        batch = ingest_pb2.RecordBatch.FromString(raw)
    except DecodeError as exc:
        return Undecodable(str(exc))
    try:
        if len(batch.tables) or batch.order:
            from collector import columnar   # imports this module: not at the top

            return columnar.shipped(batch, identity, rows, max_columnar,
                                    raw if spans else None)
        return Shipped.pack(decode_batch(batch, identity))
    except SchemaError as exc:
        return str(exc)


# How often a decoder process checks that the collector is still alive: one getppid()
# call, and at worst this long before an orphaned decoder exits.
PARENT_CHECK_S = 1.0


def _exit_with_parent(parent: int) -> None:
    # A decoder holds both ends of its task queue's pipe, so it never reads an EOF when
    # the collector is killed (SIGKILL, OOM); without this it would wait forever.
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _decoder_init() -> None:
    """Set up a decoder process."""
    # The collector handles SIGINT/SIGTERM and shuts the pool down itself; a ^C reaching
    # the whole process group must not kill a decoder mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True,
                     name="loupe-parent-watch").start()


def _warm_up_batch():
    """A valid batch with one record of every table, for warming up a decoder."""
    flow = {"uid": "w", "src_addr": "127.0.0.1", "dst_addr": "127.0.0.1", "ip_version": 4}
    l7 = {"uid": "w", "src_addr": "127.0.0.1", "dst_addr": "127.0.0.1"}
    return ingest_pb2.RecordBatch(sensor_id="warm-up", records=[
        {"flow": flow},
        {"l7": {**l7, "http": {"method": "GET"}}},
        {"l7": {**l7, "dns": {"qname": "w", "transport": "udp", "answers": [{"name": "w"}]}}},
        {"l7": {**l7, "tls": {"sni": "w", "alpn": ["h2"], "cert_san": ["w"]}}},
        {"lost": {"source": "w"}},
    ])


def _warm_up() -> int:
    """Decode a small batch, result discarded: the first decode in a process imports what
    Arrow needs for it (pandas among them, 0.4 s on an idle core)."""
    Shipped.pack(decode_batch(_warm_up_batch()))
    return os.getpid()


def _decoder_processes() -> int:
    # One per core: decoding is the collector's largest CPU cost per record, and the
    # writer thread spends most of a commit inside DuckDB, which does not need a core of
    # Python. More processes than cores would only add switching.
    return max(1, min(4, os.cpu_count() or 1))


class Writer:
    """Decode and validate in worker processes, commit on one thread: the one writer.

    Decoding is Python work (one attribute read per field), so in the collector's own
    process it would hold the GIL that the gRPC event loop and DuckDB's Python glue also
    need; in worker processes it runs on every core and overlaps the commits. A batch
    travels to a decoder as the bytes it arrived as and comes back as Arrow tables.

    DuckDB takes one writer, and a single thread also serialises the (sensor_id,
    batch_id) dedup checks. Batches are committed in the order they arrived, decoded or
    not: the group that follows a commit is every batch already decoded at the head of
    the queue, up to MAX_GROUP (group commit). With several sensors pushing, the fixed
    cost of a transaction is shared instead of paid per batch. Every batch in a group is
    still acked only after that group's commit.
    """

    # At most this many batches per transaction: bounds the memory of one commit (a
    # batch is at most the 16 MiB message limit) and the ack latency of the first batch
    # of a group, while amortising the per-transaction cost over several sensors.
    MAX_GROUP = 16

    def __init__(self, storage: Storage, clock: Callable[[], int] = time.time_ns,
                 decoders: int | None = None) -> None:
        self._storage = storage
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loupe-writer")
        # Arrival order; each entry is (decode future, batch, identity, ack future, the
        # serialized batch: columnar tables are read from it, see Shipped).
        self._pending: collections.deque = collections.deque()
        self._flusher: asyncio.Task | None = None
        self._decoder_count = decoders or _decoder_processes()
        # Whether columnar batches are stored (and Ingest.Options advertises them); off,
        # the collector acts as one from before them (tests, benchmarks).
        self.columnar = True
        # Bound on a columnar batch's buffers once decompressed (max_columnar_size);
        # None is the default bound.
        self.max_columnar_bytes: int | None = None
        self._decoders = self._new_decoders()
        # Called on the writer thread with each batch just committed (not duplicates):
        # the endpoint inventory learns from it (collector/inventory/store.py).
        self.on_stored: Callable[[DecodedBatch], None] | None = None

    def _new_decoders(self) -> ProcessPoolExecutor:
        # "spawn": the collector runs gRPC threads, which a fork would copy mid-flight.
        # Processes start on the first batches and live until close().
        return ProcessPoolExecutor(
            max_workers=self._decoder_count,
            mp_context=multiprocessing.get_context("spawn"), initializer=_decoder_init,
        )

    async def start(self) -> None:
        """Start every decoder process now, and warm them and the writer thread up.

        A decoder takes a few hundred milliseconds to spawn and import Arrow and protobuf,
        and the first batch through a process imports what Arrow needs for it (another
        0.3-0.4 s, several times that on a loaded host). Paid on the first batches, that
        lands on their acks, all of them at once."""
        loop = asyncio.get_running_loop()
        # The pool starts one process per submitted task while none is idle, so as many
        # tasks as processes, submitted together, start them all.
        await asyncio.gather(
            loop.run_in_executor(self._pool, _warm_up),
            *[loop.run_in_executor(self._decoders, _warm_up) for _ in range(self._decoder_count)],
        )

    def _store_group(self, group: list[tuple[Shipped, object, str | None, bytes]]
                     ) -> list[Stored]:
        unpacked = [d.unpack(raw) for d, _, _, raw in group]
        results = self._storage.store_many(unpacked, self._clock())
        out = []
        for (decoded, batch, identity, _), result, columns in zip(group, results, unpacked):
            if result.status is StoreStatus.STORED and self.on_stored is not None:
                try:
                    self.on_stored(columns)
                except Exception:  # noqa: BLE001 - committed already; the ack must go out
                    log.exception("the endpoint inventory failed on batch %d; the batch "
                                  "is stored", batch.batch_id)
            if result.status is StoreStatus.DUPLICATE:
                ack = ingest_pb2.BatchAck(
                    batch_id=batch.batch_id, status=ingest_pb2.ACK_STATUS_DUPLICATE,
                    message="stored before; not stored again",
                )
            else:
                ack = ingest_pb2.BatchAck(
                    batch_id=batch.batch_id, status=ingest_pb2.ACK_STATUS_STORED,
                    records=decoded.records,
                )
            out.append(Stored(ack, result.seq, batch, identity))
        return out

    def _next_group(self) -> list:
        """The decoded batches at the head of the queue (at most MAX_GROUP); rejected ones
        and failed decodes are answered on the way, in order."""
        group = []
        pending = self._pending
        while pending and len(group) < self.MAX_GROUP and pending[0][0].done():
            decode, batch, identity, fut, raw = pending.popleft()
            stream = getattr(batch, "stream", None)
            exc = decode.exception()
            if stream is not None and stream.broken:
                # After a message that is not a batch: never committed, never acked.
                fut.cancel()
            elif exc is not None:
                if not fut.done():
                    fut.set_exception(exc)
            elif isinstance(decode.result(), Undecodable):
                if stream is not None:
                    stream.broken = True
                if not fut.done():
                    fut.set_exception(DecodeError(decode.result().reason))
            elif isinstance(decode.result(), str):
                if not fut.done():
                    fut.set_result(Stored(ingest_pb2.BatchAck(
                        batch_id=batch.batch_id, status=ingest_pb2.ACK_STATUS_REJECTED,
                        message=decode.result()), 0, batch, identity))
            else:
                if decode.result().rows is not None and isinstance(batch, Received):
                    batch.rows = decode.result().rows
                group.append((decode.result(), batch, identity, fut, raw))
        return group

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            # Wait for the oldest batch only: later ones keep decoding meanwhile, and
            # whatever has finished by then joins its group.
            await asyncio.wait([self._pending[0][0]])
            group = self._next_group()
            if not group:
                continue
            try:
                stored = await loop.run_in_executor(
                    self._pool, self._store_group, [(d, b, i, r) for d, b, i, _, r in group]
                )
            except Exception as exc:  # a storage failure fails every batch of the group
                for *_, fut, _ in group:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (*_, fut, _), result in zip(group, stored):
                if not fut.done():
                    fut.set_result(result)

    async def store(self, batch, raw: bytes, identity: str | None) -> Stored:
        """Decode, validate and commit one batch (raw is its serialized form); its ack.
        Raises DecodeError if raw turns out not to be a RecordBatch."""
        loop = asyncio.get_running_loop()
        rows = getattr(batch, "want_rows", False)   # see decode_message
        if getattr(batch, "columnar", False) and not self.columnar:
            decode = loop.create_future()
            decode.set_result(COLUMNAR_REFUSED)
        else:
            decode = None
        try:
            if decode is None:
                decode = loop.run_in_executor(self._decoders, decode_message, raw, identity,
                                              rows, self.max_columnar_bytes, True)
        except BrokenProcessPool:
            # A decoder died (killed, out of memory): the batches it held fail and their
            # sensors resend them; later batches go to a fresh set of processes.
            log.error("a decoder process died; starting new ones")
            self._decoders.shutdown(wait=False, cancel_futures=True)
            self._decoders = self._new_decoders()
            decode = loop.run_in_executor(self._decoders, decode_message, raw, identity, rows,
                                          self.max_columnar_bytes, True)
        fut = loop.create_future()
        self._pending.append((decode, batch, identity, fut, raw))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def run(self, fn, *args):
        """Run another storage write (retention) on the writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    async def drain(self) -> None:
        """Commit every batch already received (shutdown: after the server stopped)."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)

    def close(self) -> None:
        self._decoders.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True)


# The REJECTED reason for a columnar batch at a collector that does not take them.
COLUMNAR_REFUSED = ("this collector stores row batches only and did not advertise columnar "
                    "ones (Ingest.Options): send RecordBatch.records")


def peer_identity(context) -> str | None:
    """The client certificate's common name under mTLS, else None."""
    auth = context.auth_context()
    names = auth.get("x509_common_name") or []
    return names[0].decode("utf-8", "replace") if names else None


class IngestService:
    """loupe.v1.Ingest. Requests arrive as raw bytes (see server.py) so that a message that
    is not a RecordBatch gets a clear INVALID_ARGUMENT instead of grpc's generic error."""

    def __init__(self, writer: Writer, hub, counters: IngestCounters, *, mtls: bool) -> None:
        self._writer = writer
        self._hub = hub
        self._counters = counters
        self._mtls = mtls

    async def Options(self, request, context):
        """The batch encodings this collector stores (registered only when columnar
        batches are on: a collector without them answers UNIMPLEMENTED, as older ones do)."""
        return ingest_pb2.IngestOptions(encodings=[ingest_pb2.BATCH_ENCODING_ROWS,
                                                   ingest_pb2.BATCH_ENCODING_ARROW])

    # Batches of one stream being decoded or committed at once, on top of the one whose
    # ack is being sent: lets the next batch decode while the previous one commits.
    # Bounds what one stream makes the collector hold (4 x the 16 MiB message limit).
    PIPELINE = 4

    async def _read(self, request_iterator, queue: asyncio.Queue, identity) -> None:
        """Parse each message's header, hand it to the writer, and queue (batch, ack task)
        in arrival order. What ends the reading is queued last: None for the end of the
        stream, else the exception (a DecodeError for a message that is not a batch; one
        whose records are not Records fails its ack task with a DecodeError instead)."""
        stream = StreamState()
        try:
            async for raw in request_iterator:
                try:
                    batch = Received.parse(raw, stream)
                except DecodeError as exc:
                    await queue.put(exc)
                    return
                # A columnar batch's records exist as rows only if the decoder makes
                # them: it does while anyone is subscribed (Received.rows).
                batch.want_rows = batch.columnar and bool(self._hub.subscribers)
                task = asyncio.ensure_future(self._writer.store(batch, raw, identity))
                await queue.put((batch, task))
        except Exception as exc:  # noqa: BLE001 - handed to Push, which re-raises it
            await queue.put(exc)
            return
        await queue.put(None)

    async def _undecodable(self, context, index: int, exc: DecodeError) -> None:
        self._counters.undecodable_messages += 1
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"message {index} on this stream is not a loupe.v1.RecordBatch ({exc}); "
            "the stream is closed, batches acked before it are stored",
        )

    async def Push(self, request_iterator, context):
        identity = peer_identity(context) if self._mtls else None
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.PIPELINE)
        reader = asyncio.create_task(self._read(request_iterator, queue, identity))
        index = 0
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, Exception) and not isinstance(item, DecodeError):
                    raise item
                if isinstance(item, DecodeError):
                    # Every batch before it has been acked above.
                    await self._undecodable(context, index, item)
                batch, task = item
                try:
                    stored = await task
                except DecodeError as exc:
                    # Its records are not Records (found by the decoder). The writer
                    # commits none of this stream's later batches.
                    await self._undecodable(context, index, exc)
                index += 1
                status = stored.ack.status
                if status == ingest_pb2.ACK_STATUS_STORED:
                    self._counters.batches_stored += 1
                    self._counters.records_stored += stored.ack.records
                elif status == ingest_pb2.ACK_STATUS_DUPLICATE:
                    self._counters.batches_duplicate += 1
                else:
                    self._counters.batches_rejected += 1
                    log.warning("rejected batch %d from %s: %s", batch.batch_id,
                                identity or batch.sensor_id or "?", stored.ack.message)
                if status == ingest_pb2.ACK_STATUS_STORED:
                    # Committed: live subscribers may see it now, before the sensor reads its ack.
                    self._hub.publish(stored.seq, batch, identity)
                yield stored.ack
        finally:
            reader.cancel()
