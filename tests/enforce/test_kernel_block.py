"""The real flow meter program with the verdict maps (bpf/maps.h block_cfg, block_flow,
block_src, and hold mode's hold_svc, hold_req, hold_ok), fed frames through
BPF_PROG_TEST_RUN: what is dropped (TC_ACT_SHOT), what passes, what is counted, and that a
stale heartbeat or an expired entry drops nothing."""

from __future__ import annotations

import ctypes
import ipaddress
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from sensor.enforce.hold import HeldService, HoldMaps, parse_service
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

# ---- hold mode (bpf/flow.c held(); maps hold_svc, hold_req, hold_ok) -----------------
# A request toward a held service arms its flow, the server's payload and FIN are dropped
# until userspace releases the flow up to the request's end, keep-alive re-arms per
# request, and a late verdict, a stale heartbeat or another service hold nothing.

CLIENT, SERVER = "198.18.9.1", "198.18.9.2"
REQ = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ISN_C, ISN_S = 1000, 5000


@pytest.fixture
def held(prog):
    b = BlockMaps(prog.block_cfg_fd, prog.block_flow_fd, prog.block_src_fd)
    h = HoldMaps(prog.hold_svc_fd, prog.hold_req_fd, prog.hold_ok_fd)
    b.clear()
    h.clear()
    b.beat()
    h.set_services([HeldService(ipaddress.ip_address(SERVER), 80),
                    parse_service("[fc00:9::2]:80")], 2 * 10**9)
    b.set_bit(abi.BLOCK_ANY_HOLD, True)
    yield b, h
    h.clear()
    b.clear()


def seg(src, dst, sport, dport, flags="A", seq=0, ack=0, data=b"", ip=IP):
    """A TCP segment with explicit sequence numbers (hold mode compares them)."""
    return raw(Ether(**MAC) / ip(src=src, dst=dst)
               / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack) / Raw(data))


def handshake(prog, sport, ip=IP, c=CLIENT, s=SERVER):
    assert run(prog, seg(c, s, sport, 80, "S", ISN_C - 1, ip=ip)) == UNSPEC
    assert run(prog, seg(s, c, 80, sport, "SA", ISN_S - 1, ISN_C, ip=ip)) == UNSPEC


def hold_key(c, s, sport, version=4) -> abi.FlowKey:
    k = abi.FlowKey()
    a, b = ipaddress.ip_address(c).packed, ipaddress.ip_address(s).packed
    ctypes.memmove(k.addr_lo, a, len(a))   # the client's address is the lower one here
    ctypes.memmove(k.addr_hi, b, len(b))
    k.port_lo, k.port_hi = sport, 80
    k.protocol, k.ip_version = 6, version
    return k


def test_response_held_until_released_and_rearmed_per_request(prog, held):
    _, hold = held
    ncpus = possible_cpus()
    before = read_counters(prog.counters_fd, ncpus)
    handshake(prog, 45000)
    assert run(prog, seg(CLIENT, SERVER, 45000, 80, "PA", ISN_C, ISN_S, REQ)) == UNSPEC
    k = hold_key(CLIENT, SERVER, 45000)
    r = hold.pending(k)
    assert r is not None and r.req_end == ISN_C + len(REQ)
    assert hold.armed(k).req_end == r.req_end
    resp = seg(SERVER, CLIENT, 80, 45000, "PA", ISN_S, ISN_C + len(REQ), RESP)
    assert run(prog, resp) == SHOT                   # pending: the response waits
    assert run(prog, resp) == SHOT                   # and its retransmission
    fin = seg(SERVER, CLIENT, 80, 45000, "FA", ISN_S, ISN_C + len(REQ))
    assert run(prog, fin) == SHOT                    # a FIN would end the stream early
    assert run(prog, seg(SERVER, CLIENT, 80, 45000, "A", ISN_S, ISN_C + len(REQ))) == UNSPEC
    # A client retransmission of the request moves nothing.
    assert run(prog, seg(CLIENT, SERVER, 45000, 80, "PA", ISN_C, ISN_S, REQ)) == UNSPEC
    assert hold.pending(k).req_end == ISN_C + len(REQ)
    # Judged up to just before the request's end: still held; up to it: released.
    assert hold.release(k, ISN_C + len(REQ) - 1)
    assert run(prog, resp) == SHOT and hold.pending(k) is not None
    assert hold.release(k, ISN_C + len(REQ))
    assert run(prog, resp) == UNSPEC and hold.pending(k) is None
    assert hold.armed(k) is not None
    # Keep-alive: the next request arms the flow again.
    seq2 = ISN_C + len(REQ)
    assert run(prog, seg(CLIENT, SERVER, 45000, 80, "PA", seq2, ISN_S + len(RESP), REQ)) \
        == UNSPEC
    resp2 = seg(SERVER, CLIENT, 80, 45000, "PA", ISN_S + len(RESP), seq2 + len(REQ), RESP)
    assert run(prog, resp2) == SHOT
    assert hold.release(k, seq2 + len(REQ))
    assert run(prog, resp2) == UNSPEC
    after = read_counters(prog.counters_fd, ncpus)
    assert after[abi.Counter.HELD] - before[abi.Counter.HELD] == 5
    # A held segment is not in its flow: the meter saw 2 + 3 (requests) + 3 (acks, released).
    flows = bpfsys.lookup_batch(prog.flows_fd, abi.FlowKey, abi.FlowValue, batch=256,
                                lock=True)
    [v] = [v for fk, v in flows if 45000 in (fk.port_lo, fk.port_hi)]
    assert v.dir[0].packets + v.dir[1].packets == 8


