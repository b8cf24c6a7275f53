"""The statistics in the collector: fed from committed batches on a thread of their own,
kept in data_dir/stats.sqlite, answered over Observer.Stats and on /metrics.

Like the inventory (collector/inventory/store.py) and for the same reasons: its own file,
one row per series (its JSON, sketches as DDSketch protobuf), only changed rows written.
The thread also does the periodic work, so the file is only ever touched by it (and at
start and close): every SAVE_S it re-keys endpoint series under the inventory's learned
templates (a merge: the sketches of /users/alice and /users/bob become /users/{name}'s),
drops cells past retention and saves.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

from collector.inventory import templates
from collector.stats import feed
from collector.stats.model import ALPHA, RES_INDEX, RESOLUTIONS, Series, Stats, summary
from collector.storage.base import DecodedBatch
from sensor.errors import StorageError

log = logging.getLogger(__name__)

FILE = "stats.sqlite"
# Committed batches waiting for the statistics thread (a few ms each, so 64 batches is
# well under a second of work); past it a batch's events are dropped, counted.
QUEUE_BATCHES = 64
# Re-key, prune and save this often: a crash loses at most this much of the statistics.
SAVE_S = 10.0
KINDS = {"services": {"service"}, "endpoints": {"endpoint", "rpc"}, "edges": {"edge"}}


class StatsStore:
    """The statistics of one collector and their file. `inventory` (an InventoryStore)
    lends its learned templates to the endpoint series; None keeps shape templates."""

    def __init__(self, data_dir: Path, inventory=None) -> None:
        path = Path(data_dir) / FILE
        self._inventory = inventory
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("CREATE TABLE IF NOT EXISTS series (key TEXT PRIMARY KEY,"
                             " state TEXT NOT NULL)")
            rows = self._db.execute("SELECT key, state FROM series").fetchall()
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the statistics {path}: {exc}; move the file "
                               "away to start new statistics") from None
        self.stats = Stats()
        for key, state in rows:
            self.stats.merge_series(tuple(json.loads(key)), Series.from_dict(json.loads(state)))
        self.stats.take_dirty()   # what was read is what is stored
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self._dropped = 0         # events of batches the full queue refused
        self._thread = threading.Thread(target=self._run, name="loupe-stats", daemon=True)
        self._thread.start()

    def on_stored(self, batch: DecodedBatch) -> None:
        """Writer hook, after a commit: queue the batch's L7 tables (never blocks; a full
        queue drops and counts)."""
        tables = {n: t for n, t in batch.tables.items() if n in feed.PROTOCOLS}
        if not tables:
            return
        try:
            self._queue.put_nowait(tables)
        except queue.Full:
            self._dropped += sum(t.num_rows for t in tables.values())

    def _run(self) -> None:
        due = time.monotonic() + SAVE_S
        while True:
            try:
                tables = self._queue.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                tables = ()
            try:
                if tables is None:
                    return
                if tables:
                    self.stats.add_groups(feed.groups(tables))
            except Exception:  # noqa: BLE001 - one bad batch must not stop the statistics
                log.exception("the statistics failed on a batch; they go on")
            finally:
                if tables != ():
                    self._queue.task_done()
            if time.monotonic() >= due:   # busy or idle, every SAVE_S
                self._tick()
                due = time.monotonic() + SAVE_S

    def _tick(self) -> None:
        try:
            self.rekey()
            self.stats.prune()
            self.save()
        except Exception:  # noqa: BLE001 - retried at the next tick
            log.exception("saving the statistics failed; retrying")

    def rekey(self) -> None:
        """Endpoint series under the inventory's templates as they read now."""
        if self._inventory is None:
            return
        with self.stats.lock:
            keys = [k for k in self.stats.series if k[0] == "endpoint"]
        pairs = [(k[1], tuple(k[3].strip("/").split("/")) if k[3] != "/" else ()) for k in keys]
        learned = self._inventory.inventory.templates_for(pairs)
        mapping = {}
        for key, pair in zip(keys, pairs):
            mapping[key] = (*key[:3], "/" + "/".join(learned[pair]))
        self.stats.rekey(mapping)

    def flush(self) -> None:
        """Wait for the batches queued so far (and the inventory's, for its templates)."""
        if self._inventory is not None:
            self._inventory.flush()
        self._queue.join()

    @property
    def dropped(self) -> int:
        return self._dropped + self.stats.dropped

    def save(self) -> int:
        changed, gone = self.stats.take_dirty()
        if not changed and not gone:
            return 0
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM series WHERE key = ?",
                                     [(json.dumps(list(k)),) for k in gone])
                self._db.executemany("INSERT OR REPLACE INTO series VALUES (?, ?)",
                                     [(json.dumps(list(k)), json.dumps(v))
                                      for k, v in changed.items()])
        except sqlite3.Error as exc:
            raise StorageError(f"cannot save the statistics: {exc}") from None
        return len(changed) + len(gone)

    def close(self) -> None:
        """Feed what is queued, save, release the file (after the writer stopped)."""
        self._queue.put(None)
        self._thread.join()
        try:
            self.rekey()
            self.save()
        finally:
            self._db.close()

    def query(self, kind: str, resolution: str = "1m", last_ns: int = 0) -> tuple[list, int, int]:
        """Rows (dicts) of one kind over the last `last_ns` of a resolution (0: all it
        keeps), and the window's start and end."""
        self.flush()
        self.rekey()
        _, width, keep = RESOLUTIONS[RES_INDEX[resolution]]
        span = min(last_ns or width * keep, width * keep)
        cells, start, end = self.stats.window(resolution, span, KINDS[kind])
        rows = [dict(_labels(key), **summary(cell, seconds))
                for key, (cell, seconds) in cells.items()]
        rows.sort(key=lambda r: (r["service"], r["path"], r["method"], r["protocol"], r["client"]))
        return rows, start, end


def _labels(key: tuple) -> dict:
    out = {"kind": key[0], "protocol": "", "service": "", "client": "", "method": "", "path": ""}
    if key[0] == "service":
        out.update(protocol=key[1], service=key[2])
    elif key[0] == "edge":
        out.update(protocol=key[1], client=key[2], service=key[3])
    else:
        path = key[3]
        if key[0] == "endpoint":   # parameter names as `loupe endpoints` shows them
            path = templates.render(tuple(s for s in path.split("/") if s))
        out.update(protocol="grpc" if key[0] == "rpc" else "http", service=key[1],
                   method=key[2], path=path)
    return out


def select(rows: list[dict], request) -> list[dict]:
    """The rows a StatsRequest's filters keep (globs over service, exact protocols)."""
    def ok(value: str, globs) -> bool:
        return not globs or any(fnmatch.fnmatchcase(value, g) for g in globs)

    return [r for r in rows if ok(r["service"], request.service)
            and ok(r["client"], request.client)
            and (not request.protocol or r["protocol"] in request.protocol)]


FIELDS = ("kind", "protocol", "service", "client", "method", "path", "requests", "rate",
          "errors_4xx", "errors_5xx", "error_rate_4xx", "error_rate_5xx", "latency_count",
          "p50_ns", "p90_ns", "p99_ns")


def to_proto(row: dict, pb):
    return pb.ServiceStat(**{f: row[f] for f in FIELDS})


def from_proto(msg) -> dict:
    return {f: getattr(msg, f) for f in FIELDS}


__all__ = ["ALPHA", "StatsStore", "select", "to_proto", "from_proto", "FIELDS"]
