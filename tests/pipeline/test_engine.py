"""The L7 stage and the pipeline on crafted packets: skip hints, DONE and ERROR stopping
the flow, memory bounds, IP reassembly for L7, shutdown order, and the Python API."""

from __future__ import annotations

import struct

import pytest

from sensor.engine.l7engine import L7Engine
from sensor.engine.meter import MAX_DEFRAG_DATAGRAMS, Meter
from sensor.engine.pipeline import Pipeline, PipelineConfig
from sensor.engine.reassembly import MemoryBudget, ReassemblyLimits
from sensor.export.sinks import table_schema
from sensor.l7.base import ParserState
from sensor.model import Flow, FlowEndReason, HttpEvent, L7Event, LostEvent, TlsEvent
from sensor.replay import replay, to_dataframe
from tests.conftest import REPO
from tests.fixtures import packets as pk

A, B = "198.18.0.1", "198.18.0.2"
T0 = 1_700_000_000_000_000_000
MS = 1_000_000


class Collect:
    def __init__(self):
        self.records = []
        self.closed = False

    def write(self, record):
        assert not self.closed
        self.records.append(record)

    def flush(self):
        pass

    def close(self):
        self.closed = True


def feed(p, ts, frame):
    p.meter.feed(ts, 0, 1, frame, len(frame))


class Conn:
    """One TCP connection's packets with running sequence numbers."""

    def __init__(self, p, sport=40000, dport=80, t=T0):
        self.p, self.sport, self.dport, self.t = p, sport, dport, t
        self.cseq, self.sseq = 100, 500

    def send(self, from_client, payload=b"", flags=pk.ACK | pk.PSH):
        self.t += MS
        if from_client:
            frame = pk.tcp4(A, self.sport, B, self.dport, flags, self.cseq, self.sseq, payload)
            self.cseq += len(payload) + (1 if flags & (pk.SYN | pk.FIN) else 0)
        else:
            frame = pk.tcp4(B, self.dport, A, self.sport, flags, self.sseq, self.cseq, payload)
            self.sseq += len(payload) + (1 if flags & (pk.SYN | pk.FIN) else 0)
        feed(self.p, self.t, frame)

    def open(self):
        self.send(True, flags=pk.SYN)
        self.send(False, flags=pk.SYN | pk.ACK)
        self.send(True, flags=pk.ACK)
        return self

    def close(self):
        self.send(True, flags=pk.FIN | pk.ACK)
        self.send(False, flags=pk.FIN | pk.ACK)
        self.send(True, flags=pk.ACK)


def _flow_state(p):
    (st,) = list(p.meter.table.tcp.values())
    return st


def test_body_of_known_length_is_skipped_not_parsed():
    sink = Collect()
    p = Pipeline(sink)
    c = Conn(p).open()
    c.send(True, b"GET /big HTTP/1.1\r\nHost: skip.test\r\n\r\n")
    body = 100 * 1400
    c.send(False, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % body)
    calls = []
    engine = p.l7
    original = engine.tcp_segment
    engine_calls = lambda *a: (calls.append(a), original(*a))  # noqa: E731
    p.meter.sink.tcp_segment = engine_calls
    for _ in range(100):
        c.send(False, b"b" * 1400)
    c.close()
    p.close()
    (flow,) = [r for r in sink.records if isinstance(r, Flow)]
    (http,) = [r for r in sink.records if isinstance(r, L7Event)]
    assert http.detail.response_body_len == body and http.detail.status == 200
    assert flow.l7_coverage.skipped_octets == body
    # The meter did not even hand the body segments over (the replay twin of the
    # kernel's skip-until-seq): only the FINs reached the L7 stage.
    assert len(calls) <= 3


def test_tls_done_stops_reassembly_and_counts_the_rest_as_skipped():
    sink = Collect()
    p = Pipeline(sink)
    hello = (REPO / "tests" / "golden" / "tls13-split-hello-ipv6.pcap")
    assert hello.exists()
    # A TLS 1.3 handshake from the golden capture, replayed over IPv4 here.
    from sensor.replay.reader import CaptureReader
    with CaptureReader(hello) as r:
        payloads = []
        for _ts, _i, _l, frame, _w in r:
            tcp_off = 14 + 40
            doff = (frame[tcp_off + 12] >> 4) * 4
            data = frame[tcp_off + doff:]
            if data:
                sport = struct.unpack("!H", frame[tcp_off:tcp_off + 2])[0]
                payloads.append((sport != 443, data))
    c = Conn(p, dport=443).open()
    for from_client, data in payloads:
        c.send(from_client, data)
    st = _flow_state(p)
    assert st.l7_off and st.l7.reasm is None      # stopped: memory given back
    assert st.l7.parser.state is ParserState.DONE
    c.send(False, b"\x17\x03\x03\x10\x00" + bytes(4096))
    c.close()
    p.close()
    (flow,) = [r for r in sink.records if isinstance(r, Flow)]
    assert flow.app_proto == "tls" and flow.tls_sni == "split.golden.test"
    assert flow.l7_coverage.skipped_octets >= 4101
    assert [r.kind for r in sink.records if isinstance(r, L7Event)] == ["tls"]
    assert p.l7.budget.used == 0


