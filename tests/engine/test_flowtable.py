"""Flow table timeouts, interim records, eviction and TCP end, driven by packet sequences
fed through the real meter (packet time only)."""

from __future__ import annotations

from sensor.engine.meter import Meter
from sensor.flow.semantics import NS, Timeouts
from sensor.model import FlowEndReason as R
from tests.fixtures import packets as pk

A, B = "198.18.0.1", "198.18.0.2"
T0 = 1_700_000_000 * NS


def _meter(**kw):
    out = []
    return Meter(emit=out.append, **kw), out


def _feed(m, ts, frame):
    m.feed(ts, 0, 1, frame, len(frame))


def _handshake(m, t, sport=40000):
    _feed(m, t, pk.tcp4(A, sport, B, 80, pk.SYN, seq=100))
    _feed(m, t + 10_000_000, pk.tcp4(B, 80, A, sport, pk.SYN | pk.ACK, seq=500, ack=101))
    _feed(m, t + 25_000_000, pk.tcp4(A, sport, B, 80, pk.ACK, seq=101, ack=501))


def test_udp_idle_timeout_at_60s_and_tcp_kept_until_300s():
    m, out = _meter()
    _feed(m, T0, pk.udp4(A, 5000, B, 53, b"q"))
    _handshake(m, T0)
    _feed(m, T0 + 59 * NS, pk.udp4(A, 6000, B, 53, b"keepalive of another flow"))
    assert out == []
    _feed(m, T0 + 62 * NS, pk.udp4(A, 6000, B, 53, b"x"))
    assert [(r.src_port, r.flow_end_reason) for r in out] == [(5000, R.IDLE_TIMEOUT)]
    _feed(m, T0 + 299 * NS, pk.udp4(A, 7000, B, 53, b"x"))
    assert [r for r in out if r.protocol == 6] == []
    _feed(m, T0 + 302 * NS, pk.udp4(A, 7000, B, 53, b"x"))
    tcp = [r for r in out if r.protocol == 6]
    assert [r.flow_end_reason for r in tcp] == [R.IDLE_TIMEOUT]
    assert tcp[0].conn_state == "S1" and tcp[0].history == "ShA"
    assert tcp[0].handshake_rtt_ns == 25_000_000
    assert tcp[0].flow_end_ns == T0 + 25_000_000


def test_active_timeout_emits_interim_records_with_same_uid_and_deltas():
    m, out = _meter(timeouts=Timeouts(active_ns=100 * NS))
    for i in range(25):   # one packet every 10 s for 240 s
        _feed(m, T0 + i * 10 * NS, pk.udp4(A, 5000, B, 53, b"x" * 10))
    m.flush()
    assert [r.flow_end_reason for r in out] == [R.ACTIVE_TIMEOUT, R.ACTIVE_TIMEOUT,
                                                 R.FORCED_END]
    assert len({r.uid for r in out}) == 1
    assert sum(r.initiator_packets for r in out) == 25
    # A packet at exactly the deadline belongs to the next record.
    assert [r.initiator_packets for r in out] == [10, 10, 5]
    assert all(r.initiator_octets == r.initiator_packets * 38 for r in out)
    assert out[1].flow_start_ns > out[0].flow_end_ns


def test_tcp_end_after_fin_both_ways_and_linger():
    m, out = _meter()
    _handshake(m, T0)
    t = T0 + NS
    _feed(m, t, pk.tcp4(A, 40000, B, 80, pk.FIN | pk.ACK, seq=101, ack=501))
    _feed(m, t + 1000, pk.tcp4(B, 80, A, 40000, pk.FIN | pk.ACK, seq=501, ack=102))
    _feed(m, t + 2000, pk.tcp4(A, 40000, B, 80, pk.ACK, seq=102, ack=502))
    _feed(m, t + 4 * NS, pk.udp4(A, 1, B, 2))
    assert out == []            # still lingering: the last ACK is counted
    _feed(m, t + 6 * NS, pk.udp4(A, 1, B, 2))
    (r,) = out
    assert r.flow_end_reason == R.END_OF_FLOW
    assert (r.initiator_packets, r.responder_packets) == (4, 2)
    assert r.conn_state == "SF" and r.history == "ShAFf"
    assert r.tcp_fin_count == 2 and r.tcp_syn_count == 2


def test_rst_ends_flow_and_new_syn_reuses_key():
    m, out = _meter()
    _handshake(m, T0)
    _feed(m, T0 + NS, pk.tcp4(B, 80, A, 40000, pk.RST, seq=501))
    _handshake(m, T0 + 2 * NS)          # same 5-tuple, new connection within linger
    m.flush()
    assert [r.flow_end_reason for r in out] == [R.END_OF_FLOW, R.FORCED_END]
    assert out[0].conn_state == "RSTR" and out[0].history == "ShAr"
    assert out[0].uid != out[1].uid


