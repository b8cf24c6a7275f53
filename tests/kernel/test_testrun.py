"""The real flow meter program fed crafted and malformed frames through
BPF_PROG_TEST_RUN: each case lands in exactly the counter it should, and no flow is
created or credited for it."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption, fragment
from scapy.layers.inet6 import (
    IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Raw, raw

from sensor.kernel import abi, bpfsys, testrun
from sensor.kernel.counters import read_counters, possible_cpus

pytestmark = pytest.mark.bpf

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
A4, B4 = "198.18.1.1", "198.18.1.2"
A6, B6 = "fc00:1::1", "fc00:1::2"


@pytest.fixture(scope="module")
def prog():
    from sensor.kernel import loader

    p = loader.load(loader.LoadOptions(flow_map_size=1024, max_ipv6_ext=4))
    yield p
    p.close()


class Probe:
    def __init__(self, prog):
        self.prog = prog
        self.ncpus = possible_cpus()

    def flows(self):
        return bpfsys.lookup_batch(self.prog.flows_fd, abi.FlowKey, abi.FlowValue,
                                   batch=256, lock=True)

    def counters(self):
        return read_counters(self.prog.counters_fd, self.ncpus)

    def clear(self):
        for key, _ in self.flows():
            bpfsys.lookup_and_delete(self.prog.flows_fd, key, abi.FlowValue(), lock=True)

    def run(self, frame: bytes, **ctx) -> dict:
        """Runs one frame; returns the counter increases."""
        before = self.counters()
        res = testrun.run_skb(self.prog.prog_fd, frame, **ctx)
        assert res.retval == -1  # TC_ACT_UNSPEC: observe only, the verdict is unchanged
        after = self.counters()
        return {c: after[c] - before[c] for c in abi.Counter
                if after[c] != before[c] and c != abi.Counter.PACKETS}


@pytest.fixture
def probe(prog):
    p = Probe(prog)
    p.clear()
    return p


def test_udp_counts_ip_and_l2_bytes(probe):
    frame = raw(Ether(**MAC) / IP(src=A4, dst=B4) / UDP(sport=1000, dport=53) / Raw(b"x" * 30))
    assert probe.run(frame) == {}
    [(key, val)] = probe.flows()
    assert (key.protocol, key.ip_version, key.port_lo, key.port_hi) == (17, 4, 1000, 53)
    # the lower end (198.18.1.1:1000) sent it: direction lo->hi
    assert val.dir[0].packets == 1 and val.dir[0].ip_bytes == 58 and val.dir[0].l2_bytes == 72
    assert val.initiator == abi.DIR_LO_HI and val.dir[1].packets == 0


def test_reply_lands_in_the_same_flow_other_direction(probe):
    probe.run(raw(Ether(**MAC) / IP(src=A4, dst=B4) / TCP(sport=40000, dport=80, flags="S")))
    probe.run(raw(Ether(**MAC) / IP(src=B4, dst=A4) / TCP(sport=80, dport=40000, flags="SA")))
    probe.run(raw(Ether(**MAC) / IP(src=A4, dst=B4) / TCP(sport=40000, dport=80, flags="A")))
    [(key, val)] = probe.flows()
    assert val.dir[0].packets == 2 and val.dir[1].packets == 1
    assert val.dir[0].side_flags == abi.SIDE_SYN and val.dir[1].side_flags == abi.SIDE_SYNACK
    assert val.syn_count == 2 and val.syn_ns <= val.synack_ns <= val.ack_ns
    assert val.flags & abi.FLOW_INITIATOR_BY_SYN


def test_gso_buffer_counts_wire_segments(probe):
    payload = 3 * 1000
    frame = raw(Ether(**MAC) / IP(src=A4, dst=B4) / TCP(sport=1, dport=2, flags="A")
                / Raw(b"y" * payload))
    probe.run(frame, gso_segs=3, gso_size=1000)
    [(_, val)] = probe.flows()
    assert val.dir[0].packets == 3
    assert val.dir[0].ip_bytes == payload + 3 * 40
    assert val.dir[0].l2_bytes == payload + 3 * 54



STEADY_SHAPES = {
    "ipv4": (lambda: Ether(**MAC), lambda s, d: IP(src=s, dst=d), (A4, B4), 40),
    "ipv6": (lambda: Ether(**MAC), lambda s, d: IPv6(src=s, dst=d), (A6, B6), 60),
    # Shapes the quick path leaves to the full parse, whose fast path adds them lock-free.
    "ipv4 with options": (lambda: Ether(**MAC),
                          lambda s, d: IP(src=s, dst=d, options=IPOption(b"\x01\x01\x01\x00")),
                          (A4, B4), 44),
    "802.1Q in the frame": (lambda: Ether(**MAC) / Dot1Q(vlan=7),
                            lambda s, d: IP(src=s, dst=d), (A4, B4), 40),
}


@pytest.mark.parametrize("shape", STEADY_SHAPES)
def test_steady_packets_are_added_without_the_lock(probe, shape):
    """Once the handshake is done, a packet changes only its flow's counters and is
    added lock-free; `updates`, which only locked updates raise, stays at 4: the
    handshake's 3 and the first PSH (a flag bit new to its side). Data both ways, and a GSO buffer of 3 segments, land in the flow the
    handshake created (same key from both parsers) and count exactly."""
    l2, l3, (a, b), hdr = STEADY_SHAPES[shape]
    l2_hdr = len(raw(l2() / IP() / TCP())) - 40

    def seg(src, dst, sport, dport, flags, data=b""):
        return raw(l2() / l3(src, dst) / TCP(sport=sport, dport=dport, flags=flags) / data)

    for frame in (seg(a, b, 40000, 80, "S"), seg(b, a, 80, 40000, "SA"),
                  seg(a, b, 40000, 80, "A")):
        assert probe.run(frame) == {}
    for _ in range(5):
        assert probe.run(seg(a, b, 40000, 80, "PA", b"q" * 100)) == {}
        assert probe.run(seg(b, a, 80, 40000, "A")) == {}
    assert probe.run(seg(b, a, 80, 40000, "A", b"r" * 3000), gso_segs=3, gso_size=1000) == {}
    [(key, val)] = probe.flows()
    assert (key.port_lo, key.port_hi) == (40000, 80)  # the client's address is the lower
    up, down = val.dir[0], val.dir[1]
    assert val.updates == 4
    assert (up.packets, up.ip_bytes, up.l2_bytes) == (
        7, 7 * hdr + 500, 7 * (hdr + l2_hdr) + 500)
    assert (down.packets, down.ip_bytes, down.l2_bytes) == (
        9, 9 * hdr + 3000, 9 * (hdr + l2_hdr) + 3000)

def test_vlan_and_qinq_tags_are_in_the_key(probe):
    base = IP(src=A4, dst=B4) / UDP(sport=5, dport=6)
    probe.run(raw(Ether(**MAC) / Dot1Q(vlan=100) / base))
    probe.run(raw(Ether(**MAC) / Dot1AD(vlan=200) / Dot1Q(vlan=30) / base))
    tags = sorted((k.vlan_id, k.inner_vlan_id, v.dir[0].l2_bytes) for k, v in probe.flows())
    assert tags == [(100, 0, 14 + 4 + 28), (200, 30, 14 + 8 + 28)]


def test_third_vlan_tag_is_unsupported(probe):
    frame = raw(Ether(**MAC) / Dot1AD(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3)
                / IP(src=A4, dst=B4) / UDP())
    assert probe.run(frame) == {abi.Counter.UNSUPPORTED_ENCAP: 1}
    assert probe.flows() == []


def test_non_ip_is_counted_not_a_flow(probe):
    frame = raw(Ether(type=0x0806, **MAC) / Raw(b"\0" * 28))
    assert probe.run(frame) == {abi.Counter.NON_IP: 1}
    assert probe.flows() == []


# BPF_PROG_TEST_RUN itself refuses a frame whose IP header is cut (EINVAL), so the cuts
# fall inside the transport header; the IP total length then claims more than the
# frame holds, which the program counts as a bad header before it looks further.
@pytest.mark.parametrize("cut", [14 + 20 + 5, 14 + 20 + 10, 14 + 20 + 19])
def test_truncated_tcp_header(probe, cut):
    full = raw(Ether(**MAC) / IP(src=A4, dst=B4) / TCP(sport=1, dport=2))
    assert probe.run(full[:cut]) == {abi.Counter.BAD_HEADER: 1}
    assert probe.flows() == []


@pytest.mark.parametrize("proto", [TCP, UDP])
def test_transport_header_cut_within_a_consistent_datagram(probe, proto):
    # IP length and frame agree, but the datagram ends inside the transport header: it
    # counts, in a flow with ports 0 (as replay, nDPI and NFStream count it).
    number = 6 if proto is TCP else 17
    ip = IP(src=A4, dst=B4, proto=number) / Raw(b"\0" * 6)
    assert probe.run(raw(Ether(**MAC) / ip)) == {abi.Counter.TRUNCATED_L4: 1}
    [(key, val)] = probe.flows()
    assert (key.protocol, key.port_lo, key.port_hi) == (number, 0, 0)
    assert val.dir[0].packets == 1 and val.dir[0].ip_bytes == 26 and val.dir[0].tcp_flags == 0


def test_bogus_ihl(probe):
    pkt = bytearray(raw(Ether(**MAC) / IP(src=A4, dst=B4) / UDP()))
    pkt[14] = 0x43  # version 4, IHL 3 (12 bytes): below the minimum of 5
    assert probe.run(bytes(pkt)) == {abi.Counter.BAD_HEADER: 1}
    pkt[14] = 0x4F  # IHL 15 (60 bytes): longer than the datagram
    assert probe.run(bytes(pkt)) == {abi.Counter.BAD_HEADER: 1}
    assert probe.flows() == []


def test_total_length_beyond_frame(probe):
    pkt = raw(Ether(**MAC) / IP(src=A4, dst=B4, len=400) / UDP(sport=1, dport=2))
    assert probe.run(pkt) == {abi.Counter.BAD_HEADER: 1}
    assert probe.flows() == []


def test_tcp_data_offset_below_minimum(probe):
    pkt = raw(Ether(**MAC) / IP(src=A4, dst=B4) / TCP(sport=1, dport=2, dataofs=3))
    assert probe.run(pkt) == {abi.Counter.BAD_HEADER: 1}
    assert probe.flows() == []


def test_fragment_without_first_is_counted_not_attributed(probe):
    frags = fragment(IP(src=A4, dst=B4, id=777) / UDP(sport=9, dport=10) / Raw(b"z" * 3000),
                     fragsize=1000)
    assert len(frags) == 4
    for f in frags[1:]:
        assert probe.run(raw(Ether(**MAC) / f)) == {abi.Counter.FRAG_NO_FIRST: 1}
    assert probe.flows() == []


def test_fragments_after_first_join_its_flow(probe):
    frags = fragment(IP(src=A4, dst=B4, id=778) / UDP(sport=9, dport=10) / Raw(b"z" * 3000),
                     fragsize=1000)
    for f in frags:
        assert probe.run(raw(Ether(**MAC) / f)) == {}
    [(key, val)] = probe.flows()
    assert (key.port_lo, key.port_hi) == (9, 10)
    assert val.dir[0].packets == 4
    assert val.dir[0].ip_bytes == sum(len(raw(f)) for f in frags)


def test_ipv6_fragments(probe):
    first = IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=55, m=1, offset=0, nh=17) \
        / UDP(sport=7, dport=8) / Raw(b"a" * 64)
    later = IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=55, m=0, offset=9, nh=17) \
        / Raw(b"b" * 64)
    orphan = IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=56, m=0, offset=9, nh=17) \
        / Raw(b"c" * 64)
    assert probe.run(raw(Ether(**MAC) / orphan)) == {abi.Counter.FRAG_NO_FIRST: 1}
    assert probe.run(raw(Ether(**MAC) / first)) == {}
    assert probe.run(raw(Ether(**MAC) / later)) == {}
    [(key, val)] = probe.flows()
    assert (key.ip_version, key.protocol, key.port_lo, key.port_hi) == (6, 17, 7, 8)
    assert val.dir[0].packets == 2


def test_ipv6_extension_chain_within_bound(probe):
    pkt = IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() \
        / IPv6ExtHdrRouting() / UDP(sport=3, dport=4)
    assert probe.run(raw(Ether(**MAC) / pkt)) == {}
    [(key, _)] = probe.flows()
    assert (key.protocol, key.port_lo, key.port_hi) == (17, 3, 4)


def test_ipv6_extension_chain_past_bound(probe):
    chain = IPv6(src=A6, dst=B6)
    for _ in range(5):  # the program was built with LOUPE_MAX_IPV6_EXT=4
        chain = chain / IPv6ExtHdrDestOpt()
    pkt = chain / UDP(sport=3, dport=4)
    assert probe.run(raw(Ether(**MAC) / pkt)) == {abi.Counter.IPV6_EXT_TOO_LONG: 1}
    assert probe.flows() == []


def test_icmp_echo_and_reply_are_one_flow(probe):
    probe.run(raw(Ether(**MAC) / IP(src=B4, dst=A4) / ICMP(type=8, id=1)))
    probe.run(raw(Ether(**MAC) / IP(src=A4, dst=B4) / ICMP(type=0, id=1)))
    [(key, val)] = probe.flows()
    assert (key.port_lo, key.port_hi) == (8, 0)
    assert val.icmp_type == 8 and val.initiator == abi.DIR_HI_LO
    assert val.dir[0].packets == 1 and val.dir[1].packets == 1


def test_rst_ends_the_flow_and_sends_an_event(probe, prog):
    seen = []
    prog.open_events(seen.append)
    prog.poll_events(0)
    seen.clear()
    probe.run(raw(Ether(**MAC) / IP(src=A4, dst=B4) / TCP(sport=11, dport=12, flags="S")))
    probe.run(raw(Ether(**MAC) / IP(src=B4, dst=A4) / TCP(sport=12, dport=11, flags="RA")))
    prog.poll_events(0)
    [(_, val)] = probe.flows()
    assert val.flags & abi.FLOW_ENDED and val.end_reason == abi.END_RST
    ends = [e for e in seen if abi.EventHdr.from_buffer_copy(e[:16]).type == abi.EventType.FLOW_END]
    assert len(ends) == 1
