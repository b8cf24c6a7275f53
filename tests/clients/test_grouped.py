"""The clients fed per client (store._feed -> Clients.add_rows, what the collector runs)
hold exactly what the record-by-record path (store._feed_records) holds: every client's
fields, the notices in their order, the changed set and the counts. The batches are real
(the sensor's encoders, the collector's decoders, columnar and rows alike) and reach the
order-dependent parts: capped endpoint and principal sets, geo of the newest record,
new countries, a client whose usual volume is exceeded mid-batch, late requests, interim
flows, and the cases add_rows leaves to the record path (a full client budget, a country
set that fills)."""

from __future__ import annotations

import random

import pytest

from collector.clients import model as cm
from collector.clients.model import Clients
from collector.clients.store import _feed, _feed_records
from collector.inventory.store import http_tables
from sensor import model
from tests.stats.test_grouped import T0, batches, flow, golden, traffic

MIN = 60 * 10**9


def _busy(seed: int) -> list:
    """12 minutes of steady requests from 20 clients, then one client's burst; one client
    touches 100 endpoints with 30 principals, one moves between 20 countries."""
    rng = random.Random(seed)
    paths = [f"/{''.join(rng.choice('qrstuvwxyz') for _ in range(6))}" for _ in range(100)]
    out: list = []
    for i in range(2400):
        minute = i // 200
        ts = T0 + minute * MIN + (i % 200) * 10**8 - (2 * MIN if i % 151 == 0 else 0)
        client = f"198.18.1.{1 + i % 20}"
        path = f"/api/{rng.choice('abcdefgh')}{rng.choice('ijklmnop')}/{i}"
        auth = ()
        if client == "198.18.1.3":
            path = paths[rng.randrange(100)]
            auth = (model.HttpCredential(kind="bearer", principal=f"p:{rng.randrange(30):016x}"),)
        out.append(_request(i, ts, client, path, rng, auth))
        if i % 5 == 0:
            f = flow(i, ts, client, rng)
            if client == "198.18.1.6":
                f = model.Flow(**{**_fields(f), "src_country": f"C{i // 20 % 20}"})
                # a second record of the same time: the later one's geo is kept
                out.append(model.Flow(**{**_fields(f), "uid": f"G{i}", "src_city": "Later"}))
            out.append(f)
    burst = T0 + 12 * MIN
    out += [_request(10_000 + k, burst + k * 10**8, "198.18.1.5", "/api/x", rng, ())
            for k in range(250)]
    return out


def _fields(f) -> dict:
    return {k: getattr(f, k) for k in f.__dataclass_fields__}


def _request(i, ts, client, path, rng, auth) -> model.L7Event:
    return model.L7Event(
        uid=f"R{i}", sensor_id=f"s{i % 2}", ts_ns=ts, src_addr=client, dst_addr="198.19.0.8",
        src_port=30000 + i % 1000, dst_port=8080, protocol=6,
        detail=model.HttpEvent(method=rng.choice(("GET", "POST", "")), host="svc.test",
                               path=path, status=rng.choice((200, 200, 404, 502)),
                               latency_ns=1_000_000, auth=auth))


def _clients(bs, feed, **kw) -> Clients:
    clients = Clients(**kw)
    for b in bs:
        flows = b.tables.get("flows")
        feed(clients, ([flows] if flows is not None else []) + http_tables(b))
    return clients


def _same(a: Clients, b: Clients) -> None:
    assert a.snapshot() == b.snapshot()
    assert [n.to_dict() for n in a.notices] == [n.to_dict() for n in b.notices]
    assert [n.to_dict() for n in a._alerts] == [n.to_dict() for n in b._alerts]
    assert (a._dirty, a.dropped, a.alerts_dropped) == (b._dirty, b.dropped, b.alerts_dropped)


@pytest.mark.parametrize("size", [9, 400])
def test_grouped_clients_equal_the_record_path(size, monkeypatch):
    monkeypatch.setattr(cm, "MAX_COUNTRIES", 32)   # the mover's countries all fit
    bs = batches(golden() + traffic(3, 600) + _busy(4), size)
    a, b = _clients(bs, _feed_records), _clients(bs, _feed)
    _same(a, b)
    kinds = {n.kind for n in a.notices}
    assert kinds == {"new_client", "new_country", "unusual_volume"}
    busy = {d["address"]: d for d in a.snapshot()}
    assert busy["198.18.1.3"]["endpoints_more"] and busy["198.18.1.3"]["principals_more"]


def test_the_rare_cases_take_the_record_path():
    bs = batches(_busy(5), 300)
    # the client budget fills mid-batch; a country set fills (MAX_COUNTRIES = 16)
    for kw in ({"max_clients": 12}, {}):
        a, b = _clients(bs, _feed_records, **kw), _clients(bs, _feed, **kw)
        _same(a, b)
    assert a.snapshot() and len(next(d for d in a.snapshot()
                                      if d["address"] == "198.18.1.6")["countries"]) == 16


def test_add_rows_leaves_a_full_budget_to_the_record_path():
    clients = Clients(max_clients=1)
    rows = {"address": ["198.18.0.1", "198.18.0.2"], "ts_ns": [T0, T0], "sensor": ["s", "s"],
            "final": [True, True], "sent": [1, 2], "received": [3, 4], "geo": [],
            "who": ["", ""], "auth": [(), ()]}
    none = {k: [] for k in ("address", "ts_ns", "sensor", "status", "endpoint", "who", "auth")}
    assert not clients.add_rows(rows, none)
    assert len(clients) == 0 and not clients.notices
    assert Clients().add_rows(rows, none)
