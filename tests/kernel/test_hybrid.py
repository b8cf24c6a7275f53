"""Selection and payload copy of the real kernel program, driven with crafted frames
through BPF_PROG_TEST_RUN: which flows are selected and why, the exact bytes and
sequence numbers of payload events, budgets, grants, skip-until, stop, GSO buffers, and
a full ring buffer, each with the flow's payload accounting checked octet by octet."""

from __future__ import annotations

import ctypes

import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from sensor.clock import SystemClock
from sensor.kernel import abi, bpfsys, testrun
from sensor.kernel.counters import CounterWatcher, possible_cpus, read_counters
from sensor.kernel.hybrid import DEFAULT_SELECTION, KernelSensor, SelectionConfig, flow_key
from sensor.model import LostSource

pytestmark = pytest.mark.bpf

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
A4, B4 = "198.18.3.1", "198.18.3.2"
A6, B6 = "fc00:3::1", "fc00:3::2"
CLIENT_HELLO = bytes.fromhex("160301002e0100002a0303") + b"\x11" * 40
DNS_QUERY = raw(DNS(id=7, rd=1, qd=DNSQR(qname="example.org")))


def tcp(src, dst, sport, dport, flags="A", seq=0, ack=0, data=b"", v6=False):
    ip = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
    return raw(Ether(**MAC) / ip / TCP(sport=sport, dport=dport, flags=flags, seq=seq,
                                       ack=ack) / Raw(data))


def seg(frm, to, flags="A", **kw):
    """A TCP segment from the end frm = (address, port) to the end to."""
    return tcp(frm[0], to[0], frm[1], to[1], flags, **kw)


def udp(src, dst, sport, dport, data=b"x" * 20):
    return raw(Ether(**MAC) / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(data))


@pytest.fixture(scope="module")
def loaded():
    from sensor.kernel import loader

    prog = loader.load(loader.LoadOptions(flow_map_size=4096))
    sensor = KernelSensor(prog, SystemClock())
    yield prog, sensor
    prog.close()


class Rig:
    def __init__(self, prog, sensor):
        self.prog, self.sensor = prog, sensor

    def reset(self, selection=DEFAULT_SELECTION):
        for key, _ in self.flows():
            bpfsys.lookup_and_delete(self.prog.flows_fd, key, abi.FlowValue(), lock=True)
            self.sensor.forget(bytes(key))
        self.sensor.reload_selection(selection)
        self.events()

    def run(self, frame, **ctx):
        assert testrun.run_skb(self.prog.prog_fd, frame, **ctx).retval == -1

    def flows(self):
        return bpfsys.lookup_batch(self.prog.flows_fd, abi.FlowKey, abi.FlowValue,
                                   batch=256, lock=True)

    def flow(self, sport):
        [(key, val)] = [(k, v) for k, v in self.flows() if sport in (k.port_lo, k.port_hi)]
        return key, val

    def events(self):
        self.sensor.poll(0)
        return list(self.sensor.payload_events())


@pytest.fixture
def rig(loaded):
    r = Rig(*loaded)
    r.reset()
    return r


def test_default_ports_select_and_others_do_not(rig):
    rig.run(tcp(A4, B4, 40000, 80, "S", seq=1))
    rig.run(udp(A4, B4, 40001, 53))
    rig.run(tcp(A4, B4, 40002, 5555, "S", seq=1))
    assert rig.flow(40000)[1].l7_select == abi.SEL_PORT
    assert rig.flow(40001)[1].l7_select == abi.SEL_PORT
    assert rig.flow(40002)[1].l7_select == 0


def test_cidr_selection_v4_and_v6(rig):
    rig.reset(SelectionConfig(ports=(), cidrs=("198.18.3.2/32", "fc00:3::/64"), sniff=False))
    rig.run(udp(A4, B4, 1000, 2000))
    rig.run(udp(A4, "198.18.3.9", 1001, 2000))
    rig.run(tcp(A6, B6, 1002, 2000, "S", v6=True))
    assert rig.flow(1000)[1].l7_select == abi.SEL_CIDR
    assert rig.flow(1001)[1].l7_select == 0
    assert rig.flow(1002)[1].l7_select == abi.SEL_CIDR


