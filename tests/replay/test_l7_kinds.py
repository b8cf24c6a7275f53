"""MySQL, PostgreSQL and Redis end to end: `loupe replay` of their golden captures gives
the events their parser tests expect (the same events as the parser fed each flow
directly, and what the real clients saw), and the collector stores and returns them."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from collector.ingest import decode_batch
from collector.storage.duckdb import DuckDBStorage
from sensor import model
from sensor.export import jsonfmt, wire
from sensor.export.table import TableWriter
from sensor.l7 import registry
from sensor.l7.mysql import MysqlParser
from sensor.l7.pgsql import PgsqlParser
from sensor.l7.redis import RedisParser
from tests.l7 import pcaputil, test_mysql, test_pgsql, test_redis

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
LOUPE = str(Path(sys.executable).with_name("loupe"))

CASES = {
    "mysql": (GOLDEN / "mysql-parser" / "session.pcap", MysqlParser),
    "pgsql": (GOLDEN / "pgsql-session.pcap.gz", PgsqlParser),
    "redis": (GOLDEN / "redis-session.pcap.gz", RedisParser),
}


def replay(path: Path, tmp_path: Path) -> list[model.Record]:
    out = tmp_path / "out.jsonl"
    done = subprocess.run([LOUPE, "replay", "--no-progress", str(path), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [jsonfmt.from_dict(json.loads(line)) for line in out.read_text().splitlines()]


def by_client_port(records, kind: str) -> dict[int, list]:
    out: dict[int, list] = defaultdict(list)
    for r in records:
        if isinstance(r, model.L7Event) and r.kind == kind:
            out[r.src_port].append(r.detail)
    return out


def parser_events(path: Path, parser_cls, port: int) -> dict[int, list]:
    """What the parser makes of each flow when fed it directly (as its tests do)."""
    return {f.sport: [t.detail for t in pcaputil.feed(parser_cls(), f)]
            for f in pcaputil.flows(path) if f.proto == 6 and f.dport == port}


def _us(events: dict[int, list]) -> dict[int, list]:
    # The captures hold microseconds. Replay keeps them exact; tests/l7/pcaputil reads
    # them through a float, a few hundred ns off, so latencies compare to the microsecond.
    return {port: [dataclasses.replace(e, latency_ns=round(e.latency_ns / 1000)) for e in evs]
            for port, evs in events.items()}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_replay_gives_the_parser_events_per_flow(kind, tmp_path):
    path, parser_cls = CASES[kind]
    records = replay(path, tmp_path)
    port = next(r.dst_port for r in records if isinstance(r, model.L7Event))
    got = by_client_port(records, kind)
    # Only the kind's own events: MySQL's TLS login also gives a TlsEvent (kind "tls").
    want = {p: [e for e in evs if registry.of_event(type(e)).name == kind]
            for p, evs in parser_events(path, parser_cls, port).items()}
    assert want and _us(got) == _us(want)
    flows = [r for r in records if isinstance(r, model.Flow) and r.dst_port == port]
    assert {f.app_proto for f in flows} == {kind}


def test_replay_mysql_equals_what_the_clients_did(tmp_path):
    spec, flows = test_mysql.golden_flows()
    got = by_client_port(replay(CASES["mysql"][0], tmp_path), "mysql")
    for flow, expected in zip(flows, spec["connections"]):
        test_mysql.check_session(got[flow.sport], expected)


def test_replay_pgsql_equals_what_the_clients_did(tmp_path):
    exp = test_pgsql._expected()
    got = by_client_port(replay(CASES["pgsql"][0], tmp_path), "pgsql")
    flows = test_pgsql.pg_flows(test_pgsql.SESSION, exp["port"])
    events = [model.L7Event(uid="u", ts_ns=1, src_addr="198.18.0.1", dst_addr="198.18.0.2",
                            protocol=6, detail=d) for f in flows for d in got[f.sport]]
    test_pgsql._check_against_clients(events, exp["transactions"])


def test_replay_redis_equals_what_the_clients_did(tmp_path):
    expect, flows = test_redis._golden()
    got = by_client_port(replay(CASES["redis"][0], tmp_path), "redis")
    pushes = 0
    for flow, conn in zip(flows, expect["connections"]):
        fields = [test_redis._fields(e) for e in got[flow.sport] if not e.push]
        pushes += sum(e.push for e in got[flow.sport])
        for g, x in zip(fields, conn, strict=True):
            if g["error"].startswith("ERR ") and x["error"] == g["error"][4:]:
                x = {**x, "error": g["error"]}   # as in test_redis: redis-py drops "ERR "
            assert g == x
    assert pushes == expect["pushes"]


@pytest.mark.parametrize("kind", sorted(CASES))
def test_collector_round_trip_and_table_line(kind, tmp_path):
    records = [r for r in replay(CASES[kind][0], tmp_path) if not isinstance(r, model.LostEvent)]
    batch = wire.batch_to_proto(records, sensor_id="s1", batch_id=1, created_ns=1)
    store = DuckDBStorage(tmp_path / "db")
    store.store_many([decode_batch(batch)], 1)
    # The collector names the sensor of records that carry no sensor_id (replay's).
    l7 = [dataclasses.replace(r, sensor_id="s1") for r in records
          if isinstance(r, model.L7Event) and r.kind == kind]
    # MySQL's TLS login also gives a TLS event, stored in its own table.
    tls = sum(isinstance(r, model.L7Event) and r.kind == "tls" for r in records)
    assert store.counts()[kind] == len(l7) and store.counts().get("tls", 0) == tls
    stored = list(store.records_since(0, 1 << 62, tables=(kind,)))
    key = lambda r: (r.ts_ns, r.uid, repr(r.detail))  # noqa: E731
    assert sorted(stored, key=key) == sorted(l7, key=key)
    store.close()
    line = TableWriter(None, color=False, width=None).line(l7[0])
    assert f" {kind} " in line and "sni=" not in line and "TLS" not in line


def test_eve_and_zeek_of_a_kind_without_their_shapes(tmp_path):
    # MySQL registered no EVE or Zeek shape: EVE carries its fields as they are, Zeek
    # skips its events and counts them (no log is made up for it).
    import io

    from sensor.export import formats

    records = replay(CASES["mysql"][0], tmp_path)
    event = next(r for r in records if isinstance(r, model.L7Event))
    out = formats.eve(event)
    assert out["event_type"] == out["app_proto"] == "mysql"
    assert out["mysql"] == jsonfmt.to_dict(event)["detail"]
    writer = formats.ZeekWriter(io.StringIO())
    for r in records:
        writer.write(r)
    # The TLS event after MySQL's SSLRequest goes to ssl.log.
    assert writer.skipped == sum(isinstance(r, model.L7Event) and r.kind == "mysql"
                                 for r in records)
