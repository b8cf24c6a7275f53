"""The inventory against a reference OpenAPI document, as the collector's [api] spec
check does it (collector/inventory/api_alerts.py): which findings are new, what is kept
across restarts, when an unused operation counts, a spec edit that does not parse. The
endpoints come from a real Inventory fed transactions; the state is a real sqlite file.
The check in a real collector: test_api_alerts_live.py."""

from __future__ import annotations

import json

import pytest

from collector.inventory import api_alerts
from collector.inventory.model import Inventory, Transaction
from sensor.errors import ConfigError

T0 = 1_700_000_000
SPEC = {
    "openapi": "3.1.0", "info": {"title": "shop", "version": "1"},
    "paths": {
        "/items/{itemId}": {"get": {"parameters": [
            {"name": "itemId", "in": "path", "required": True, "schema": {"type": "integer"}},
            {"name": "page", "in": "query", "schema": {"type": "integer"}}]}},
        "/old": {"get": {"deprecated": True}},
        "/health": {"get": {}},
    },
}


def _endpoints(targets: list[tuple[str, str]]) -> list[dict]:
    inv = Inventory()
    inv.add_many(Transaction(service="api.test:443", method=m, target=t, ts_ns=T0 * 10**9 + i,
                             status=200, request_content_type="", response_content_type="",
                             sensor_id="s") for i, (m, t) in enumerate(targets))
    return inv.snapshot()


def test_unused_waits_for_unused_after_and_a_bad_spec_edit_keeps_the_last(tmp_path):
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(SPEC))
    now = [1_000 * 10**9]
    hour = 3600 * 10**9

    def watch():
        return api_alerts.ApiWatch(spec, tmp_path / "state", kinds=("unused", "shadow"),
                                   unused_after_ns=hour, clock=lambda: now[0])

    w = watch()
    eps = _endpoints([("GET", "/items/7"), ("GET", "/old")])
    check = w.check(eps)
    assert (check.new, check.waiting_unused) == ([], 1)   # /health: watched 0 s so far
    w.commit(check)
    w.close()
    now[0] += hour
    w = watch()   # the time each operation has been watched is kept across restarts
    check = w.check(eps)
    assert [(f.kind, f.path) for f in check.new] == [("unused", "/health")]
    w.commit(check)
    spec.write_text("paths: [unclosed")
    check = w.check(eps + _endpoints([("POST", "/items/7")]))
    assert [(f.kind, f.method, f.path) for f in check.new] == [("shadow", "POST", "/items/{id}")]
    w.close()
    spec.write_text("not: openapi")
    with pytest.raises(ConfigError, match="not an OpenAPI document"):
        watch()


def test_a_finding_as_an_alert_and_its_identity():
    f = api_alerts.Finding("shadow", "[fc00::2]:8080", "GET", "/x/{id}", "seen, not in the spec")
    a = api_alerts.alert_of(f, 5)
    assert (a.rule_id, a.action, a.severity, a.category, a.sensor_id, a.field) == (
        "loupe-api-shadow", "alert", "medium", "api", "collector", "endpoint")
    assert (a.dst_addr, a.dst_port, a.ts_ns) == ("fc00::2", 8080, 5)
    assert a.excerpt == "GET [fc00::2]:8080 /x/{id}: seen, not in the spec"
    named = api_alerts.alert_of(api_alerts.Finding("drift", "api.test:443", "POST", "/" + "a" * 400,
                                                   "query parameters not in the spec: q"), 5)
    assert (named.dst_addr, named.dst_port, len(named.excerpt)) == ("", 443, 256)
    # A zombie's request count is not part of it; what drifted is.
    zombie = [api_alerts.Finding("zombie", "s:80", "GET", "/old", f"still called ({n} requests)")
              for n in (1, 2)]
    assert zombie[0].key == zombie[1].key
    drift = [api_alerts.Finding("drift", "s:80", "GET", "/a", f"query parameters not in the spec: {q}")
             for q in ("debug", "debug, trace")]
    assert drift[0].key != drift[1].key