def test_protocol_selection(rig):
    rig.reset(SelectionConfig(ports=(), protocols={17}, sniff=False))
    rig.run(udp(A4, B4, 3000, 3001))
    rig.run(tcp(A4, B4, 3002, 3003, "S"))
    assert rig.flow(3000)[1].l7_select == abi.SEL_PROTO
    assert rig.flow(3002)[1].l7_select == 0


def test_sampling_is_one_in_n_by_key_hash_and_direction_blind(rig):
    rig.reset(SelectionConfig(ports=(), sample_n=3, sniff=False))
    for port in range(5000, 5060):
        # half the flows start with the reply direction: the decision must not care
        if port % 2:
            rig.run(udp(B4, A4, 53000, port))
        else:
            rig.run(udp(A4, B4, port, 53000))
    chosen = {k.port_lo if k.port_lo != 53000 else k.port_hi
              for k, v in rig.flows() if v.l7_select == abi.SEL_SAMPLED}
    expected = {(k.port_lo if k.port_lo != 53000 else k.port_hi)
                for k, _ in rig.flows() if abi.sample_hash(k) % 3 == 0}
    assert chosen == expected and 5 < len(chosen) < 40


def test_explicit_key_selected_at_run_time_and_removed(rig):
    rig.reset(SelectionConfig(ports=(), sniff=False))
    key = flow_key(src=B4, dst=A4, sport=7000, dport=7001, protocol=6)
    assert rig.sensor.select_flow(key)
    rig.run(tcp(A4, B4, 7001, 7000, "S"))   # the other end starts it: same flow
    assert rig.flow(7001)[1].l7_select == abi.SEL_EXPLICIT
    rig.reset(SelectionConfig(ports=(), sniff=False))
    rig.sensor.unselect_flow(key)
    rig.run(tcp(A4, B4, 7001, 7000, "S"))
    assert rig.flow(7001)[1].l7_select == 0


@pytest.mark.parametrize("proto,payload", [
    ("tcp", CLIENT_HELLO), ("tcp", b"GET /index.html HTTP/1.1\r\n"),
    ("tcp", b"OPTIONS * HTTP/1.1\r\n\r\n"), ("udp", DNS_QUERY)])
def test_sniffer_selects_on_first_payload_and_copies_it(rig, proto, payload):
    rig.reset(SelectionConfig(ports=()))
    if proto == "tcp":
        rig.run(tcp(A4, B4, 8001, 9999, "S", seq=99))
        rig.run(tcp(A4, B4, 8001, 9999, "PA", seq=100, data=payload))
    else:
        rig.run(udp(A4, B4, 8001, 9999, payload))
    _, val = rig.flow(8001)
    assert val.l7_select == abi.SEL_SNIFFED
    [ev] = [e for e in rig.events() if e.data]
    assert ev.data == payload and ev.l7_select == abi.SEL_SNIFFED
    assert ev.seq == (100 if proto == "tcp" else 0) and ev.direction == abi.PL_TO_RESPONDER
    assert read_counters(rig.prog.counters_fd, possible_cpus())[abi.Counter.SNIFFED_FLOWS] > 0


@pytest.mark.parametrize("payload", [b"\x00\x01binary protocol", b"SSH-2.0-OpenSSH_9.2\r\n"])
def test_sniffer_leaves_other_content_alone(rig, payload):
    rig.reset(SelectionConfig(ports=()))
    rig.run(tcp(A4, B4, 8002, 9998, "PA", seq=5, data=payload))
    rig.run(tcp(A4, B4, 8002, 9998, "PA", seq=5 + len(payload), data=b"GET / HTTP/1.1\r\n"))
    assert rig.flow(8002)[1].l7_select == 0   # one look, at the first payload only
    assert rig.events() == []


def test_sniffing_off(rig):
    rig.reset(SelectionConfig(ports=(), sniff=False))
    rig.run(tcp(A4, B4, 8003, 9997, "PA", seq=5, data=b"GET / HTTP/1.1\r\n\r\n"))
    assert rig.flow(8003)[1].l7_select == 0 and rig.events() == []


