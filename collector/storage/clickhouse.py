"""ClickHouse storage: the scale-out engine, shared by several collectors.

Connection. The native protocol through clickhouse-driver (clickhouse-connect speaks HTTP
and needs a newer server than Debian's 18.16). Everything here goes through a small
connection object (Native below; tests also drive the same SQL through chDB, the engine
in-process), so the SQL is this module's and nothing else's.

Two generations of DDL, picked from the server's version at open:
- legacy (before 22.3, e.g. Debian's 18.16): plain String, UInt8 for booleans, no codecs,
  no TTL; retention drops whole day partitions.
- modern (22.3 and later): LowCardinality(String) for the columns that hold a handful of
  values, IPv6 for addresses (IPv4 stored mapped, ::ffff:a.b.c.d), Bool, DoubleDelta on
  the time columns (sorted within a part, so their second difference is near zero), and a
  row TTL on received_ns besides the partition drop.
Enums are not used for the small sets (conn_state, methods): an unexpected value would fail
a whole batch's insert, and LowCardinality compresses them as well without that risk.

Tables. One MergeTree per record kind, same columns as DuckDB's (collector/schema.py).
- PARTITION BY the day of received_ns, not of the record's own time: retention ages rows by
  received_ns (as DuckDB does), so a partition drop is exact to the day; and a batch always
  lands in one partition, where partitioning by record time would make a replayed capture
  spanning months write one part per day it covers (ClickHouse refuses an insert touching
  more than 100 partitions).
- ORDER BY the record's hour, then service and address, then its time: a query for a time
  range and a service or address reads only the granules of that hour and that service,
  and records_since's ORDER BY time still reads few rows out of order.
- List-of-struct columns (DNS answers) are Nested: 18.16 stores Array(Tuple) in a MergeTree
  as Nested anyway, and names its members answers.name, answers.rtype, ... on both. The
  flows' l7_summary map is Nested(key, value) too (18.16 has no Map):
  l7_summary.value[indexOf(l7_summary.key, 'mysql_user')] reads one key.

Dedup of (sensor_id, batch_id): a `batches` table (ReplacingMergeTree on that pair) is read
before a group is inserted. A new batch gets a claim row first (records = 0, with the
batch_seq and received_ns its rows will carry), then its records, then its commit row
(records = n, replacing the claim at merges). So a resend after a collector restart, or to
a second collector, of a committed batch is answered DUPLICATE; and a resend of a batch
whose collector died after claiming it (SIGKILL between the records and the commit row,
or while the server was still writing them) is taken over: after CLAIM_SETTLE_NS from the
claim, each table's rows carrying the claim's batch_seq are counted, the tables whose rows
are all there are not written again, the others are, and the commit row follows. ClickHouse
has no transaction across tables, which leaves one window (docs/scaling.md): a collector
still alive and writing more than CLAIM_SETTLE_NS after its claim while the sensor resent
the batch elsewhere (its stream broke, or no ack in 30 s) is stored twice. It errs towards
a duplicate, never a loss (at least once).

Commit sequence (batch_seq): max(previous + 1, wall-clock ns). Within one collector it
rises with every commit, as DuckDB's counter does (the live stream's stitching relies on
that); across collectors sharing the server it orders commits by wall clock, so a
restarted or second collector continues above what is stored, and last_seq() (the bound
of an export) is the newest commit of any of them. Without transactions an export is not
an atomic snapshot: a batch another collector is inserting at that moment may be read in
part.

Cluster (`cluster` set): the tables are made on every server of that remote_servers
cluster as <name>_local, under Distributed tables of the plain names; reads and writes go
through those, retention and TTL to each server's local tables (docs/scaling.md).

Queries from analysts run with readonly=1 (no writes, no SET, no table functions such as
file() or url()), after the same one-statement, read-only check as DuckDB's.
"""

from __future__ import annotations

import datetime as dt
import heapq
import ipaddress
import logging
import math
import re
import socket
import threading
import time
from typing import Iterator

import pyarrow as pa

from collector import schema
from collector.storage import migrate
from collector.storage.base import (
    Cancel, DecodedBatch, QueryResult, SensorSummary, StoreResult, StoreStatus,
)
from sensor.errors import QueryError, StorageError

