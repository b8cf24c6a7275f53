"""[api] spec in a real collector: a pcap built with scapy is replayed into it (DuckDB and
sqlite files in tmp_path); the inventory's findings against a reference OpenAPI document
become Alerts, read back with `loupe tail`, from the DuckDB file and as the console
lists them, and are not raised again by a second check, nor after a restart
(collector/inventory/api_alerts.py, Collector.check_api)."""

from __future__ import annotations

import contextlib
import io
import json

import duckdb
import yaml

from collector.ui import data
from sensor import cli
from sensor.config import ApiConfig
from tests.collector.conftest import start_collector  # noqa: F401 - fixture
from tests.fixtures.gen_golden import _tcp_conversation
from tests.inventory.test_api_alerts import SPEC, T0


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: shop.test\r\n\r\n".encode()


def _capture(path) -> None:
    from scapy.utils import wrpcap

    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    steps = []
    for target in ("/items/1?page=2&debug=1", "/items/2", "/items/3", "/old", "/cart"):
        steps += [(True, _get(target)), (False, ok)]
    wrpcap(str(path), _tcp_conversation("198.18.0.10", "198.18.0.20", 42000, 80, steps, t0=T0))


def _tail(address: str) -> list[dict]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["tail", "--collector", address, "--format", "json",
                         "--alert-rule", "loupe-api-*"]) == 0
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_new_findings_become_alerts_once_and_survive_a_restart(tmp_path, start_collector):  # noqa: F811
    cap, spec, store = tmp_path / "shop.pcap", tmp_path / "openapi.yaml", tmp_path / "data"
    _capture(cap)
    spec.write_text(yaml.safe_dump(SPEC))
    api = ApiConfig(spec=str(spec), services=("shop.test:*",), unused_after=0)
    col = start_collector(data_dir=store, api=api)
    assert cli.main(["replay", "--no-progress", str(cap), "--collector", col.address]) == 0
    assert col.call(col.collector.check_api()) == 4

    alerts = _tail(col.address)
    found = sorted((a["rule_id"], a["excerpt"]) for a in alerts)
    assert found == [
        ("loupe-api-drift", "GET shop.test:80 /items/{id}: query parameters not in the spec: debug"),
        ("loupe-api-shadow", "GET shop.test:80 /cart: seen, not in the spec"),
        ("loupe-api-unused", "GET /health: in the spec, never seen"),
        ("loupe-api-zombie", "GET shop.test:80 /old: deprecated in the spec as GET /old, "
                             "still called (1 requests)")]
    assert {(a["sensor_id"], a["category"], a["action"], a["field"]) for a in alerts} == {
        ("collector", "api", "alert", "endpoint")}
    assert {a["dst_port"] for a in alerts} == {80, 0}   # the spec's unused op has no service
    # The console's alerts page reads the same rows, with what was found.
    page = data.alerts(col.collector, "loupe-api-shadow")
    assert [a["excerpt"] for a in page["alerts"]] == ["GET shop.test:80 /cart: seen, not in the spec"]
    # Findings that still hold are not alerted again, and the zombie's growing request
    # count does not make it a new one.
    assert cli.main(["replay", "--no-progress", str(cap), "--collector", col.address,
                     "--sensor-id", "again"]) == 0
    assert col.call(col.collector.check_api()) == 0
    col.stop()

    col = start_collector(data_dir=store, api=api)
    assert col.call(col.collector.check_api()) == 0
    # The spec now lists /cart: that finding stops holding and is forgotten...
    doc = {**SPEC, "paths": {**SPEC["paths"], "/cart": {"get": {}}}}
    spec.write_text(yaml.safe_dump(doc))
    assert col.call(col.collector.check_api()) == 0
    assert col.collector.api_watch.alerted == 3
    # ... and alerts again when it comes back.
    spec.write_text(yaml.safe_dump(SPEC))
    assert col.call(col.collector.check_api()) == 1
    assert len(_tail(col.address)) == 5
    col.stop()
    with duckdb.connect(str(store / "loupe.duckdb"), read_only=True) as db:
        rows = db.execute("SELECT rule_id, count(*) FROM alerts WHERE sensor_id = 'collector' "
                          "GROUP BY rule_id ORDER BY rule_id").fetchall()
    assert rows == [("loupe-api-drift", 1), ("loupe-api-shadow", 2), ("loupe-api-unused", 1),
                    ("loupe-api-zombie", 1)]
