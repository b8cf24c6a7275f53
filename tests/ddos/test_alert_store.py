"""A DDoS Alert (rate, top_sources, mitigation, window_ns, baseline: Alert fields 22-26)
through JSON lines, EVE and a real collector: stored in the alerts table, read back by SQL
and by `loupe tail --type alert`."""

from __future__ import annotations

import json
from dataclasses import replace

from sensor.export import formats, jsonfmt, wire
from sensor.model import Alert
from sensor.rules import ddos
from tests.collector.conftest import (  # noqa: F401  (fixtures)
    BASE_NS, batch, collector, push, query, start_collector,
)
from tests.collector.test_tail_cli import loupe, records


def flood_alert() -> Alert:
    return Alert(rule_id=ddos.RULE_HTTP, action="block", field="rate",
                 excerpt="612 req/s toward 198.18.0.2:80 (threshold 50, baseline learning)",
                 reason="http-flood: 3 source(s) at 600 req/s", severity="high",
                 category="http-flood", ts_ns=BASE_NS, event_kind="http",
                 src_addr="198.18.0.11", dst_addr="198.18.0.2", dst_port=80, count=3060,
                 enforced=True, block_expires_ns=BASE_NS + 300 * 10**9, rate=600,
                 top_sources="198.18.0.11 198.18.0.12 198.18.0.13", mitigation="block",
                 window_ns=5 * 10**9, baseline=0)


def test_ddos_fields_in_json_and_eve():
    a = flood_alert()
    assert jsonfmt.from_dict(json.loads(formats.json_line(a))) == a
    assert wire.from_proto(wire.to_proto(a)) == a
    meta = formats.eve(a)["alert"]["metadata"]
    assert meta["rate"] == [600] and meta["mitigation"] == ["block"]
    assert meta["top_sources"] == ["198.18.0.11", "198.18.0.12", "198.18.0.13"]


def test_collector_stores_and_tails_ddos_alerts(collector, capsys):
    push(collector.address, [batch([flood_alert()], 1)])
    rows = query(collector.address, "SELECT rule_id, rate, top_sources, mitigation, "
                 "window_ns, baseline FROM alerts")
    assert rows == [(ddos.RULE_HTTP, 600, "198.18.0.11 198.18.0.12 198.18.0.13", "block",
                     5 * 10**9, 0)]
    code, out, err = loupe(capsys, "tail", "--collector", collector.address, "--type",
                           "alert", "--format", "json")
    assert code == 0, err
    # The collector stamps the batch's sensor id.
    assert [replace(r, sensor_id="") for r in records(out)] == [flood_alert()]
