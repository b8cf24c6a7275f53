"""The inventory in the collector: fed from committed batches, kept in its own file,
answered over Observer.Endpoints.

Its own file (data_dir/inventory.sqlite, Python's sqlite3) rather than a table in the
record store: the inventory is a small keyed state updated in place, the record store is
append-only columns behind a seam with more than one engine, and the inventory must not
depend on which one runs. One row per endpoint (its JSON); save() writes only the rows
changed since the last save and deletes the keys that a learned parameter merged away.
At start every row is read back and merged in (Inventory.merge), which also rebuilds the
learned templates: the stored templates are exactly what the learner had learned.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import queue
import sqlite3
import threading
from pathlib import Path

from collector.inventory.model import Endpoint, Inventory, Transaction, service_of
from collector.storage.base import DecodedBatch
from sensor.errors import StorageError

log = logging.getLogger(__name__)

FILE = "inventory.sqlite"
# Committed batches waiting for the inventory's thread. The feed costs ~15-25 us per
# HTTP event (bench_inventory), several times what storing it costs, so it runs on a
# thread of its own and never holds up a commit or an ack. 64 batches of 1000 events
# is ~1.5 s of that work; past it a batch's events are counted as dropped.
QUEUE_BATCHES = 64
# HTTP-shaped tables the inventory reads: HTTP/1 now; HTTP/2 and gRPC events share the
# HTTP shape (DESIGN.md, Records) and join here by having these columns.
_NEEDS = ("method", "host", "path", "status", "request_content_type",
          "response_content_type", "ts_ns", "dst_addr", "dst_port", "sensor_id")
# Read when a table has them (request-body capture, auth presence): optional.
_OPTIONAL = ("auth", "request_fields", "response_fields", "pii")


def http_tables(batch: DecodedBatch) -> list:
    """The batch's tables of HTTP-shaped events."""
    return [t for t in batch.tables.values() if all(n in t.schema.names for n in _NEEDS)]


def transactions(batch: DecodedBatch):
    """The inventory's view of every HTTP-shaped event in a committed batch, one
    Transaction per event."""
    return _transactions(http_tables(batch))


def _columns(table) -> dict[str, list]:
    names = table.schema.names
    return {n: table.column(n).to_pylist() for n in _NEEDS + _OPTIONAL if n in names}


def _transactions(tables: list):
    for table in tables:
        cols = _columns(table)
        for i in range(table.num_rows):
            if cols["method"][i]:
                yield _transaction(cols, i, cols["ts_ns"][i])


def _transaction(cols: dict[str, list], i: int, ts_ns: int, last_ns: int = 0,
                 count: int = 1) -> Transaction:
    """Row i of a table's columns as a Transaction (count events from ts_ns to last_ns)."""
    return Transaction(
        service=service_of(cols["host"][i], cols["dst_addr"][i], cols["dst_port"][i]),
        method=cols["method"][i], target=cols["path"][i], ts_ns=ts_ns, last_ns=last_ns,
        count=count, status=cols["status"][i],
        request_content_type=cols["request_content_type"][i],
        response_content_type=cols["response_content_type"][i],
        sensor_id=cols["sensor_id"][i],
        auth=_kinds(cols["auth"][i]) if "auth" in cols else (),
        request_fields=_fields(cols, "request_fields", i),
        response_fields=_fields(cols, "response_fields", i),
        pii=_fields(cols, "pii", i),
    )


# The columns whose values make two events one Transaction with a count: all that
# Endpoint.add reads but the time.
_ALIKE = ("method", "host", "dst_addr", "dst_port", "path", "status", "request_content_type",
          "response_content_type", "sensor_id") + _OPTIONAL


def _hashable(value):
    if isinstance(value, list):   # auth structs, or a map column's (key, value) pairs
        return tuple(tuple(v.items()) if isinstance(v, dict) else v for v in value)
    return value


