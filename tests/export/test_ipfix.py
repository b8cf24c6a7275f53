"""sensor/export/ipfix.py against an independent decoder (tests/export/ipfix_decode.py):
real UDP and TCP sockets on loopback, the bytes on the wire decoded from RFC 7011."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from sensor import model
from sensor.errors import ConfigError
from sensor.export.ipfix import IpfixExporter, IpfixSink, parse_target
from tests.export import records
from tests.export.ipfix_decode import REVERSE_PEN, Decoder, addr, num, text

PEN = 32473


class Clock:
    """The sink's monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def udp():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def receive(sock, n: int) -> list[bytes]:
    return [sock.recv(65535) for _ in range(n)]


def sink_for(sock, **kw) -> IpfixSink:
    return IpfixSink(f"127.0.0.1:{sock.getsockname()[1]}", **kw)


def flow(i: int, **kw) -> model.Flow:
    return dataclasses.replace(records.numbered_flow(i), **kw)


def test_biflow_record_carries_every_field(udp):
    sink = sink_for(udp, domain=7)
    sink.write(records.FLOW)
    sink.write(records.HTTP)          # L7 events and loss records are not flows: ignored
    sink.write(records.LOST)
    sink.close()
    (data,) = receive(udp, 1)
    msg = Decoder().message(data)
    assert msg.domain == 7 and msg.sequence == 0
    assert msg.templates == [256, 257]
    (rec,) = msg.records
    f = records.FLOW
    assert addr(rec, "sourceIPv4Address") == f.src_addr
    assert addr(rec, "destinationIPv4Address") == f.dst_addr
    assert num(rec, "sourceTransportPort") == 40000
    assert num(rec, "destinationTransportPort") == 80
    assert num(rec, "protocolIdentifier") == 6
    assert num(rec, "flowStartMilliseconds") == f.flow_start_ns // 1_000_000
    assert num(rec, "flowEndMilliseconds") == f.flow_end_ns // 1_000_000
    # The initiator's direction in the standard IEs, the responder's in RFC 5103's.
    assert num(rec, "octetDeltaCount") == 500
    assert num(rec, "packetDeltaCount") == 5
    assert num(rec, "layer2OctetDeltaCount") == 570
    assert num(rec, "tcpControlBits") == 0x1B
    assert num(rec, "octetDeltaCount", REVERSE_PEN) == 1500
    assert num(rec, "packetDeltaCount", REVERSE_PEN) == 4
    assert num(rec, "layer2OctetDeltaCount", REVERSE_PEN) == 1556
    assert num(rec, "tcpControlBits", REVERSE_PEN) == 0x1A
    assert num(rec, "tcpSynTotalCount") == 2 and num(rec, "tcpFinTotalCount") == 2
    assert num(rec, "tcpRstTotalCount") == 0
    assert num(rec, "flowEndReason") == 3
    assert num(rec, "biflowDirection") == 1
    assert num(rec, "vlanId") == 100 and num(rec, "dot1qCustomerVlanId") == 7
    assert num(rec, "ingressInterface") == 3
    # Loupe's own IEs, under the enterprise number (docs/export.md's table).
    assert text(rec, PEN, 1) == "http"
    assert text(rec, PEN, 2) == ""
    assert text(rec, PEN, 3) == "example.test"
    assert text(rec, PEN, 5) == "1:abc="
    assert text(rec, PEN, 7) == "SF" and text(rec, PEN, 8) == "ShADadFf"
    assert text(rec, PEN, 9) == "Cx1" and text(rec, PEN, 10) == "s1"
    assert int.from_bytes(rec[(PEN, 11)], "big") == 120_000
    assert sink.counters() == {"ipfix_records_sent": 1, "ipfix_records_dropped": 0,
                               "ipfix_messages_sent": 1, "ipfix_send_errors": 0}


def test_ipv6_uses_its_own_template_and_a_configured_pen(udp):
    sink = sink_for(udp, pen=4242)
    sink.write(dataclasses.replace(records.ICMP6_FLOW, tls_sni="x.test",
                                   tls_ja4="t13d1516h2_8daaf6152771_b0da82dd1658"))
    sink.close()
    decoder = Decoder()
    msg = decoder.message(receive(udp, 1)[0])
    assert [spec for spec in decoder.templates[(0, 257)] if spec[2] not in (0, REVERSE_PEN)]
    assert all(pen == 4242 for _, _, pen in decoder.templates[(0, 257)]
               if pen not in (0, REVERSE_PEN))
    (rec,) = msg.records
    assert addr(rec, "sourceIPv6Address") == "fc00::1"
    assert addr(rec, "destinationIPv6Address") == "fc00::2"
    assert num(rec, "icmpTypeCodeIPv6") == 128 << 8
    assert text(rec, 4242, 2) == "x.test"
    assert text(rec, 4242, 4) == "t13d1516h2_8daaf6152771_b0da82dd1658"


