"""Record kinds at the collector come from the protocol registry: each kind has its own
table, and a kind the collector does not know is refused, never stored as another."""

from __future__ import annotations

import pytest

from collector import ingest, schema
from collector.ingest import decode_batch
from collector.storage.duckdb import DuckDBStorage
from sensor.errors import SchemaError
from sensor.l7 import registry

from .conftest import batch, dns, flow, http, mixed, tls


def test_every_registered_kind_has_its_table():
    for spec in registry.kinds():
        assert schema.KIND_TABLE[spec.name] == spec.table_name
        table = schema.TABLES[spec.table_name]
        assert table.time_column == "ts_ns"
        assert table.schema.names[:len(schema.L7_COLUMNS)] == [n for n, _ in schema.L7_COLUMNS]


def test_a_table_of_no_kind_is_not_read_as_another_kind():
    # Before the registry, an unknown L7 table name was read back as TLS.
    row = {n: None for n in schema.TABLES["tls"].schema.names}
    with pytest.raises(KeyError, match="no record kind is stored in table 'smtp'"):
        schema.record_from_row("smtp", row)


def test_an_unknown_kind_is_refused_naming_it(monkeypatch, tmp_path):
    # A collector that does not know "tls" (its registry lacks it) while the batch carries
    # one: the batch is refused with the kind named, and nothing of it is stored.
    known = {k: v for k, v in ingest._KINDS.items() if k != "tls"}
    monkeypatch.setattr(ingest, "_KINDS", known)
    b = batch(mixed(6) + [tls(7)], 1)
    with pytest.raises(SchemaError, match=r"record 6: L7Event of kind 'tls', which this "
                                          r"collector does not know"):
        decode_batch(b)
    monkeypatch.undo()
    store = DuckDBStorage(tmp_path)
    store.store_many([decode_batch(b)], 1)
    assert store.counts()["tls"] == 1
    store.close()


def _matches(**criteria) -> list[str]:
    from collector import filters
    from sensor.export import wire

    records = [flow(1), flow(2, tls_sni="", tls_ja4="", http_host="WWW.Example.test.",
                             app_proto="http"),
               http(3, method="post", path="/API/x", status=503), http(4, host="other.test"),
               dns(5, rcode=3, qname="Gone.example.test."), dns(6), tls(7), tls(8, sni="x.test")]
    flt = wire.observer_pb2.RecordFilter(**criteria)
    match = filters.compile_filter(flt)
    return [r.uid for r in records if match(wire.to_proto(r))]


def test_registered_filters_match_their_kind_and_the_flow_summary():
    ja4 = "t13d1516h2_8daaf6152771_b0da82dd1658"
    assert _matches(http_method=["POST"]) == ["H3"]
    assert _matches(http_status=["5xx"]) == ["H3"]
    assert _matches(http_path=["/api/*"]) == []          # paths keep their case
    assert _matches(http_path=["/API/*"]) == ["H3"]
    assert _matches(http_host=["*.example.test"]) == ["F2", "H3"]   # folded, dot ignored
    assert _matches(dns_qname=["gone.*"]) == ["D5"]
    assert _matches(dns_rcode=[3]) == ["D5"]
    assert _matches(tls_sni=["api.*"]) == ["F1", "T7"]
    assert _matches(tls_ja4=[ja4]) == ["T7", "T8"]        # flows here carry no JA4
    assert _matches(tls_ja4=[ja4], record_kind=["tls"], tls_sni=["x.test"]) == ["T8"]


def test_top_counts_another_kind_under_its_own_service():
    # Before: every event that was neither HTTP nor DNS was taken for TLS (d.sni).
    from collector import top_model as tm
    from sensor import model
    from sensor.l7.mysql import MysqlEvent

    m = tm.TopModel()
    now = 1_800_000_000 * tm.NS
    ev = model.L7Event(uid="M1", ts_ns=now, src_addr="198.18.0.5", dst_addr="198.19.0.33",
                       src_port=50000, dst_port=3306, protocol=6,
                       detail=MysqlEvent(command="query", statement="SELECT 1", status="result",
                                         latency_ns=1_000_000))
    m.add(flow(1, dst_addr="198.19.0.33", dst_port=3306, app_proto="mysql", tls_sni=""), now)
    m.add(ev, now)
    rows = {(r[0], r[1]): r for r in m.panel("services", now).rows}
    assert rows[("198.19.0.33:3306", "mysql")][2] == 1   # one request
    assert rows[("198.19.0.33:3306", "mysql")][9] == 1   # its flow, on the same row
    assert not any(k[1] == "tls" for k in rows)


def test_an_event_its_class_refuses_is_rejected_for_a_kind_without_column_checks():
    # MySQL declares no column checks: its events are built (MysqlEvent's own checks).
    from sensor import model
    from sensor.l7.mysql import MysqlEvent

    ev = model.L7Event(uid="M1", ts_ns=1, src_addr="198.18.0.5", dst_addr="198.19.0.33",
                       src_port=50000, dst_port=3306, protocol=6,
                       detail=MysqlEvent(command="query", status="error", error_code=1064,
                                         sql_state="42000"))
    good = batch(mixed(3) + [ev], 1)
    assert decode_batch(good).tables["mysql"].num_rows == 1
    bad = batch(mixed(3) + [ev], 2)
    bad.records[3].l7.mysql.sql_state = "4200"     # not 5 characters
    with pytest.raises(SchemaError, match=r"record 3: .*sql_state='4200' is not 5 characters"):
        decode_batch(bad)
    bad.records[3].l7.mysql.sql_state = "42000"
    bad.records[3].l7.mysql.status = "maybe"       # not a status the parser makes
    with pytest.raises(SchemaError, match=r"record 3: .*status='maybe'"):
        decode_batch(bad)
