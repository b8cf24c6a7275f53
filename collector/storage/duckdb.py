"""DuckDB storage: the embedded default, one file, one writer process.

DuckDB takes a file lock: only one process may open the file for writing, so a running
collector owns it. Inside the collector, the writer thread uses the main connection and
readers (queries, subscription replays) use their own cursors; DuckDB's MVCC gives them a
consistent snapshot while ingest goes on.

Batches arrive as Arrow tables and are inserted with one statement per table (a relation
over the Arrow table, inserted: no view to register and drop, which cost about as much
again), so a 1000-record batch costs a handful of statements, not 1000.

Queries arriving over the network run in a sandbox: after start-up the collector turns
`enable_external_access` off, so SQL cannot read or write files on the collector's host
(read_csv('/etc/shadow'), COPY ... TO). `loupe export` therefore asks the collector for the
records (Observer.Export) and writes the files itself, on the analyst's side.
"""

from __future__ import annotations

import heapq
import logging
import threading
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa

from collector import schema
from collector.storage import migrate
from collector.storage.base import (
    Cancel, DecodedBatch, QueryResult, SensorSummary, StoreResult, StoreStatus,
)
from sensor.errors import QueryError, StorageError

log = logging.getLogger(__name__)

DB_FILE = "loupe.duckdb"

# Statement types a query may be. EXPLAIN only plans a statement (it cannot run it).
_READ_ONLY = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)

# Rows read from DuckDB per fetch when replaying history to a subscriber: enough to
# amortise the call, small enough that a replay holds little memory per table.
_REPLAY_CHUNK = 1000

_BATCHES_DDL = (
    "CREATE TABLE IF NOT EXISTS batches (sensor_id VARCHAR NOT NULL, batch_id UBIGINT NOT NULL,"
    " batch_seq UBIGINT NOT NULL, received_ns UBIGINT NOT NULL, records UINTEGER NOT NULL,"
    " PRIMARY KEY (sensor_id, batch_id))"
)

# Settings of a collector's store (the writing process).
_WRITER_SETTINGS = (
    # One DuckDB thread: an insert of a few thousand rows is too small to split, and extra
    # threads only wait on each other and take cores from the decoder processes (measured
    # on 2 cores: 5.7 ms of CPU per 1000 rows with one thread, 8.8 ms with two). Queries
    # scan with one thread too.
    "SET threads = 1",
    # WAL size at which a commit checkpoints on the spot, holding up that commit (and so
    # every ack behind it) for as long as the checkpoint takes: about a second per
    # 128 MiB. The Checkpointer below gets there long before; this is the backstop for
    # when its checkpoints keep failing.
    "SET checkpoint_threshold = '256MiB'",
    # No vacuum tasks: each checkpoint writes the rows appended since the last one as row
    # groups of their own, and every third or fourth checkpoint would otherwise merge the
    # partial ones of every table into full row groups, rewriting them: a checkpoint of
    # ~1 s of CPU instead of ~0.2 s, during which inserts into the table it writes wait
    # (ingest benchmark: those stalls alone set the p99 ack at 1.2-2 s; without them
    # 0.47 s, and 10% less CPU per record). The cost is row groups of one checkpoint's
    # rows (~30,000 at full rate) instead of 122,880. Row groups that retention deleted
    # entirely are still dropped, and their blocks freed, at the next checkpoint.
    "SET max_vacuum_tasks = 0",
)

# WAL size at which the Checkpointer checkpoints, off the writer thread. Each checkpoint
# has a fixed part per table, so checkpointing often costs more per row under steady
# ingest (measured on 2 cores: 8.4 ms of CPU per 1000 rows at 16 MiB, DuckDB's default,
# against 6.3 ms at 256 MiB); but a checkpoint takes a core for about a second per
# 128 MiB, and on a busy 2-core host that stalls every ack meanwhile. 32 MiB keeps that
# stall near a quarter of a second (ingest benchmark on a shared 2-core host: p99 ack
# 0.9 s at 32 MiB, 1.1-2 s at 128 MiB), and bounds the WAL replay after a crash to well
# under a second.
CHECKPOINT_WAL_BYTES = 32 * 1024 * 1024
# How often the Checkpointer looks at the WAL's size: one stat() call.
CHECKPOINT_POLL_S = 0.5


