"""Per-client behaviour in the collector: fed from committed batches on its own thread,
kept in its own file (data_dir/clients.sqlite), answered over Observer.Clients.

Like the endpoint inventory (collector/inventory/store.py, same reasons): a small keyed
state updated in place, independent of the record store's engine. One row per client (its
JSON); save() writes the clients changed since the last save and appends the new notices,
keeping the newest MAX_STORED_NOTICES. At start every row is read back and merged in.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import logging
import queue
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from collector.clients.model import Client, Clients, Notice, endpoint_of
from collector.inventory.model import service_of
from collector.inventory.store import http_tables
from collector.storage.base import DecodedBatch
from sensor.errors import StorageError

log = logging.getLogger(__name__)

FILE = "clients.sqlite"
# Committed batches waiting for the clients' thread (as the inventory's queue: a full
# queue drops a batch's records and counts them, never holds up a commit).
QUEUE_BATCHES = 64
# Notices kept in the file, newest first out of the way of older ones.
MAX_STORED_NOTICES = 10_000
_FLOW_COLS = ("src_addr", "flow_end_ns", "sensor_id", "flow_end_reason", "initiator_octets",
              "responder_octets", "src_country", "src_city", "src_asn", "l7_summary")
_HTTP_COLS = ("src_addr", "ts_ns", "sensor_id", "method", "host", "path", "status",
              "dst_addr", "dst_port")
_ACTIVE_TIMEOUT = 2   # FlowEndReason: an interim record, the flow goes on

COLUMNS = ["address", "principal", "first_seen_ns", "last_seen_ns", "flows", "octets_sent",
           "octets_received", "requests", "errors_4xx", "errors_5xx", "request_rate",
           "error_rate", "endpoints", "endpoints_more", "country", "city", "asn",
           "countries", "sensors", "principals", "auth"]
COLUMN_TYPES = ["VARCHAR", "VARCHAR", "UBIGINT", "UBIGINT", "UBIGINT", "UBIGINT",
                "UBIGINT", "UBIGINT", "UBIGINT", "UBIGINT", "DOUBLE", "DOUBLE",
                "VARCHAR[]", "UBIGINT", "VARCHAR", "VARCHAR", "UINTEGER", "VARCHAR[]",
                "VARCHAR[]", "VARCHAR[]", "VARCHAR[]"]
NOTICE_COLUMNS = ["ts_ns", "kind", "address", "principal", "detail"]
NOTICE_TYPES = ["UBIGINT", "VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR"]


def _feed(clients: Clients, tables: list) -> None:
    """A batch's flows and HTTP events into the clients, per client (Clients.add_rows),
    or record by record in the rare cases add_rows leaves to that path."""
    flows = {k: [] for k in ("address", "ts_ns", "sensor", "final", "sent", "received",
                             "geo", "who", "auth")}
    requests = {k: [] for k in ("address", "ts_ns", "sensor", "status", "endpoint", "who",
                                "auth")}
    for table in tables:
        names = table.schema.names
        if "flow_end_reason" in names and "src_country" in names:
            _flow_columns(table, flows, len(flows["address"]))
            continue
        rows = [i for i, m in enumerate(table.column("method").to_pylist()) if m]
        if not rows:
            continue
        if len(rows) < table.num_rows:
            table = table.take(rows)
        cols = {n: table.column(n).to_pylist() for n in _HTTP_COLS}
        creds = table.column("auth").to_pylist() if "auth" in names else None
        # endpoint_of once per distinct (host, address, port, method, path)
        rows = list(zip(cols["host"], cols["dst_addr"], cols["dst_port"], cols["method"],
                        cols["path"]))
        endpoints = dict.fromkeys(rows)
        services: dict = {}
        for key in endpoints:
            host, addr, port, method, path = key
            service = services.get((host, addr, port))
            if service is None:
                service = services[(host, addr, port)] = service_of(host, addr, port)
            endpoints[key] = endpoint_of(service, method, path)
        requests["endpoint"] += map(endpoints.__getitem__, rows)
        requests["address"] += cols["src_addr"]
        requests["ts_ns"] += cols["ts_ns"]
        requests["sensor"] += cols["sensor_id"]
        requests["status"] += [s or 0 for s in cols["status"]]
        if creds is None:
            requests["who"] += [""] * len(rows)
            requests["auth"] += [()] * len(rows)
        else:
            requests["who"] += [next((c["principal"] for c in a if c["principal"]), "")
                                if a else "" for a in creds]
            requests["auth"] += [tuple(c["kind"] for c in a) if a else () for a in creds]
    for k in ("ts_ns", "final", "sent", "received"):
        flows[k] = np.concatenate(flows[k]) if flows[k] else np.zeros(0, np.int64)
    if not clients.add_rows(flows, requests):
        _feed_records(clients, tables)


def _flow_columns(table, flows: dict, offset: int) -> None:
    """A flows table's part of add_rows' input: numbers as arrays, geo only for the rows
    that have one, principals and credential kinds from l7_summary."""
    n = table.num_rows
    ints = lambda name: pc.fill_null(table.column(name), 0).to_numpy()  # noqa: E731
    flows["address"] += table.column("src_addr").to_pylist()
    flows["sensor"] += table.column("sensor_id").to_pylist()
    flows["ts_ns"].append(ints("flow_end_ns").astype(np.int64))
    flows["final"].append(ints("flow_end_reason") != _ACTIVE_TIMEOUT)
    flows["sent"].append(ints("initiator_octets").astype(np.int64))
    flows["received"].append(ints("responder_octets").astype(np.int64))
    has_geo = pc.or_(pc.fill_null(pc.not_equal(table.column("src_country"), ""), False),
                     pc.not_equal(pc.fill_null(table.column("src_asn"), 0), 0))
    rows = np.nonzero(has_geo.to_numpy(zero_copy_only=False))[0]
    if len(rows):
        geo = table.take(rows)
        flows["geo"] += zip((rows + offset).tolist(), geo.column("src_country").to_pylist(),
                            geo.column("src_city").to_pylist(), geo.column("src_asn").to_pylist())
    summary = table.column("l7_summary")
    for key, name, make in (("who", "http_principal", lambda v: v or ""),
                            ("auth", "http_auth", lambda v: tuple(v.split(",")) if v else ())):
        values = pc.map_lookup(summary, name, "last")   # dict(summary) keeps the last
        if values.null_count == n:
            flows[key] += [make(None)] * n
        else:
            flows[key] += [make(v) for v in values.to_pylist()]


def _feed_records(clients: Clients, tables: list) -> None:
    """Record by record: the reference add_rows is held to (tests/clients), and its
    path for the rare batches it leaves here."""
    for table in tables:
        names = table.schema.names
        if "flow_end_reason" in names and "src_country" in names:
            cols = {n: table.column(n).to_pylist() for n in _FLOW_COLS}
            for i in range(table.num_rows):
                summary = dict(cols["l7_summary"][i] or ())
                auth = summary.get("http_auth", "")
                clients.add_flow(
                    who=summary.get("http_principal", ""),
                    auth=tuple(auth.split(",")) if auth else (),
                    address=cols["src_addr"][i], ts_ns=cols["flow_end_ns"][i],
                    sensor=cols["sensor_id"][i],
                    final=cols["flow_end_reason"][i] != _ACTIVE_TIMEOUT,
                    sent=cols["initiator_octets"][i], received=cols["responder_octets"][i],
                    country=cols["src_country"][i], city=cols["src_city"][i],
                    asn=cols["src_asn"][i])
            continue
        cols = {n: table.column(n).to_pylist() for n in _HTTP_COLS}
        creds = table.column("auth").to_pylist() if "auth" in names else None
        for i in range(table.num_rows):
            method = cols["method"][i]
            if not method:
                continue
            service = service_of(cols["host"][i], cols["dst_addr"][i], cols["dst_port"][i])
            auth = creds[i] or () if creds is not None else ()
            clients.add_request(
                address=cols["src_addr"][i], ts_ns=cols["ts_ns"][i],
                sensor=cols["sensor_id"][i], status=cols["status"][i],
                endpoint=endpoint_of(service, method, cols["path"][i]),
                who=next((c["principal"] for c in auth if c["principal"]), ""),
                auth=tuple(c["kind"] for c in auth))


class ClientStore:
    """The clients of one collector and their file."""

    def __init__(self, data_dir: Path) -> None:
        path = Path(data_dir) / FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the data directory {path.parent}: "
                               f"{exc.strerror}; pick another with --data-dir") from None
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("CREATE TABLE IF NOT EXISTS clients (address TEXT NOT NULL, "
                             "principal TEXT NOT NULL, state TEXT NOT NULL, "
                             "PRIMARY KEY (address, principal))")
            self._db.execute("CREATE TABLE IF NOT EXISTS notices (ts_ns INTEGER NOT NULL, "
                             "kind TEXT NOT NULL, address TEXT NOT NULL, principal TEXT NOT "
                             "NULL, detail TEXT NOT NULL)")
            rows = self._db.execute("SELECT state FROM clients").fetchall()
            notices = self._db.execute(
                "SELECT kind, address, principal, ts_ns, detail FROM notices "
                "ORDER BY rowid DESC LIMIT 1000").fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the client store {path}: {exc}; move the file "
                               "away to start anew") from None
        self.clients = Clients()
        self.clients.merge(Client.from_dict(json.loads(s)) for (s,) in rows)
        self.clients.take_changes()
        self.clients.notices = [Notice(*n) for n in reversed(notices)]
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="loupe-clients", daemon=True)
        self._thread.start()

    def on_stored(self, batch: DecodedBatch) -> None:
        """Writer hook: queue the batch's flows and HTTP events (never blocks)."""
        tables = http_tables(batch)
        flows = batch.tables.get("flows")
        if flows is not None:
            tables = [flows, *tables]
        if not tables:
            return
        try:
            self._queue.put_nowait(tables)
        except queue.Full:
            self._dropped += sum(t.num_rows for t in tables)

    def _run(self) -> None:
        while (tables := self._queue.get()) is not None:
            try:
                _feed(self.clients, tables)
            except Exception:  # noqa: BLE001 - one bad batch must not stop the feed
                log.exception("the client store failed on a batch; it goes on")
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def flush(self) -> None:
        self._queue.join()

    def snapshot(self) -> list[dict]:
        self.flush()
        return self.clients.snapshot()

    def notices(self) -> list[dict]:
        self.flush()
        return [n.to_dict() for n in self.clients.notices]

    @property
    def dropped(self) -> int:
        return self._dropped + self.clients.dropped

    def save(self) -> int:
        changed, notices = self.clients.take_changes()
        if not changed and not notices:
            return 0
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO clients VALUES (?, ?, ?)",
                    [(d["address"], d["principal"], json.dumps(d)) for d in changed])
                self._db.executemany(
                    "INSERT INTO notices VALUES (?, ?, ?, ?, ?)",
                    [(n.ts_ns, n.kind, n.address, n.principal, n.detail) for n in notices])
                self._db.execute(
                    "DELETE FROM notices WHERE rowid <= (SELECT MAX(rowid) FROM notices) - ?",
                    (MAX_STORED_NOTICES,))
        except sqlite3.Error as exc:
            raise StorageError(f"cannot save the client store: {exc}") from None
        return len(changed) + len(notices)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        try:
            self.save()
        finally:
            self._db.close()


