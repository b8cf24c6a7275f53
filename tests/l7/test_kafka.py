"""The Kafka parser on real bytes: the shared corpus captures with tshark as the oracle,
requests and responses encoded by kafka-python's own protocol classes (no broker exists in
these registries), and `loupe replay` of that capture into a real collector."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from sensor.l7 import kafka
from sensor.l7.base import NEED_DATA, Direction, ParserState
from sensor.l7.detect import PROTO_TCP, detect, sniff
from sensor.l7.kafka import API_VERSIONS, KafkaEvent, KafkaParser, looks_like
from tests.fixtures import gen_kafka
from tests.l7 import pcaputil

C, S = Direction.TO_SERVER, Direction.TO_CLIENT
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "kafka-parser"
SESSION = GOLDEN / "session.pcap.gz"
LOUPE = str(Path(sys.executable).with_name("loupe"))


def events(parser, flow) -> list[KafkaEvent]:
    return [t.detail for t in pcaputil.feed(parser, flow)]


def golden():
    spec = json.loads((GOLDEN / "session.expect.json").read_text())
    flows = [f for f in pcaputil.flows(SESSION) if f.proto == 6]
    assert [f.sport for f in flows] == [c["sport"] for c in spec["connections"]]
    return spec, flows


def fields(e: KafkaEvent, keys) -> dict:
    out = {}
    for k in keys:
        v = getattr(e, k, None)
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def check_connection(got: list[KafkaEvent], expected: list[dict]) -> None:
    """The events of one connection against what gen_kafka encoded."""
    assert len(got) == len(expected)
    for e, x in zip(got, expected):
        x = dict(x)
        responded = x.pop("responded")
        big = x.pop("big", False)
        unknown = x.pop("unknown", False)
        assert fields(e, x) == x, x
        assert (e.response_bytes > 0) == responded
        assert (e.latency_ns > 0) == responded   # the broker answered 1 ms later
        assert not e.malformed and not e.truncated
        if big:
            assert e.record_bytes > gen_kafka.BIG and e.request_bytes > gen_kafka.BIG
        if unknown:
            assert not e.topics and not e.error_code


# -- what the encoders made ----------------------------------------------------------------

def test_golden_capture_gives_what_was_encoded():
    spec, flows = golden()
    for flow, conn in zip(flows, spec["connections"]):
        p = KafkaParser()
        check_connection(events(p, flow), conn["events"])
        assert p.state is ParserState.DONE and p.malformed == 0 and p.unmatched == 0


def test_golden_counters_unknown_apis_and_raw_sasl():
    _, flows = golden()
    odds, raw = KafkaParser(), KafkaParser()
    events(odds, flows[4])
    events(raw, flows[5])
    # api key 999 and Metadata v40 are counted, reported, and the requests after them parsed.
    assert (odds.unknown_apis, odds.unknown_versions) == (1, 1)
    assert raw.sasl_tokens == 1 and raw.state is ParserState.DONE


def test_sasl_secrets_never_reach_an_event():
    spec, flows = golden()
    text = repr([events(KafkaParser(), f) for f in flows])
    for secret in spec["secrets"]:
        assert secret not in text
    sasl = events(KafkaParser(), flows[3])
    assert [e.sasl_user for e in sasl] == ["", "alice", "", "bob", ""]
    assert sasl[1].error == "SASL_AUTHENTICATION_FAILED"


def test_summary_names_client_and_first_topic():
    _, flows = golden()
    p = KafkaParser()
    events(p, flows[0])
    assert p.summary() == {"kafka_client_id": "producer-1", "kafka_topic": "orders"}


def test_api_table_matches_the_kafka_schemas_kafka_python_ships():
    # kafka-python 3 carries Kafka's own JSON message schemas: names, newest version and
    # first flexible version of every API in it must be the table's.
    import kafka.protocol.schemas as schemas

    resources = Path(schemas.__file__).parent / "resources"
    checked = 0
    for path in resources.glob("*Request.json"):
        text = re.sub(r"^\s*//.*$", "", path.read_text(), flags=re.M)
        spec = json.loads(text)
        flex = spec["flexibleVersions"]
        first_flex = -1 if flex == "none" else int(flex.rstrip("+"))
        newest = int(spec["validVersions"].split("-")[-1])
        assert API_VERSIONS[spec["apiKey"]] == (spec["name"][:-len("Request")], newest,
                                                first_flex), path.name
        checked += 1
    assert checked >= 50


# -- tshark on the shared corpus -------------------------------------------------------------

TSHARK_FIELDS = ("frame.number", "tcp.stream", "tcp.srcport", "tcp.dstport", "kafka.api_key",
                 "kafka.api_version", "kafka.correlation_id", "kafka.client_id",
                 "kafka.topic_name", "kafka.partition_id", "kafka.error", "_ws.malformed")


def tshark(path: Path) -> list[dict]:
    cmd = ["tshark", "-r", str(path), "-Y", "kafka", "-T", "fields", "-E", "separator=\t",
           "-E", "occurrence=a", "-E", "aggregator=|"]
    for f in TSHARK_FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    rows = []
    for line in out.splitlines():
        values = line.split("\t")
        row = dict(zip(TSHARK_FIELDS, values + [""] * (len(TSHARK_FIELDS) - len(values))))
        rows.append({k: [x for x in v.split("|") if x] if k.startswith("kafka.t") or
                     k in ("kafka.partition_id", "kafka.error") else v for k, v in row.items()})
    return rows


CORPUS_CASES = ["ndpi/kafka/kafka.pcapng", "arkime/kafka-vlan/kafka.pcap"]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
@pytest.mark.parametrize("case", CORPUS_CASES)
def test_corpus_equals_tshark(corpus, case):
    path = corpus / case
    rows = tshark(path)
    assert rows, f"tshark decoded no Kafka in {case}"
    ours: dict[frozenset, dict[int, KafkaEvent]] = {}
    unmatched = 0
    for flow in pcaputil.flows(path):
        if flow.proto != 6:
            continue
        p = KafkaParser()
        got = events(p, flow)
        assert p.state is ParserState.DONE, p.error
        ours[frozenset((flow.sport, flow.dport))] = {e.correlation_id: e for e in got}
        assert len(ours[frozenset((flow.sport, flow.dport))]) == len(got)
        unmatched += p.unmatched
    requests = set()
    tshark_unmatched = []
    for row in rows:
        conn = ours[frozenset((int(row["tcp.srcport"]), int(row["tcp.dstport"])))]
        corr = int(row["kafka.correlation_id"])
        malformed = bool(row["_ws.malformed"])
        topics = [t for t in row["kafka.topic_name"] if t != "[ Null ]"]  # a null name
        if row["kafka.api_version"]:        # a request: tshark shows versions only there
            e = conn[corr]
            requests.add((id(conn), corr))
            assert (e.api_key, e.api_version) == (int(row["kafka.api_key"]),
                                                  int(row["kafka.api_version"]))
            assert e.client_id == row["kafka.client_id"]
            if malformed:
                # tshark 4.0 stops at Produce v9 ("Unsupported Produce version. Supports
                # v0-8") and marks the rest malformed: only the header is compared.
                continue
            if topics:
                assert set(e.topics) == set(topics)
            if e.api in ("Produce", "Fetch", "ListOffsets", "OffsetCommit"):
                assert e.partitions == len(row["kafka.partition_id"])
        elif row["kafka.api_key"]:          # a response tshark paired with its request
            e = conn[corr]
            assert e.response_bytes > 0 and e.api_key == int(row["kafka.api_key"])
            codes = [int(x) for x in row["kafka.error"]]
            assert e.error_code == next((c for c in codes if c), 0)
            assert set(topics) <= set(e.topics)
        else:
            tshark_unmatched.append((conn, corr))
    # Every event is a request tshark saw: none made up, none missed.
    assert requests == {(id(c), k) for c in ours.values() for k in c}
    # Responses tshark could not pair: those whose request precedes the capture are
    # unmatched here too; the one answering tshark's malformed Produce v9 is paired here.
    late = [(c, k) for c, k in tshark_unmatched if k in c]
    assert all(c[k].api == "Produce" and c[k].api_version >= 9 and c[k].response_bytes
               for c, k in late)
    assert len(tshark_unmatched) - len(late) == unmatched


def test_capture_that_starts_with_the_broker(corpus):
    # nDPI's flow 9092 -> 58052 begins with two responses: the engine takes the broker for
    # the initiator. The parser tells requests from responses by content and pairs the one
    # request that follows.
    flow = next(f for f in pcaputil.flows(corpus / "ndpi/kafka/kafka.pcapng")
                if f.proto == 6 and f.sport == 9092)
    p = KafkaParser()
    got = events(p, flow)
    assert [(e.api, e.correlation_id, e.topics) for e in got] == \
        [("Metadata", 142, ("LB_MAIN_LOG_INPUT",))]
    assert p.unmatched == 2 and p.unknown_versions == 0


# -- detection -----------------------------------------------------------------------------------

def test_signature_on_every_encoded_request():
    _, flows = golden()
    for flow in flows[:5]:
        first = flow.stream(C)[:64]
        assert looks_like(first, C), flow.sport
        assert not looks_like(flow.stream(S)[:64], S)
    # The classic consumer talks to port 29092: detected by content, not by port.
    assert detect(protocol=PROTO_TCP, server_port=29092, to_server=flows[1].stream(C)[:64]) \
        == "kafka"


@pytest.mark.parametrize("first", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    b"*1\r\n$4\r\nPING\r\n",
    struct.pack("!II", 41, 0x00030000) + b"user\x00bob\x00database\x00db\x00\x00",  # pgsql
    struct.pack("<iiii", 40, 7, 0, 2013) + b"\x00" * 24,                            # OP_MSG
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,                  # TLS
    b"\x00\x1d\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x07example\x03com\x00"
    b"\x00\x01\x00\x01",                                                            # DNS/TCP
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
])
def test_signature_refuses_other_protocols(first):
    assert not looks_like(first, C)
    assert sniff(first, protocol=PROTO_TCP, to_server=True, server_port=1234) != "kafka"


def test_signature_does_not_fire_on_random_bytes():
    import random

    rng = random.Random(7)
    assert not any(looks_like(rng.randbytes(64), C) for _ in range(10_000))


def test_signature_needs_known_api_version_and_printable_client_id():
    def req(key, version, client=b"c1"):
        body = struct.pack(">hhih", key, version, 1, len(client)) + client
        return struct.pack(">i", len(body) + 4) + body + b"\x00" * 4

    assert looks_like(req(18, 3), C)
    assert not looks_like(req(18, 99), C)           # a version Kafka does not have
    assert not looks_like(req(999, 0), C)           # an api key Kafka does not have
    assert not looks_like(req(3, 1, b"a\x00b"), C)  # a client id that is not text
    assert not looks_like(req(18, 3)[:15], C)       # client id not all there yet


# -- the budget: record payloads are skipped -------------------------------------------------

def produce(value_size: int) -> bytes:
    from kafka.protocol.producer import ProduceRequest

    TD = ProduceRequest.TopicProduceData
    r = ProduceRequest[9](acks=-1, timeout_ms=1000, topic_data=[TD(name="big", partition_data=[
        TD.PartitionProduceData(index=0, records=gen_kafka.batch(1, value=b"z" * value_size))])])
    r.with_header(correlation_id=1, client_id="p")
    return bytes(r.encode(header=True, framed=True))


def fetch_response(value_size: int) -> tuple[bytes, bytes]:
    from kafka.protocol.consumer.fetch import FetchRequest, FetchResponse

    FT = FetchRequest.FetchTopic
    req = FetchRequest[11](max_wait_ms=1, min_bytes=1, topics=[FT(topic="big", partitions=[
        FT.FetchPartition(partition=0, fetch_offset=0, partition_max_bytes=1 << 30)])])
    req.with_header(correlation_id=2, client_id="c")
    FR = FetchResponse.FetchableTopicResponse
    resp = FetchResponse[11](responses=[FR(topic="big", partitions=[FR.PartitionData(
        partition_index=0, high_watermark=1, records=gen_kafka.batch(2, value=b"z" * value_size))])])
    resp.with_header(correlation_id=2)
    return bytes(req.encode(header=True, framed=True)), bytes(resp.encode(header=True, framed=True))


def budgeted(p: KafkaParser, d: Direction, data: bytes, mss: int = 1448) -> int:
    """Feed `data` as the engine does under the kernel budget: segments of `mss` bytes,
    except what skip_hint hands out, which the kernel skips (receive_skip). Returns the
    bytes copied to the parser."""
    pos = copied = 0
    while pos < len(data):
        hint = p.skip_hint(d)
        if hint:
            n = min(hint, len(data) - pos)
            p.receive_skip(d, n, 1)
            pos += n
            continue
        seg = data[pos:pos + mss]
        p.receive_data(d, seg, 1)
        copied += len(seg)
        pos += len(seg)
    return copied


def test_budget_stays_flat_for_big_produce_and_fetch():
    copied = {}
    for size in (10, 10 << 20):
        p = KafkaParser()
        copied[("produce", size)] = budgeted(p, C, produce(size))
        req, resp = fetch_response(size)
        q = KafkaParser()
        budgeted(q, C, req)
        copied[("fetch", size)] = budgeted(q, S, resp)
        for parser, records in ((p, 1), (q, 2)):
            parser.receive_eof(C, 2)
            parser.receive_eof(S, 2)
            (e,) = [t.detail for t in iter(parser.next_event, NEED_DATA)]
            assert e.records == records and e.topics == ("big",)
            assert e.record_bytes > size
    # 10 B and 10 MiB values cost the same bytes, give or take one segment.
    for what in ("produce", "fetch"):
        assert copied[(what, 10 << 20)] - copied[(what, 10)] <= 1448, copied
        assert copied[(what, 10 << 20)] < 4 * 1448


def test_gap_inside_a_payload_is_harmless_inside_a_header_fatal():
    data = produce(100_000)
    p = KafkaParser()
    p.receive_data(C, data[:200], 1)
    assert p.skip_hint(C) > 90_000
    hint = p.skip_hint(C)
    p.receive_gap(C, hint, 2)             # lost inside the record payload: costs nothing
    p.receive_data(C, data[200 + hint:], 3)
    p.receive_eof(C, 4)
    p.receive_eof(S, 4)
    assert p.state is ParserState.DONE
    assert p.next_event().detail.records == 1
    q = KafkaParser()
    q.receive_data(C, data[:10], 1)       # inside the request header
    q.receive_gap(C, 5, 2)
    assert q.state is ParserState.ERROR and "gap" in q.error


# -- errors are data; garbage is an ERROR, never an exception ----------------------------------

def frame(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


def test_garbage_framing_is_an_error_with_a_reason():
    for data in (b"\xff\xff\xff\xff" + b"\x00" * 12, frame(b"\x00\x12"),
                 frame(struct.pack(">hhih", -3, 0, 1, -1))):
        p = KafkaParser()
        p.receive_data(C, frame(struct.pack(">hhih", 18, 0, 1, -1)), 1)   # roles: requests
        p.receive_data(C, data, 2)
        assert p.state is ParserState.ERROR and p.error
    p = KafkaParser()
    p.receive_data(C, frame(struct.pack(">hhih", 18, 0, 1, -1)), 1)
    p.receive_data(S, frame(b"\x00\x01"), 2)          # a response without correlation id
    assert p.state is ParserState.ERROR
    # The request seen before the garbage is still reported.
    assert p.next_event().detail.api == "ApiVersions"


def test_a_body_that_breaks_its_layout_costs_only_that_message():
    # A Produce whose topic array claims more topics than the message holds: marked
    # malformed; the next request and both responses are still paired.
    head = struct.pack(">hhih", 0, 3, 7, 1) + b"p"
    bad = frame(head + b"\xff\xff" + struct.pack(">hi", 1, 1000) + struct.pack(">i", 50) + b"\x00")
    good = frame(struct.pack(">hhih", 18, 0, 8, 1) + b"p")
    p = KafkaParser()
    p.receive_data(C, bad + good, 1)
    # Produce v3's response: no topics, throttle time; then ApiVersions': UNSUPPORTED_VERSION.
    p.receive_data(S, frame(struct.pack(">iii", 7, 0, 0)) + frame(struct.pack(">ih", 8, 35)), 2)
    got = [t.detail for t in iter(p.next_event, NEED_DATA)]
    assert [(e.api, e.malformed, e.response_bytes > 0) for e in got] == \
        [("Produce", True, True), ("ApiVersions", False, True)]
    assert got[1].error == "UNSUPPORTED_VERSION" and p.malformed == 1
    assert p.state is ParserState.OK


def test_pending_requests_are_bounded():
    p = KafkaParser(max_pending=2)
    for corr in range(3):
        p.receive_data(C, frame(struct.pack(">hhih", 12, 0, corr, 1) + b"c"
                                + b"\x00\x01g" + b"\x00" * 4 + b"\x00\x01m"), 1)
    assert p.evicted == 1 and p.next_event().detail.correlation_id == 0
    p.receive_data(S, frame(struct.pack(">ih", 2, 27)), 2)
    e = p.next_event().detail
    assert (e.correlation_id, e.group, e.error) == (2, "g", "REBALANCE_IN_PROGRESS")


def test_acks_zero_produce_is_reported_at_once():
    _, flows = golden()
    p = KafkaParser()
    odds = flows[4]
    first = next(c for c in odds.chunks if c.direction == C)
    p.receive_data(C, first.data, first.ts_ns)
    e = p.next_event().detail
    assert (e.api, e.records, e.response_bytes, e.latency_ns) == ("Produce", 7, 0, 0)


def test_event_checks_its_fields():
    with pytest.raises(ValueError):
        KafkaEvent(records=-1)
    with pytest.raises(ValueError):
        KafkaEvent(correlation_id=1 << 31)
    with pytest.raises(ValueError):
        KafkaEvent(compression="brotli")
    assert kafka.error_name(6) == "NOT_LEADER_OR_FOLLOWER" and kafka.error_name(0) == ""
    assert kafka.error_name(-1) == "UNKNOWN_SERVER_ERROR" and kafka.error_name(5000) == ""


# -- end to end: replay, JSON and table output, a real collector, tail's filter -------------------

def test_replay_gives_the_parser_events_and_the_table_lines(tmp_path):
    from sensor import model
    from sensor.export.table import TableWriter
    from tests.replay.test_l7_kinds import _us, by_client_port, replay

    records = replay(SESSION, tmp_path)
    got = by_client_port(records, "kafka")
    spec, flows = golden()
    want = {f.sport: events(KafkaParser(), f) for f in flows}
    assert _us(got) == _us(want)
    for flow, conn in zip(flows, spec["connections"]):
        check_connection(got[flow.sport], conn["events"])
    apps = {r.dst_port: r.app_proto for r in records if isinstance(r, model.Flow)}
    assert apps == {9092: "kafka", 29092: "kafka"}
    writer = TableWriter(None, color=False, width=None)
    lines = [writer.line(r) for r in records if isinstance(r, model.L7Event)]
    assert any(" kafka " in ln and "Produce v9 orders,audit" in ln and
               "NOT_LEADER_OR_FOLLOWER" in ln for ln in lines), lines


def test_collector_stores_the_events_and_tail_filters_by_topic(tmp_path):
    from tests.collector.conftest import RunningCollector
    from collector.server import CollectorConfig

    running = RunningCollector(CollectorConfig(listen="127.0.0.1:0", data_dir=tmp_path / "db"))
    try:
        done = subprocess.run([LOUPE, "replay", "--no-progress", str(SESSION), "--collector",
                               running.address, "--sensor-id", "s-kafka"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        tail = subprocess.run([LOUPE, "tail", "--collector", running.address, "--type", "kafka",
                               "--kafka-topic", "order*", "--first", "1000", "--format", "json"],
                              capture_output=True, text=True, timeout=60)
        assert tail.returncode == 0, tail.stderr
    finally:
        running.stop()
    stored = [json.loads(line) for line in tail.stdout.splitlines()]
    spec, _ = golden()
    want = sorted((e["api"], e["correlation_id"]) for c in spec["connections"]
                  for e in c["events"] if any(t.startswith("order") for t in e["topics"]))
    assert sorted((r["detail"]["api"], r["detail"]["correlation_id"]) for r in stored) == want
    assert all(r["type"] == "kafka" and r["sensor_id"] == "s-kafka" for r in stored)
    produce9 = next(r["detail"] for r in stored if r["detail"]["api"] == "Produce"
                    and r["detail"]["records"] == 14)
    assert produce9["topics"] == ["orders", "audit"] and produce9["error_code"] == 6
