"""The inventory against a reference OpenAPI spec, continuously, as Alert records.

`loupe api diff --spec FILE` answers once, when someone asks. With `[api] spec` set in
collector.toml the collector runs the same diff (openapi.diff) every CHECK_S over its
whole inventory and stores each NEW finding as an Alert: rule loupe-api-shadow,
loupe-api-zombie, loupe-api-unused or loupe-api-drift, category "api", the finding as
the excerpt ("GET shop.test:80 /users/{id}: seen, not in the spec"). They enter
like the client notices (collector/clients/alerts.py): a batch of sensor "collector"
through the collector's own ingest path, stored, then offered to live subscribers, so
they land in the alerts table, `loupe tail --type alert --alert-rule 'loupe-api-*'`
and the console's alerts page.

A finding's identity is (kind, service, method, path template) and, for drift, its
detail (the parameter or field names: a newly seen name is a new finding); a zombie's
detail carries a request count, which is not part of it. A finding is alerted once
while it holds. One that stops holding (the spec now lists the endpoint) is forgotten,
and alerts again if it comes back.

Unused: right after a start with a new inventory every operation looks unused. An
operation becomes an "unused" alert only once the watch has held it for unused_after
(7 days by default) with no endpoint matching it.

State (data_dir/api_findings.sqlite, its own file as the inventory's): the alerted
findings that still hold, and since when each operation of the spec is watched. It is
written after the alerts are stored: a crash between the two alerts again (at least
once), it never loses an alert. The spec file is re-read when it changes (mtime, size,
inode); an edit that does not parse keeps the previous spec and says so in the log.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from collector.inventory import openapi
from collector.inventory.cli import load_spec
from sensor import model
from sensor.errors import ConfigError, StorageError
from sensor.export import wire

log = logging.getLogger(__name__)

FILE = "api_findings.sqlite"
COLLECTOR_ID = "collector"
KINDS = ("shadow", "zombie", "unused", "drift")
# How often the inventory is checked: a finding is about an endpoint's existence, not
# about one request, so a minute late is on time; a check at 10,000 endpoints costs
# ~0.5 s of a worker thread (mostly reading the inventory), which once a minute is cheap.
CHECK_S = 60.0
# Alerts stored per check: a first check against an estate of thousands of unlisted
# endpoints becomes a few minutes of batches, not one huge one. The rest are found
# again at the next check (they are not marked alerted until stored).
MAX_PER_CHECK = 1000
# Alerts per stored batch, as the client notices.
MAX_PER_BATCH = 500

RULES = {
    "shadow": ("loupe-api-shadow", "medium", "an endpoint seen that the API spec does not list"),
    "zombie": ("loupe-api-zombie", "medium",
               "an endpoint the API spec marks deprecated is still called"),
    "unused": ("loupe-api-unused", "low", "an operation of the API spec not seen in traffic"),
    "drift": ("loupe-api-drift", "low",
              "query parameters or body fields seen that the API spec does not declare"),
}


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    service: str
    method: str
    path: str
    detail: str

    @property
    def key(self) -> str:
        return json.dumps([self.kind, self.service, self.method, self.path,
                           self.detail if self.kind == "drift" else ""])


@dataclass(slots=True)
class Check:
    """One check's outcome: the findings to alert now, and the state to keep once they
    are stored (ApiWatch.commit)."""

    new: list[Finding]
    holding: set[str]                     # keys of every finding that holds now
    since: dict[tuple[str, str], int]     # (method, path) of each spec operation -> ns
    spec_ops: int = 0
    endpoints: int = 0
    waiting_unused: int = 0               # unused, but not yet for unused_after
    all_new: int = 0                      # new findings before MAX_PER_CHECK


def _stamp(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _operations(doc: dict) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in (doc.get("paths") or {}).items()
            if isinstance(item, dict)
            for m in openapi.HTTP_METHODS if isinstance(item.get(m), dict)}


class ApiWatch:
    """The reference spec, the findings already alerted, and their file.

    Used from one task at a time (the collector's check loop); check() and commit()
    block (file reads, the diff, sqlite) and run on a worker thread."""

    def __init__(self, spec: Path, data_dir: Path, *, services: tuple[str, ...] = (),
                 kinds: tuple[str, ...] = KINDS, unused_after_ns: int = 7 * 86_400 * 10**9,
                 clock=time.time_ns) -> None:
        self.spec = Path(spec)
        self.services = tuple(services)
        self.kinds = tuple(kinds)
        self.unused_after_ns = unused_after_ns
        self._clock = clock
        # At start a spec that cannot be read is a configuration error (one line); later
        # a bad edit keeps the previous one.
        self._doc = load_spec(self.spec)
        self._stamp = _stamp(self.spec)
        path = Path(data_dir) / FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the data directory {path.parent}: "
                               f"{exc.strerror}; pick another with --data-dir") from None
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("CREATE TABLE IF NOT EXISTS findings (key TEXT PRIMARY KEY, "
                             "kind TEXT NOT NULL, alerted_ns INTEGER NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS operations (method TEXT NOT NULL, "
                             "path TEXT NOT NULL, since_ns INTEGER NOT NULL, "
                             "PRIMARY KEY (method, path))")
            self._alerted = {k for (k,) in self._db.execute("SELECT key FROM findings")}
            self._since = {(m, p): ns for m, p, ns in self._db.execute(
                "SELECT method, path, since_ns FROM operations")}
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the API findings {path}: {exc}; move the file "
                               "away to start anew (every finding then alerts once more)"
                               ) from None

    @property
    def alerted(self) -> int:
        return len(self._alerted)

    def _reload(self) -> None:
        stamp = _stamp(self.spec)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._doc = load_spec(self.spec)
        except ConfigError as exc:
            log.warning("[api] spec changed but cannot be used; the previous one stays: %s",
                        exc)
        else:
            log.info("[api] spec %s re-read: %d operations", self.spec,
                     len(_operations(self._doc)))

    def _in_scope(self, service: str) -> bool:
        return not self.services or any(fnmatch.fnmatchcase(service, g) for g in self.services)

    def check(self, endpoints: list[dict]) -> Check:
        """The diff of the inventory's endpoints (Inventory.snapshot dicts) against the
        spec; nothing is marked alerted until commit()."""
        self._reload()
        now = self._clock()
        ops = _operations(self._doc)
        since = {op: self._since.get(op, now) for op in ops}
        scoped = [e for e in endpoints if self._in_scope(e["service"])]
        holding: dict[str, Finding] = {}
        waiting = 0
        for f in openapi.diff(self._doc, scoped):
            if f["kind"] not in self.kinds:
                continue
            if f["kind"] == "unused" and now - since.get((f["method"], f["path"]), now) \
                    < self.unused_after_ns:
                waiting += 1
                continue
            finding = Finding(f["kind"], f["service"], f["method"], f["path"], f["detail"])
            holding.setdefault(finding.key, finding)
        new = [f for k, f in holding.items() if k not in self._alerted]
        return Check(new=new[:MAX_PER_CHECK], holding=set(holding), since=since,
                     spec_ops=len(ops), endpoints=len(scoped), waiting_unused=waiting,
                     all_new=len(new))

    def commit(self, check: Check) -> None:
        """Keep what a check found, once its new findings are stored as Alerts: those
        are alerted, findings no longer holding are forgotten."""
        now = self._clock()
        alerted = (self._alerted & check.holding) | {f.key for f in check.new}
        gone = self._alerted - alerted
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM findings WHERE key = ?",
                                     [(k,) for k in gone])
                self._db.executemany("INSERT OR REPLACE INTO findings VALUES (?, ?, ?)",
                                     [(f.key, f.kind, now) for f in check.new])
                if check.since != self._since:
                    self._db.execute("DELETE FROM operations")
                    self._db.executemany("INSERT INTO operations VALUES (?, ?, ?)",
                                         [(m, p, ns) for (m, p), ns in check.since.items()])
        except sqlite3.Error as exc:
            raise StorageError(f"cannot save the API findings: {exc}") from None
        self._alerted = alerted
        self._since = dict(check.since)

    def close(self) -> None:
        self._db.close()


def _destination(service: str) -> tuple[str, int]:
    """(address, port) of a host:port service: the address only when the host is one."""
    host, _, port = service.rpartition(":")
    host = host.strip("[]")
    try:
        addr = str(ipaddress.ip_address(host))
    except ValueError:
        addr = ""
    return addr, int(port) if port.isdigit() and int(port) <= 0xFFFF else 0


def alert_of(f: Finding, ts_ns: int) -> model.Alert:
    rule_id, severity, reason = RULES[f.kind]
    addr, port = _destination(f.service)
    where = f"{f.method} {f.service} {f.path}" if f.service else f"{f.method} {f.path}"
    return model.Alert(
        rule_id=rule_id, action="alert", field="endpoint",
        excerpt=f"{where}: {f.detail}"[:model.MAX_EXCERPT], reason=reason,
        severity=severity, category="api", ts_ns=ts_ns, event_kind="http",
        dst_addr=addr, dst_port=port, sensor_id=COLLECTOR_ID, count=1)


class Publisher:
    """Stores Alerts through the collector's ingest path and offers them to live
    subscribers. Batch ids are the wall clock in ns, strictly increasing here, so a
    restart never reuses one and dedup on (sensor_id, batch_id) never drops a batch."""

    def __init__(self) -> None:
        self._last_id = 0

    def _batch_id(self) -> int:
        self._last_id = max(time.time_ns(), self._last_id + 1)
        return self._last_id

    async def publish(self, writer, hub, alerts: list[model.Alert]) -> int:
        """How many were stored (all of them, or fewer when the store refused a batch)."""
        stored = 0
        for i in range(0, len(alerts), MAX_PER_BATCH):
            batch = wire.ingest_pb2.RecordBatch(
                sensor_id=COLLECTOR_ID, batch_id=self._batch_id(),
                records=[wire.to_proto(a) for a in alerts[i:i + MAX_PER_BATCH]])
            result = await writer.store(batch, batch.SerializeToString(), None)
            if result.ack.status != wire.ingest_pb2.ACK_STATUS_STORED:
                log.warning("API findings not stored as alerts: %s", result.ack.message)
                break
            hub.publish(result.seq, batch, None)
            stored += len(batch.records)
        return stored
