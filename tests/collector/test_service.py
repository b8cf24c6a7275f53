"""The collector end to end over real gRPC: ingest, dedup, rejections, queries, live and
replayed subscriptions with allow/deny filters, slow subscribers."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading
import time

import grpc
import pytest

from collector.observer import READER_THREADS
from collector.server import CollectorConfig, create_server
from sensor import model
from sensor.errors import CollectorError
from sensor.export import wire

from .conftest import (
    BASE_NS, REPO, batch, dns, flow, http, ingest_stub, mixed, observer_stub, push, query,
    subscribe, tls, with_sensor,
)

STORED = wire.ingest_pb2.ACK_STATUS_STORED
DUPLICATE = wire.ingest_pb2.ACK_STATUS_DUPLICATE
REJECTED = wire.ingest_pb2.ACK_STATUS_REJECTED
F = wire.observer_pb2.RecordFilter


def test_pushed_records_come_back_through_query_and_subscribe(collector):
    records = mixed(200)
    acks = push(collector.address, [batch(records[:100], 1), batch(records[100:], 2)])
    assert [(a.batch_id, a.status, a.records) for a in acks] == [(1, STORED, 100), (2, STORED, 100)]

    counts = dict(query(collector.address, "SELECT 'flows', count(*) FROM flows UNION ALL "
                        "SELECT 'http', count(*) FROM http UNION ALL SELECT 'dns', count(*) FROM dns "
                        "UNION ALL SELECT 'tls', count(*) FROM tls"))
    assert counts == {"flows": 100, "http": 40, "dns": 40, "tls": 20}
    # The batch's sensor id fills records that carry none.
    assert query(collector.address, "SELECT DISTINCT sensor_id FROM flows") == [("s1",)]
    # Lists are real lists in SQL.
    assert query(collector.address, "SELECT alpn FROM tls LIMIT 1") == [(["h2", "http/1.1"],)]
    assert query(collector.address, "SELECT answers[1].data FROM dns WHERE rcode = 0 LIMIT 1") == [
        ("198.19.0.9",)]

    # Replay everything: the records come back equal to what was pushed (plus sensor id).
    back = subscribe(collector.address, since_ns=1)
    assert sorted(back, key=repr) == sorted(with_sensor(records, "s1"), key=repr)

    # Allow: HTTP 5xx OR DNS NXDOMAIN; deny: anything to port 80 from an odd uid is not
    # expressible, so deny one specific host path.
    allow = [F(http_status=["500+"]), F(record_kind=["dns"], dns_rcode=[3])]
    got = subscribe(collector.address, since_ns=1, allow=allow)
    expect = [r for r in with_sensor(records, "s1")
              if (model.record_kind(r) == "http" and r.detail.status >= 500)
              or (model.record_kind(r) == "dns" and r.detail.rcode == 3)]
    assert got and sorted(got, key=repr) == sorted(expect, key=repr)

    deny = [F(record_kind=["flow", "tls"]), F(http_status=["4xx"])]
    got = subscribe(collector.address, since_ns=1, deny=deny)
    assert {model.record_kind(r) for r in got} == {"http", "dns"}
    assert all(r.detail.status != 404 for r in got if model.record_kind(r) == "http")
    assert len(got) == 40 - 13 + 40  # 13 of the 40 HTTP events are 404s

    assert len(subscribe(collector.address, since_ns=1, number=7)) == 7


def test_live_subscription_sees_new_batches_after_history(collector):
    push(collector.address, [batch(mixed(10), 1)])
    req = wire.observer_pb2.SubscribeRequest(since_ns=1, follow=True,
                                             allow=[F(record_kind=["http"], http_path=["/api/*"])])
    stream = observer_stub(collector.address).Subscribe(req, timeout=20)
    live = [http(1000 + i, path=f"/api/v{i}") for i in range(5)] + [http(2000, path="/other")]
    got = []

    def read():
        try:
            for resp in stream:
                got.append(wire.from_proto(resp.record))
                if len(got) == 5:
                    stream.cancel()
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.3)
    push(collector.address, [batch(live, 2)])
    reader.join(15)
    assert [r.detail.path for r in got] == [f"/api/v{i}" for i in range(5)]


def test_duplicate_batch_is_stored_once(collector):
    b = batch(mixed(50), 7)
    acks = push(collector.address, [b, b])
    assert [a.status for a in acks] == [STORED, DUPLICATE]
    assert push(collector.address, [b])[0].status == DUPLICATE  # another stream, same answer
    # Same batch id from another sensor is a different batch.
    assert push(collector.address, [batch(mixed(50), 7, sensor_id="s2")])[0].status == STORED
    assert query(collector.address, "SELECT sensor_id, count(*) FROM flows GROUP BY 1 ORDER BY 1") == [
        ("s1", 25), ("s2", 25)]


def test_invalid_batch_is_rejected_and_the_stream_goes_on(collector):
    bad = batch([flow(1)], 2)
    bad.records[0].flow.src_addr = "999.1.1.1"
    bad_port = batch([http(1)], 3)
    bad_port.records[0].l7.dst_port = 70000
    empty_detail = batch([http(1)], 4)
    empty_detail.records[0].l7.ClearField("http")
    no_sensor = batch([flow(1)], 5, sensor_id="")
    acks = push(collector.address, [batch([flow(0)], 1), bad, bad_port, empty_detail, no_sensor,
                                    batch([flow(9)], 6)])
    assert [a.status for a in acks] == [STORED, REJECTED, REJECTED, REJECTED, REJECTED, STORED]
    assert "src_addr='999.1.1.1'" in acks[1].message and "record 0" in acks[1].message
    assert "dst_port=70000" in acks[2].message
    assert "without detail" in acks[3].message
    assert "sensor_id is empty" in acks[4].message
    assert query(collector.address, "SELECT uid FROM flows ORDER BY uid") == [("F0",), ("F9",)]
    status = observer_stub(collector.address).Status(wire.observer_pb2.StatusRequest())
    assert status.counters["batches_rejected"] == 4


def test_garbage_bytes_get_a_clear_error_and_the_collector_stays_up(collector):
    channel = grpc.insecure_channel(collector.address)
    push_raw = channel.stream_stream("/loupe.v1.Ingest/Push", request_serializer=None,
                                     response_deserializer=None)
    # Field 1 (sensor_id) claiming 2**35 bytes that never come: not a RecordBatch.
    garbage = b"\x0a\xff\xff\xff\xff\x7f" + b"junk"
    with pytest.raises(grpc.RpcError) as info:
        list(push_raw(iter([garbage]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a loupe.v1.RecordBatch" in info.value.details()

    subscribe_raw = channel.unary_stream("/loupe.v1.Observer/Subscribe", request_serializer=None,
                                         response_deserializer=None)
    with pytest.raises(grpc.RpcError):
        list(subscribe_raw(garbage, timeout=10))

    # Another sensor on its own stream is unaffected, and the collector answers.
    assert push(collector.address, [batch([flow(1)], 1)])[0].status == STORED
    status = observer_stub(collector.address).Status(wire.observer_pb2.StatusRequest())
    assert status.counters["undecodable_messages"] == 1 and status.stored["flows"] == 1


def test_garbage_inside_records_ends_the_stream_before_later_batches(collector):
    channel = grpc.insecure_channel(collector.address)
    push_raw = channel.stream_stream("/loupe.v1.Ingest/Push", request_serializer=None,
                                     response_deserializer=wire.ingest_pb2.BatchAck.FromString)
    # A well-framed batch whose field 4 (a Record) holds a string field cut short.
    inner = batch([], 2).SerializeToString() + b"\x22\x03\x0a\xff\xff"
    messages = [batch([flow(1)], 1).SerializeToString(), inner,
                batch([flow(3)], 3).SerializeToString(), batch([flow(4)], 4).SerializeToString()]
    acks = []
    with pytest.raises(grpc.RpcError) as info:
        for ack in push_raw(iter(messages), timeout=10):
            acks.append(ack)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 1 on this stream is not a loupe.v1.RecordBatch" in info.value.details()
    assert [(a.batch_id, a.status) for a in acks] == [(1, STORED)]
    # The batches after it on that stream were not stored, so their resend is not a duplicate.
    assert query(collector.address, "SELECT uid FROM flows ORDER BY uid") == [("F1",)]
    assert push(collector.address, [batch([flow(3)], 3)])[0].status == STORED
    status = observer_stub(collector.address).Status(wire.observer_pb2.StatusRequest())
    assert status.counters["undecodable_messages"] == 1


def test_oversized_message_is_refused_with_the_limit(start_collector):
    running = start_collector(max_message_bytes=64 * 1024)
    big = batch(mixed(2000), 1)
    assert big.ByteSize() > 64 * 1024
    with pytest.raises(grpc.RpcError) as info:
        push(running.address, [big])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(64 * 1024) in info.value.details()
    assert push(running.address, [batch(mixed(10), 2)])[0].status == STORED


@pytest.mark.parametrize("sql, words", [
    ("DELETE FROM flows", "got DELETE"),
    ("INSERT INTO flows (uid) VALUES ('x')", "got INSERT"),
    ("SELECT 1; DROP TABLE flows", "exactly one statement"),
    ("COPY flows TO '/tmp/x.csv'", "got COPY"),
    ("ATTACH '/tmp/other.duckdb'", "got ATTACH"),
    ("SELECT * FROM read_text('/etc/hostname')", "disabled"),
    ("SELEC nothing", "cannot parse"),
])
def test_non_select_query_is_refused_and_the_collector_stays_up(collector, sql, words):
    push(collector.address, [batch([flow(1)], 1)])
    with pytest.raises(grpc.RpcError) as info:
        query(collector.address, sql)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()
    assert query(collector.address, "WITH f AS (SELECT * FROM flows) SELECT count(*) FROM f") == [(1,)]


def test_query_rows_are_capped(collector):
    push(collector.address, [batch(mixed(100), 1)])
    resp = observer_stub(collector.address).Query(
        wire.observer_pb2.QueryRequest(sql="SELECT uid FROM flows", max_rows=10))
    assert len(resp.rows_json) == 10 and resp.truncated


def test_slow_subscriber_gets_lost_events_while_ingest_and_a_fast_one_continue(start_collector):
    running = start_collector(subscriber_queue=1000)
    # Both follow only the pushing sensor's records: the collector adds records of its own
    # (client notices, every 10 s), which would otherwise share the count below.
    only_s1 = [wire.observer_pb2.RecordFilter(sensor_id=["s1"])]
    # The slow client never reads; without BDP probing its HTTP/2 window stays small, so
    # the collector-side queue fills quickly.
    slow_channel = grpc.insecure_channel(running.address, options=[("grpc.http2.bdp_probe", 0)])
    slow = slow_channel.unary_stream(
        "/loupe.v1.Observer/Subscribe",
        request_serializer=wire.observer_pb2.SubscribeRequest.SerializeToString,
        response_deserializer=wire.observer_pb2.SubscribeResponse.FromString,
    )(wire.observer_pb2.SubscribeRequest(follow=True, allow=only_s1), timeout=60)
    fast = observer_stub(running.address).Subscribe(
        wire.observer_pb2.SubscribeRequest(follow=True, allow=only_s1), timeout=60)
    fast_got = []
    seen = threading.Condition()

    def read_fast():
        try:
            for resp in fast:
                with seen:
                    fast_got.append(resp.record)
                    seen.notify_all()
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED

    threading.Thread(target=read_fast, daemon=True).start()
    time.sleep(0.3)
    per_batch, batches = 500, 40
    total = per_batch * batches
    stub = ingest_stub(running.address)
    for i in range(batches):
        t0 = time.monotonic()
        ack = list(stub.Push(iter([batch(mixed(per_batch, i * per_batch), i + 1)]), timeout=10))[0]
        assert ack.status == STORED and time.monotonic() - t0 < 5
        with seen:  # pace on the fast reader so that only the slow one falls behind
            assert seen.wait_for(lambda: len(fast_got) >= (i + 1) * per_batch, timeout=10)
    assert len(fast_got) == total
    assert not any(r.WhichOneof("kind") == "lost" for r in fast_got)

    delivered = lost = 0
    for resp in slow:
        if resp.record.WhichOneof("kind") == "lost":
            assert resp.record.lost.source == "subscriber_slow"
            lost += resp.record.lost.count
        else:
            delivered += 1
        if delivered + lost == total:
            break
    slow.cancel()
    fast.cancel()
    assert lost > total // 2 and delivered >= 1000
    assert delivered + lost == total
    status = observer_stub(running.address).Status(wire.observer_pb2.StatusRequest())
    assert status.counters["subscriber_dropped"] == lost


def test_status_reports_tables_sensors_and_counters(collector):
    push(collector.address, [batch(mixed(20), 1), batch(mixed(20), 2, sensor_id="s2"),
                             batch(mixed(20), 1)])
    status = observer_stub(collector.address).Status(wire.observer_pb2.StatusRequest())
    assert status.stored["flows"] == 20 and status.stored["lost"] == 0
    assert [(s.sensor_id, s.last_batch_id, s.records) for s in status.sensors] == [
        ("s1", 1, 20), ("s2", 2, 20)]
    assert status.counters["batches_stored"] == 2 and status.counters["batches_duplicate"] == 1
    assert status.storage.startswith("duckdb:")


def test_health_and_reflection(collector):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(collector.address)
    resp = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="loupe.v1.Ingest"), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert {"loupe.v1.Ingest", "loupe.v1.Observer", "grpc.health.v1.Health"} <= names


def test_port_in_use_is_one_clear_error(collector, tmp_path):
    import asyncio

    async def second():
        create_server(CollectorConfig(listen=collector.address, data_dir=tmp_path / "other"))

    with pytest.raises(CollectorError, match=f"cannot listen on {collector.address}"):
        asyncio.run(second())


def test_plaintext_on_a_public_address_needs_insecure(tmp_path):
    from sensor.errors import ConfigError
    with pytest.raises(ConfigError, match="--insecure"):
        CollectorConfig(listen="0.0.0.0:0", data_dir=tmp_path).check()


def _slow_query(address: str, timeout: float):
    """A cross join DuckDB needs minutes for, given up by its client after `timeout` s."""
    sql = "SELECT sum(a.range * b.range) FROM range(10000000) a CROSS JOIN range(10000000) b"
    return subprocess.run(
        [sys.executable, "-m", "sensor.cli", "query", "--collector", address,
         "--timeout", str(timeout), sql],
        cwd=REPO, capture_output=True, text=True, timeout=60)


def test_query_timeout_stops_the_query_on_the_server(collector):
    # As many slow queries as the collector has reader threads: if they ran on after
    # their clients gave up, the next query would wait for the server's 30 s cap.
    with concurrent.futures.ThreadPoolExecutor(READER_THREADS) as pool:
        outs = list(pool.map(lambda _: _slow_query(collector.address, 3), range(READER_THREADS)))
    for out in outs:
        assert out.returncode == 1 and "did not answer in time" in out.stderr, out.stderr
    # Well within the 30 s the readers would stay busy if the queries ran on.
    resp = observer_stub(collector.address).Query(
        wire.observer_pb2.QueryRequest(sql="SELECT 42"), timeout=10)
    assert list(resp.rows_json) == ["[42]"]
    status = observer_stub(collector.address).Status(wire.observer_pb2.StatusRequest(), timeout=10)
    assert status.counters["queries_cancelled"] == READER_THREADS
    assert status.counters["queries_timed_out"] == 0


def test_query_client_default_wait_is_within_the_server_cap():
    from collector.observer import QUERY_TIMEOUT_S
    from sensor.cli import build_parser

    args = build_parser(["collector.cli"]).parse_args(["query", "SELECT 1"])
    assert 0 < args.timeout <= QUERY_TIMEOUT_S
