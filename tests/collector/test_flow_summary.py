"""Flow.l7_summary end to end: real captures of real clients replayed, each protocol's own
summary keys on its flows (and nothing undeclared), TLS after an upgrade on the Flow's TLS
fields, then the wire, the collector's decode and DuckDB store, SQL over the map, the
protocols' tail filters matching flows through it, the table line, JSON, EVE, Zeek and
Parquet; and the bounds, refused by the model and by ingest, cut by the engine."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from collector import filters
from collector.ingest import decode_batch
from collector.render import line
from collector.storage.duckdb import DuckDBStorage
from sensor import model
from sensor.errors import SchemaError
from sensor.export import formats, jsonfmt, sinks, wire
from sensor.l7 import registry
from sensor.replay.api import replay_records
from tests.conftest import REPO
from tests.fixtures import gen_starttls

GOLDEN = REPO / "tests" / "golden"
STARTTLS = GOLDEN / "starttls-parser"


def flows(path: Path) -> list[model.Flow]:
    return [r for r in replay_records(path) if isinstance(r, model.Flow) and r.app_proto]


def summaries(path: Path) -> list[dict]:
    return [dict(f.l7_summary) for f in flows(path)]


# (capture, a summary one of its flows carries): what the clients did (the generators in
# tests/fixtures name the users, databases, topics and collections they used).
CASES = {
    "mysql": (GOLDEN / "mysql-parser" / "session.pcap",
              {"mysql_user": "loupe", "mysql_database": "loupe",
               "mysql_server_version": "5.5.5-10.11.19-MariaDB-0+deb12u1"}),
    "pgsql": (GOLDEN / "pgsql-session.pcap.gz",
              {"pgsql_user": "loupe", "pgsql_database": "loupedb",
               "pgsql_statement": "CREATE TABLE items (id int PRIMARY KEY, name text);"}),
    "kafka": (GOLDEN / "kafka-parser" / "session.pcap.gz",
              {"kafka_client_id": "producer-1", "kafka_topic": "orders"}),
    "mongodb": (GOLDEN / "mongodb-parser" / "session.pcap.gz",
                {"mongodb_database": "market", "mongodb_command": "getMore",
                 "mongodb_collection": "ticks"}),
    "http2": (GOLDEN / "http2-parser" / "session.pcap.gz",
              {"grpc_service": "loupe.test.Echo", "grpc_method": "Unary"}),
    "redis": (GOLDEN / "redis-session.pcap.gz",
              {"redis_command": "GET", "redis_user": "default", "redis_resp": "2"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_protocol_puts_its_declared_keys_on_its_flows(name):
    path, want = CASES[name]
    got = flows(path)
    assert want in [dict(f.l7_summary) for f in got if f.app_proto == name]
    declared = set(registry.get(name).summary_keys)
    for f in got:
        assert set(f.l7_summary) <= set(registry.get(f.app_proto).summary_keys)
        assert all(len(v) <= registry.SUMMARY_VALUE_MAX for v in f.l7_summary.values())
    assert declared >= set(want)


# -- TLS after an upgrade --------------------------------------------------------------------

UPGRADED = {  # capture -> (outer app_proto, the SNI its client sent)
    "pgsql": (STARTTLS / "pgsql.pcap", "localhost"),     # psql sslmode=require
    "smtp": (STARTTLS / "smtp.pcap", "mail.loupe.test"),  # smtplib against aiosmtpd
    "imap": (STARTTLS / "imap.pcap", "imap.loupe.test"),
    "pop3": (STARTTLS / "pop3.pcap", "pop.loupe.test"),
    "ftp": (STARTTLS / "ftp.pcap", "ftp.loupe.test"),     # ftplib against pyftpdlib
    "mysql": (GOLDEN / "mysql-parser" / "session.pcap", ""),  # PyMySQL sends no SNI
}


@pytest.mark.parametrize("name", sorted(UPGRADED))
def test_tls_after_an_upgrade_fills_the_flow_tls_fields_and_app_proto_stays(name):
    path, sni = UPGRADED[name]
    records = replay_records(path)
    tls = {r.uid: r.detail for r in records
           if isinstance(r, model.L7Event) and isinstance(r.detail, model.TlsEvent)}
    upgraded = [r for r in records if isinstance(r, model.Flow) and r.uid in tls]
    assert len(upgraded) == 1
    (flow,) = upgraded
    assert flow.app_proto == name
    assert (flow.tls_sni, flow.tls_ja4) == (sni, tls[flow.uid].ja4) and flow.tls_ja4
    # --ja4 (and --tls-sni, where a name was sent) find the flow as they find a TLS flow.
    crit = {"tls_ja4": [flow.tls_ja4], **({"tls_sni": [sni]} if sni else {})}
    match = filters.compile_lists([wire.observer_pb2.RecordFilter(**crit)], [])
    assert match(wire.to_proto(flow))


@pytest.mark.skipif(gen_starttls.available() is not None,
                    reason=str(gen_starttls.available()))
@pytest.mark.parametrize("name", ["pgsql", "smtp"])
def test_live_upgrade_by_the_real_peers(name, tmp_path):
    """Now, the real peers: psql sslmode=require against PostgreSQL, smtplib against
    aiosmtpd, captured on lo; the SNI is the one the client sent."""
    pcap = tmp_path / f"{name}.pcap"
    if name == "pgsql":
        want = gen_starttls.pgsql(pcap)
    else:
        want = gen_starttls.smtp(*gen_starttls.make_cert(tmp_path), pcap)
    (flow,) = [f for f in flows(pcap) if f.dst_port == want["port"]]
    (tls,) = [r.detail for r in replay_records(pcap) if isinstance(r, model.L7Event)
              and isinstance(r.detail, model.TlsEvent)]
    assert flow.app_proto == name
    assert (flow.tls_sni, flow.tls_ja4) == (want["sni"], tls.ja4) and tls.ja4


# -- the collector and every output --------------------------------------------------------

def _all_summary_flows() -> list[model.Flow]:
    out = []
    for path, _ in CASES.values():
        out += [f for f in flows(path) if f.l7_summary]
    return out


def _matches(**criteria) -> set[tuple[str, str]]:
    pred = filters.compile_lists([wire.observer_pb2.RecordFilter(**criteria)], [])
    return {(f.app_proto, f.uid) for f in ALL if pred(wire.to_proto(f))}


ALL: list[model.Flow] = []


@pytest.fixture(scope="module", autouse=True)
def _flows():
    ALL[:] = _all_summary_flows()
    assert len(ALL) >= 20


def test_stored_by_the_collector_read_back_and_queried(tmp_path):
    batch = decode_batch(wire.batch_to_proto(ALL, sensor_id="s1", batch_id=1, created_ns=1))
    store = DuckDBStorage(tmp_path / "data")
    try:
        store.store_many([batch], time.time_ns())
        got = [r for r in store.records_since(0, store.last_seq()) if isinstance(r, model.Flow)]
        want = [dataclasses.replace(f, sensor_id=f.sensor_id or "s1") for f in ALL]
        assert sorted(got, key=repr) == sorted(want, key=repr)
        rows = store.query("SELECT l7_summary['kafka_topic'] AS t, count(*) FROM flows "
                           "WHERE app_proto = 'kafka' GROUP BY t ORDER BY t", 100, 10).rows
        topics = [dict(f.l7_summary).get("kafka_topic") for f in ALL if f.app_proto == "kafka"]
        assert rows == sorted(((t, topics.count(t)) for t in set(topics)),
                              key=lambda r: (r[0] is None, r[0] or ""))
    finally:
        store.close()


def test_protocol_filters_match_flows_through_the_map():
    kafka = {(p, u) for p, u in _matches() if p == "kafka"}
    orders = {("kafka", f.uid) for f in ALL if f.l7_summary.get("kafka_topic") == "orders"}
    assert orders and _matches(kafka_topic=["ord*"]) == orders < kafka
    users = {("mongodb", f.uid) for f in ALL
             if f.l7_summary.get("mongodb_collection") == "users"}
    assert users and _matches(mongo_collection=["user*"]) == users
    unary = {("http2", f.uid) for f in ALL if f.l7_summary.get("grpc_method") == "Unary"}
    assert unary and _matches(grpc_method=["Un*"]) == unary
    assert not _matches(kafka_topic=["nothing-*"])
    # A flow without the key never matches, whatever its protocol.
    assert not _matches(mongo_collection=["*"]) & kafka


def test_table_line_json_eve_zeek_and_parquet_carry_it(tmp_path):
    (kafka,) = [f for f in ALL if f.l7_summary.get("kafka_client_id") == "producer-1"]
    text = line(kafka)
    assert "kafka" in text and "topic=orders" in text and "client_id=producer-1" in text
    (grpc,) = [f for f in ALL if f.l7_summary.get("grpc_method")]
    assert "grpc_method=Unary" in line(grpc)

    d = jsonfmt.to_dict(kafka)
    assert d["l7_summary"] == {"kafka_client_id": "producer-1", "kafka_topic": "orders"}
    assert jsonfmt.from_dict(json.loads(json.dumps(d))) == kafka
    assert json.loads(formats.json_line(kafka)) == d
    assert formats.eve(kafka)["l7_summary"] == d["l7_summary"]

    out = []
    w = formats.ZeekWriter(type("Out", (), {"write": lambda self, s: out.append(s)})())
    w.write(kafka)
    lines = "".join(out).splitlines()
    fields = next(x for x in lines if x.startswith("#fields")).split("\t")[1:]
    types = next(x for x in lines if x.startswith("#types")).split("\t")[1:]
    row = dict(zip(fields, lines[-1].split("\t"), strict=True))
    assert types[fields.index("l7_summary")] == "vector[string]"
    assert row["l7_summary"] == "kafka_client_id=producer-1,kafka_topic=orders"

    sink = sinks.open_sink(tmp_path / "flows.parquet")
    for f in ALL:
        sink.write(f)
    sink.close()
    got = pq.read_table(tmp_path / "flows.parquet").column("l7_summary").to_pylist()
    assert [dict(m) for m in got] == [dict(f.l7_summary) for f in ALL]


def test_loupe_replay_writes_the_map():
    out = subprocess.run([str(REPO / ".venv/bin/loupe"), "replay",
                          str(CASES["kafka"][0])], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    got = [json.loads(x)["l7_summary"] for x in out.splitlines()
           if json.loads(x)["type"] == "flow" and json.loads(x)["app_proto"] == "kafka"]
    assert {"kafka_client_id": "producer-1", "kafka_topic": "orders"} in got


# -- bounds ----------------------------------------------------------------------------------

BASE = dict(uid="C1", flow_start_ns=1, flow_end_ns=2, src_addr="198.18.0.1",
            dst_addr="198.18.0.2", protocol=6, ip_version=4, app_proto="pgsql")


@pytest.mark.parametrize("summary,problem", [
    ({f"k{i}": "v" for i in range(registry.SUMMARY_KEYS_MAX + 1)}, "at most"),
    ({"pgsql_statement": "x" * (registry.SUMMARY_VALUE_MAX + 1)}, "up to 256"),
    ({"not a key": "v"}, "identifier"),
    ({"k" * (registry.SUMMARY_KEY_MAX + 1): "v"}, "identifier"),
])
def test_the_model_and_ingest_refuse_a_summary_past_its_bounds(summary, problem):
    with pytest.raises(ValueError, match=problem):
        model.Flow(**BASE, l7_summary=summary)
    msg = wire.records_pb2.Record()
    msg.flow.CopyFrom(wire.to_proto(model.Flow(**BASE)).flow)
    msg.flow.l7_summary.update(summary)
    batch = wire.ingest_pb2.RecordBatch(sensor_id="s1", batch_id=1, records=[msg])
    with pytest.raises(SchemaError, match="l7_summary"):
        decode_batch(batch)


def test_the_engine_cuts_a_long_value_and_keeps_only_declared_keys(tmp_path):
    from scapy.all import IP, TCP, wrpcap

    statement = "SELECT " + ", ".join(f"col{i}" for i in range(200)) + " FROM t"
    startup = b"\x00\x03\x00\x00user\x00app\x00database\x00shop\x00\x00"
    query = statement.encode() + b"\x00"
    c, s = dict(src="198.18.0.1", dst="198.18.0.2"), dict(src="198.18.0.2", dst="198.18.0.1")
    pkts = [IP(**c) / TCP(sport=40000, dport=5432, flags="S", seq=100),
            IP(**s) / TCP(sport=5432, dport=40000, flags="SA", seq=900, ack=101),
            IP(**c) / TCP(sport=40000, dport=5432, flags="A", seq=101, ack=901),
            IP(**c) / TCP(sport=40000, dport=5432, flags="PA", seq=101, ack=901) /
            ((len(startup) + 4).to_bytes(4, "big") + startup),
            IP(**c) / TCP(sport=40000, dport=5432, flags="PA", seq=105 + len(startup),
                          ack=901) / (b"Q" + (len(query) + 4).to_bytes(4, "big") + query)]
    for i, p in enumerate(pkts):
        p.time = 1_700_000_000 + i / 1000
    wrpcap(str(tmp_path / "long.pcap"), pkts)
    (flow,) = flows(tmp_path / "long.pcap")
    assert flow.app_proto == "pgsql"
    assert dict(flow.l7_summary) == {"pgsql_user": "app", "pgsql_database": "shop",
                                     "pgsql_statement": statement[:registry.SUMMARY_VALUE_MAX]}
    assert len(statement) > registry.SUMMARY_VALUE_MAX
