"""The seam between the pipeline and whatever exports its records.

The pipeline only ever calls Exporter.submit(), which never blocks: records go into an
ExportQueue, a bounded queue whose overflow is counted and reported as a LostEvent with
source "export_queue_full". A thread on the other side of the queue does the slow work
(disk, network), so a slow or dead collector, or a stdout nobody reads, never stalls the
kernel reader. The gRPC client (grpc_client.py) and the file sinks (SinkExporter below)
are the two implementations; tests can put any fake behind the same Protocol.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Protocol, runtime_checkable

from sensor import model

__all__ = ["Exporter", "ExportQueue", "Sink", "SinkExporter"]

log = logging.getLogger(__name__)


@runtime_checkable
class Exporter(Protocol):
    def submit(self, record: model.Record) -> bool:
        """Hand over one record without blocking. False if it was dropped (counted)."""

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what was submitted, spending at most about timeout_s on delivery."""

    def counters(self) -> dict[str, int]:
        """A snapshot of this exporter's counters, for metrics."""


class ExportQueue:
    """Bounded multi-producer, single-consumer queue of (enqueue monotonic ns, record).

    Overflow policy: the new record is dropped (the queue keeps the older ones, which are
    closer to being sent) and counted; take_lost() turns the count into one LostEvent.
    """

    def __init__(
        self,
        maxsize: int,
        *,
        batch_records: int,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if maxsize < 1 or batch_records < 1:
            raise ValueError("maxsize and batch_records must be positive")
        self._maxsize = maxsize
        self._batch = batch_records
        self._clock_ns = clock_ns
        self._items: deque[tuple[int, model.Record]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._queued = 0
        self._dropped = 0
        self._lost_count = 0
        self._lost_start = 0
        self._lost_end = 0

    def put(self, record: model.Record) -> bool:
        now = time.monotonic_ns()
        with self._cond:
            if self._closed or len(self._items) >= self._maxsize:
                self._dropped += 1
                wall = self._clock_ns()
                if self._lost_count == 0:
                    self._lost_start = wall
                self._lost_count += 1
                self._lost_end = wall
                return False
            self._items.append((now, record))
            self._queued += 1
            n = len(self._items)
            # Wake the consumer when it has something to wait on (first record starts its
            # batch timer) and when a full batch is ready; not on every record.
            if n == 1 or n >= self._batch:
                self._cond.notify()
            return True

    def get_batch(self, max_delay_s: float,
                  idle_s: float | None) -> list[tuple[int, model.Record]]:
        """Up to batch_records items: returns when a batch is full, max_delay_s after the
        first record arrived, after idle_s with nothing at all (an empty list; None: wait
        for a record), or at once when closed."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(idle_s)
            if not self._items:
                return []
            deadline = time.monotonic() + max_delay_s
            while len(self._items) < self._batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            n = min(self._batch, len(self._items))
            return [self._items.popleft() for _ in range(n)]

    def take_lost(self, sensor_id: str = "") -> model.LostEvent | None:
        with self._cond:
            if not self._lost_count:
                return None
            event = model.LostEvent(
                source=model.LostSource.EXPORT_QUEUE_FULL.value, count=self._lost_count,
                interval_start_ns=self._lost_start, interval_end_ns=self._lost_end,
                sensor_id=sensor_id,
            )
            self._lost_count = 0
            return event

    def close(self) -> None:
        """Refuse new records (counted as dropped) and wake the consumer to drain."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items)

    def counters(self) -> dict[str, int]:
        return {
            "records_queued": self._queued,
            "export_queue_full": self._dropped,
            "export_queue_depth": len(self._items),
        }


class Sink(Protocol):
    """Something that writes records synchronously: a file, stdout, a Parquet writer."""

    def write(self, record: model.Record) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class SinkExporter:
    """An Exporter over a synchronous Sink: the queue in front, one writer thread behind.

    Loss from the queue is written into the sink too, as a LostEvent record, so a JSON
    lines file shows its own gaps.
    """

    # Reason for the default bound: about a second of a busy sensor's records; beyond
    # that a sink that cannot keep up is broken, and memory must not grow with it.
    def __init__(self, sink: Sink, *, sensor_id: str = "", queue_records: int = 65536,
                 flush_delay_s: float = 0.2) -> None:
        self._sink = sink
        self._sensor_id = sensor_id
        self._delay = flush_delay_s
        self._queue = ExportQueue(queue_records, batch_records=1024)
        self._written = 0
        self._write_errors = 0
        self._thread = threading.Thread(target=self._run, name="loupe-sink", daemon=True)
        self._thread.start()

    def submit(self, record: model.Record) -> bool:
        return self._queue.put(record)

    def _run(self) -> None:
        while True:
            # Nothing to do until a record or close() comes: no idle wakeups.
            items = self._queue.get_batch(self._delay, idle_s=None)
            lost = self._queue.take_lost(self._sensor_id)
            try:
                for _, record in items:
                    self._sink.write(record)
                if lost is not None:
                    self._sink.write(lost)
                self._sink.flush()
                self._written += len(items)
            except OSError as exc:
                # A full disk or a closed pipe: counted and logged; the thread goes on so
                # that the queue keeps draining (and counting) instead of filling up.
                self._write_errors += 1
                log.error("cannot write records: %s", exc)
            if not items and self._queue.closed and not len(self._queue):
                return

    def close(self, timeout_s: float = 5.0) -> None:
        self._queue.close()
        self._thread.join(timeout_s)
        self._sink.close()

    def counters(self) -> dict[str, int]:
        out = self._queue.counters()
        out["records_written"] = self._written
        out["sink_write_errors"] = self._write_errors
        return out