def test_messages_are_bounded_and_sequence_counts_data_records(udp):
    sink = sink_for(udp)
    flows = [flow(i) for i in range(200)]
    for f in flows:
        sink.write(f)
    sink.close()
    n = sink.messages_sent
    assert n > 5          # 200 records do not fit one 1400-octet message
    decoder = Decoder()
    seen, expected_seq = [], 0
    for data in receive(udp, n):
        assert len(data) <= 1400
        msg = decoder.message(data)
        # RFC 7011 3.1: data records sent before this message; templates do not count.
        assert msg.sequence == expected_seq
        expected_seq += len(msg.records)
        seen += msg.records
    assert [text(r, PEN, 9) for r in seen] == [f.uid for f in flows]
    assert sink.sequence == 200


def test_long_names_are_cut_on_a_character_boundary_and_still_fit(udp):
    huge = "é" * 2000     # two octets each: a cut in the middle would be invalid UTF-8
    sink = sink_for(udp)
    big = dataclasses.replace(records.FLOW, src_addr="fc00::1", dst_addr="fc00::2",
                              ip_version=6, tls_sni=huge, http_host=huge, dns_qname=huge,
                              app_proto=huge, history=huge, sensor_id=huge, uid=huge)
    sink.write(big)
    sink.write(big)
    sink.close()
    decoder = Decoder()
    recs = [r for data in receive(udp, sink.messages_sent) for r in decoder.message(data).records]
    assert len(recs) == 2
    sni = text(recs[0], PEN, 2)
    assert 0 < len(sni.encode()) <= 253 and set(sni) == {"é"}


def test_udp_template_refresh(udp):
    mono = Clock()
    sink = sink_for(udp, refresh_s=30, refresh_messages=3, monotonic=mono)
    carried = []
    for i in range(9):
        if i == 7:
            mono.now += 31
        sink.write(flow(i))
        sink.flush()
        data = receive(udp, 1)[0]
        # Decoded without the earlier templates: only messages that carry them decode.
        carried.append(int.from_bytes(data[16:18], "big") == 2)
    sink.close()
    # Messages 0, 3, 6 by count (every 3rd after the last templates), 7 by time.
    assert carried == [True, False, False, True, False, False, True, True, False]


def test_send_errors_are_counted_and_leave_a_sequence_gap():
    port_holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    port_holder.bind(("127.0.0.1", 0))
    port = port_holder.getsockname()[1]
    port_holder.close()                    # nobody listens: ICMP port unreachable
    sink = IpfixSink(f"127.0.0.1:{port}")
    for i in range(5):
        sink.write(flow(i))
        sink.flush()
    # A datagram leaves before the ICMP error of the one before is back, and the
    # send after it reports that error: so about every other send fails.
    assert sink.send_errors >= 1 and sink.records_dropped >= 1
    assert sink.records_sent + sink.records_dropped == 5
    assert sink.last_error
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", port))
    receiver.settimeout(0.5)
    try:
        # An ICMP error still pending fails the next send; at most one more can.
        for i in range(5, 8):
            before, dropped = sink.sequence, sink.records_dropped
            sink.write(flow(i))
            sink.flush()
            if sink.records_dropped == dropped:
                break
        data = receiver.recv(65535)
    finally:
        receiver.close()
        sink.close()
    # Dropped records still advanced the sequence: the collector sees the gap.
    assert int.from_bytes(data[8:12], "big") == before
    assert before >= 5


def test_uniflow_mode_sends_each_direction_in_forward_ies(udp):
    sink = sink_for(udp, uniflow=True)
    sink.write(records.FLOW)
    sink.write(flow(1))                    # no responder packets: one record only
    sink.close()
    recs = Decoder().message(receive(udp, 1)[0]).records
    assert len(recs) == 3
    fwd, back, lone = recs
    assert (addr(fwd, "sourceIPv4Address"), num(fwd, "sourceTransportPort")) == \
        ("198.18.0.1", 40000)
    assert (num(fwd, "octetDeltaCount"), num(fwd, "packetDeltaCount")) == (500, 5)
    assert num(fwd, "octetDeltaCount", REVERSE_PEN) == 0
    assert (addr(back, "sourceIPv4Address"), num(back, "sourceTransportPort")) == \
        ("198.18.0.2", 80)
    assert addr(back, "destinationIPv4Address") == "198.18.0.1"
    assert (num(back, "octetDeltaCount"), num(back, "packetDeltaCount")) == (1500, 4)
    assert num(back, "layer2OctetDeltaCount") == 1556
    assert num(back, "biflowDirection") == 2       # reverseInitiator: dst initiated
    assert num(fwd, "biflowDirection") == 1
    assert num(lone, "packetDeltaCount") == 1
    assert sink.records_sent == 3