def test_payload_events_carry_exact_bytes_seq_and_direction(rig):
    c, s = (A4, 41000), (B4, 80)
    rig.run(seg(c, s, "S", seq=1000))
    rig.run(seg(s, c, "SA", seq=5000, ack=1001))
    rig.run(seg(c, s, "PA", seq=1001, ack=5001, data=b"GET / HTTP/1.1\r\n\r\n"))
    rig.run(seg(s, c, "PA", seq=5001, ack=1019, data=b"HTTP/1.1 200 OK\r\n\r\n"))
    rig.run(seg(c, s, "FA", seq=1019, ack=5020))
    evs = rig.events()
    got = [(e.direction, e.seq, e.tcp_flags, e.data) for e in evs]
    assert got == [
        (abi.PL_TO_RESPONDER, 1000, 0x02, b""),
        (abi.PL_TO_INITIATOR, 5000, 0x12, b""),
        (abi.PL_TO_RESPONDER, 1001, 0x18, b"GET / HTTP/1.1\r\n\r\n"),
        (abi.PL_TO_INITIATOR, 5001, 0x18, b"HTTP/1.1 200 OK\r\n\r\n"),
        (abi.PL_TO_RESPONDER, 1019, 0x11, b""),
    ]
    assert all(e.key == bytes(rig.flow(41000)[0]) for e in evs)
    _, val = rig.flow(41000)
    assert sum(d.captured for d in val.l7) == 18 + 19
    assert sum(d.truncated + d.skipped + d.gap for d in val.l7) == 0


def _segments(rig, c, s, seq, sizes, fill=b"a"):
    for n in sizes:
        rig.run(seg(c, s, "PA", seq=seq, data=fill * n))
        seq += n
    return seq


def test_budget_exhausted_is_truncated_and_a_grant_resumes(rig):
    rig.reset(SelectionConfig(ports={80}, sniff=False, budget=(100, 100)))
    c, s = (A4, 41001), (B4, 80)
    seq = _segments(rig, c, s, 1, [60, 60, 60])
    evs = rig.events()
    assert [(e.seq, len(e.data)) for e in evs] == [(1, 60), (61, 40)]
    key, val = rig.flow(41001)
    d = val.l7[abi.DIR_LO_HI]
    assert (d.captured, d.truncated, d.skipped, d.gap) == (100, 80, 0, 0)
    assert rig.sensor.grant(bytes(key), abi.PL_TO_RESPONDER, 50)
    _segments(rig, c, s, seq, [60])
    assert [(e.seq, len(e.data)) for e in rig.events()] == [(seq, 50)]
    d = rig.flow(41001)[1].l7[abi.DIR_LO_HI]
    assert (d.captured, d.truncated) == (150, 90)


def test_skip_until_is_honoured_and_copying_resumes(rig):
    rig.reset(SelectionConfig(ports={80}, sniff=False, budget=(10_000, 10_000)))
    c, s = (A4, 41002), (B4, 80)
    rig.run(seg(c, s, "S", seq=0xFFFFFF00))   # the skip crosses the seq wrap
    key = bytes(rig.flow(41002)[0])
    rig.events()
    start = 0xFFFFFF01
    until = (start + 250) & 0xFFFFFFFF
    assert rig.sensor.skip_until(key, abi.PL_TO_RESPONDER, until)
    data = bytes(range(100)) * 4
    seq = start
    for i in range(4):
        rig.run(seg(c, s, "PA", seq=seq, data=data[i * 100:(i + 1) * 100]))
        seq = (seq + 100) & 0xFFFFFFFF
    evs = rig.events()
    assert [(e.seq, e.offset, e.data) for e in evs] == [
        (until, 50, data[250:300]), ((until + 50) & 0xFFFFFFFF, 0, data[300:400])]
    d = rig.flow(41002)[1].l7[abi.DIR_LO_HI]
    assert (d.captured, d.skipped, d.truncated) == (150, 250, 0)


def test_stop_copies_nothing_more(rig):
    c, s = (A4, 41003), (B4, 80)
    seq = _segments(rig, c, s, 1, [10])
    key = bytes(rig.flow(41003)[0])
    assert len(rig.events()) == 1
    assert rig.sensor.stop(key)
    _segments(rig, c, s, seq, [30, 30])
    assert rig.events() == []
    d = rig.flow(41003)[1].l7[abi.DIR_LO_HI]
    assert (d.captured, d.skipped) == (10, 60)


