"""The per-source token bucket (bpf/loupe.h "rate limits", maps.h rate_src) in the real
flow meter program, fed frames through BPF_PROG_TEST_RUN: a limited source gets `burst`
packets through and then one per refill, bare ACKs and resets always pass, other
sources are untouched, and an expired entry, a stale heartbeat or expire() ends it. And
the detector's new flows as the flow map reader's snapshots hand them over (initiator,
service, half open), the flows that were there before the first read left out."""

from __future__ import annotations

import ipaddress
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from sensor.enforce.maps import BlockMaps
from sensor.enforce.ratelimit import RateLimits
from sensor.clock import SystemClock
from sensor.kernel import abi, bpfsys, testrun
from sensor.kernel.flowmap import FlowMapReader
from sensor.rules import ddos
from sensor.rules.ddos_live import NewFlows

pytestmark = pytest.mark.bpf

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
A, B, C = "198.18.9.1", "198.18.9.2", "198.18.9.3"
A6, B6 = "fc00::9:1", "fc00::9:2"
SHOT, UNSPEC = 2, -1
GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def prog():
    from sensor.kernel import loader

    p = loader.load(loader.LoadOptions(flow_map_size=1024))
    yield p
    p.close()


@pytest.fixture
def limits(prog):
    blocks = BlockMaps(prog.block_cfg_fd, prog.block_flow_fd, prog.block_src_fd)
    rl = RateLimits(blocks, prog.rate_src_fd)
    blocks.clear()
    rl.clear()
    blocks.beat()
    yield rl
    rl.clear()
    blocks.clear()


def pkt(src, dst, flags="PA", data=GET, sport=41000):
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return raw(Ether(**MAC) / ip / TCP(sport=sport, dport=80, flags=flags) / Raw(data))


def run(prog, frame) -> int:
    return testrun.run_skb(prog.prog_fd, frame, ifindex=1).retval


def test_bucket_passes_burst_then_refill_rate(prog, limits):
    limits.limit(A, rate=10, burst=5, ttl_ns=60 * 10**9)
    assert limits.blocks.config().active & abi.BLOCK_ANY_RATE
    verdicts = [run(prog, pkt(A, B)) for _ in range(8)]
    assert verdicts[:5] == [UNSPEC] * 5 and set(verdicts[5:]) == {SHOT}
    # Bare ACKs and resets carry nothing to limit: they pass with the bucket empty.
    assert run(prog, pkt(A, B, "A", b"")) == UNSPEC
    assert run(prog, pkt(A, B, "R", b"")) == UNSPEC
    # A SYN opens a connection: it takes a token like a request.
    assert run(prog, pkt(A, B, "S", b"", sport=41001)) == SHOT
    # Another source, and the server's answers, are untouched.
    assert run(prog, pkt(C, B)) == UNSPEC
    assert run(prog, pkt(B, A, "PA", b"HTTP/1.1 200 OK\r\n\r\n")) == UNSPEC
    time.sleep(0.25)   # 10 tokens a second: two come back (coarse clock: allow 1..3)
    after = [run(prog, pkt(A, B)) for _ in range(5)]
    assert 1 <= after.count(UNSPEC) <= 3 and after[0] == UNSPEC, after
    [entry] = limits.entries()
    assert entry.source == A and entry.rate == 10 and entry.burst == 5
    assert entry.passed == 5 + after.count(UNSPEC)
    assert entry.dropped == 3 + 1 + after.count(SHOT)


def test_ipv6_source(prog, limits):
    limits.limit(A6, rate=1, burst=1, ttl_ns=60 * 10**9)
    assert [run(prog, pkt(A6, B6)) for _ in range(3)] == [UNSPEC, SHOT, SHOT]


def test_expiry_heartbeat_and_expire(prog, limits):
    limits.limit(A, rate=1, burst=1, ttl_ns=300 * 10**6)
    assert [run(prog, pkt(A, B)) for _ in range(2)] == [UNSPEC, SHOT]
    time.sleep(0.35)
    assert run(prog, pkt(A, B)) == UNSPEC          # expired: ignored by the kernel
    assert limits.expire() == 1 and limits.entries(include_expired=True) == []
    assert not limits.blocks.config().active & abi.BLOCK_ANY_RATE
    # A stale heartbeat (a dead sensor) ends every limit: fail open.
    limits.limit(A, rate=1, burst=1, ttl_ns=60 * 10**9)
    assert [run(prog, pkt(A, B)) for _ in range(2)] == [UNSPEC, SHOT]
    limits.blocks._write_config(heartbeat_ns=time.monotonic_ns() - abi.BLOCK_STALE_NS - 10**9)
    assert run(prog, pkt(A, B)) == UNSPEC
    # A block map's change keeps the rate bit (BlockMaps._refresh_active).
    limits.blocks.beat()
    limits.blocks.block_src(ipaddress.ip_network(C), 10**9, abi.BLOCK_CLI)
    limits.blocks.unblock_src(ipaddress.ip_network(C))
    assert limits.blocks.config().active == abi.BLOCK_ANY_RATE
    assert run(prog, pkt(A, B)) == SHOT


def test_bad_rate_refused(limits):
    with pytest.raises(ValueError):
        limits.limit(A, rate=0, burst=1, ttl_ns=10**9)
    with pytest.raises(ValueError):
        limits.limit(A, rate=abi.RATE_MAX + 1, burst=1, ttl_ns=10**9)


def test_new_flows_from_the_map_snapshots(prog, limits):
    for key, _ in bpfsys.lookup_batch(prog.flows_fd, abi.FlowKey, abi.FlowValue, batch=256,
                                      lock=True):
        bpfsys.lookup_and_delete(prog.flows_fd, key, abi.FlowValue(), lock=True)
    alerts = []
    det = ddos.Detector(ddos.Settings(flows_ps=1, source_floor_rps=1), alerts.append)
    reader = FlowMapReader(prog.flows_fd, SystemClock())
    seen = []
    new_flows = NewFlows(det, lambda: T)
    reader.on_snapshot = lambda k, v: (seen.append(len(k)), new_flows(k, v))
    run(prog, pkt(C, B, "S", b"", sport=50000))      # there before the first read
    T = 1_800_000_000 * 10**9
    reader.collect()
    assert seen == [1] and det.stats.new_flows == 0
    # Three sources open 10 connections each; one completes its handshake.
    for i in range(10):
        for j, src in enumerate((A, C, "198.18.9.4")):
            run(prog, pkt(src, B, "S", b"", sport=51000 + 10 * j + i))
    run(prog, raw(Ether(**MAC) / IP(src=B, dst=A) / TCP(sport=80, dport=51000, flags="SA")))
    run(prog, pkt(A, B, "A", b"", sport=51000))
    T += 10**9
    reader.collect()
    assert det.stats.new_flows == 30
    half = det._cur.half_open
    assert sum(det._cur.flows.values()) == 30 and sum(half.values()) == 29
    assert det._cur.flows[(f"{B}:80", A)] == 10 and half[(f"{B}:80", A)] == 9
    T += 10**9
    reader.collect()                                # nothing new
    assert det.stats.new_flows == 30
