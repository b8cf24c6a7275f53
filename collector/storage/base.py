"""The storage seam: what the collector needs from a store, whatever the engine.

DuckDB (collector/storage/duckdb.py) is the embedded default, ClickHouse
(collector/storage/clickhouse.py) the engine for many sensors and collectors; the collector
opens either through collector.storage.open_storage. Columns are defined once in
collector/schema.py; each engine makes its own tables from them.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import pyarrow as pa

from sensor import model


class StoreStatus(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A validated batch, as columns: table name -> Arrow table (schema.TABLES columns,
    without the collector's received_ns / batch_seq, which the store adds)."""

    sensor_id: str
    batch_id: int
    tables: dict[str, pa.Table]
    records: int


@dataclass(frozen=True, slots=True)
class StoreResult:
    status: StoreStatus
    seq: int = 0  # commit sequence number of the batch; 0 for a duplicate


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    column_types: list[str]
    rows: list[tuple]
    truncated: bool


class Cancel:
    """Stops a running query from another thread: the reader binds the engine's interrupt
    to it, and whoever gave up on the result (a cancelled RPC) calls it. Calling it
    before the query started stops the query as soon as it binds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interrupt: Callable[[], None] | None = None
        self.cancelled = False

    def bind(self, interrupt: Callable[[], None] | None) -> None:
        with self._lock:
            self._interrupt = interrupt
            if interrupt is not None and self.cancelled:
                interrupt()

    def __call__(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._interrupt is not None:
                self._interrupt()


@dataclass(frozen=True, slots=True)
class SensorSummary:
    sensor_id: str
    last_batch_id: int
    last_seen_ns: int
    records: int


class Storage(Protocol):
    description: str  # "duckdb:/var/lib/loupe/loupe.duckdb", for Status

    def store_many(self, batches: list[DecodedBatch], received_ns: int) -> list[StoreResult]:
        """Commit the batches and their dedup rows in one transaction; a batch stored
        before (or twice in the list) is reported DUPLICATE and not stored again."""

    def last_seq(self) -> int:
        """The commit sequence number of the newest stored batch (0 when empty)."""

    def records_since(self, since_ns: int, upto_seq: int, *, until_ns: int = 0,
                      tables: tuple[str, ...] = ()) -> Iterator[model.Record]:
        """Stored records with their own time >= since_ns (and < until_ns unless 0), from
        batches committed at or before upto_seq, of `tables` (all when empty), in time
        order across tables. Lazy: reads in chunks."""

    def query(self, sql: str, max_rows: int, timeout_s: float,
              cancel: Cancel | None = None) -> QueryResult:
        """One read-only statement (QueryError otherwise), at most max_rows rows; stopped
        after timeout_s, or when `cancel` is called."""

    def counts(self) -> dict[str, int]:
        """Rows per table."""

    def sensors(self) -> list[SensorSummary]: ...

    def delete_older_than(self, cutoff_ns: int) -> int:
        """Retention: delete rows received before cutoff_ns; return how many."""

    def set_retention(self, retention_ns: int) -> None:
        """The retention, for engines that expire rows themselves (ClickHouse's TTL);
        delete_older_than still runs on every engine."""

    def close(self) -> None:
        """Commit what is pending and release the store (its lock, for DuckDB)."""
