"""The inventory's feed groups a batch's alike events into one Transaction with a count
(collector/inventory/store.py grouped_transactions). Fed that way, the inventory must read
exactly as fed event by event: same endpoints, templates, counts, times, sets and PII, on
real decoded tables (columnar batches through the collector's decoder), including a
position made a parameter for good mid-batch and the endpoint cap."""

from __future__ import annotations

import dataclasses
import random

from collector.ingest import decode_message
from collector.inventory import templates
from collector.inventory.model import Inventory
from collector.inventory.store import _transactions, grouped_transactions, http_tables
from sensor import model
from sensor.export import columnar

BASE = 1_700_000_000_000_000_000
_CREDS = ((), (model.HttpCredential(kind="bearer", principal="p:0123456789abcdef"),),
          (model.HttpCredential(kind="basic", principal="p:fedcba9876543210"),))


def _event(rng: random.Random, i: int) -> model.L7Event:
    users = templates.MAX_VALUES * 3   # more than a position keeps: promoted mid-batch
    path = rng.choice([
        "/index.html", "/api/v1/items?page=2&sort=name", "/api/v1/items/%d" % rng.randrange(50),
        "/users/u%dx" % rng.randrange(users), "/users/u%dx/orders" % rng.randrange(users),
        "/users/u%dx" % rng.randrange(users), "/users/u%dx/orders" % rng.randrange(users),
        "/static/app.js", "/pkg.Svc/Get",
    ])
    grpc = path.startswith("/pkg.")
    return model.L7Event(
        uid=f"H{i}", ts_ns=BASE + rng.randrange(10**9), src_addr="198.18.0.5",
        dst_addr=rng.choice(["198.19.0.80", "fc00::80"]), src_port=50000, dst_port=80,
        protocol=6, sensor_id=rng.choice(["", "s2", "s3"]),
        detail=model.HttpEvent(
            method=rng.choice(["GET", "GET", "POST", ""]),
            host=rng.choice(["www.example.test", "API.example.test:8080", ""]),
            path=path, version="1.1", status=rng.choice([200, 200, 201, 404, 503, 0]),
            request_content_type="application/grpc" if grpc else rng.choice(
                ["", "application/json; charset=utf-8", "text/plain"]),
            response_content_type=rng.choice(["", "application/json", "text/html"]),
            pii=rng.choice([{}, {}, {"email.response": 2}, {"card.request": 1,
                                                           "email.response": 1}]),
            auth=rng.choice(_CREDS)))


def _tables(seed: int, batches: int = 3, size: int = 600, alike: int = 0) -> list[list]:
    """HTTP tables of `batches` decoded batches; alike: events drawn from that many
    distinct ones (their times apart), as real traffic repeats its endpoints."""
    rng = random.Random(seed)
    pool = [_event(rng, i) for i in range(alike)]
    out = []
    for b in range(batches):
        records = [dataclasses.replace(rng.choice(pool), uid=f"R{b}-{i}",
                                       ts_ns=BASE + rng.randrange(10**9)) if pool
                   else _event(rng, b * size + i) for i in range(size)]
        raw = columnar.encode(records, sensor_id="s1", batch_id=b + 1,
                              created_ns=1).SerializeToString()
        out.append(http_tables(decode_message(raw, None).unpack()))
    return out


def _fed(tables: list[list], feed, **kw) -> tuple[list[dict], int, int]:
    inv = Inventory(**kw)
    for batch in tables:
        inv.add_many(feed(batch))
    return inv.snapshot(), inv.dropped, inv.learner.generation


def test_grouped_feed_reads_as_the_per_event_feed():
    for seed, alike in ((1, 0), (2, 0), (3, 40), (4, 40)):
        tables = _tables(seed, alike=alike)
        events = sum(t.num_rows for batch in tables for t in batch)
        grouped = sum(1 for batch in tables for _ in grouped_transactions(batch))
        assert grouped < events   # it does group
        per_event, _, promoted = _fed(tables, _transactions)
        assert promoted or alike   # a position became a parameter for good on the way
        assert _fed(tables, grouped_transactions)[0] == per_event
        assert sum(d["requests"] for d in per_event) == sum(
            1 for batch in tables for _ in _transactions(batch))


def test_grouped_feed_counts_the_same_drops_at_the_endpoint_cap():
    tables = _tables(4, batches=1)
    per_event = _fed(tables, _transactions, max_endpoints=5)
    assert per_event[1] > 0
    assert _fed(tables, grouped_transactions, max_endpoints=5) == per_event
