"""tail --sql-query-contains: one filter that MySQL and PostgreSQL both declare, matched
on their statements (any case) in records replayed from their real captures."""

from __future__ import annotations

from collector import filters
from collector.cli import FILTER_FLAGS
from sensor.export import wire
from sensor.replay.api import replay_records
from tests.conftest import REPO

CAPTURES = [REPO / "tests/golden/mysql-parser/session.pcap",
            REPO / "tests/golden/pgsql-session.pcap.gz"]


def _records():
    return [wire.to_proto(r) for r in replay_records(CAPTURES)]


def _kinds(matched) -> set[str]:
    return {filters.kind_of(r) for r in matched}


def test_sql_query_contains_matches_both_kinds_by_statement_in_any_case():
    records = _records()
    statements = [(filters.kind_of(r), getattr(r.l7, filters.kind_of(r)).statement)
                  for r in records if filters.kind_of(r) in ("mysql", "pgsql")]
    assert {k for k, _ in statements} == {"mysql", "pgsql"}
    match = filters.compile_filter(wire.observer_pb2.RecordFilter(sql_query_contains=["sElEcT"]))
    matched = [r for r in records if match(r)]
    expected = sum(1 for _, s in statements if "select" in s.lower())
    assert expected and len(matched) == expected
    assert _kinds(matched) == {"mysql", "pgsql"}
    # Values are alternatives; a text no statement holds matches nothing; flows never do.
    either = filters.compile_filter(wire.observer_pb2.RecordFilter(
        sql_query_contains=["no such text", "select"]))
    assert sum(map(either, records)) == expected
    none = filters.compile_filter(wire.observer_pb2.RecordFilter(
        sql_query_contains=["no such text"]))
    assert not any(map(none, records))


def test_sql_query_contains_is_one_tail_flag():
    name, parse = FILTER_FLAGS["sql-query-contains"]
    assert name == "sql_query_contains" and parse("Drop Table") == "Drop Table"


def test_a_filter_over_a_list_field_matches_any_of_its_values():
    # tail --kafka-topic over an event's `topics`: the second topic named matches too.
    from sensor import model
    from sensor.l7.kafka import KafkaEvent

    def kafka(uid: str, topics: tuple[str, ...]):
        return wire.to_proto(model.L7Event(
            uid=uid, ts_ns=1, src_addr="198.18.0.5", dst_addr="198.19.0.9", src_port=40000,
            dst_port=9092, protocol=6,
            detail=KafkaEvent(api_key=0, api="Produce", topic=topics[0] if topics else "",
                              topics=topics)))

    records = [kafka("K1", ("audit", "orders")), kafka("K2", ("audit",)), kafka("K3", ())]
    match = filters.compile_filter(wire.observer_pb2.RecordFilter(kafka_topic=["order*"]))
    assert [r.l7.uid for r in records if match(r)] == ["K1"]
