"""The exclusion filter in the real kernel program, driven with crafted frames through
BPF_PROG_TEST_RUN: an excluded flow is counted like every flow but never selected (no
rule, sniffing, explicit key or sampling gets it a payload copy), each packet is counted
once although a new flow runs the meter twice (loupe_new_flow), the kernel's decision is
the one sensor/capfilter.py makes on the same first packet, and reloads swap programs
with the selection set."""

from __future__ import annotations

import ctypes

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from sensor.capfilter import compile_packet_filter
from sensor.clock import SystemClock
from sensor.errors import ConfigError
from sensor.kernel import abi, bpfsys, testrun
from sensor.kernel.counters import possible_cpus, read_counters
from sensor.kernel.hybrid import KernelSensor, SelectionConfig, flow_key

pytestmark = pytest.mark.bpf

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
A4, B4, C4 = "198.18.5.1", "198.18.5.2", "198.18.6.3"
A6, B6 = "fc00:5::1", "fc00:5::2"
GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def frame(src, dst, sport=0, dport=0, proto="tcp", flags="S", data=b""):
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    if proto == "tcp":
        l4 = TCP(sport=sport, dport=dport, flags=flags)
    elif proto == "udp":
        l4 = UDP(sport=sport, dport=dport)
    else:
        l4 = ICMP(type=8)
    return raw(Ether(**MAC) / ip / l4 / Raw(data))


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

    def reset(self, selection: SelectionConfig):
        for key, _ in self.flows():
            bpfsys.lookup_and_delete(self.prog.flows_fd, key, abi.FlowValue(), lock=True)
        self.sensor.reload_selection(selection)
        self.payload()

    def run(self, f):
        assert testrun.run_skb(self.prog.prog_fd, f).retval == -1

    def flows(self):
        return bpfsys.lookup_batch(self.prog.flows_fd, abi.FlowKey, abi.FlowValue,
                                   batch=256, lock=True)

    def flow(self, port):
        [value] = [v for k, v in self.flows() if port in (k.port_lo, k.port_hi)]
        return value

    def payload(self):
        self.sensor.poll(0)
        return list(self.sensor.payload_events())

    def counters(self):
        return read_counters(self.prog.counters_fd, possible_cpus())


@pytest.fixture
def rig(loaded):
    r = Rig(*loaded)
    yield r
    r.reset(SelectionConfig())


def test_an_excluded_flow_is_counted_and_never_selected(rig):
    rig.reset(SelectionConfig(exclude="host 198.18.5.2 and tcp port 80"))
    before = rig.counters()
    # Excluded: a whole HTTP exchange on a selected port, content the sniffer knows.
    rig.run(frame(A4, B4, 40000, 80, flags="S"))
    rig.run(frame(B4, A4, 80, 40000, flags="SA"))
    rig.run(frame(A4, B4, 40000, 80, flags="PA", data=GET))
    rig.run(frame(B4, A4, 80, 40000, flags="PA", data=b"HTTP/1.1 200 OK\r\n\r\n"))
    # Not excluded (another host): selected by port as usual.
    rig.run(frame(A4, C4, 40001, 80, flags="S"))
    rig.run(frame(A4, C4, 40001, 80, flags="PA", data=GET))
    out = rig.flow(40000)
    assert out.l7_select == 0 and out.flags & abi.FLOW_EXCLUDED
    assert not out.flags & abi.FLOW_SNIFF_PENDING
    # Metered like every flow: packets both ways, the handshake's times.
    assert (out.dir[0].packets, out.dir[1].packets) == (2, 2)
    assert out.syn_ns and out.synack_ns and out.ack_ns
    assert out.l7[0].captured == out.l7[1].captured == 0
    kept = rig.flow(40001)
    assert kept.l7_select == abi.SEL_PORT and not kept.flags & abi.FLOW_EXCLUDED
    events = rig.payload()
    assert events and {e.key for e in events} == {events[0].key}   # the kept flow only
    after = rig.counters()
    delta = {c: after[c] - before[c] for c in abi.Counter if after[c] != before[c]}
    # Every packet counted once, although each new flow ran the meter twice.
    assert delta[abi.Counter.PACKETS] == 6
    assert delta[abi.Counter.EXCLUDED_FLOWS] == 1
    assert delta[abi.Counter.SELECTED_FLOWS] == 1
    assert abi.Counter.TAIL_CALL_FAILED not in delta


def test_a_new_flow_run_twice_counts_its_packet_once(rig):
    """The re-run through loupe_new_flow counts nothing twice, also the first packet of
    a flow whose transport header is cut (parsed twice, counted in truncated_l4 once)."""
    rig.reset(SelectionConfig(exclude="host 198.18.9.9"))
    before = rig.counters()
    rig.run(raw(Ether(**MAC) / IP(src=A4, dst=B4, proto=17) / Raw(b"\0" * 6)))
    rig.run(frame(A4, B4, 40100, 9000, proto="udp", data=b"x"))
    after = rig.counters()
    delta = {c: after[c] - before[c] for c in abi.Counter if after[c] != before[c]}
    assert delta == {abi.Counter.PACKETS: 2, abi.Counter.TRUNCATED_L4: 1}