class TcpCollector:
    """Accepts connections one after another and keeps each one's byte stream."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.port = self.server.getsockname()[1]
        self.streams: list[bytearray] = []
        self.conns: list[socket.socket] = []

    def accept(self) -> socket.socket:
        self.server.settimeout(5)
        conn, _ = self.server.accept()
        conn.settimeout(5)
        self.conns.append(conn)
        return conn

    def read_messages(self, conn: socket.socket, n: int) -> list[bytes]:
        out, buf = [], b""
        while len(out) < n:
            while len(buf) < 4 or len(buf) < int.from_bytes(buf[2:4], "big"):
                chunk = conn.recv(65535)
                assert chunk, "connection closed early"
                buf += chunk
            length = int.from_bytes(buf[2:4], "big")
            out.append(buf[:length])
            buf = buf[length:]
        return out

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.server.close()


def test_tcp_templates_once_per_connection_and_sequence_per_session():
    coll = TcpCollector()
    try:
        sink = IpfixSink(f"tcp://127.0.0.1:{coll.port}", monotonic=Clock())
        conn = coll.accept()
        for i in range(3):
            sink.write(flow(i))
            sink.flush()
        decoder = Decoder()
        msgs = [decoder.message(m) for m in coll.read_messages(conn, 3)]
        assert [m.templates for m in msgs] == [[256, 257], [], []]
        assert [m.sequence for m in msgs] == [0, 1, 2]
        # Only the first message of the connection carries templates, even past
        # the UDP refresh count.
        sink.refresh_messages = 1
        sink.write(flow(3))
        sink.flush()
        (data,) = coll.read_messages(conn, 1)
        assert int.from_bytes(data[16:18], "big") != 2
        assert int.from_bytes(data[8:12], "big") == 3
        # The collector goes away: sends fail, are counted, and a new connection
        # starts over with templates and sequence 0.
        conn.close()
        for i in range(4, 40):
            sink.write(flow(i))
            sink.flush()
        assert sink.send_errors >= 1 and sink.records_dropped >= 1
        sink._next_connect = 0.0          # skip the reconnect delay
        sink.write(flow(40))
        sink.flush()
        conn2 = coll.accept()
        (data,) = coll.read_messages(conn2, 1)
        msg = Decoder().message(data)
        assert msg.templates == [256, 257] and msg.sequence == 0
        assert [text(r, PEN, 9) for r in msg.records] == [flow(40).uid]
        sink.close()
    finally:
        coll.close()


def test_exporter_adds_send_counters_and_keeps_loss_records_off_the_wire(udp):
    exporter = IpfixExporter(sink_for(udp), sensor_id="s1", queue_records=100)
    for i in range(3):
        assert exporter.submit(flow(i))
    assert exporter.submit(records.LOST)
    exporter.close(5)
    decoder = Decoder()
    recs = []
    while len(recs) < 3:
        recs += decoder.message(udp.recv(65535)).records
    assert len(recs) == 3
    c = exporter.counters()
    assert c["ipfix_records_sent"] == 3 and c["ipfix_records_dropped"] == 0
    assert c["records_written"] == 4


@pytest.mark.parametrize("text_, want", [
    ("127.0.0.1:4739", ("127.0.0.1", 4739, "udp")),
    ("udp://collector.example:4739", ("collector.example", 4739, "udp")),
    ("TCP://[::1]:4739", ("::1", 4739, "tcp")),
])
def test_targets(text_, want):
    t = parse_target(text_)
    assert (t.host, t.port, t.transport) == want


@pytest.mark.parametrize("bad", ["sctp://h:1", "h", "h:0", "tcp://h:99999", "[::1:1"])
def test_bad_targets_are_one_line_config_errors(bad):
    with pytest.raises(ConfigError) as exc:
        parse_target(bad)
    assert "\n" not in str(exc.value)


def test_sensor_config_wires_the_exporter_and_its_loss_metric(udp):
    from sensor import config as cfg
    from sensor.sensor_cli import _export_snapshot, build_exporters

    port = udp.getsockname()[1]
    config = cfg.parse_config("sensor", {
        "collector": {"address": ""},
        "export": {"ipfix": f"udp://127.0.0.1:{port}", "ipfix_domain": 9, "ipfix_pen": 4242,
                   "ipfix_uniflow": True}}, source="test")
    fan = build_exporters(config, "none")
    assert fan.submit(records.FLOW)
    fan.close(5)
    msg = Decoder().message(udp.recv(65535))
    assert msg.domain == 9 and len(msg.records) == 2          # uniflow: both directions
    assert text(msg.records[0], 4242, 9) == records.FLOW.uid
    assert _export_snapshot(fan)["lost"]["ipfix_send_error"] == 0


@pytest.mark.parametrize("bad", ["sctp://h:1", "h", "udp://h:1:2"])
def test_bad_config_target_names_the_key(bad):
    from sensor import config as cfg

    with pytest.raises(ConfigError, match="export.ipfix"):
        cfg.parse_config("sensor", {"export": {"ipfix": bad}}, source="sensor.toml")
