"""IPFIX export from the collector: every Flow record it stores, from any sensor, to one
or more IPFIX collectors (nfdump, pmacct, ...), with sensor/export/ipfix.py's encoder.

Where it taps in: the writer's on_stored hook (collector/ingest.py), called on the writer
thread for each batch just committed, row batches and columnar ones alike, as the same
Arrow tables. So what goes out is exactly what was stored: a batch a sensor resends after
a lost ack is a duplicate, never stored again and never exported again.

Never in ingest's way: on_stored only appends the batch's flows table to a bounded queue
(QUEUE_RECORDS flows by default) and returns; one thread of its own ("loupe-ipfix")
encodes and sends. A full queue drops the whole table and counts its flows
(export_queue_full), logged at most once a minute with the count, never per record. The
thread still shares the interpreter with ingest, so encoding costs ingest some CPU when
both are busy; the queue bounds how far behind export can fall, not that cost.

Observation Domains: one per sensor, observation_domain(sensor_id), the first four
octets of SHA-256 of the sensor id, so every collector in front of one store gives a
sensor the same domain, across restarts, with nothing to configure or keep. Each domain
has its own sequence numbers and templates on each target (RFC 7011 3.1, 8.). The
sensor id also goes out in every record (enterprise IE 10), and the first record of each
sensor logs its domain.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque, namedtuple

import pyarrow as pa
import pyarrow.compute as pc

from sensor.errors import ConfigError
from sensor.export.ipfix import (DEFAULT_PEN, FLOW_FIELDS, IpfixSink, parse_target,
                                 resolve_target)

__all__ = ["IpfixExport", "observation_domain", "QUEUE_RECORDS"]

log = logging.getLogger(__name__)

# Flows waiting for the export thread. About a second of a busy collector's flows at
# the encoder's rate (docs/export.md); a target slower than that for longer is broken
# and memory must not grow with it.
QUEUE_RECORDS = 65536
LOG_EVERY_S = 60.0
# Sensor ids whose domain was computed (and logged); cleared past this, which only
# costs a hash and a repeated log line per sensor.
MAX_SENSORS = 4096


def observation_domain(sensor_id: str) -> int:
    """The Observation Domain ID of a sensor: the first 4 octets of SHA-256(sensor id in
    UTF-8), big-endian. 0 ("no specific domain", RFC 7011 3.1) becomes 1."""
    digest = hashlib.sha256(sensor_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") or 1


# A stored flow as the encoder reads it: the Flow's attributes, nothing else.
_Row = namedtuple("_Row", FLOW_FIELDS)


def _rows(table: pa.Table) -> list[_Row]:
    """The encoder's fields of each stored flow."""
    columns = []
    for column in table.select(FLOW_FIELDS).columns:
        if column.null_count:
            # A column a sensor left out: the record's default, as storage reads it.
            column = pc.fill_null(column, "" if pa.types.is_string(column.type) else 0)
        columns.append(column.to_pylist())
    return list(map(_Row._make, zip(*columns)))


