"""Per-client behaviour: one Client per source address (and principal, when the sensors
report one), fed the flows and HTTP-shaped events of committed batches.

A client is the initiator of a flow (Loupe's src) and the sender of a request. What is
kept per client, all mergeable (sums, min, max, capped set unions), so sensors and a
stored state merge in any order:
- first and last seen; flows (final records only: an interim record of a long flow is the
  same flow), octets sent and received (flow deltas, so sums are exact);
- requests, 4xx and 5xx responses, and the endpoints touched (service, method, path
  template by the segment shapes of collector/inventory/templates.classify), capped;
- geo from its flows (sensor [geoip], docs/geo.md): the latest country, city and ASN, and
  every country seen (capped);
- the sensors that saw it.

Notices (docs/clients.md) come out of add_*: new client, new country for a known client,
and unusual volume (a minute with many times the client's usual requests). They are
collector facts, not rule matches: only the collector sees every sensor and the history.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from collector.inventory import templates

# Clients kept: ~1 KiB each with full sets, so ~100 MiB at worst. Past it, records of
# clients not yet known are counted in `dropped`, not kept.
MAX_CLIENTS = 100_000
# Per-client caps: a scanner touching a new path per request must not grow its client
# without end; what is past the cap is counted (endpoints_more), not listed.
MAX_ENDPOINTS = 64
MAX_COUNTRIES = 16
MAX_SENSORS = 32
# Principals (salted hashes, sensor/l7/principal.py) listed per client address: a client
# host behind which many users sit (a proxy, a NAT) lists the first ones and counts the rest.
MAX_PRINCIPALS = 16
# Unusual volume: a minute with more than VOLUME_FACTOR times the client's average
# requests per active minute (after VOLUME_MIN_MINUTES such minutes) and at least
# VOLUME_FLOOR requests. A new client has no average, so it never fires on its first
# minutes: those are the new-client notice's.
VOLUME_FACTOR = 10
VOLUME_MIN_MINUTES = 5
VOLUME_FLOOR = 100
MINUTE_NS = 60 * 10**9


def endpoint_of(service: str, method: str, target: str) -> str:
    """'GET api.test:80 /users/{id}': the path by segment shape alone (no learning, so a
    client's list does not depend on what other clients sent)."""
    path, _ = templates.split_target(target)
    segs = templates.segments(path)[:templates.MAX_DEPTH]
    return f"{method} {service} /" + "/".join(templates.classify(s) or s for s in segs)


@dataclass(slots=True)
class Notice:
    kind: str            # new_client, new_country, unusual_volume
    address: str
    principal: str
    ts_ns: int
    detail: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "address": self.address, "principal": self.principal,
                "ts_ns": self.ts_ns, "detail": self.detail}