def test_exclusion_wins_over_sniffing_explicit_keys_and_sampling(rig):
    key = flow_key(src=A4, dst=B4, sport=5353, dport=5354, protocol=17)
    rig.reset(SelectionConfig(ports=(5353,), protocols={17}, sample_n=1, sniff=True,
                              exclude="udp"))
    rig.sensor.select_flow(key)
    try:
        rig.run(frame(A4, B4, 5353, 5354, proto="udp", data=b"\x00\x07\x01\x00\x00\x01"
                      + b"\x00" * 6 + b"\x07example\x03org\x00\x00\x01\x00\x01"))
        rig.run(frame(A4, B4, 40002, 80, flags="S"))
    finally:
        rig.sensor.unselect_flow(key)
    assert rig.flow(5353).l7_select == 0 and rig.flow(5353).flags & abi.FLOW_EXCLUDED
    assert rig.flow(40002).l7_select != 0
    assert rig.payload() == [] or all(e.key != bytes(key) for e in rig.payload())


# Expressions x first packets: the kernel's decision equals capfilter's on that packet
# (for plain IPv4/IPv6 packets both read the same fields).
EXPRESSIONS = ["src port 40000", "dst host 198.18.5.2", "net 198.18.5.0/24 and not tcp",
               "ip6 and port 443", "portrange 5000-5010", "src and dst net fc00:5::/64",
               "icmp", "proto 17", "tcp dst portrange 1-1024 or udp", "not ip6",
               "dst port 80 and src net 198.18.6.0/24", "host fc00:5::2 or 198.18.6.3",
               "udp src port 53", "(tcp or udp) and not (port 80 or port 443)"]
PACKETS = [(A4, B4, 40000, 80, "tcp"), (B4, A4, 80, 40004, "tcp"), (C4, B4, 5005, 53, "udp"),
           (A4, C4, 53, 9999, "udp"), (A6, B6, 443, 50000, "tcp"), (B6, A6, 5001, 5002, "udp"),
           (A4, B4, 0, 0, "icmp"), (C4, A4, 40003, 80, "tcp")]


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_kernel_decides_as_capfilter_on_the_first_packet(rig, expr):
    rig.reset(SelectionConfig(ports=(), sniff=False, sample_n=1, exclude=expr))
    match = compile_packet_filter(expr)
    want, got = [], []
    for src, dst, sport, dport, proto in PACKETS:
        f = frame(src, dst, sport, dport, proto)
        rig.run(f)
        want.append(match(1, f))
        [value] = [v for _, v in rig.flows() if v.first_ns == max(x.first_ns for _, x in rig.flows())]
        got.append(bool(value.flags & abi.FLOW_EXCLUDED))
        # Sampling 1 in 1 selects every flow that is not excluded.
        assert bool(value.l7_select) != got[-1]
    assert got == want and any(want) and not all(want)


def test_reload_swaps_the_program_with_the_set_and_empties_the_tail_slot(rig):
    rig.reset(SelectionConfig(exclude="port 80"))
    rig.run(frame(A4, B4, 40010, 80))
    rig.sensor.reload_selection(SelectionConfig(exclude="port 443"))
    rig.run(frame(A4, B4, 40011, 80))
    rig.run(frame(A4, B4, 40012, 443))
    rig.sensor.reload_selection(SelectionConfig())
    rig.run(frame(A4, B4, 40013, 443))
    excluded = {p: bool(rig.flow(p).flags & abi.FLOW_EXCLUDED)
                for p in (40010, 40011, 40012, 40013)}
    assert excluded == {40010: True, 40011: False, 40012: True, 40013: False}
    # No filter: the slot is empty again, so new flows skip the tail call. (A filled
    # slot reads back as the program's id.)
    slot, prog_id = ctypes.c_uint32(abi.TAIL_NEW_FLOW), ctypes.c_uint32()
    assert not bpfsys.lookup(rig.prog.tails_fd, slot, prog_id, lock=False)
    rig.sensor.reload_selection(SelectionConfig(exclude="udp"))
    assert bpfsys.lookup(rig.prog.tails_fd, slot, prog_id, lock=False) and prog_id.value


def test_the_longest_program_runs_and_a_longer_one_is_refused(rig):
    # 32 primitives and 31 operators: 63 instructions; the last primitive matches.
    ports = " or ".join(f"port {p}" for p in range(1000, 1031)) + " or port 80"
    rig.reset(SelectionConfig(exclude=ports))
    rig.run(frame(A4, B4, 40020, 80))
    rig.run(frame(A4, B4, 40021, 81))
    assert rig.flow(40020).flags & abi.FLOW_EXCLUDED
    assert not rig.flow(40021).flags & abi.FLOW_EXCLUDED
    with pytest.raises(ConfigError, match="more than 64"):
        SelectionConfig(exclude=ports + " or port 82")