def grouped_transactions(tables: list):
    """The same as _transactions, as one Transaction per distinct event (count, first
    and last time): a batch's events repeat a handful of endpoints, so the inventory's
    per-event work (learning the path, updating its endpoint) runs per distinct event.
    The groups come in the order of their first event, so new paths, endpoints and
    capped sets see their values in the order the events bring them, and the inventory
    reads the same as fed event by event (tests/inventory/test_grouped_feed.py)."""
    for table in tables:
        cols = _columns(table)
        present = [n for n in _ALIKE if n in cols]
        keyed = [[_hashable(v) for v in cols[n]] if n in _OPTIONAL else cols[n]
                 for n in present]
        groups: dict[tuple, list[int]] = {}   # key -> [first row, count, first ts, last ts]
        for i, (key, ts) in enumerate(zip(zip(*keyed), cols["ts_ns"])):
            group = groups.get(key)
            if group is None:
                groups[key] = [i, 1, ts, ts]
            else:
                group[1] += 1
                if ts < group[2]:
                    group[2] = ts
                elif ts > group[3]:
                    group[3] = ts
        for i, count, first, last in groups.values():
            if cols["method"][i]:
                yield _transaction(cols, i, first, last, count)


def _kinds(creds) -> tuple[str, ...]:
    """Credential kinds of an event's auth column: HttpCredential structs (kind,
    principal), or kind names."""
    return tuple(c["kind"] if isinstance(c, dict) else c for c in creds or ())


def _fields(cols: dict, name: str, i: int) -> dict | None:
    value = cols.get(name)
    if not value or not value[i]:
        return None
    return json.loads(value[i]) if isinstance(value[i], str) else dict(value[i])


class InventoryStore:
    """The inventory of one collector and its file."""

    def __init__(self, data_dir: Path) -> None:
        path = Path(data_dir) / FILE
        try:
            # Whatever the record store is (ClickHouse keeps nothing in data_dir).
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the data directory {path.parent}: "
                               f"{exc.strerror}; pick another with --data-dir") from None
        try:
            # Used by the writer thread (save) and at start/stop; serialised by the caller.
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS endpoints (service TEXT NOT NULL, method TEXT NOT"
                " NULL, template TEXT NOT NULL, state TEXT NOT NULL,"
                " PRIMARY KEY (service, method, template))")
            rows = self._db.execute("SELECT state FROM endpoints").fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the endpoint inventory {path}: {exc}; move the "
                               "file away to start a new inventory") from None
        self.inventory = Inventory()
        self.inventory.merge(Endpoint.from_dict(json.loads(state)) for (state,) in rows)
        # Rows whose keys merged on the way (a position made a parameter for good while
        # reading) are replaced now; the others are written back unchanged, once.
        self.save()
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self._dropped = 0   # events of batches the full queue refused (writer thread only)
        self._thread = threading.Thread(target=self._run, name="loupe-inventory", daemon=True)
        self._thread.start()

    def on_stored(self, batch: DecodedBatch) -> None:
        """Writer hook, on the writer thread after a batch committed: queue its HTTP
        events for the inventory's thread (never blocks; a full queue drops and counts)."""
        tables = http_tables(batch)
        if not tables:
            return
        try:
            self._queue.put_nowait(tables)
        except queue.Full:
            self._dropped += sum(t.num_rows for t in tables)

    def _run(self) -> None:
        while (tables := self._queue.get()) is not None:
            try:
                self.inventory.add_many(grouped_transactions(tables))
            except Exception:  # noqa: BLE001 - one bad batch must not stop the inventory
                log.exception("the endpoint inventory failed on a batch; it goes on")
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def flush(self) -> None:
        """Wait until every batch queued so far is in the inventory (at most
        QUEUE_BATCHES of work): a read then sees every batch acked before it."""
        self._queue.join()

    def snapshot(self) -> list[dict]:
        self.flush()
        return self.inventory.snapshot()

    @property
    def dropped(self) -> int:
        """Events not in the inventory: refused by the full queue, or of new endpoints
        past MAX_ENDPOINTS."""
        return self._dropped + self.inventory.dropped

    def save(self) -> int:
        """Write the changed endpoints; returns how many rows were written or deleted."""
        changed, removed = self.inventory.take_changes()
        if not changed and not removed:
            return 0
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "DELETE FROM endpoints WHERE service = ? AND method = ? AND template = ?",
                    [(s, m, json.dumps(list(t))) for s, m, t in removed])
                self._db.executemany(
                    "INSERT OR REPLACE INTO endpoints VALUES (?, ?, ?, ?)",
                    [(d["service"], d["method"], json.dumps(d["template"]), json.dumps(d))
                     for d in changed])
        except sqlite3.Error as exc:
            raise StorageError(f"cannot save the endpoint inventory: {exc}") from None
        return len(changed) + len(removed)

    def close(self) -> None:
        """Feed what is queued, save, release the file (after the writer stopped)."""
        self._queue.put(None)
        self._thread.join()
        try:
            self.save()
        finally:
            self._db.close()