def test_hold_skips_a_direction_until_the_other_sends_more(rig):
    # A response the parser needs no more of (MySQL after enough rows): the server's
    # bytes are skipped until the client's next request, which ends the hold in the
    # kernel, so the next response is copied from its first byte.
    rig.reset(SelectionConfig(ports={3306}, sniff=False, budget=(10_000, 10_000)))
    c, s = (A4, 41010), (B4, 3306)
    cseq = _segments(rig, c, s, 1, [20])                  # the request
    sseq = _segments(rig, s, c, 1, [100, 100], fill=b"r")  # rows
    key = bytes(rig.flow(41010)[0])
    assert len(rig.events()) == 3
    assert rig.sensor.hold(key, abi.PL_TO_INITIATOR, 20)  # userspace saw 20 client octets
    sseq = _segments(rig, s, c, sseq, [100] * 5, fill=b"r")  # more rows: held
    assert rig.events() == []
    cseq = _segments(rig, c, s, cseq, [15])               # the next request ...
    _segments(rig, s, c, sseq, [30], fill=b"n")           # ... and its response
    assert [(e.direction, e.data) for e in rig.events()] == [
        (abi.PL_TO_RESPONDER, b"a" * 15), (abi.PL_TO_INITIATOR, b"n" * 30)]
    key_, val = rig.flow(41010)
    server = val.l7[abi.DIR_LO_HI if key_.port_lo == 3306 else abi.DIR_HI_LO]
    assert (server.captured, server.skipped, server.truncated) == (230, 500, 0)


def test_hold_ends_at_once_when_the_other_side_already_sent_more(rig):
    # Userspace asks for a hold after the kernel already passed the client's next
    # request (userspace lagged): the client has sent beyond what userspace saw, so
    # nothing is held and the response is copied.
    rig.reset(SelectionConfig(ports={3306}, sniff=False, budget=(10_000, 10_000)))
    c, s = (A4, 41011), (B4, 3306)
    cseq = _segments(rig, c, s, 1, [20])
    sseq = _segments(rig, s, c, 1, [100], fill=b"r")
    _segments(rig, c, s, cseq, [15])                      # the next request, unseen
    key = bytes(rig.flow(41011)[0])
    assert rig.sensor.hold(key, abi.PL_TO_INITIATOR, 20)
    _segments(rig, s, c, sseq, [30], fill=b"n")
    assert [e.data for e in rig.events()][-1] == b"n" * 30
    # A release clears the flag: a later hold is a new one.
    assert rig.sensor.release(key, abi.PL_TO_INITIATOR)
    assert not rig.sensor._ctl[key].flags & (abi.CTL_HOLD << abi.PL_TO_INITIATOR)


def test_a_turn_copies_its_head_when_the_allowance_is_spent(rig):
    # Userspace lagging: the server's allowance went on a body and no grant came. The
    # server's next packet after the client spoke again still brings LOUPE_TURN_OCTETS
    # (512): the next response's head; a packet that does not start a turn brings nothing.
    rig.reset(SelectionConfig(ports={6379}, sniff=False, budget=(1000, 1000)))
    c, s = (A4, 41012), (B4, 6379)
    cseq = _segments(rig, c, s, 1, [30])
    sseq = _segments(rig, s, c, 1, [1400, 1400], fill=b"b")   # a body: 1000 copied
    rig.events()
    cseq = _segments(rig, c, s, cseq, [30])                    # the next request
    sseq = _segments(rig, s, c, sseq, [1400, 1400], fill=b"h")  # its response
    got = [(e.direction, len(e.data)) for e in rig.events()]
    assert got == [(abi.PL_TO_RESPONDER, 30), (abi.PL_TO_INITIATOR, 512)]
    key, val = rig.flow(41012)
    server = val.l7[abi.DIR_HI_LO]
    assert (server.captured, server.truncated) == (1512, 4 * 1400 - 1512)


def test_gso_buffer_chunks_carry_their_sequence_numbers(rig):
    # A test run takes at most about a page of data, so the "GSO" buffer is 4 x 900.
    rig.reset(SelectionConfig(ports={80}, sniff=False, budget=(3000, 3000)))
    payload = bytes(i % 251 for i in range(3600))
    frame = tcp(A4, B4, 41004, 80, "PA", seq=777, data=payload)
    rig.run(frame, gso_segs=4, gso_size=900)
    evs = rig.events()
    assert [(e.seq, e.offset, len(e.data)) for e in evs] == [
        (777, 0, 2048), (777 + 2048, 2048, 952)]
    assert b"".join(e.data for e in evs) == payload[:3000]
    assert all(e.payload_len == 3600 for e in evs)
    val = rig.flow(41004)[1]
    assert val.dir[abi.DIR_LO_HI].packets == 4
    d = val.l7[abi.DIR_LO_HI]
    assert (d.captured, d.truncated) == (3000, 600)