def _address_matches(address: str, patterns) -> bool:
    for p in patterns:
        if "/" in p:
            try:
                if ipaddress.ip_address(address) in ipaddress.ip_network(p, strict=False):
                    return True
            except ValueError:
                continue
        elif fnmatch.fnmatchcase(address, p):
            return True
    return not patterns


def select(snapshot: list[dict], request) -> list[dict]:
    """The clients a ClientsRequest asks for: address (glob or CIDR) and country; the
    filter's service/method/path select clients that touched such an endpoint."""
    f = request.filter
    methods = {m.upper() for m in f.method}
    countries = set(request.country)
    out = []
    for d in snapshot:
        if not _address_matches(d["address"], request.address):
            continue
        if countries and d["country"] not in countries and not countries & set(d["countries"]):
            continue
        if f.sensor_id and not set(f.sensor_id) & set(d["sensors"]):
            continue
        if f.since_ns and d["last_seen_ns"] < f.since_ns:
            continue
        if f.until_ns and d["first_seen_ns"] >= f.until_ns:
            continue
        if f.service or methods or f.path:
            if not any(_touched(e, f.service, methods, f.path) for e in d["endpoints"]):
                continue
        out.append(d)
    out.sort(key=lambda d: (-d["requests"], -d["octets_sent"], d["address"], d["principal"]))
    return out


def merged(local: list[dict], others: list[list[dict]]) -> list[dict]:
    """Client snapshots (Client.to_dict rows, every field) of several collectors as one
    (Client.merge): what one collector fed every batch would hold."""
    clients = Clients()
    for snapshot in (local, *others):
        clients.merge(Client.from_dict(d) for d in snapshot)
    return clients.snapshot()


def _touched(endpoint: str, services, methods, paths) -> bool:
    method, service, path = endpoint.split(" ", 2)
    return ((not methods or method in methods)
            and (not services or any(fnmatch.fnmatchcase(service, g) for g in services))
            and (not paths or any(fnmatch.fnmatchcase(path, g) for g in paths)))


def select_notices(notices: list[dict], request) -> list[dict]:
    f = request.filter
    return [n for n in notices if _address_matches(n["address"], request.address)
            and (not f.since_ns or n["ts_ns"] >= f.since_ns)
            and (not f.until_ns or n["ts_ns"] < f.until_ns)]