def test_garbage_is_a_counted_parser_error_and_the_stream_stays_in_error():
    sink = Collect()
    p = Pipeline(sink)
    c = Conn(p, dport=80).open()
    c.send(True, b"\x00\x01garbage that is not HTTP\r\n\r\n")
    st = _flow_state(p)
    assert st.l7.parser.state is ParserState.ERROR and st.l7_off
    c.send(True, b"GET / HTTP/1.1\r\nHost: late.test\r\n\r\n")   # never parsed
    c.close()
    summary = p.close()
    assert summary.lost == {"parser_error": 1}
    assert not [r for r in sink.records if isinstance(r, L7Event)]
    (lost,) = [r for r in sink.records if isinstance(r, LostEvent)]
    assert (lost.source, lost.count) == ("parser_error", 1)
    assert sink.records[-1] is lost and sink.closed   # loss last, then the sink closes


def test_reassembly_memory_is_bounded_globally_and_drops_are_counted():
    sink = Collect()
    budget = 64 * 1024
    p = Pipeline(sink, PipelineConfig(reassembly_budget_bytes=budget))
    conns = [Conn(p, sport=41000 + i).open() for i in range(20)]
    peak = 0
    for c in conns:
        c.send(True, b"GET / HTTP/1.1\r\nHost: hole.test\r\n\r\n")
        c.sseq += 1000      # a hole: 1000 bytes of the response never arrive
        for _ in range(4):
            c.send(False, b"x" * 1400)
            peak = max(peak, p.l7.budget.used)
    assert peak <= budget
    summary = p.close()
    assert summary.lost.get("reassembly_memory", 0) > 0
    assert p.l7.budget.used == 0


def test_flow_end_flushes_l7_before_the_flow_record():
    """A request without response at the end of the capture: the L7 stage reports it
    (status 0) before the flow's FORCED_END record."""
    sink = Collect()
    p = Pipeline(sink)
    c = Conn(p).open()
    c.send(True, b"GET /unanswered HTTP/1.1\r\nHost: end.test\r\n\r\n")
    p.close()
    kinds = [type(r) for r in sink.records]
    assert kinds == [L7Event, Flow]
    http, flow = sink.records
    assert isinstance(http.detail, HttpEvent) and http.detail.status == 0
    assert flow.flow_end_reason is FlowEndReason.FORCED_END and flow.http_host == "end.test"
    assert http.uid == flow.uid and http.community_id == flow.community_id


def test_fragmented_datagram_that_never_completes_is_counted():
    sink = Collect()
    p = Pipeline(sink)
    dns = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x03abc\x00\x00\x01\x00\x01"
    udp = pk.udp(5353, 53, dns + b"p" * 40)
    first = pk.ether(pk.ipv4(A, B, 17, udp[:32], ident=9, frag=0x2000))
    feed(p, T0, first)          # the rest never comes
    summary = p.close()
    assert summary.errors.get("fragmented_payload_not_passed") == 1
    assert not [r for r in sink.records if isinstance(r, L7Event)]


def test_fragment_reassembly_is_bounded():
    sink = Collect()
    p = Pipeline(sink)
    for i in range(MAX_DEFRAG_DATAGRAMS + 50):
        feed(p, T0 + i, pk.ether(pk.ipv4(A, B, 17, pk.udp(6000, 53, b"q" * 24),
                                         ident=i, frag=0x2000)))
    assert p.meter._defrag._pending.__len__() <= MAX_DEFRAG_DATAGRAMS
    assert p.meter._defrag.given_up == 50


def test_engine_alone_is_a_payload_sink_for_any_meter():
    out = []
    engine = L7Engine(emit=out.append, budget=MemoryBudget(1 << 20),
                      limits=ReassemblyLimits(max_buffered_bytes=4096))
    meter = Meter(emit=out.append, sink=engine)
    q = b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04test\x00\x00\x01\x00\x01"
    a = (b"\x00\x07\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x04test\x00\x00\x01\x00\x01"
         b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc6\x12\x00\x09")
    f1, f2 = pk.udp4(A, 7000, B, 53, q), pk.udp4(B, 53, A, 7000, a)
    meter.feed(T0, 0, 1, f1, len(f1))
    meter.feed(T0 + MS, 0, 1, f2, len(f2))
    meter.flush()
    dns, flow = out
    assert dns.detail.answers[0].data == "198.18.0.9" and dns.detail.latency_ns == MS
    assert flow.app_proto == "dns" and flow.dns_qname == "test"


def test_python_api_streams_records_and_makes_dataframes():
    pcap = REPO / "tests" / "golden" / "dig-dnsmasq.pcap"
    gen = replay(pcap)
    first = next(gen)                 # records come out before the run ends
    rest = list(gen)
    assert [first, *rest][-1].__class__ in (Flow, LostEvent)
    frames = to_dataframe(pcap)
    # One frame per record kind: flows, every registered L7 kind, loss.
    from sensor.l7 import registry

    assert set(frames) == {"flow", *registry.kind_names(), "lost"}
    assert {"http", "dns", "tls", "mysql", "pgsql", "redis"} <= set(frames)
    assert list(frames["flow"].columns) == table_schema("flows").names
    assert list(frames["dns"].columns) == table_schema("dns").names
    assert sorted(frames["dns"]["qname"]) == ["dig.golden.test", "dig.golden.test",
                                              "v6.golden.test"]
    assert len(frames["flow"]) == sum(isinstance(r, Flow) for r in [first, *rest])
    with pytest.raises(Exception) as info:
        list(replay(REPO / "README.md"))
    assert "not a pcap or pcapng capture" in str(info.value)


def test_tls_event_fields_on_real_capture_via_api():
    recs = list(replay(REPO / "tests" / "golden" / "openssl-tls12.pcap"))
    (tls,) = [r for r in recs if isinstance(r, L7Event)]
    assert isinstance(tls.detail, TlsEvent) and tls.detail.version == 0x0303
