"""The real flow meter program with the verdict maps (bpf/maps.h block_cfg, block_flow,
block_src), fed frames through BPF_PROG_TEST_RUN: what is dropped (TC_ACT_SHOT), what
passes, what is counted, and that a stale heartbeat or an expired entry drops nothing."""

from __future__ import annotations

import ipaddress
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from sensor.enforce.maps import BlockMaps
from sensor.kernel import abi, bpfsys, testrun
from sensor.kernel.counters import possible_cpus, read_counters

pytestmark = pytest.mark.bpf

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
A, B, C = "198.18.7.1", "198.18.7.2", "198.18.8.9"
SHOT, UNSPEC = 2, -1


@pytest.fixture(scope="module")
def prog():
    from sensor.kernel import loader

    p = loader.load(loader.LoadOptions(flow_map_size=1024))
    yield p
    p.close()


@pytest.fixture
def maps(prog):
    m = BlockMaps(prog.block_cfg_fd, prog.block_flow_fd, prog.block_src_fd)
    m.clear()
    m.beat()
    for key, _ in bpfsys.lookup_batch(prog.flows_fd, abi.FlowKey, abi.FlowValue, batch=256,
                                      lock=True):
        bpfsys.lookup_and_delete(prog.flows_fd, key, abi.FlowValue(), lock=True)
    yield m
    m.clear()


def tcp(src, dst, sport, dport, flags="A", data=b""):
    return raw(Ether(**MAC) / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags)
               / Raw(data))


def run(prog, frame) -> int:
    return testrun.run_skb(prog.prog_fd, frame, ifindex=1).retval


def flow_key(prog, sport: int) -> abi.FlowKey:
    flows = bpfsys.lookup_batch(prog.flows_fd, abi.FlowKey, abi.FlowValue, batch=256, lock=True)
    [key] = [k for k, _ in flows if sport in (k.port_lo, k.port_hi)]
    return key


def test_nothing_dropped_without_blocks(prog, maps):
    assert maps.config().active == 0
    assert run(prog, tcp(A, B, 40000, 80, "S")) == UNSPEC
    assert run(prog, tcp(B, A, 80, 40000, "SA")) == UNSPEC


def test_blocked_flow_dropped_both_ways_and_counted(prog, maps):
    ncpus = possible_cpus()
    run(prog, tcp(A, B, 40001, 80, "S"))
    run(prog, tcp(B, A, 80, 40001, "SA"))
    maps.block_flow(flow_key(prog, 40001), 10 * 10**9, abi.BLOCK_RULE, "test-rule")
    assert maps.config().active == abi.BLOCK_ANY_FLOW
    before = read_counters(prog.counters_fd, ncpus)
    assert run(prog, tcp(A, B, 40001, 80, "PA", b"GET / HTTP/1.1\r\n\r\n")) == SHOT
    assert run(prog, tcp(B, A, 80, 40001, "PA", b"HTTP/1.1 200 OK\r\n\r\n")) == SHOT
    # A bare reset passes (the sensor's own, to end both sides); other flows pass.
    assert run(prog, tcp(B, A, 80, 40001, "RA")) == UNSPEC
    assert run(prog, tcp(A, B, 40002, 80, "S")) == UNSPEC
    after = read_counters(prog.counters_fd, ncpus)
    assert after[abi.Counter.BLOCKED_FLOW] - before[abi.Counter.BLOCKED_FLOW] == 2
    assert after[abi.Counter.BLOCKED_SRC] == before[abi.Counter.BLOCKED_SRC]
    # The dropped packets are still counted in their flow.
    flows = dict((bytes(k), v) for k, v in bpfsys.lookup_batch(
        prog.flows_fd, abi.FlowKey, abi.FlowValue, batch=256, lock=True))
    v = flows[bytes(flow_key(prog, 40001))]
    assert v.dir[0].packets + v.dir[1].packets == 5
    [b] = maps.entries()
    assert (b.kind, b.reason, b.note) == ("flow", "rule", "test-rule")
    assert "198.18.7.1:40001" in b.target


def test_blocked_source_prefix_drops_new_flows_at_first_packet(prog, maps):
    maps.block_src(ipaddress.ip_network("198.18.8.0/24"), 10 * 10**9, abi.BLOCK_CLI, "ops")
    assert maps.config().active == abi.BLOCK_ANY_SRC
    assert run(prog, tcp(C, B, 41000, 80, "S")) == SHOT
    assert run(prog, raw(Ether(**MAC) / IP(src=C, dst=B) / UDP(sport=5, dport=53))) == SHOT
    # Packets to the banned source and from elsewhere pass.
    assert run(prog, tcp(B, C, 80, 41000, "SA")) == UNSPEC
    assert run(prog, tcp(A, B, 41001, 80, "S")) == UNSPEC
    v6 = raw(Ether(**MAC) / IPv6(src="fc00:7::1", dst="fc00:7::2") / TCP(sport=1, dport=80))
    assert run(prog, v6) == UNSPEC
    maps.block_src(ipaddress.ip_network("fc00:7::/64"), 10 * 10**9, abi.BLOCK_CLI)
    assert run(prog, v6) == SHOT
    assert {b.target for b in maps.entries()} == {"198.18.8.0/24", "fc00:7::/64"}
    assert maps.unblock_src(ipaddress.ip_network("198.18.8.0/24"))
    assert run(prog, tcp(C, B, 41002, 80, "S")) == UNSPEC
    assert maps.unblock_src(ipaddress.ip_network("fc00:7::/64"))
    assert maps.config().active == 0


def test_stale_heartbeat_fails_open(prog, maps):
    maps.block_src(ipaddress.ip_network(f"{C}/32"), 60 * 10**9, abi.BLOCK_CLI)
    assert run(prog, tcp(C, B, 42000, 80, "S")) == SHOT
    c = maps.config()
    c.heartbeat_ns = time.monotonic_ns() - abi.BLOCK_STALE_NS - 10**9
    import ctypes

    bpfsys.update(maps.cfg_fd, ctypes.c_uint32(0), c)
    assert run(prog, tcp(C, B, 42001, 80, "S")) == UNSPEC
    maps.beat()
    assert run(prog, tcp(C, B, 42002, 80, "S")) == SHOT


def test_expired_entries_drop_nothing_and_are_removed(prog, maps):
    clock = [time.monotonic_ns()]
    m = BlockMaps(maps.cfg_fd, maps.flow_fd, maps.src_fd, clock=lambda: clock[0])
    m.beat()
    m.block_src(ipaddress.ip_network(f"{C}/32"), 10**9, abi.BLOCK_CLI)
    assert run(prog, tcp(C, B, 43000, 80, "S")) == SHOT
    time.sleep(1.2)
    assert run(prog, tcp(C, B, 43001, 80, "S")) == UNSPEC   # expired: ignored by the kernel
    clock[0] = time.monotonic_ns()
    assert m.entries() == [] and len(m.entries(include_expired=True)) == 1
    assert m.expire() == 1
    assert m.entries(include_expired=True) == [] and m.config().active == 0