def test_new_connection_on_same_tuple_starts_pending(prog, held):
    _, hold = held
    handshake(prog, 45001)
    assert run(prog, seg(CLIENT, SERVER, 45001, 80, "PA", ISN_C, ISN_S, REQ)) == UNSPEC
    k = hold_key(CLIENT, SERVER, 45001)
    assert hold.release(k, ISN_C + len(REQ))
    # The same 4-tuple again, with sequence numbers far behind the old ones.
    assert run(prog, seg(CLIENT, SERVER, 45001, 80, "S", 99, 0)) == UNSPEC
    assert hold.armed(k) is None
    assert hold.release(k, 5) is None                # nothing armed: nothing written
    assert run(prog, seg(CLIENT, SERVER, 45001, 80, "PA", 100, ISN_S, REQ)) == UNSPEC
    assert run(prog, seg(SERVER, CLIENT, 80, 45001, "PA", ISN_S, 100 + len(REQ), RESP)) == SHOT


def test_late_verdict_stale_heartbeat_and_other_services_hold_nothing(prog, held):
    blocks, hold = held
    ncpus = possible_cpus()
    hold.set_services([HeldService(ipaddress.ip_address(SERVER), 80)], 50 * 10**6)
    handshake(prog, 45002)
    assert run(prog, seg(CLIENT, SERVER, 45002, 80, "PA", ISN_C, ISN_S, REQ)) == UNSPEC
    resp = seg(SERVER, CLIENT, 80, 45002, "PA", ISN_S, ISN_C + len(REQ), RESP)
    assert run(prog, resp) == SHOT
    before = read_counters(prog.counters_fd, ncpus)
    time.sleep(0.07)
    assert run(prog, resp) == UNSPEC                 # past max hold: fail open
    after = read_counters(prog.counters_fd, ncpus)
    assert after[abi.Counter.HOLD_EXPIRED] - before[abi.Counter.HOLD_EXPIRED] == 1
    # Another port of the same server is not held.
    assert run(prog, seg(CLIENT, SERVER, 45003, 81, "PA", ISN_C, ISN_S, REQ)) == UNSPEC
    assert run(prog, seg(SERVER, CLIENT, 81, 45003, "PA", ISN_S, ISN_C + len(REQ), RESP)) \
        == UNSPEC
    # A stale heartbeat: nothing is held (the sensor is gone).
    hold.set_services([HeldService(ipaddress.ip_address(SERVER), 80)], 2 * 10**9)
    handshake(prog, 45004)
    assert run(prog, seg(CLIENT, SERVER, 45004, 80, "PA", ISN_C, ISN_S, REQ)) == UNSPEC
    resp = seg(SERVER, CLIENT, 80, 45004, "PA", ISN_S, ISN_C + len(REQ), RESP)
    assert run(prog, resp) == SHOT
    c = blocks.config()
    c.heartbeat_ns = time.monotonic_ns() - abi.BLOCK_STALE_NS - 10**9
    bpfsys.update(blocks.cfg_fd, ctypes.c_uint32(0), c)
    assert run(prog, resp) == UNSPEC
    blocks.beat()
    assert run(prog, resp) == SHOT
    blocks.set_bit(abi.BLOCK_ANY_HOLD, False)        # the sensor stops holding
    assert run(prog, resp) == UNSPEC


def test_ipv6_service_held(prog, held):
    c6, s6 = "fc00:9::1", "fc00:9::2"
    handshake(prog, 45005, ip=IPv6, c=c6, s=s6)
    assert run(prog, seg(c6, s6, 45005, 80, "PA", ISN_C, ISN_S, REQ, ip=IPv6)) == UNSPEC
    assert run(prog, seg(s6, c6, 80, 45005, "PA", ISN_S, ISN_C + len(REQ), RESP, ip=IPv6)) \
        == SHOT


def test_parse_service():
    assert str(parse_service("198.18.0.2:80")) == "198.18.0.2:80"
    assert str(parse_service("[fc00::2]:8080")) == "[fc00::2]:8080"
    for bad in ("198.18.0.2", "host:80", "198.18.0.2:0", "[fc00::2]:99999"):
        with pytest.raises(ValueError):
            parse_service(bad)
