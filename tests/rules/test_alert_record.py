"""The Alert record kind end to end: model checks, protobuf, JSON lines, EVE, the table,
and a real collector (ingest, the alerts table, SQL, `loupe tail --type alert`,
--alert-rule, --alert-action)."""

from __future__ import annotations

import io
import json

import pytest

from collector import filters
from sensor import model
from sensor.export import formats, jsonfmt, table, wire
from loupe.v1 import ingest_pb2
from tests.collector.conftest import (  # noqa: F401  (fixtures)
    BASE_NS, batch, collector, http, push, query, start_collector,
)
from tests.collector.test_tail_cli import loupe, records


def alert(i: int, rule: str = "loupe-sqli", action: str = "alert", **kw) -> model.Alert:
    fields = dict(rule_id=rule, action=action, field="arg:id", excerpt="1' or '1'='1",
                  reason="string boolean", severity="high", category="sql-injection",
                  community_id="1:abc=", uid=f"H{i}", ts_ns=BASE_NS + i * 1000,
                  event_kind="http", src_addr="198.18.0.1", dst_addr="198.18.0.2",
                  src_port=40000 + i, dst_port=80)
    fields.update(kw)
    return model.Alert(**fields)


def test_model_refuses_bad_alerts():
    with pytest.raises(ValueError, match="action"):
        alert(1, action="drop")
    with pytest.raises(ValueError, match="severity"):
        alert(1, severity="urgent")
    with pytest.raises(ValueError, match="excerpt"):
        alert(1, excerpt="x" * (model.MAX_EXCERPT + 1))
    with pytest.raises(ValueError, match="rule_id"):
        alert(1, rule="")
    assert model.record_kind(alert(1)) == "alert"


def test_wire_json_eve_and_table_shapes():
    a = alert(1, action="block", count=12)
    assert wire.from_proto(wire.to_proto(a)) == a
    assert jsonfmt.from_dict(json.loads(formats.json_line(a))) == a
    eve = formats.eve(a)
    assert eve["event_type"] == "alert"
    assert eve["alert"]["signature_id"] == "loupe-sqli"
    assert eve["alert"]["action"] == "blocked"      # Suricata's word for a drop
    assert eve["alert"]["severity"] == 1
    assert eve["alert"]["metadata"]["excerpt"] == ["1' or '1'='1"]
    assert eve["community_id"] == "1:abc=" and eve["src_ip"] == "198.18.0.1"
    out = io.StringIO()
    w = table.TableWriter(out, color=False)
    w.write(a)
    w.flush()
    line = out.getvalue()
    assert "alert" in line and "BLOCK" in line and "loupe-sqli" in line and "count=12" in line


def test_filters_on_alerts():
    rec = wire.to_proto(alert(1, rule="login-failures-source", action="alert"))
    assert filters.build_alert_rule(["login-*"])(rec)
    assert not filters.build_alert_rule(["loupe-*"])(rec)
    assert filters.build_alert_action(["alert"])(rec)
    assert not filters.build_alert_action(["block"])(rec)
    assert filters.build_record_kind(["alert"])(rec)
    assert filters.build_source_ip(["198.18.0.0/16"])(rec)
    assert not filters.build_protocol([6])(rec)   # an alert carries no IP protocol
    with pytest.raises(filters.FilterError):
        filters.build_alert_action(["drop"])


def test_collector_stores_and_tails_alerts(collector, capsys):
    recs = [http(1), alert(1), alert(2, rule="xss-1", action="block", category="cross-site-scripting")]
    push(collector.address, [batch(recs, 1)])
    rows = query(collector.address, "SELECT rule_id, action, excerpt FROM alerts ORDER BY ts_ns")
    assert rows == [("loupe-sqli", "alert", "1' or '1'='1"), ("xss-1", "block", "1' or '1'='1")]
    code, out, err = loupe(capsys, "tail", "--collector", collector.address, "--type",
                           "alert", "--format", "json")
    assert code == 0, err
    assert [r.rule_id for r in records(out)] == ["loupe-sqli", "xss-1"]
    code, out, err = loupe(capsys, "tail", "--collector", collector.address,
                           "--alert-action", "block", "--format", "json")
    assert code == 0, err
    assert [(r.rule_id, r.action) for r in records(out)] == [("xss-1", "block")]
    code, out, err = loupe(capsys, "tail", "--collector", collector.address,
                           "--alert-rule", "loupe-*", "--format", "json")
    assert [r.uid for r in records(out)] == ["H1"]


def test_collector_refuses_an_invalid_alert(collector):
    bad = wire.to_proto(alert(1))
    bad.alert.action = "explode"
    b = batch([], 1)
    b.records.append(bad)
    acks = push(collector.address, [b])
    assert acks[0].status == ingest_pb2.ACK_STATUS_REJECTED and "action" in acks[0].message
    assert query(collector.address, "SELECT count(*) FROM alerts") == [(0,)]


def test_collector_exports_the_alerts_table(collector, capsys, tmp_path):
    push(collector.address, [batch([http(1), alert(1), alert(2)], 1)])
    target = tmp_path / "out.parquet"
    code, _, err = loupe(capsys, "export", "--collector", collector.address, "--table",
                         "alerts", "-o", str(target))
    assert code == 0, err
    import pyarrow.parquet as pq

    rows = pq.read_table(target.with_name("out.alerts.parquet")).to_pylist()
    assert [r["uid"] for r in rows] == ["H1", "H2"] and rows[0]["rule_id"] == "loupe-sqli"