# The driver logs every failed connect as a warning with a traceback; the collector says
# it in one line of its own (StorageError).
logging.getLogger("clickhouse_driver.connection").setLevel(logging.ERROR)
log = logging.getLogger(__name__)

MODERN = (22, 3)   # the first LTS with every feature the modern DDL uses (Bool: 21.12)

# Strings that hold a handful of distinct values per part: LowCardinality on modern servers.
LOW_CARDINALITY = frozenset({
    "sensor_id", "app_proto", "conn_state", "source", "method", "version", "transport",
    "command", "kind", "status", "severity", "reply_type", "auth", "copy", "alpn_selected",
    "sql_state", "sqlstate", "process_comm", "process_user", "server_version", "auth_plugin",
})
ADDRESSES = frozenset({"src_addr", "dst_addr"})
# Columns that rise (nearly) monotonically within a part: DoubleDelta on modern servers.
MONOTONIC = frozenset({"flow_start_ns", "flow_end_ns", "ts_ns", "interval_start_ns",
                       "interval_end_ns", "received_ns", "batch_seq"})

HOUR_NS = 3600 * 10**9
DAY_S = 86_400
_TYPES = {pa.uint8(): "UInt8", pa.uint16(): "UInt16", pa.uint32(): "UInt32",
          pa.uint64(): "UInt64", pa.int32(): "Int32", pa.int64(): "Int64", pa.string(): "String"}

# Rows per block when reading history: the driver streams blocks of this size.
_REPLAY_BLOCK = 1000

_BATCH_COLUMNS = ("sensor_id", "batch_id", "batch_seq", "received_ns", "records")
# How long after a claim (its received_ns) another collector waits before it counts what the
# claiming collector wrote: longer than a group's inserts take on the server, which finishes
# an insert whose data it received even when the collector that sent it has died.
CLAIM_SETTLE_NS = 3 * 10**9

_READ_ONLY_WORDS = ("SELECT", "WITH", "EXPLAIN", "SHOW", "DESCRIBE", "DESC", "EXISTS")


def _day(ns_column: str) -> str:
    # UTC whatever the server's time zone: delete_older_than reads partition names as
    # UTC days.
    return f"toYYYYMMDD(toDateTime(intDiv({ns_column}, 1000000000), 'UTC'))"