def test_full_table_evicts_longest_idle_and_counts():
    m, out = _meter(max_flows=3)
    for i in range(3):
        _feed(m, T0 + i, pk.udp4(A, 1000 + i, B, 53))
    _feed(m, T0 + 10, pk.udp4(A, 1000, B, 53))      # 1000 is now the most recent
    _feed(m, T0 + 20, pk.udp4(A, 2000, B, 53))      # table full: evict 1001
    assert [(r.src_port, r.flow_end_reason) for r in out] == [(1001, R.LACK_OF_RESOURCES)]
    assert m.table.stats.evicted == 1 and len(m.table) == 3


def test_initiator_is_first_pure_syn_sender_even_if_seen_second():
    m, out = _meter()
    _feed(m, T0, pk.tcp4(B, 80, A, 40000, pk.ACK, seq=1, ack=1))   # stray, from server
    _feed(m, T0 + 1, pk.tcp4(A, 40000, B, 80, pk.SYN, seq=100))
    m.flush()
    (r,) = out
    assert (r.src_addr, r.src_port) == (A, 40000)
    assert (r.initiator_packets, r.responder_packets) == (1, 1)


def test_vlan_tags_are_part_of_the_key():
    m, out = _meter()
    _feed(m, T0, pk.udp4(A, 1, B, 2, vlans=(10,)))
    _feed(m, T0, pk.udp4(A, 1, B, 2, vlans=(20,)))
    _feed(m, T0, pk.udp4(A, 1, B, 2, vlans=(13, 10)))
    m.flush()
    assert sorted((r.vlan_id, r.inner_vlan_id) for r in out) == [(10, 0), (13, 10), (20, 0)]


def test_fragments_follow_first_fragment_and_orphans_are_counted():
    m, out = _meter()
    body = pk.udp(5353, 53, b"z" * 40)
    first = pk.ether(pk.ipv4(A, B, 17, body[:24], ident=7, frag=0x2000))
    later = pk.ether(pk.ipv4(A, B, 17, body[24:], ident=7, frag=3))
    orphan = pk.ether(pk.ipv4(A, B, 17, b"y" * 16, ident=8, frag=3))
    for f in (later, first, later, orphan):   # the first `later` arrives too early
        _feed(m, T0, f)
    m.flush()
    (r,) = out
    assert (r.src_port, r.dst_port, r.initiator_packets) == (5353, 53, 2)
    assert m.stats.fragments_orphaned == 2 and m.stats.fragments_attributed == 1


def test_ipv6_extension_headers_and_fragment_header():
    m, out = _meter()
    udp = pk.udp(1000, 53, b"a" * 8)
    hop = bytes((44, 0)) + b"\0" * 6                    # hop-by-hop -> fragment
    frag = bytes((17, 0)) + (0x0001).to_bytes(2, "big") + (99).to_bytes(4, "big")
    first = pk.ether(pk.ipv6("fc00::1", "fc00::2", 0, hop + frag + udp))
    frag2 = bytes((17, 0)) + ((2 << 3)).to_bytes(2, "big") + (99).to_bytes(4, "big")
    later = pk.ether(pk.ipv6("fc00::1", "fc00::2", 44, frag2 + b"b" * 8))
    _feed(m, T0, first)
    _feed(m, T0 + 1, later)
    m.flush()
    (r,) = out
    assert (r.src_port, r.dst_port, r.initiator_packets, r.ip_version) == (1000, 53, 2, 6)


class _Sink:
    def __init__(self):
        self.events = []

    def tcp_segment(self, flow, direction, seq, ack, flags, payload, ts_ns):
        self.events.append(("tcp", int(direction), seq, flags, payload))

    def udp_datagram(self, flow, direction, payload, ts_ns):
        self.events.append(("udp", int(direction), payload))

    def flow_ended(self, flow, record):
        self.events.append(("end", record.flow_end_reason))


def test_payload_sink_gets_segments_with_direction_relative_to_initiator():
    sink = _Sink()
    m, out = _meter(sink=sink)
    _handshake(m, T0)
    _feed(m, T0 + NS, pk.tcp4(A, 40000, B, 80, pk.ACK | pk.PSH, 101, 501, b"GET /"))
    _feed(m, T0 + NS, pk.tcp4(B, 80, A, 40000, pk.ACK | pk.PSH, 501, 106, b"HTTP/1.1"))
    _feed(m, T0 + NS, pk.udp4(A, 9, B, 53, b"dns"))
    m.flush()
    assert sink.events[:2] == [("tcp", 0, 100, pk.SYN, b""),
                               ("tcp", 1, 500, pk.SYN | pk.ACK, b"")]
    assert ("tcp", 0, 101, pk.ACK | pk.PSH, b"GET /") in sink.events
    assert ("tcp", 1, 501, pk.ACK | pk.PSH, b"HTTP/1.1") in sink.events
    assert ("udp", 0, b"dns") in sink.events
    assert [e for e in sink.events if e[0] == "end"] == [("end", R.FORCED_END)] * 2