class IpfixExport:
    """Stored flows to IPFIX targets, off the ingest path. on_stored() is the writer's
    hook; start() / close() bracket the export thread."""

    def __init__(self, targets: tuple[str, ...], *, pen: int = DEFAULT_PEN,
                 uniflow: bool = False, queue_records: int = QUEUE_RECORDS) -> None:
        if not targets:
            raise ConfigError("IPFIX export needs at least one target (ipfix.targets)")
        # Checked and resolved now, before anything else starts: a bad target is a
        # configuration error at start, in one line.
        self.targets = tuple(parse_target(t) for t in targets)
        for target in self.targets:
            resolve_target(target)
        self._pen = pen
        self._uniflow = uniflow
        self._max = queue_records
        self.sinks: list[IpfixSink] = []
        self._queue: deque[pa.Table] = deque()
        self._queued = 0
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._thread: threading.Thread | None = None
        self._domains: dict[str, int] = {}
        self.queue_full = 0          # flows dropped because the queue was full
        self.flows_exported = 0      # flows handed to every target
        self.errors = 0              # tables that failed to encode (a bug; logged)
        self._logged_full = 0
        self._next_log = 0.0

    # -- the writer's side -----------------------------------------------------------------

    def on_stored(self, batch) -> None:
        """Writer hook, on the writer thread after a batch committed: queue its flows
        (never blocks; a full queue drops them and counts)."""
        table = batch.tables.get("flows")
        if table is None or not table.num_rows:
            return
        n = table.num_rows
        with self._cond:
            if self._closed or self._queued + n > self._max:
                self.queue_full += n
                return
            self._queue.append(table)
            self._queued += n
            self._cond.notify()

    # -- the export thread -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loupe-ipfix", daemon=True)
        self._thread.start()

    def _open_sinks(self) -> None:
        # Here, not in start(): a TCP connect may wait up to the sink's send timeout,
        # which must not hold up the collector's start.
        for target in self.targets:
            try:
                self.sinks.append(IpfixSink(target, pen=self._pen, uniflow=self._uniflow))
            except ConfigError as exc:     # the name stopped resolving since the check
                log.error("IPFIX export to %s is off: %s", target, exc)
        for sink in self.sinks:
            log.info("IPFIX: exporting stored flows to %s", sink.target)

    def _run(self) -> None:
        self._open_sinks()
        while True:
            with self._cond:
                if not self._queue and not self._closed:
                    self._cond.wait(LOG_EVERY_S)
                if not self._queue:
                    if self._closed:
                        break               # closed and drained
                    table = None
                else:
                    table = self._queue.popleft()
                    self._queued -= table.num_rows
                    more = bool(self._queue)
            if table is None:               # idle: only drops to report
                self._log_drops()
                continue
            self._export(table)
            if not more:
                # Nothing waiting: send the partly filled messages now rather than
                # holding flows until the next batch.
                self._flush()
            self._log_drops()
        self._flush()
        self._log_drops(final=True)
        for sink in self.sinks:
            sink.close()

    def _export(self, table: pa.Table) -> None:
        try:
            for row in _rows(table):
                domain = self._domain(row.sensor_id)
                for sink in self.sinks:
                    sink.write_flow(row, domain)
            self.flows_exported += table.num_rows
        except Exception:  # noqa: BLE001 - a bug in one table must not end the export
            self.errors += 1
            if self.errors == 1 or self.errors % 1000 == 0:
                log.exception("IPFIX export failed on a table of %d flows (%d so far)",
                              table.num_rows, self.errors)

    def _flush(self) -> None:
        for sink in self.sinks:
            try:
                sink.flush()
            except Exception:  # noqa: BLE001 - as in _export
                self.errors += 1
                log.exception("IPFIX flush to %s failed", sink.target)

    def _domain(self, sensor_id: str) -> int:
        domain = self._domains.get(sensor_id)
        if domain is None:
            if len(self._domains) >= MAX_SENSORS:
                self._domains.clear()
            domain = self._domains[sensor_id] = observation_domain(sensor_id)
            log.info("IPFIX: sensor %r is observation domain %d", sensor_id, domain)
        return domain

    def _log_drops(self, final: bool = False) -> None:
        dropped = self.queue_full - self._logged_full
        now = time.monotonic()
        if dropped and (final or now >= self._next_log):
            log.warning("IPFIX export queue full: %d flows not exported (%d in all); the "
                        "targets or this host cannot keep up", dropped, self.queue_full)
            self._logged_full = self.queue_full
            self._next_log = now + LOG_EVERY_S

    def close(self, timeout_s: float = 10.0) -> None:
        """Export what is queued (at most about timeout_s), then close the sockets."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("IPFIX export did not finish within %.0f s; %d flows left",
                            timeout_s, self._queued)

    # -- numbers -----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queued

    def counters(self) -> dict[str, int]:
        """Flows queued, exported and dropped; IPFIX Data Records sent and not sent,
        summed over the targets (a flow is one record, two in uniflow mode)."""
        sinks = list(self.sinks)
        return {
            "ipfix_flows_exported": self.flows_exported,
            "ipfix_queue_full": self.queue_full,
            "ipfix_queue_depth": self._queued,
            "ipfix_records_sent": sum(s.records_sent for s in sinks),
            "ipfix_records_dropped": sum(s.records_dropped for s in sinks),
            "ipfix_send_errors": sum(s.send_errors for s in sinks),
            "ipfix_errors": self.errors,
        }