def _quote(value) -> str:
    """A literal for the few values this module puts in SQL text (ints, sensor ids)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"no literal for {type(value).__name__}")
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ident(name: str) -> str:
    return "`" + name.replace("`", "") + "`"


# -- connections ---------------------------------------------------------------------------


class Native:
    """One native-protocol connection (clickhouse-driver). Not thread-safe: every reader
    takes its own through clone()."""

    def __init__(self, host: str, port: int, database: str, user: str, password: str,
                 *, create_database: bool = True) -> None:
        from clickhouse_driver import Client

        self._args = (host, port, database, user, password)
        self.where = f"clickhouse://{user}@{host}:{port}/{database}"
        # The database may not exist yet: connect to `default`, make it, then use it.
        self._client = Client(host, port=port, user=user, password=password,
                              database="default", connect_timeout=5,
                              send_receive_timeout=300, settings={"use_numpy": False})
        try:
            if create_database:
                self._client.execute(f"CREATE DATABASE IF NOT EXISTS {_ident(database)}")
            self._client.execute(f"USE {_ident(database)}")
            info = self._client.connection.server_info
        except Exception as exc:  # noqa: BLE001 - the driver raises socket errors too
            raise StorageError(f"cannot reach ClickHouse at {host}:{port}: "
                               f"{_first_line(exc)}; check [storage.clickhouse]") from None
        self.version = (info.version_major, info.version_minor)
        self.database = database

    def clone(self) -> "Native":
        return Native(*self._args, create_database=False)

    def node(self, host: str, port: int) -> "Native":
        """A connection to another server of the cluster, same database and user."""
        return Native(host, port, *self._args[2:])

    def execute(self, sql: str, settings: dict | None = None) -> list[tuple]:
        return self._client.execute(sql, settings=settings)

    def stream(self, sql: str, settings: dict | None = None,
               with_types: bool = False) -> Iterator:
        """Rows as the server sends them, block by block; with_types: first the
        [(name, type)] of the columns."""
        return self._client.execute_iter(sql, settings=settings,
                                         with_column_types=with_types)

    def insert(self, table: str, columns: list[str], data: list[list],
               settings: dict | None = None) -> None:
        cols = ", ".join(_ident(c) for c in columns)
        self._client.execute(f"INSERT INTO {_ident(table)} ({cols}) VALUES", data,
                             columnar=True, settings=settings)

    def interrupt(self) -> None:
        """Give up on the running query, from another thread: shutting the socket down
        wakes the reader (which then fails and closes the connection), and the server
        cancels a query whose connection dropped. disconnect() here would race the
        reader's own clean-up."""
        sock = getattr(self._client.connection, "socket", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass   # already closed

    def close(self) -> None:
        self._client.disconnect()


def native(config) -> Native:
    """A connection from [storage.clickhouse] (sensor.config.ClickHouseConfig)."""
    return Native(config.host, config.port, config.database, config.user, config.password)


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return text.strip().splitlines()[0]


# -- table definitions ------------------------------------------------------------------------


def _column_type(name: str, arrow_type: pa.DataType, modern: bool) -> str:
    if pa.types.is_map(arrow_type):
        # 18.16 has no Map type (21.1 has): a Nested of key and value, both generations.
        return (f"Nested(key {_column_type('', arrow_type.key_type, modern)}, "
                f"value {_column_type('', arrow_type.item_type, modern)})")
    if pa.types.is_list(arrow_type):
        inner = arrow_type.value_type
        if pa.types.is_struct(inner):
            members = ", ".join(f"{_ident(inner.field(i).name)} "
                                f"{_column_type(inner.field(i).name, inner.field(i).type, modern)}"
                                for i in range(inner.num_fields))
            return f"Nested({members})"
        return f"Array({_column_type('', inner, modern)})"
    if pa.types.is_boolean(arrow_type):
        return "Bool" if modern else "UInt8"
    base = _TYPES[arrow_type]
    if modern and base == "String":
        if name in ADDRESSES:
            return "IPv6"
        if name in LOW_CARDINALITY:
            return "LowCardinality(String)"
    if modern and name in MONOTONIC:
        return f"{base} CODEC(DoubleDelta, LZ4)"
    return base


def _stored_columns(table: schema.Table, modern: bool) -> list[tuple[str, str, object]]:
    """(column, type, default) as the server lists a table's columns (system.columns):
    a Nested is its member arrays (answers.name Array(String), ...); the default is what
    a column added to stored rows reads there (migrate.default_value; None: the type's)."""
    out = []
    for field in table.schema:
        ddl = _column_type(field.name, field.type, modern)
        if ddl.startswith("Nested("):
            t = field.type
            members = ([("key", t.key_type), ("value", t.item_type)] if pa.types.is_map(t) else
                       [(t.value_type.field(i).name, t.value_type.field(i).type)
                        for i in range(t.value_type.num_fields)])
            out += [(f"{field.name}.{m}", f"Array({_column_type(m, mt, modern)})", None)
                    for m, mt in members]
            continue
        default = migrate.default_value(table.name, field.name, field.type)
        if isinstance(default, bool):
            default = int(default)
        if default in ("", 0):
            default = None   # the type's own default
        out.append((field.name, ddl, default))
    return out


def _order_by(table: schema.Table) -> str:
    time_col = table.time_column
    names = set(table.schema.names)
    keys = [f"intDiv({time_col}, {HOUR_NS})"]
    if table.name == "flows":
        keys += ["app_proto", "dst_port", "dst_addr"]
    elif "dst_addr" in names:
        keys += ["dst_port", "dst_addr"]
    return "(" + ", ".join(keys + [time_col]) + ")"


def create_table_sql(table: schema.Table, modern: bool, name: str | None = None) -> str:
    cols = ", ".join(f"{_ident(f.name)} {_column_type(f.name, f.type, modern)}"
                     for f in table.schema)
    return (f"CREATE TABLE IF NOT EXISTS {_ident(name or table.name)} ({cols}) "
            f"ENGINE = MergeTree PARTITION BY {_day('received_ns')} "
            f"ORDER BY {_order_by(table)}")


def _batches_sql(name: str = "batches") -> str:
    return (f"CREATE TABLE IF NOT EXISTS {name} (sensor_id String, batch_id UInt64, "
            "batch_seq UInt64, received_ns UInt64, records UInt32) "
            f"ENGINE = ReplacingMergeTree PARTITION BY {_day('received_ns')} "
            "ORDER BY (sensor_id, batch_id)")


# -- values in and out ----------------------------------------------------------------------


def _to_v6(text: str) -> str:
    if not text:
        return "::"
    addr = ipaddress.ip_address(text)
    return f"::ffff:{addr}" if addr.version == 4 else str(addr)


def _from_v6(value) -> str:
    """An IPv6 column's value (an IPv6Address from the driver, text from JSON) back to
    the address the record carried: IPv4 un-mapped, the empty address empty."""
    addr = value if isinstance(value, ipaddress.IPv6Address) else ipaddress.ip_address(value)
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return "" if addr == ipaddress.IPv6Address("::") else str(addr)


def _columns_of(rows: pa.Table, modern: bool) -> tuple[list[str], list[list]]:
    """Arrow columns as the driver's columnar lists; a list<struct> becomes one list per
    Nested member (answers.name, answers.rtype, ...)."""
    names: list[str] = []
    data: list[list] = []
    for field in rows.schema:
        col = rows.column(field.name).combine_chunks()
        if pa.types.is_map(field.type):
            names += [f"{field.name}.key", f"{field.name}.value"]
            data += [pa.ListArray.from_arrays(col.offsets, col.keys).to_pylist(),
                     pa.ListArray.from_arrays(col.offsets, col.items).to_pylist()]
            continue
        if pa.types.is_list(field.type) and pa.types.is_struct(field.type.value_type):
            values = col.flatten()
            for i in range(field.type.value_type.num_fields):
                member = pa.ListArray.from_arrays(col.offsets, values.field(i))
                names.append(f"{field.name}.{field.type.value_type.field(i).name}")
                data.append(member.to_pylist())
            continue
        values = col.to_pylist()
        if modern and field.name in ADDRESSES:
            values = [_to_v6(v) for v in values]
        names.append(field.name)
        data.append(values)
    return names, data


class _Reader:
    """The SELECT list of one table and how its rows become schema.record_from_row's
    dicts (Nested members zipped back into structs, IPv6 un-mapped, 0/1 as booleans)."""

    def __init__(self, table: schema.Table, modern: bool) -> None:
        self.table = table
        self.select: list[str] = []
        self._plan: list[tuple[str, str, object]] = []   # (name, how, detail)
        for field in table.schema:
            t = field.type
            if pa.types.is_map(t):
                self.select += [_ident(f"{field.name}.key"), _ident(f"{field.name}.value")]
                self._plan.append((field.name, "map", None))
            elif pa.types.is_list(t) and pa.types.is_struct(t.value_type):
                members = [t.value_type.field(i) for i in range(t.value_type.num_fields)]
                self.select += [_ident(f"{field.name}.{m.name}") for m in members]
                self._plan.append((field.name, "nested", members))
            else:
                self.select.append(_ident(field.name))
                how = ("addr" if modern and field.name in ADDRESSES else
                       "bool" if pa.types.is_boolean(t) else
                       "list" if pa.types.is_list(t) else "plain")
                self._plan.append((field.name, how, None))

    def row(self, values) -> dict:
        out = {}
        it = iter(values)
        for name, how, detail in self._plan:
            if how == "map":
                keys = next(it)
                out[name] = dict(zip(keys, next(it)))
                continue
            if how == "nested":
                arrays = [next(it) for _ in detail]
                out[name] = [
                    {m.name: (bool(v) if pa.types.is_boolean(m.type) else v)
                     for m, v in zip(detail, item)}
                    for item in zip(*arrays)
                ]
                continue
            v = next(it)
            if how == "addr":
                v = _from_v6(v)
            elif how == "bool":
                v = bool(v)
            elif how == "list":
                v = list(v)
            out[name] = v
        return out


# -- the read-only check ----------------------------------------------------------------------

_COMMENT_OR_STRING = re.compile(
    r"--[^\n]*|#[^\n]*|/\*.*?\*/|'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`(?:[^`\\]|\\.)*`",
    re.S)


def check_read_only(sql: str) -> None:
    """DuckDB's rules, for ClickHouse's dialect: exactly one statement, and a read-only
    one. The server enforces readonly=1 besides; this gives the same one-line refusal."""
    bare = _COMMENT_OR_STRING.sub(lambda m: " " if m.group(0)[0] in "-#/" else "''", sql)
    statements = [s for s in bare.split(";") if s.strip()]
    if len(statements) != 1:
        raise QueryError(f"send exactly one statement, got {len(statements)}")
    words = re.findall(r"[A-Za-z_]+", statements[0])
    kind = words[0].upper() if words else ""
    if kind not in _READ_ONLY_WORDS:
        raise QueryError("only read-only queries (SELECT, WITH ... SELECT, EXPLAIN) are "
                         f"allowed, got {kind or 'nothing'}")


# -- the store ----------------------------------------------------------------------------------


class ClickHouseStorage:
    """Storage over a ClickHouse server through `conn` (Native, or any object with its
    methods), or over a cluster of them (see _nodes)."""

    def __init__(self, conn, *, cluster: str = "") -> None:
        self._conn = conn
        self._cluster = cluster
        self._retention_ns = 0
        self._closed = False
        # Every server that holds data: the one connected to, or each of the cluster's.
        self._nodes = self._connect_nodes() if cluster else [conn]
        version = min(tuple(n.version) for n in self._nodes)
        self.modern = version >= MODERN
        self._readers = {name: _Reader(t, self.modern) for name, t in schema.TABLES.items()}
        shards = f", cluster {cluster} of {len(self._nodes)}" if cluster else ""
        self.description = f"{conn.where} (ClickHouse {'.'.join(map(str, version))}{shards})"
        try:
            for node in self._nodes:
                self._create_tables(node)
            row = conn.execute("SELECT max(batch_seq) FROM batches")
        except Exception as exc:  # noqa: BLE001 - driver and server errors alike
            raise StorageError(f"cannot create Loupe's tables on {conn.where}: "
                               f"{_first_line(exc)}") from None
        self._last_seq = int(row[0][0] or 0)
        # Through a Distributed table an insert returns once every shard has its rows,
        # so an ack means stored, and the next dedup check sees them.
        self._insert_settings = {"insert_distributed_sync": 1} if cluster else None

    def _local(self, name: str) -> str:
        """The table that holds a node's own rows (under the Distributed table)."""
        return f"{name}_local" if self._cluster else name

    def _connect_nodes(self) -> list:
        """The cluster's servers, from remote_servers as the connected server has it.
        Tables are made on each one directly: ON CLUSTER DDL needs ZooKeeper, which a
        cluster without replication does not run."""
        try:
            rows = self._conn.execute(
                "SELECT DISTINCT host_address, port FROM system.clusters WHERE cluster = "
                f"{_quote(self._cluster)} ORDER BY shard_num, replica_num")
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot read the clusters of {self._conn.where}: "
                               f"{_first_line(exc)}") from None
        if not rows:
            raise StorageError(f"{self._conn.where} has no cluster {self._cluster!r} in its "
                               "remote_servers: fix [storage.clickhouse] cluster or the "
                               "server's config (docs/scaling.md)")
        return [self._conn.node(host, int(port)) for host, port in rows]

    def _create_tables(self, node) -> None:
        for table in schema.TABLES.values():
            node.execute(create_table_sql(table, self.modern, self._local(table.name)))
            self._migrate(node, table, self._local(table.name))
        node.execute(_batches_sql(self._local("batches")))
        if not self._cluster:
            return
        # A Distributed table of the plain name on every node, so that collectors and
        # analysts may use any server. Records spread at random; the dedup rows of a
        # (sensor_id, batch_id) always land on one shard.
        db = _quote(node.database)
        for table in schema.TABLES:
            node.execute(f"CREATE TABLE IF NOT EXISTS {table} AS {table}_local ENGINE = "
                         f"Distributed({self._cluster}, {db}, {table}_local, rand())")
        node.execute(f"CREATE TABLE IF NOT EXISTS batches AS batches_local ENGINE = "
                     f"Distributed({self._cluster}, {db}, batches_local, "
                     "cityHash64(sensor_id, batch_id))")
        for table in schema.TABLES.values():
            self._migrate(node, table, table.name)   # a Distributed table holds only columns

    def _migrate(self, node, table: schema.Table, name: str) -> None:
        """Adds the columns a table from an older Loupe lacks (collector/storage/migrate.py);
        refuses, in one line, a column whose type differs. Inserts and reads name their
        columns, so the added ones may sit at the end."""
        have = dict(node.execute(
            "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND "
            f"table = {_quote(name)}"))
        want = _stored_columns(table, self.modern)
        for added in migrate.plan(node.where, name, have,
                                  [(n, t.split(" CODEC(")[0]) for n, t, _ in want]):
            ddl, default = next((t, d) for n, t, d in want if n == added.column)
            # Collectors in front of one server may start together and add the same column:
            # IF NOT EXISTS on modern servers; 18.16 lacks it, so there the slower one stops
            # with "column with this name already exists" and starts on the next try.
            exists = "IF NOT EXISTS " if self.modern else ""
            node.execute(f"ALTER TABLE {_ident(name)} ADD COLUMN {exists}"
                         f"{_ident(added.column)} {ddl}"
                         + ("" if default is None else f" DEFAULT {_quote(default)}"))
            migrate.logged(node.where, added)

    # -- writing (the writer thread only) -------------------------------------------------

    def store_many(self, batches: list[DecodedBatch], received_ns: int) -> list[StoreResult]:
        keys = [(b.sensor_id, b.batch_id) for b in batches]
        try:
            committed, claims = self._batch_rows(set(keys))
            seqs: dict[tuple[str, int], int] = {}
            results: list = []
            takeovers: list[tuple[int, DecodedBatch, tuple[int, int]]] = []
            taken: set[tuple[str, int]] = set()
            parts: dict[str, list[pa.Table]] = {}
            part_seqs: dict[str, list[tuple[int, int]]] = {}
            seq = self._last_seq
            for batch, key in zip(batches, keys):
                if key in committed or key in seqs or key in taken:
                    results.append(StoreResult(StoreStatus.DUPLICATE))
                    continue
                if key in claims:
                    taken.add(key)
                    takeovers.append((len(results), batch, claims[key]))
                    results.append(None)
                    continue
                seq = max(seq + 1, time.time_ns())
                seqs[key] = seq
                results.append(StoreResult(StoreStatus.STORED, seq))
                for name, table in batch.tables.items():
                    parts.setdefault(name, []).append(table)
                    part_seqs.setdefault(name, []).append((seq, table.num_rows))
            records = {(b.sensor_id, b.batch_id): b.records for b in batches}
            if seqs:
                # The claim: a collector taking the batch over later finds which rows
                # these are (their batch_seq), should this one die before the commit row.
                self._insert_batch_rows(seqs, received_ns, dict.fromkeys(seqs, 0))
            for name, tables in parts.items():
                rows = pa.concat_tables(tables)
                rows = rows.append_column(
                    "received_ns", pa.repeat(pa.scalar(received_ns, pa.uint64()), rows.num_rows)
                ).append_column("batch_seq", pa.chunked_array(
                    [pa.repeat(pa.scalar(q, pa.uint64()), n) for q, n in part_seqs[name]],
                    pa.uint64()))
                self._conn.insert(name, *_columns_of(rows, self.modern),
                                  settings=self._insert_settings)
            if seqs:
                # After the records: never acks a batch whose records are missing.
                self._insert_batch_rows(seqs, received_ns, records)
            for index, batch, claim in takeovers:
                results[index] = self._take_over(batch, claim)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - driver, socket and server errors alike
            raise StorageError(f"cannot write to {self._conn.where}: {_first_line(exc)}") from None
        self._last_seq = seq
        return results

    def _insert_batch_rows(self, seqs: dict, received_ns: int, records: dict) -> None:
        self._conn.insert("batches", list(_BATCH_COLUMNS), [
            [k[0] for k in seqs], [k[1] for k in seqs], list(seqs.values()),
            [received_ns] * len(seqs), [records[k] for k in seqs]],
            settings=self._insert_settings)

    def _batch_rows(self, keys: set[tuple[str, int]]):
        """Of these pairs: the committed ones, and the claimed-only ones with their claim
        (batch_seq, received_ns). A committed empty batch (0 records) looks claimed: it is
        then taken over and stored again, which stores nothing."""
        if not keys:
            return set(), {}
        wanted = ", ".join(f"({_quote(s)}, {_quote(b)})" for s, b in sorted(keys))
        rows = self._conn.execute(
            "SELECT sensor_id, batch_id, max(records), argMax(batch_seq, records), "
            "argMax(received_ns, records) FROM batches WHERE (sensor_id, batch_id) IN "
            f"({wanted}) GROUP BY sensor_id, batch_id")
        committed, claims = set(), {}
        for sensor_id, batch_id, records, seq, received in rows:
            key = (sensor_id, int(batch_id))
            if int(records):
                committed.add(key)
            else:
                claims[key] = (int(seq), int(received))
        return committed, claims

    def _take_over(self, batch: DecodedBatch, claim: tuple[int, int]) -> StoreResult:
        """A batch another collector claimed and never committed (it died, or is slow):
        write what of it is not stored, under the claim's batch_seq and received_ns."""
        seq, received_ns = claim
        wait_ns = received_ns + CLAIM_SETTLE_NS - time.time_ns()
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)
        key = (batch.sensor_id, batch.batch_id)
        committed, _ = self._batch_rows({key})
        if key in committed:   # the claiming collector finished after all
            return StoreResult(StoreStatus.DUPLICATE)
        written = 0
        for name, table in batch.tables.items():
            (n,), = self._conn.execute(
                f"SELECT count() FROM {name} WHERE received_ns = {_quote(received_ns)} "
                f"AND batch_seq = {_quote(seq)}")
            if int(n) == table.num_rows:
                continue
            if n:
                # Part of a table's rows (one shard's share): write them all again, a
                # duplicate rather than a loss.
                log.warning("batch %d of %s: %d of %d %s rows found from a collector that "
                            "died; writing them all again", batch.batch_id, batch.sensor_id,
                            n, table.num_rows, name)
            rows = table.append_column(
                "received_ns", pa.repeat(pa.scalar(received_ns, pa.uint64()), table.num_rows)
            ).append_column(
                "batch_seq", pa.repeat(pa.scalar(seq, pa.uint64()), table.num_rows))
            self._conn.insert(name, *_columns_of(rows, self.modern), settings=self._insert_settings)
            written += table.num_rows
        self._insert_batch_rows({key: seq}, received_ns, {key: batch.records})
        log.warning("took over batch %d of %s from a collector that claimed it and did not "
                    "commit: %d of %d records written", batch.batch_id, batch.sensor_id,
                    written, batch.records)
        return StoreResult(StoreStatus.STORED if written else StoreStatus.DUPLICATE,
                           seq if written else 0)

    def set_retention(self, retention_ns: int) -> None:
        """Modern servers expire rows themselves (TTL, applied at merges); the partition
        drop in delete_older_than runs on every server."""
        if not self.modern or retention_ns == self._retention_ns:
            return
        seconds = max(1, retention_ns // 10**9)
        for node in self._nodes:
            for name in [*schema.TABLES, "batches"]:
                node.execute(
                    f"ALTER TABLE {_ident(self._local(name))} MODIFY TTL toDateTime("
                    f"intDiv(received_ns, 1000000000)) + INTERVAL {seconds} SECOND")
        self._retention_ns = retention_ns

    def delete_older_than(self, cutoff_ns: int) -> int:
        """Drop every day partition that ends at or before the cutoff: whole days, so a
        row outlives the retention by less than a day (the TTL trims that on modern
        servers). Returns the rows dropped."""
        cutoff_day = dt.datetime.fromtimestamp(cutoff_ns // 10**9, dt.timezone.utc)
        # A partition is named by its day (toYYYYMMDD in the server's time zone, UTC for
        # the collector's servers); it ends at the next midnight.
        deleted = 0
        for node in self._nodes:
            for name in [*schema.TABLES, "batches"]:
                local = self._local(name)
                parts = node.execute(
                    "SELECT partition, sum(rows) FROM system.parts WHERE active AND database"
                    f" = currentDatabase() AND table = {_quote(local)} GROUP BY partition")
                for partition, rows in parts:
                    day = dt.datetime.strptime(str(partition).strip("'"), "%Y%m%d").replace(
                        tzinfo=dt.timezone.utc)
                    if day + dt.timedelta(days=1) <= cutoff_day:
                        node.execute(f"ALTER TABLE {_ident(local)} DROP PARTITION {partition}")
                        if name != "batches":
                            deleted += int(rows)
        return deleted

    def last_seq(self) -> int:
        """The newest commit in the store, this collector's or another's (they share it):
        an export from a collector that stores nothing itself still sees everything."""
        conn = self._conn.clone()
        try:
            row = conn.execute("SELECT max(batch_seq) FROM batches")
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot read {self._conn.where}: {_first_line(exc)}") from None
        finally:
            conn.close()
        return max(self._last_seq, int(row[0][0] or 0))

    # -- reading (any thread, each on its own connection) --------------------------------

    def _table_rows(self, table: str, since_ns: int, upto_seq: int, until_ns: int):
        reader = self._readers[table]
        t = reader.table.time_column
        until = f" AND {t} < {_quote(until_ns)}" if until_ns else ""
        conn = self._conn.clone()
        try:
            rows = conn.stream(
                f"SELECT {', '.join(reader.select)} FROM {_ident(table)} "
                f"WHERE {t} >= {_quote(since_ns)} AND batch_seq <= {_quote(upto_seq)}{until} "
                f"ORDER BY {t}, batch_seq", settings={"max_block_size": _REPLAY_BLOCK})
            for values in rows:
                row = reader.row(values)
                yield row[t], table, row
        finally:
            conn.close()

    def records_since(self, since_ns: int, upto_seq: int, *, until_ns: int = 0,
                      tables: tuple[str, ...] = ()):
        streams = [self._table_rows(t, since_ns, upto_seq, until_ns)
                   for t in (tables or schema.TABLES)]
        try:
            for _, table, row in heapq.merge(*streams, key=lambda item: item[0]):
                yield schema.record_from_row(table, row)
        finally:
            for stream in streams:
                stream.close()

    def query(self, sql: str, max_rows: int, timeout_s: float,
              cancel: Cancel | None = None) -> QueryResult:
        check_read_only(sql)
        cancel = cancel if cancel is not None else Cancel()
        conn = self._conn.clone()
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            conn.interrupt()

        # The server stops the query at max_execution_time; the timer covers what the
        # server does not count (a stalled network, sleep()).
        timer = threading.Timer(timeout_s + 1.0, on_timeout)
        settings = {"readonly": 1, "max_execution_time": max(1, math.ceil(timeout_s))}
        timer.start()
        cancel.bind(conn.interrupt)
        try:
            stream = conn.stream(sql, settings=settings, with_types=True)
            types = next(stream)
            rows = []
            for row in stream:
                rows.append(row)
                if len(rows) > max_rows:
                    break
        except Exception as exc:  # noqa: BLE001 - the driver's errors have no common base
            if cancel.cancelled:
                raise QueryError("the query was cancelled by its client") from None
            if timed_out.is_set() or getattr(exc, "code", None) == 159:  # TIMEOUT_EXCEEDED
                raise QueryError(f"the query ran longer than {timeout_s:g} s and was stopped") from None
            raise QueryError(_server_message(exc)) from None
        finally:
            cancel.bind(None)
            timer.cancel()
            conn.close()
        return QueryResult([n for n, _ in types], [t for _, t in types], rows[:max_rows],
                           len(rows) > max_rows)

    def counts(self) -> dict[str, int]:
        conn = self._conn.clone()
        try:
            return {name: int(conn.execute(f"SELECT count() FROM {_ident(name)}")[0][0])
                    for name in schema.TABLES}
        finally:
            conn.close()

    def sensors(self) -> list[SensorSummary]:
        conn = self._conn.clone()
        try:
            rows = conn.execute(
                "SELECT sensor_id, max(batch_id), max(received_ns), sum(records) FROM "
                "batches FINAL GROUP BY sensor_id ORDER BY sensor_id")
        finally:
            conn.close()
        return [SensorSummary(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for node in {id(n): n for n in [self._conn, *self._nodes]}.values():
                node.close()


def _server_message(exc: BaseException) -> str:
    """A server exception's one line, without the 'Code: N.' header and stack trace."""
    text = getattr(exc, "message", None) or str(exc)
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("Code:")]
    line = lines[0] if lines else text.strip()
    return re.sub(r"^DB::Exception:\s*", "", line).split(" Stack trace:")[0]