def select(snapshot: list[dict], request) -> list[dict]:
    """The endpoints (dicts) an EndpointsRequest asks for."""
    def any_glob(value: str, globs) -> bool:
        return not globs or any(fnmatch.fnmatchcase(value, g) for g in globs)

    methods = {m.upper() for m in request.method}
    out = []
    for d in snapshot:
        if methods and d["method"] not in methods:
            continue
        if not any_glob(d["service"], request.service) or not any_glob(d["path_template"],
                                                                      request.path):
            continue
        if request.sensor_id and not set(request.sensor_id) & set(d["sensors"]):
            continue
        if request.since_ns and d["last_seen_ns"] < request.since_ns:
            continue
        if request.until_ns and d["first_seen_ns"] >= request.until_ns:
            continue
        out.append(d)
    out.sort(key=lambda d: (d["service"], d["path_template"], d["method"]))
    return out


def merged(local: list[dict], others: list[list[dict]]) -> list[dict]:
    """Endpoint snapshots of several collectors as one (Inventory.merge, order-free): the
    templates are learned again over all of them, as one collector fed every batch."""
    inv = Inventory()
    for snapshot in (local, *others):
        inv.merge(Endpoint.from_dict(d) for d in snapshot)
    return inv.snapshot()


def to_proto(d: dict, pb):
    """One endpoint dict as an observer_pb2.Endpoint (pb is the observer_pb2 module)."""
    fields = lambda m: {k: pb.FieldTypes(types=v) for k, v in m.items()}  # noqa: E731
    return pb.Endpoint(
        service=d["service"], method=d["method"], path_template=d["path_template"],
        template=d["template"], first_seen_ns=d["first_seen_ns"],
        last_seen_ns=d["last_seen_ns"], requests=d["requests"],
        status_classes=d["status_classes"],
        request_content_types=d["request_content_types"],
        response_content_types=d["response_content_types"], auth=_auth_entries(d),
        query_params=d["query_params"], request_fields=fields(d["request_fields"]),
        response_fields=fields(d["response_fields"]), sensors=d["sensors"],
    )


def _auth_entries(d: dict) -> list[str]:
    """Endpoint.auth on the wire: each kind as "kind:requests", then "any:N" and
    "none:N", requests with any and without any credential (observer.proto); a kind
    stored before counts were kept goes bare."""
    counts = d.get("auth_counts", {})
    out = [f"{k}:{counts[k]}" if k in counts else k for k in d["auth"]]
    if d.get("authenticated") or d.get("unauthenticated"):
        out += [f"any:{d.get('authenticated', 0)}", f"none:{d.get('unauthenticated', 0)}"]
    return out


def _auth_from(entries) -> dict:
    kinds, counts, totals = [], {}, {"any": 0, "none": 0}
    for entry in entries:
        kind, _, n = entry.partition(":")
        if kind in totals:
            totals[kind] = int(n or 0)
            continue
        kinds.append(kind)
        if n.isdigit():
            counts[kind] = int(n)
    return {"auth": kinds, "auth_counts": counts, "authenticated": totals["any"],
            "unauthenticated": totals["none"]}


def from_proto(msg) -> dict:
    """An observer_pb2.Endpoint back to the dict shape (the CLI's side)."""
    return {
        "service": msg.service, "method": msg.method, "path_template": msg.path_template,
        "template": list(msg.template), "first_seen_ns": msg.first_seen_ns,
        "last_seen_ns": msg.last_seen_ns, "requests": msg.requests,
        "status_classes": dict(sorted(msg.status_classes.items())),
        "request_content_types": list(msg.request_content_types),
        "response_content_types": list(msg.response_content_types),
        **_auth_from(msg.auth), "query_params": list(msg.query_params),
        "request_fields": {k: list(v.types) for k, v in sorted(msg.request_fields.items())},
        "response_fields": {k: list(v.types) for k, v in sorted(msg.response_fields.items())},
        "sensors": list(msg.sensors),
    }