class Checkpointer:
    """Checkpoints a store from its own thread once its WAL passes CHECKPOINT_WAL_BYTES.

    DuckDB checkpoints on commit by default, so one unlucky batch waits for the whole
    checkpoint; from a thread of its own, the checkpoint runs beside the commits (DuckDB
    lets appends go on meanwhile) and the other core can take it.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, wal: Path) -> None:
        self._cur = con.cursor()
        self._wal = wal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loupe-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(CHECKPOINT_POLL_S):
            try:
                size = self._wal.stat().st_size
            except FileNotFoundError:
                continue  # no WAL: nothing written since the last checkpoint
            if size < CHECKPOINT_WAL_BYTES:
                continue
            try:
                self._cur.execute("CHECKPOINT")
            except duckdb.Error as exc:
                # e.g. a conflicting transaction; the WAL is still there at the next poll.
                log.warning("checkpoint failed, retrying: %s", str(exc).splitlines()[0])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._cur.close()


def _literal(value, arrow_type: pa.DataType) -> str:
    """A DuckDB literal of migrate.default_value (None: the type's empty value)."""
    if value is None:
        return "MAP {}" if pa.types.is_map(arrow_type) else "[]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


def _open(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as exc:
        text = str(exc)
        if "lock" in text.lower():
            raise StorageError(
                f"{path} is locked by another process (a running collector?): ask the "
                "running collector instead (`loupe export` without --data-dir, `loupe "
                "query`, `loupe tail`), or stop it first"
            ) from None
        raise StorageError(f"cannot open {path}: {text.splitlines()[0]}") from None
    except duckdb.Error as exc:
        raise StorageError(f"cannot open {path}: {str(exc).splitlines()[0]}") from None


class DuckDBStorage:
    """Storage over one DuckDB file in data_dir."""

    def __init__(self, data_dir: Path, *, read_only: bool = False, sandbox: bool = False) -> None:
        data_dir = Path(data_dir)
        if not read_only:
            try:
                data_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(
                    f"cannot create the data directory {data_dir}: {exc.strerror}; "
                    "pick another with --data-dir"
                ) from None
        self.path = data_dir / DB_FILE
        if read_only and not self.path.exists():
            raise StorageError(f"no store at {self.path}: check --data-dir")
        self.description = f"duckdb:{self.path}"
        self._con = _open(self.path, read_only)
        # Table -> its columns in the store's order, where that is not the schema's (a
        # store migrated from an older Loupe has its added columns last).
        self._reorder: dict[str, list[str]] = {}
        if not read_only:
            for table in schema.TABLES.values():
                self._con.execute(schema.create_table_sql(table))
            self._migrate()
            self._con.execute(_BATCHES_DDL)
            for setting in _WRITER_SETTINGS:
                self._con.execute(setting)
        row = self._con.execute("SELECT coalesce(max(batch_seq), 0) FROM batches").fetchone()
        self._last_seq = int(row[0])
        if sandbox:
            self._con.execute("SET enable_external_access = false")
        self._checkpointer = None if read_only else Checkpointer(
            self._con, self.path.with_name(self.path.name + ".wal"))
        self._closed = False

    def _migrate(self) -> None:
        """Adds the columns a store from an older Loupe lacks (collector/storage/migrate.py);
        refuses, in one line, a column whose type differs."""
        con = self._con
        canonical: dict[str, str] = {}

        def typed(arrow_type: pa.DataType) -> str:
            # DuckDB's own spelling of the type, as duckdb_columns() gives it back.
            ddl = schema.duckdb_type(arrow_type)
            if ddl not in canonical:
                canonical[ddl] = con.execute(f"SELECT typeof(CAST(NULL AS {ddl}))").fetchone()[0]
            return canonical[ddl]

        where = str(self.path)
        for table in schema.TABLES.values():
            have = dict(con.execute(
                "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ? AND"
                " database_name = current_database() AND schema_name = current_schema()"
                " ORDER BY column_index", [table.name]).fetchall())
            want = [(f.name, typed(f.type)) for f in table.schema]
            for added in migrate.plan(where, table.name, have, want):
                field = table.schema.field(added.column)
                default = migrate.default_value(table.name, field.name, field.type)
                try:
                    con.execute(f'ALTER TABLE {table.name} ADD COLUMN "{field.name}" '
                                f"{schema.duckdb_type(field.type)} DEFAULT "
                                f"{_literal(default, field.type)}")
                except duckdb.Error as exc:
                    raise StorageError(f"cannot add column {table.name}.{field.name} to "
                                       f"{self.path}: {str(exc).splitlines()[0]}") from None
                migrate.logged(where, added)
                have[added.column] = added.type
            if list(have) != table.schema.names:
                self._reorder[table.name] = list(have)

    # -- writing (the writer thread only) -------------------------------------------------

    def store_many(self, batches: list[DecodedBatch], received_ns: int) -> list[StoreResult]:
        """Commit several batches in one transaction; each one is deduplicated on its own
        (sensor_id, batch_id), against the store and against the others of the group.

        The dedup rows go in first, and the primary key's index answers which batches are
        new. A resent batch is rare (a sensor reconnecting), so the group's rows are first
        inserted as they are: one plain INSERT, a third of the cost of the INSERT ...
        ON CONFLICT DO NOTHING RETURNING that names the new ones. Only when the key
        rejects that insert is the transaction restarted with the RETURNING form. Then one
        INSERT per record table carries the rows of every new batch of the group.
        """
        con = self._con
        seqs: dict[tuple[str, int], int] = {}
        keys = []
        seq = self._last_seq
        for batch in batches:
            key = (batch.sensor_id, batch.batch_id)
            keys.append(key)
            if key not in seqs:
                seq += 1
                seqs[key] = seq
        dedup = self._batch_rows(batches, seqs, received_ns)
        try:
            new = self._insert_dedup_rows(dedup, seqs)
            results: list[StoreResult] = []
            parts: dict[str, list[pa.Table]] = {}
            part_seqs: dict[str, list[tuple[int, int]]] = {}
            for batch, key in zip(batches, keys):
                if key not in new:
                    results.append(StoreResult(StoreStatus.DUPLICATE))
                    continue
                new.discard(key)  # a second copy in the same group is a duplicate
                results.append(StoreResult(StoreStatus.STORED, seqs[key]))
                for name, table in batch.tables.items():
                    parts.setdefault(name, []).append(table)
                    part_seqs.setdefault(name, []).append((seqs[key], table.num_rows))
            for name, tables in parts.items():
                # One chunk per column: DuckDB's Arrow scan pays per chunk and column, so a
                # group's 16 chunks cost more than copying them into one (measured: http
                # and dns tables of 16 batches, 5-8 ms -> 3.4-4.3 ms of CPU per INSERT).
                rows = pa.concat_tables(tables).combine_chunks()
                rows = rows.append_column(
                    "received_ns", pa.repeat(pa.scalar(received_ns, pa.uint64()), rows.num_rows)
                ).append_column("batch_seq", pa.chunked_array(
                    [pa.repeat(pa.scalar(q, pa.uint64()), n) for q, n in part_seqs[name]],
                    pa.uint64()))
                order = self._reorder.get(name)
                if order is not None:   # insert_into goes by position
                    rows = rows.select(order)
                con.from_arrow(rows).insert_into(name)
            con.commit()
        except duckdb.Error as exc:
            con.rollback()
            raise StorageError(f"cannot write to {self.path}: {str(exc).splitlines()[0]}") from None
        self._last_seq = seq
        return results

    def _insert_dedup_rows(self, rows: pa.Table, seqs: dict) -> set[tuple[str, int]]:
        """Begin the group's transaction with its dedup rows; the keys that were new."""
        con = self._con
        con.begin()
        try:
            con.from_arrow(rows).insert_into("batches")
            return set(seqs)
        except duckdb.ConstraintException:
            # A batch of the group is stored already. The failed statement spoilt the
            # transaction: start again and let the key pick out the new batches.
            con.rollback()
            con.begin()
        con.register("_loupe_batches", rows)
        try:
            return {tuple(row) for row in con.execute(
                "INSERT INTO batches SELECT * FROM _loupe_batches ON CONFLICT DO NOTHING "
                "RETURNING sensor_id, batch_id"
            ).fetchall()}
        finally:
            con.unregister("_loupe_batches")

    @staticmethod
    def _batch_rows(batches: list[DecodedBatch], seqs: dict, received_ns: int) -> pa.Table:
        """The dedup rows of a group, one per distinct (sensor_id, batch_id)."""
        records = {}
        for b in batches:
            records.setdefault((b.sensor_id, b.batch_id), b.records)
        return pa.table({
            "sensor_id": pa.array([k[0] for k in seqs], pa.string()),
            "batch_id": pa.array([k[1] for k in seqs], pa.uint64()),
            "batch_seq": pa.array(list(seqs.values()), pa.uint64()),
            "received_ns": pa.repeat(pa.scalar(received_ns, pa.uint64()), len(seqs)),
            "records": pa.array([records[k] for k in seqs], pa.uint32()),
        })

    def delete_older_than(self, cutoff_ns: int) -> int:
        deleted = 0
        con = self._con
        con.begin()
        for name in list(schema.TABLES) + ["batches"]:
            row = con.execute(
                f"DELETE FROM {name} WHERE received_ns < ? RETURNING 1", [cutoff_ns]
            ).fetchall()
            if name != "batches":
                deleted += len(row)
        con.commit()
        return deleted

    def set_retention(self, retention_ns: int) -> None:
        """Nothing to set: delete_older_than is DuckDB's whole retention."""

    def last_seq(self) -> int:
        return self._last_seq

    # -- reading (any thread, each with its own cursor) ----------------------------------

    def _table_rows(self, table: str, since_ns: int, upto_seq: int,
                    until_ns: int = 0) -> Iterator[tuple[int, dict]]:
        spec = schema.TABLES[table]
        cur = self._con.cursor()
        until = f" AND {spec.time_column} < ?" if until_ns else ""
        try:
            cur.execute(
                f"SELECT * FROM {table} WHERE {spec.time_column} >= ? AND batch_seq <= ?"
                f"{until} ORDER BY {spec.time_column}, batch_seq",
                [since_ns, upto_seq, *([until_ns] if until_ns else [])],
            )
            names = [d[0] for d in cur.description]
            t = names.index(spec.time_column)
            while rows := cur.fetchmany(_REPLAY_CHUNK):
                for row in rows:
                    yield row[t], table, dict(zip(names, row))
        finally:
            cur.close()

    def records_since(self, since_ns: int, upto_seq: int, *, until_ns: int = 0,
                      tables: tuple[str, ...] = ()):
        streams = [self._table_rows(t, since_ns, upto_seq, until_ns)
                   for t in (tables or schema.TABLES)]
        for _, table, row in heapq.merge(*streams, key=lambda item: item[0]):
            yield schema.record_from_row(table, row)

    def query(self, sql: str, max_rows: int, timeout_s: float,
              cancel: Cancel | None = None) -> QueryResult:
        cur = self._con.cursor()
        cancel = cancel if cancel is not None else Cancel()
        try:
            try:
                statements = cur.extract_statements(sql)
            except duckdb.Error as exc:
                raise QueryError(f"cannot parse the query: {str(exc).splitlines()[0]}") from None
            if len(statements) != 1:
                raise QueryError(
                    f"send exactly one statement, got {len(statements)}"
                )
            kind = statements[0].type
            if kind not in _READ_ONLY:
                raise QueryError(
                    f"only read-only queries (SELECT, WITH ... SELECT, EXPLAIN) are allowed, "
                    f"got {kind.name}"
                )
            # A runaway query (a cross join of two big tables) must not hold a reader
            # thread forever: interrupt it after timeout_s, or as soon as the client has
            # gone (cancel).
            timer = threading.Timer(timeout_s, cur.interrupt)
            timer.start()
            cancel.bind(cur.interrupt)
            try:
                cur.execute(sql)
                columns = [d[0] for d in cur.description]
                types = [str(d[1]) for d in cur.description]
                rows = cur.fetchmany(max_rows + 1)
            except duckdb.InterruptException:
                if cancel.cancelled:
                    raise QueryError("the query was cancelled by its client") from None
                raise QueryError(f"the query ran longer than {timeout_s:g} s and was stopped") from None
            except duckdb.Error as exc:
                raise QueryError(str(exc).splitlines()[0]) from None
            finally:
                cancel.bind(None)
                timer.cancel()
        finally:
            cur.close()
        return QueryResult(columns, types, rows[:max_rows], len(rows) > max_rows)

    def counts(self) -> dict[str, int]:
        cur = self._con.cursor()
        try:
            return {
                name: int(cur.execute(f"SELECT count(*) FROM {name}").fetchone()[0])
                for name in schema.TABLES
            }
        finally:
            cur.close()

    def sensors(self) -> list[SensorSummary]:
        cur = self._con.cursor()
        try:
            rows = cur.execute(
                "SELECT sensor_id, max(batch_id), max(received_ns), sum(records) FROM batches "
                "GROUP BY sensor_id ORDER BY sensor_id"
            ).fetchall()
        finally:
            cur.close()
        return [SensorSummary(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._checkpointer is not None:
            self._checkpointer.stop()
        try:
            self._con.execute("CHECKPOINT")
        except duckdb.Error:
            # Read-only stores cannot checkpoint; the WAL replays on the next open anyway.
            pass
        self._con.close()