def test_full_ring_buffer_is_a_gap_and_a_lost_event_and_counts_stay_exact(load_program):
    prog = load_program(flow_map_size=64, ringbuf_pages=1)   # one 4 KiB page
    sensor = KernelSensor(prog, SystemClock(),
                          selection=SelectionConfig(ports={80}, sniff=False,
                                                    budget=(1 << 20, 1 << 20)))
    watcher = CounterWatcher(prog.counters_fd)
    frames, size = 40, 1000
    seq = 1
    for _ in range(frames):   # nobody polls meanwhile: the ring fills after ~3 events
        assert testrun.run_skb(prog.prog_fd, tcp(A4, B4, 41005, 80, "PA", seq=seq,
                                                  data=b"z" * size)).retval == -1
        seq += size
    sensor.poll(0)
    copied = sum(len(e.data) for e in sensor.payload_events())
    [(key, val)] = bpfsys.lookup_batch(prog.flows_fd, abi.FlowKey, abi.FlowValue,
                                       batch=8, lock=True)
    d = val.l7[abi.DIR_LO_HI]
    assert d.captured == copied and d.gap == frames * size - copied > 0
    assert d.captured + d.gap + d.truncated + d.skipped == frames * size
    assert val.dir[abi.DIR_LO_HI].packets == frames   # metering never depends on the ring
    lost = watcher.poll(SystemClock().wall_ns())
    assert [(e.source, e.count) for e in lost] == \
        [(LostSource.KERNEL_RINGBUF_FULL.value, frames - copied // size)]
    totals = watcher.totals()
    assert totals[abi.Counter.PAYLOAD_GAP_OCTETS] == d.gap
    sensor.reader.drain()
    [record] = sensor.reader.flush()
    cov = record.l7_coverage
    assert cov.inspected and not cov.sampled
    assert (cov.captured_octets, cov.gap_octets) == (copied, d.gap)


def test_reload_keeps_live_flows_and_applies_to_new_ones(rig):
    rig.run(tcp(A4, B4, 42000, 80, "S", seq=1))       # selected by the default port rule
    rig.run(tcp(A4, B4, 42001, 9000, "S", seq=1))     # not selected
    rig.sensor.reload_selection(SelectionConfig(ports={9000}, sniff=False))
    rig.run(tcp(A4, B4, 42000, 80, "A", seq=2))
    rig.run(tcp(A4, B4, 42001, 9000, "A", seq=2))
    rig.run(tcp(A4, B4, 42002, 9000, "S", seq=1))     # new flow: the new rules
    rig.run(tcp(A4, B4, 42003, 80, "S", seq=1))
    got = {p: (rig.flow(p)[1].l7_select, rig.flow(p)[1].dir[abi.DIR_LO_HI].packets)
           for p in (42000, 42001, 42002, 42003)}
    assert got == {42000: (abi.SEL_PORT, 2), 42001: (0, 2), 42002: (abi.SEL_PORT, 1),
                   42003: (0, 1)}
    # the old set's rules are gone from the maps, the new set's are in
    class U8(ctypes.Structure):
        _fields_ = [("v", ctypes.c_uint8)]

    ports = {(k.set, k.port) for k, _ in bpfsys.lookup_batch(
        rig.prog.sel_ports_fd, abi.PortKey, U8, batch=64, lock=False)}
    assert ports == {(rig.sensor.active_set, 9000)}


def test_payload_queue_is_bounded_and_counts_what_it_drops(load_program):
    prog = load_program(flow_map_size=64)
    sensor = KernelSensor(prog, SystemClock(), queue_events=2,
                          selection=SelectionConfig(ports={80}, sniff=False))
    for i in range(5):
        testrun.run_skb(prog.prog_fd, tcp(A4, B4, 42100, 80, "PA", seq=1 + 10 * i,
                                          data=b"0123456789"))
    sensor.poll(0)
    kept = list(sensor.payload_events())
    assert [e.seq for e in kept] == [1, 11]
    assert (sensor.stats.payload_events, sensor.stats.queue_full,
            sensor.stats.queue_full_octets) == (5, 3, 30)
