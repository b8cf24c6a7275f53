"""The inventory in a real collector: fed by Ingest, answered by Observer.Endpoints and
`loupe endpoints`, merged across sensors, kept across a restart; and its facts, spec and
diff on known input."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

from openapi_spec_validator import validate

from collector.inventory import openapi
from collector.inventory.model import Endpoint, Inventory, Transaction, body_fields, service_of
from sensor.export import wire
from tests.collector.conftest import BASE_NS, batch, http, observer_stub, push

LOUPE = str(Path(sys.executable).with_name("loupe"))
USERS = [f"user{c}{c}{c}x" for c in "abcdefghijklmnopqrst"]   # 20 names: a parameter


def endpoints(address: str, **kw) -> list:
    req = wire.observer_pb2.EndpointsRequest(**kw)
    return list(observer_stub(address).Endpoints(req, timeout=30).endpoints)


def _traffic(start: int, users) -> list:
    out = []
    for i, name in enumerate(users):
        out.append(http(start + i, path=f"/users/{name}?page=2", host="api.example.test"))
        out.append(http(start + 100 + i, path=f"/orders/{i}", method="POST", status=201,
                        host="api.example.test"))
    return out


def test_sensors_merge_duplicates_do_not_count_and_a_restart_keeps_it(start_collector):
    first = start_collector()
    acks = push(first.address, [batch(_traffic(0, USERS[:10]), 1, sensor_id="s1"),
                                batch(_traffic(200, USERS[10:]), 1, sensor_id="s2")])
    assert [a.status for a in acks] == [wire.ingest_pb2.ACK_STATUS_STORED] * 2
    # The same batch again is acked DUPLICATE and must not count twice.
    push(first.address, [batch(_traffic(0, USERS[:10]), 1, sensor_id="s1")])
    before = {(e.method, e.path_template): e for e in endpoints(first.address)}
    assert set(before) == {("GET", "/users/{name}"), ("POST", "/orders/{id}")}
    users = before[("GET", "/users/{name}")]
    assert users.requests == 20 and list(users.sensors) == ["s1", "s2"]
    assert users.service == "api.example.test:80" and list(users.query_params) == ["page"]
    assert users.first_seen_ns == BASE_NS and users.last_seen_ns == BASE_NS + 209 * 1000
    assert dict(before[("POST", "/orders/{id}")].status_classes) == {"2xx": 20}
    assert [e.path_template for e in endpoints(first.address, sensor_id=["s2"], method=["POST"])
            ] == ["/orders/{id}"]
    first.stop()

    second = start_collector()
    after = {(e.method, e.path_template): e for e in endpoints(second.address)}
    assert after == before
    # And it goes on learning from where it was.
    push(second.address, [batch(_traffic(400, ["zed0000x"]), 1, sensor_id="s3")])
    users = {(e.method, e.path_template): e for e in endpoints(second.address)}[
        ("GET", "/users/{name}")]
    assert users.requests == 21 and list(users.sensors) == ["s1", "s2", "s3"]


def test_loupe_endpoints_formats(collector):
    push(collector.address, [batch(_traffic(0, USERS), 1)])
    run = lambda *a: subprocess.run(  # noqa: E731
        [LOUPE, "endpoints", "--collector", collector.address, *a], capture_output=True,
        text=True, timeout=60)
    rows = list(csv.DictReader(io.StringIO(run("--format", "csv").stdout)))
    assert [(r["method"], r["path_template"], r["requests"]) for r in rows] == [
        ("POST", "/orders/{id}", "20"), ("GET", "/users/{name}", "20")]
    table = run("--format", "table", "--http-path", "/users/*").stdout.splitlines()
    assert table[0].split()[:3] == ["service", "method", "path_template"]
    assert table[2].split()[:4] == ["api.example.test:80", "GET", "/users/{name}", "20"]
    picked = [json.loads(x) for x in run("-o", "json", "--fields", "method,requests").stdout.splitlines()]
    assert picked == [{"method": "POST", "requests": 20}, {"method": "GET", "requests": 20}]
    bad = run("--collector", "127.0.0.1:1", "--timeout", "2")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


def test_body_fields_and_auth_reach_the_spec():
    inv = Inventory()
    body = json.dumps({"name": "a", "age": 3, "tags": ["x"], "address": {"city": "c"},
                       "items": [{"sku": "k", "qty": 1}]})
    for i in range(3):
        inv.add(Transaction(service="shop:443", method="POST", target=f"/carts/{i}/items",
                            ts_ns=i, status=201, request_content_type="application/json",
                            response_content_type="application/json; charset=utf-8",
                            auth=("bearer", "bogus"), request_fields=body_fields(body),
                            response_fields={"id": "integer"}))
    (ep,) = inv.endpoints()
    d = ep.to_dict()
    assert d["request_fields"] == {"address": ["object"], "address.city": ["string"],
                                   "age": ["integer"], "items": ["array"],
                                   "items[].qty": ["integer"], "items[].sku": ["string"],
                                   "name": ["string"], "tags": ["array"]}
    assert d["auth"] == ["bearer"] and d["response_content_types"] == ["application/json"]
    assert Endpoint.from_dict(json.loads(json.dumps(d))).to_dict() == d
    doc = openapi.spec([d])
    validate(doc)
    op = doc["paths"]["/carts/{id}/items"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["items"]["items"]["properties"]["qty"] == {"type": "integer"}
    assert schema["properties"]["address"]["properties"]["city"] == {"type": "string"}
    assert op["security"] == [{"bearerAuth": []}]
    assert op["parameters"][0] == {"name": "id", "in": "path", "required": True,
                                   "schema": {"type": "integer"}}


def _ep(method, template, query=(), fields=None):
    ep = Endpoint("api:80", method, tuple(template), requests=5, first_seen_ns=1,
                  last_seen_ns=2, query_params=set(query))
    ep.status_classes = {"2xx": 5}
    ep.request_fields = fields or {}
    return ep.to_dict()


def test_diff_finds_shadow_zombie_unused_and_drift():
    given = {"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "paths": {
        "/users/{userId}": {"get": {"parameters": [
            {"name": "userId", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "page", "in": "query", "schema": {"type": "integer"}}]}},
        "/v1/orders": {"post": {"deprecated": True, "requestBody": {"content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}}}},
        "/health": {"get": {}},
    }, "components": {"schemas": {"Order": {"type": "object",
                                            "properties": {"sku": {"type": "string"}}}}}}
    seen = [_ep("GET", ["users", "{name}"], query=["page", "debug"]),
            _ep("POST", ["v1", "orders"], fields={"sku": ["string"], "coupon": ["string"]}),
            _ep("DELETE", ["users", "{name}"])]
    found = {(f["kind"], f["method"], f["path"]): f["detail"] for f in openapi.diff(given, seen)}
    assert set(found) == {
        ("drift", "GET", "/users/{name}"), ("zombie", "POST", "/v1/orders"),
        ("drift", "POST", "/v1/orders"), ("shadow", "DELETE", "/users/{name}"),
        ("unused", "GET", "/health")}
    assert found[("drift", "GET", "/users/{name}")].endswith(": debug")
    assert found[("drift", "POST", "/v1/orders")].endswith(": coupon")


def test_service_names():
    assert service_of("API.example.test:8443", "198.18.0.2", 443) == "api.example.test:443"
    assert service_of("", "fc00::2", 80) == "[fc00::2]:80"
    assert service_of("[fc00::2]:80", "fc00::2", 80) == "[fc00::2]:80"


def test_http2_and_grpc_streams_join_the_inventory(collector):
    from sensor import model
    from sensor.l7.http2 import Http2Event

    def h2(i, path, ctype="", host="grpc.example.test:50051"):
        return model.L7Event(
            uid=f"G{i}", ts_ns=BASE_NS + i, src_addr="198.18.0.5", dst_addr="198.19.0.9",
            src_port=40000 + i, dst_port=50051, protocol=6,
            detail=Http2Event(stream_id=1 + 2 * i, method="POST" if ctype else "GET",
                              host=host, path=path, status=200,
                              request_content_type=ctype, response_content_type=ctype))

    # 15 methods of one gRPC service: more than THRESHOLD, each seen once, and still
    # 15 endpoints (a gRPC path names a method, never a value).
    records = [h2(i, f"/shop.Catalog/Method{chr(65 + i)}", "application/grpc")
               for i in range(15)]
    records += [h2(100 + i, f"/files/{name}") for i, name in enumerate(USERS)]
    push(collector.address, [batch(records, 1)])
    got = sorted((e.method, e.path_template) for e in endpoints(collector.address))
    assert got == sorted([("POST", f"/shop.Catalog/Method{chr(65 + i)}") for i in range(15)]
                         + [("GET", "/files/{name}")])
    assert {e.service for e in endpoints(collector.address)} == {"grpc.example.test:50051"}


def test_merging_inventories_past_max_values_replaces_every_merged_row():
    # Two collectors' 75 file names each: together past MAX_VALUES (100), so the
    # position becomes {name} for good and every one of the 150 stored rows must go
    # (a row left behind would be counted again at the next start).
    inv = Inventory()
    rows = [Endpoint("s:80", "GET", ("files", f"doc{c}{i}x"), requests=1, first_seen_ns=i,
                     last_seen_ns=i) for c in "ab" for i in range(75)]
    keys = {ep.key for ep in rows}
    inv.merge(rows)
    changed, removed = inv.take_changes()
    assert set(removed) == keys
    assert [(d["template"], d["requests"]) for d in changed] == [(["files", "{name}"], 150)]


def test_a_full_queue_drops_and_counts_and_never_blocks_the_writer(tmp_path, monkeypatch):
    from collector.inventory import store
    from collector.ingest import decode_batch

    monkeypatch.setattr(store, "QUEUE_BATCHES", 2)
    inv = store.InventoryStore(tmp_path)
    decoded = decode_batch(batch([http(i, path=f"/p{i % 3}") for i in range(10)], 1))
    with inv.inventory._lock:          # the inventory's thread will be stuck on a batch
        inv.on_stored(decoded)
        for _ in range(100):           # bounded: until the thread took it (~at once)
            if inv._queue.qsize() == 0:
                break
            time.sleep(0.01)
        for _ in range(5):
            inv.on_stored(decoded)     # returns at once, full queue or not
        # One batch taken by the thread, two queued, three dropped.
        assert inv.dropped == 30
    assert sum(d["requests"] for d in inv.snapshot()) == 30
    inv.close()
    again = store.InventoryStore(tmp_path)
    assert sum(d["requests"] for d in again.snapshot()) == 30
    again.close()