@dataclass(slots=True)
class Client:
    address: str
    principal: str = ""
    first_seen_ns: int = 0
    last_seen_ns: int = 0
    flows: int = 0
    octets_sent: int = 0
    octets_received: int = 0
    requests: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    endpoints: set[str] = field(default_factory=set)
    endpoints_more: int = 0          # requests to endpoints past MAX_ENDPOINTS
    country: str = ""
    city: str = ""
    asn: int = 0
    geo_ns: int = 0                  # time of the record the geo came from
    countries: set[str] = field(default_factory=set)
    sensors: set[str] = field(default_factory=set)
    principals: set[str] = field(default_factory=set)  # from its flows' http_principal
    principals_more: int = 0
    auth: set[str] = field(default_factory=set)        # credential kinds (http_auth)
    # unusual volume: the current minute and the average over past active minutes
    minute: int = 0
    minute_requests: int = 0
    minutes: int = 0
    minutes_requests: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return self.address, self.principal

    def seen(self, ts_ns: int, sensor: str) -> None:
        if not self.first_seen_ns or ts_ns < self.first_seen_ns:
            self.first_seen_ns = ts_ns
        self.last_seen_ns = max(self.last_seen_ns, ts_ns)
        if sensor and len(self.sensors) < MAX_SENSORS:
            self.sensors.add(sensor)

    def merge(self, o: "Client") -> None:
        for name in ("flows", "octets_sent", "octets_received", "requests", "errors_4xx",
                     "errors_5xx", "endpoints_more", "minutes", "minutes_requests",
                     "principals_more"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        if o.first_seen_ns and (not self.first_seen_ns or o.first_seen_ns < self.first_seen_ns):
            self.first_seen_ns = o.first_seen_ns
        self.last_seen_ns = max(self.last_seen_ns, o.last_seen_ns)
        for name, cap in (("endpoints", MAX_ENDPOINTS), ("countries", MAX_COUNTRIES),
                          ("sensors", MAX_SENSORS), ("principals", MAX_PRINCIPALS),
                          ("auth", 8)):
            mine = getattr(self, name)
            for v in sorted(getattr(o, name)):
                if v in mine or len(mine) < cap:
                    mine.add(v)
                elif name in ("endpoints", "principals"):
                    setattr(self, f"{name}_more", getattr(self, f"{name}_more") + 1)
        if o.geo_ns >= self.geo_ns and (o.country or o.asn):
            self.country, self.city, self.asn, self.geo_ns = o.country, o.city, o.asn, o.geo_ns
        if o.minute > self.minute:
            self.minute, self.minute_requests = o.minute, o.minute_requests
        elif o.minute == self.minute:
            self.minute_requests += o.minute_requests

    def to_dict(self) -> dict:
        span_s = max((self.last_seen_ns - self.first_seen_ns) / 1e9, 1.0)
        return {
            "address": self.address, "principal": self.principal,
            "first_seen_ns": self.first_seen_ns, "last_seen_ns": self.last_seen_ns,
            "flows": self.flows, "octets_sent": self.octets_sent,
            "octets_received": self.octets_received, "requests": self.requests,
            "errors_4xx": self.errors_4xx, "errors_5xx": self.errors_5xx,
            # over the client's active span (first to last seen, at least 1 s)
            "request_rate": round(self.requests / span_s, 6),
            "error_rate": round((self.errors_4xx + self.errors_5xx) / self.requests, 6)
            if self.requests else 0.0,
            "endpoints": sorted(self.endpoints), "endpoints_more": self.endpoints_more,
            "country": self.country, "city": self.city, "asn": self.asn,
            "geo_ns": self.geo_ns, "countries": sorted(self.countries),
            "sensors": sorted(self.sensors), "principals": sorted(self.principals),
            "principals_more": self.principals_more, "auth": sorted(self.auth),
            "minute": self.minute,
            "minute_requests": self.minute_requests, "minutes": self.minutes,
            "minutes_requests": self.minutes_requests,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Client":
        c = cls(d["address"], d.get("principal", ""))
        for name in ("first_seen_ns", "last_seen_ns", "flows", "octets_sent",
                     "octets_received", "requests", "errors_4xx", "errors_5xx",
                     "endpoints_more", "country", "city", "asn", "geo_ns", "minute",
                     "minute_requests", "minutes", "minutes_requests", "principals_more"):
            setattr(c, name, d.get(name, getattr(c, name)))
        c.endpoints = set(d.get("endpoints", ()))
        c.countries = set(d.get("countries", ()))
        c.sensors = set(d.get("sensors", ()))
        c.principals = set(d.get("principals", ()))
        c.auth = set(d.get("auth", ()))
        return c


def _sums(group: np.ndarray, values, n: int) -> list[int]:
    """Per group, the exact integer sum of its values (a float sum is exact below 2^53)."""
    values = np.asarray(values, np.int64)
    if not len(values):
        return [0] * n
    if int(values.max()) < 2**53 // len(values) and int(values.min()) >= 0:
        return np.bincount(group, weights=values, minlength=n).astype(np.int64).tolist()
    out = np.zeros(n, np.int64)
    np.add.at(out, group, values)
    return out.tolist()


def _enter_minute(c: Client, minute: int) -> bool:
    """Move c's volume count to `minute` (closing the minute before it); False for a late
    event of a past minute, which counts in requests but not in volume."""
    if minute > c.minute:
        if c.minute_requests:
            c.minutes += 1
            c.minutes_requests += c.minute_requests
        c.minute, c.minute_requests = minute, 0
    return minute >= c.minute


class Clients:
    """Every client; add_flow/add_request from one feeding thread, snapshot from others."""

    def __init__(self, *, max_clients: int = MAX_CLIENTS, max_notices: int = 1000) -> None:
        self._clients: dict[tuple[str, str], Client] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.max_clients = max_clients
        self.dropped = 0
        # Newest notices, for Observer.Clients; the store also keeps them in its file.
        self.notices: list[Notice] = []
        self.new_notices: list[Notice] = []
        self._max_notices = max_notices
        # Notices not yet made Alerts (collector/clients/alerts.py), at most max_notices *
        # 10; past it the oldest are dropped and counted.
        self._alerts: list[Notice] = []
        self.alerts_dropped = 0

    def __len__(self) -> int:
        return len(self._clients)

    def _notice(self, kind: str, c: Client, ts_ns: int, detail: str) -> None:
        n = Notice(kind, c.address, c.principal, ts_ns, detail)
        self.notices.append(n)
        self.new_notices.append(n)
        self._alerts.append(n)
        if len(self.notices) > self._max_notices:
            del self.notices[: len(self.notices) - self._max_notices]
        if len(self._alerts) > 10 * self._max_notices:
            self.alerts_dropped += 1
            del self._alerts[0]

    def _get(self, address: str, principal: str, ts_ns: int) -> Client | None:
        key = (address, principal)
        c = self._clients.get(key)
        if c is None:
            if len(self._clients) >= self.max_clients:
                self.dropped += 1
                return None
            c = self._clients[key] = Client(address, principal)
            self._notice("new_client", c, ts_ns, "first seen")
        self._dirty.add(key)
        return c

    def add_flow(self, *, address: str, principal: str = "", ts_ns: int, sensor: str,
                 final: bool, sent: int, received: int, country: str = "", city: str = "",
                 asn: int = 0, who: str = "", auth: tuple[str, ...] = ()) -> None:
        with self._lock:
            c = self._get(address, principal, ts_ns)
            if c is None:
                return
            c.seen(ts_ns, sensor)
            self._credentials(c, who, auth)
            c.flows += int(final)
            c.octets_sent += sent
            c.octets_received += received
            if country or asn:
                if ts_ns >= c.geo_ns:
                    c.country, c.city, c.asn, c.geo_ns = country, city, asn, ts_ns
                if country and country not in c.countries:
                    if c.countries:
                        self._notice("new_country", c, ts_ns,
                                     f"{country} (before: {','.join(sorted(c.countries))})")
                    if len(c.countries) < MAX_COUNTRIES:
                        c.countries.add(country)

    @staticmethod
    def _credentials(c: Client, who: str, auth) -> None:
        if who:
            if who in c.principals or len(c.principals) < MAX_PRINCIPALS:
                c.principals.add(who)
            else:
                c.principals_more += 1
        c.auth.update(auth[:8])

    def add_request(self, *, address: str, principal: str = "", ts_ns: int, sensor: str,
                    endpoint: str, status: int, who: str = "",
                    auth: tuple[str, ...] = ()) -> None:
        """who, auth: the request's own principal hash and credential kinds (HttpEvent
        .auth): every principal of a connection, where its flow names the first."""
        with self._lock:
            c = self._get(address, principal, ts_ns)
            if c is None:
                return
            c.seen(ts_ns, sensor)
            self._credentials(c, who, auth)
            c.requests += 1
            if 400 <= status <= 499:
                c.errors_4xx += 1
            elif 500 <= status <= 599:
                c.errors_5xx += 1
            if endpoint in c.endpoints or len(c.endpoints) < MAX_ENDPOINTS:
                c.endpoints.add(endpoint)
            else:
                c.endpoints_more += 1
            self._count_minute(c, ts_ns)

    def _count_minute(self, c: Client, ts_ns: int) -> None:
        if _enter_minute(c, ts_ns // MINUTE_NS):
            c.minute_requests += 1
        if c.minutes >= VOLUME_MIN_MINUTES:
            usual = c.minutes_requests / c.minutes
            limit = max(VOLUME_FLOOR, VOLUME_FACTOR * usual)
            # once per minute: at the request that crosses the limit
            if c.minute_requests == int(limit) + 1:
                self._notice("unusual_volume", c, ts_ns,
                             f"{c.minute_requests} requests this minute, usually "
                             f"{usual:.1f}")

    def add_rows(self, flows: dict, requests: dict) -> bool:
        """A batch's flows and requests at once, as add_flow and add_request record by
        record in this order (flows, then requests), with the Python work per client and
        per distinct value, not per record. Column lists, one item per record:
        flows: address, ts_ns, sensor, final, sent, received, who, auth, and geo: (row,
        country, city, asn) of the rows with a country or an ASN, in row order;
        requests: address, ts_ns, sensor, status, endpoint, who, auth.

        Order-dependent state is kept exact: capped sets take their values in order of
        first appearance (a value refused once stays refused: the set only grows), geo
        is the last of the newest records, the volume minutes are walked run by run and
        notices are made in record order. Three rare cases are left to the record path
        (False is returned, nothing changed): a zero timestamp, a batch that would fill
        the client budget, a client whose country set would fill."""
        nf = len(flows["address"])
        addr = flows["address"] + requests["address"]
        n = len(addr)
        if not n:
            return True
        ts = np.concatenate((np.asarray(flows["ts_ns"], np.int64),
                             np.asarray(requests["ts_ns"], np.int64)))
        if not ts.all():
            return False
        index = dict.fromkeys(addr)   # dict and map iterate in C: no Python frame per row
        for number, a in enumerate(index):
            index[a] = number
        cid = np.fromiter(map(index.__getitem__, addr), np.int64, n)
        names = list(index)
        first_row = np.nonzero(np.diff(np.maximum.accumulate(cid), prepend=-1))[0].tolist()
        geo = flows["geo"]
        new_countries: dict = {}     # (client, country) -> its first row, in row order
        for i, c, _, _ in geo:
            if c:
                new_countries.setdefault((int(cid[i]), c), i)
        with self._lock:
            have = [self._clients.get((a, "")) for a in names]
            unknown = sum(c is None for c in have)
            if unknown and len(self._clients) + unknown > self.max_clients:
                return False
            grow: dict = {}
            for (j, country) in new_countries:
                c = have[j]
                if c is None or country not in c.countries:
                    grow[j] = grow.get(j, 0) + 1
            for j, more in grow.items():
                if (len(have[j].countries) if have[j] else 0) + more > MAX_COUNTRIES:
                    return False
            self._apply(names, have, cid, ts, nf, first_row, geo, new_countries,
                        flows, requests)
        return True

    def _apply(self, names, have, cid, ts, nf, first_row, geo, new_countries, flows,
               requests) -> None:
        nc = len(names)
        notices: list = []    # (row, order within the row, kind, client, ts, detail)
        clients = have
        for j in [j for j, c in enumerate(have) if c is None]:
            c = clients[j] = self._clients[(names[j], "")] = Client(names[j], "")
            notices.append((first_row[j], 0, "new_client", c, int(ts[first_row[j]]),
                            "first seen"))
        self._dirty.update((a, "") for a in names)
        # first and last seen: each client's times in ascending order, clients in turn
        n_rows = np.bincount(cid, minlength=nc)
        by_time = np.lexsort((ts, cid))
        ends = np.cumsum(n_rows)
        lo, hi = ts[by_time[ends - n_rows]].tolist(), ts[by_time[ends - 1]].tolist()
        fc, rc = cid[:nf], cid[nf:]
        final = np.bincount(fc, weights=np.asarray(flows["final"], bool), minlength=nc)
        sent = _sums(fc, flows["sent"], nc)
        received = _sums(fc, flows["received"], nc)
        for c, a, b, f, s, r in zip(clients, lo, hi, final.astype(np.int64).tolist(), sent,
                                    received):
            if not c.first_seen_ns or a < c.first_seen_ns:
                c.first_seen_ns = a
            if b > c.last_seen_ns:
                c.last_seen_ns = b
            c.flows += f
            c.octets_sent += s
            c.octets_received += r
        if len(rc):
            status = np.asarray(requests["status"], np.int64)
            reqs = np.bincount(rc, minlength=nc)
            e4 = np.bincount(rc[(status >= 400) & (status <= 499)], minlength=nc)
            e5 = np.bincount(rc[(status >= 500) & (status <= 599)], minlength=nc)
            some = np.nonzero(reqs)[0]
            for j, q, x4, x5 in zip(some.tolist(), reqs[some].tolist(), e4[some].tolist(),
                                    e5[some].tolist()):
                c = clients[j]
                c.requests += q
                c.errors_4xx += x4
                c.errors_5xx += x5
        sensors = flows["sensor"] + requests["sensor"]
        for j, sensor in dict.fromkeys(zip(cid.tolist(), sensors)):
            c = clients[j]
            if sensor and len(c.sensors) < MAX_SENSORS:
                c.sensors.add(sensor)
        # Counter counts in C and keeps first-seen order
        whos = flows["who"] + requests["who"]
        who = Counter(zip(cid.tolist(), whos)) if any(whos) else {}
        for (j, w), count in who.items():
            if not w:
                continue
            c = clients[j]
            if w in c.principals or len(c.principals) < MAX_PRINCIPALS:
                c.principals.add(w)
            else:
                c.principals_more += count
        auths = flows["auth"] + requests["auth"]
        if any(auths):
            for j, auth in dict.fromkeys(zip(cid.tolist(), auths)):
                if auth:
                    clients[j].auth.update(auth[:8])
        # geo: the last of the records with the newest time, if not older than the client's
        newest: dict = {}
        for i, country, city, asn in geo:
            j, t = int(cid[i]), int(ts[i])
            if t >= newest.get(j, (-1,))[0]:
                newest[j] = (t, country, city, asn)
        for j, (t, country, city, asn) in newest.items():
            c = clients[j]
            if t >= c.geo_ns:
                c.country, c.city, c.asn, c.geo_ns = country, city, asn, t
        for (j, country), i in new_countries.items():
            c = clients[j]
            if country in c.countries:
                continue
            if c.countries:
                notices.append((i, 1, "new_country", c, int(ts[i]),
                                f"{country} (before: {','.join(sorted(c.countries))})"))
            c.countries.add(country)   # add_rows checked it stays within MAX_COUNTRIES
        endpoints = Counter(zip(rc.tolist(), requests["endpoint"]))
        for (j, endpoint), count in endpoints.items():
            c = clients[j]
            if endpoint in c.endpoints or len(c.endpoints) < MAX_ENDPOINTS:
                c.endpoints.add(endpoint)
            else:
                c.endpoints_more += count
        if len(rc):
            self._minutes(clients, rc, ts[nf:], nf, notices)
        notices.sort(key=lambda n: (n[0], n[1]))
        for _, _, kind, c, t, detail in notices:
            self._notice(kind, c, t, detail)

    def _minutes(self, clients, rc, ts, nf, notices) -> None:
        """_count_minute over each client's requests, a run of one minute at a time."""
        minute = ts // MINUTE_NS
        order = np.argsort(rc, kind="stable")
        c_sorted, m_sorted = rc[order], minute[order]
        starts = np.nonzero(np.diff(c_sorted, prepend=-1) | np.diff(m_sorted, prepend=-1))[0]
        lengths = np.diff(starts, append=len(order)).tolist()
        for start, length, j, m in zip(starts.tolist(), lengths, c_sorted[starts].tolist(),
                                       m_sorted[starts].tolist()):
            c = clients[j]
            if not _enter_minute(c, m):
                continue
            before = c.minute_requests
            c.minute_requests += length
            if c.minutes >= VOLUME_MIN_MINUTES:
                usual = c.minutes_requests / c.minutes
                crossing = int(max(VOLUME_FLOOR, VOLUME_FACTOR * usual)) + 1
                if before < crossing <= before + length:
                    row = int(order[start + crossing - before - 1])
                    notices.append((nf + row, 1, "unusual_volume", c, int(ts[row]),
                                    f"{crossing} requests this minute, usually {usual:.1f}"))

    def merge(self, clients) -> None:
        with self._lock:
            for c in clients:
                have = self._clients.get(c.key)
                if have is None:
                    self._clients[c.key] = c
                else:
                    have.merge(c)
                self._dirty.add(c.key)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [c.to_dict() for c in self._clients.values()]

    def take_alerts(self) -> list[Notice]:
        with self._lock:
            out, self._alerts = self._alerts, []
            return out

    def take_changes(self) -> tuple[list[dict], list[Notice]]:
        with self._lock:
            changed = [self._clients[k].to_dict() for k in self._dirty if k in self._clients]
            self._dirty.clear()
            notices, self.new_notices = self.new_notices, []
            return changed, notices
