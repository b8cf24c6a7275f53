"""Live <-> replay parity, record for record: the same frames go through the real kernel
program (BPF_PROG_TEST_RUN, read out by FlowMapReader) and through the replay meter
(sensor/engine/meter.py), and both must produce the same flows with the same fields.

Fields that must differ, and why:
- uid, flow_start_ns, flow_end_ns: live time is the kernel clock when the test runs
  the frame, replay time is the frame's capture timestamp; the uid hashes the start.
- handshake_rtt_ns: the same rule on those two clocks; both are set or both are 0.
- history: the kernel keeps OR-ed flags per direction, not the packet order Zeek's
  history letters need, so it is empty live (flowmap.py).
Everything else is compared exactly.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Raw, raw

from sensor.clock import SystemClock
from sensor.engine.meter import Meter
from sensor.flow.packet import LINKTYPE_ETHERNET
from sensor.kernel import testrun
from sensor.kernel.flowmap import FlowMapReader

pytestmark = pytest.mark.bpf

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
A4, B4 = "198.18.4.1", "198.18.4.2"
A6, B6 = "fc00:4::1", "fc00:4::2"
# BPF_PROG_TEST_RUN runs the program on a buffer of the loopback device.
IFINDEX = 1

COMPARED = (
    "src_addr", "dst_addr", "src_port", "dst_port", "protocol", "ip_version", "vlan_id",
    "inner_vlan_id", "ifindex", "initiator_packets", "responder_packets",
    "initiator_octets", "responder_octets", "initiator_l2_octets", "responder_l2_octets",
    "initiator_tcp_flags", "responder_tcp_flags", "tcp_syn_count", "tcp_fin_count",
    "tcp_rst_count", "conn_state", "flow_end_reason", "icmp_type", "icmp_code",
    "community_id",
)


def _eth(pkt, tags=()):
    frame = Ether(**MAC)
    for tag in tags:
        frame = frame / tag
    return raw(frame / pkt)


def _tcp_conversation(ip, a, b, sport, dport, request: bytes, response: bytes):
    c_isn, s_isn = 1000, 90000
    out = [
        ip(src=a, dst=b) / TCP(sport=sport, dport=dport, flags="S", seq=c_isn),
        ip(src=b, dst=a) / TCP(sport=dport, dport=sport, flags="SA", seq=s_isn, ack=c_isn + 1),
        ip(src=a, dst=b) / TCP(sport=sport, dport=dport, flags="A", seq=c_isn + 1,
                               ack=s_isn + 1),
        ip(src=a, dst=b) / TCP(sport=sport, dport=dport, flags="PA", seq=c_isn + 1,
                               ack=s_isn + 1) / Raw(request),
        ip(src=b, dst=a) / TCP(sport=dport, dport=sport, flags="PA", seq=s_isn + 1,
                               ack=c_isn + 1 + len(request)) / Raw(response),
    ]
    c_next, s_next = c_isn + 1 + len(request), s_isn + 1 + len(response)
    out += [
        ip(src=a, dst=b) / TCP(sport=sport, dport=dport, flags="FA", seq=c_next, ack=s_next),
        ip(src=b, dst=a) / TCP(sport=dport, dport=sport, flags="FA", seq=s_next,
                               ack=c_next + 1),
        ip(src=a, dst=b) / TCP(sport=sport, dport=dport, flags="A", seq=c_next + 1,
                               ack=s_next + 1),
    ]
    return [_eth(p) for p in out]


def _traffic() -> list[bytes]:
    frames = []
    frames += _tcp_conversation(IP, A4, B4, 40000, 80, b"GET / HTTP/1.1\r\n\r\n",
                                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    frames += _tcp_conversation(IPv6, A6, B6, 40001, 8080, b"x" * 300, b"y" * 1200)
    # A refused connection: SYN, RST-ACK.
    frames += [_eth(IP(src=A4, dst=B4) / TCP(sport=40002, dport=81, flags="S", seq=5)),
               _eth(IP(src=B4, dst=A4) / TCP(sport=81, dport=40002, flags="RA", ack=6))]
    # UDP both ways (SF) and one way only (S0).
    frames += [_eth(IP(src=A4, dst=B4) / UDP(sport=5353, dport=53) / Raw(b"q" * 30)),
               _eth(IP(src=B4, dst=A4) / UDP(sport=53, dport=5353) / Raw(b"r" * 90)),
               _eth(IP(src=A4, dst=B4) / UDP(sport=6000, dport=6001) / Raw(b"s" * 10))]
    # ICMP and ICMPv6 echo with replies; the v4 one started by the higher address.
    frames += [_eth(IP(src=B4, dst=A4) / ICMP(type=8, id=3, seq=1) / Raw(b"p" * 56)),
               _eth(IP(src=A4, dst=B4) / ICMP(type=0, id=3, seq=1) / Raw(b"p" * 56)),
               _eth(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=4, seq=1)),
               _eth(IPv6(src=B6, dst=A6) / ICMPv6EchoReply(id=4, seq=1))]
    # VLAN and QinQ.
    base = IP(src=A4, dst=B4) / UDP(sport=4000, dport=4001) / Raw(b"v" * 100)
    frames += [_eth(base, (Dot1Q(vlan=100),))] * 3
    frames += [_eth(base, (Dot1AD(vlan=200), Dot1Q(vlan=30)))] * 2
    # Datagrams that end inside their transport header: flows with ports 0.
    frames += [_eth(IP(src=A4, dst=B4, proto=6) / Raw(b"\0" * 6)),
               _eth(IP(src=B4, dst=A4, proto=17) / Raw(b"\0" * 4)),
               _eth(IP(src=A4, dst=B4, proto=1) / Raw(b"\x08"))]
    # SCTP carries ports like UDP.
    frames += [_eth(IP(src=A4, dst=B4, proto=132) / Raw(bytes.fromhex("0b590050") + b"\0" * 8))]
    # A fragmented datagram (first fragment first, as the kernel needs).
    frames += [_eth(f) for f in fragment(IP(src=A4, dst=B4, id=4242)
                                         / UDP(sport=4002, dport=4003)
                                         / Raw(b"f" * 2500), fragsize=1000)]
    return frames


def _flow_id(r):
    return (r.protocol, r.vlan_id, r.inner_vlan_id,
            frozenset({(r.src_addr, r.src_port), (r.dst_addr, r.dst_port)}))


def test_kernel_and_replay_records_are_the_same(load_program):
    frames = _traffic()
    prog = load_program(flow_map_size=256)
    for frame in frames:
        assert testrun.run_skb(prog.prog_fd, frame).retval == -1
    reader = FlowMapReader(prog.flows_fd, SystemClock())
    reader.drain()
    live = reader.flush()

    replayed = []
    meter = Meter(emit=replayed.append)
    t0 = 1_700_000_000_000_000_000
    for i, frame in enumerate(frames):
        meter.feed(t0 + i * 1_000_000, IFINDEX, LINKTYPE_ETHERNET, frame, len(frame))
    meter.flush()

    by_id_live = {_flow_id(r): r for r in live}
    by_id_replay = {_flow_id(r): r for r in replayed}
    assert len(by_id_live) == len(live) and len(by_id_replay) == len(replayed)
    assert set(by_id_live) == set(by_id_replay)
    assert len(live) == 14
    for fid, rep in by_id_replay.items():
        got = by_id_live[fid]
        for name in COMPARED:
            assert getattr(got, name) == getattr(rep, name), (fid, name)
        assert bool(got.handshake_rtt_ns) == bool(rep.handshake_rtt_ns), fid
        # replay's history is there wherever there are TCP/UDP headers to read it from
        assert got.history == ""
        assert rep.history or rep.protocol not in (6, 17) or rep.src_port == 0
    # The cases are what they claim to be.
    states = sorted((r.protocol, r.conn_state, r.flow_end_reason.name) for r in live)
    assert states == sorted([
        (6, "SF", "END_OF_FLOW"), (6, "SF", "END_OF_FLOW"), (6, "REJ", "END_OF_FLOW"),
        (17, "SF", "FORCED_END"), (17, "S0", "FORCED_END"), (1, "SF", "FORCED_END"),
        (58, "SF", "FORCED_END"), (17, "S0", "FORCED_END"), (17, "S0", "FORCED_END"),
        (17, "S0", "FORCED_END"), (6, "OTH", "FORCED_END"), (17, "S0", "FORCED_END"),
        (1, "S0", "FORCED_END"), (132, "S0", "FORCED_END")])
