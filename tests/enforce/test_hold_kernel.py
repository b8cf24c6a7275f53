"""Hold mode in the real flow meter program (bpf/flow.c held(); maps hold_svc, hold_req,
hold_ok), fed frames through BPF_PROG_TEST_RUN: a request toward a held service arms its
flow, the server's payload and FIN are dropped until userspace releases the flow up to the
request's end, keep-alive re-arms per request, and a late verdict, a stale heartbeat or
another service hold nothing."""

from __future__ import annotations

import ctypes
import ipaddress
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from sensor.enforce.hold import HeldService, HoldMaps, parse_service
from sensor.enforce.maps import BlockMaps
from sensor.kernel import abi, bpfsys, testrun
from sensor.kernel.counters import possible_cpus, read_counters

pytestmark = pytest.mark.bpf

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
CLIENT, SERVER = "198.18.9.1", "198.18.9.2"
SHOT, UNSPEC = 2, -1
REQ = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ISN_C, ISN_S = 1000, 5000


@pytest.fixture(scope="module")
def prog():
    from sensor.kernel import loader

    p = loader.load(loader.LoadOptions(flow_map_size=1024))
    yield p
    p.close()


@pytest.fixture
def maps(prog):
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


def tcp(src, dst, sport, dport, flags="A", seq=0, ack=0, data=b"", ip=IP):
    return raw(Ether(**MAC) / ip(src=src, dst=dst)
               / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack) / Raw(data))


def run(prog, frame) -> int:
    return testrun.run_skb(prog.prog_fd, frame, ifindex=1).retval


def handshake(prog, sport, ip=IP, c=CLIENT, s=SERVER):
    assert run(prog, tcp(c, s, sport, 80, "S", ISN_C - 1, ip=ip)) == UNSPEC
    assert run(prog, tcp(s, c, 80, sport, "SA", ISN_S - 1, ISN_C, ip=ip)) == UNSPEC


def key(c, s, sport, version=4) -> abi.FlowKey:
    k = abi.FlowKey()
    a, b = ipaddress.ip_address(c).packed, ipaddress.ip_address(s).packed
    ctypes.memmove(k.addr_lo, a, len(a))   # the client's address is the lower one here
    ctypes.memmove(k.addr_hi, b, len(b))
    k.port_lo, k.port_hi = sport, 80
    k.protocol, k.ip_version = 6, version
    return k


def test_response_held_until_released_and_rearmed_per_request(prog, maps):
    _, hold = maps
    ncpus = possible_cpus()
    before = read_counters(prog.counters_fd, ncpus)
    handshake(prog, 45000)
    assert run(prog, tcp(CLIENT, SERVER, 45000, 80, "PA", ISN_C, ISN_S, REQ)) == UNSPEC
    k = key(CLIENT, SERVER, 45000)
    r = hold.pending(k)
    assert r is not None and r.req_end == ISN_C + len(REQ)
    assert hold.armed(k).req_end == r.req_end
    resp = tcp(SERVER, CLIENT, 80, 45000, "PA", ISN_S, ISN_C + len(REQ), RESP)
    assert run(prog, resp) == SHOT                   # pending: the response waits
    assert run(prog, resp) == SHOT                   # and its retransmission
    fin = tcp(SERVER, CLIENT, 80, 45000, "FA", ISN_S, ISN_C + len(REQ))
    assert run(prog, fin) == SHOT                    # a FIN would end the stream early
    assert run(prog, tcp(SERVER, CLIENT, 80, 45000, "A", ISN_S, ISN_C + len(REQ))) == UNSPEC
    # A client retransmission of the request moves nothing.
    assert run(prog, tcp(CLIENT, SERVER, 45000, 80, "PA", ISN_C, ISN_S, REQ)) == UNSPEC
    assert hold.pending(k).req_end == ISN_C + len(REQ)
    # Judged up to just before the request's end: still held; up to it: released.
    assert hold.release(k, ISN_C + len(REQ) - 1)
    assert run(prog, resp) == SHOT and hold.pending(k) is not None
    assert hold.release(k, ISN_C + len(REQ))
    assert run(prog, resp) == UNSPEC and hold.pending(k) is None
    assert hold.armed(k) is not None
    # Keep-alive: the next request arms the flow again.
    seq2 = ISN_C + len(REQ)
    assert run(prog, tcp(CLIENT, SERVER, 45000, 80, "PA", seq2, ISN_S + len(RESP), REQ)) \
        == UNSPEC
    resp2 = tcp(SERVER, CLIENT, 80, 45000, "PA", ISN_S + len(RESP), seq2 + len(REQ), RESP)
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


def test_new_connection_on_same_tuple_starts_pending(prog, maps):
    _, hold = maps
    handshake(prog, 45001)
    assert run(prog, tcp(CLIENT, SERVER, 45001, 80, "PA", ISN_C, ISN_S, REQ)) == UNSPEC
    k = key(CLIENT, SERVER, 45001)
    assert hold.release(k, ISN_C + len(REQ))
    # The same 4-tuple again, with sequence numbers far behind the old ones.
    assert run(prog, tcp(CLIENT, SERVER, 45001, 80, "S", 99, 0)) == UNSPEC
    assert hold.armed(k) is None
    assert hold.release(k, 5) is None                # nothing armed: nothing written
    assert run(prog, tcp(CLIENT, SERVER, 45001, 80, "PA", 100, ISN_S, REQ)) == UNSPEC
    assert run(prog, tcp(SERVER, CLIENT, 80, 45001, "PA", ISN_S, 100 + len(REQ), RESP)) == SHOT


def test_late_verdict_stale_heartbeat_and_other_services_hold_nothing(prog, maps):
    blocks, hold = maps
    ncpus = possible_cpus()
    hold.set_services([HeldService(ipaddress.ip_address(SERVER), 80)], 50 * 10**6)
    handshake(prog, 45002)
    assert run(prog, tcp(CLIENT, SERVER, 45002, 80, "PA", ISN_C, ISN_S, REQ)) == UNSPEC
    resp = tcp(SERVER, CLIENT, 80, 45002, "PA", ISN_S, ISN_C + len(REQ), RESP)
    assert run(prog, resp) == SHOT
    before = read_counters(prog.counters_fd, ncpus)
    time.sleep(0.07)
    assert run(prog, resp) == UNSPEC                 # past max hold: fail open
    after = read_counters(prog.counters_fd, ncpus)
    assert after[abi.Counter.HOLD_EXPIRED] - before[abi.Counter.HOLD_EXPIRED] == 1
    # Another port of the same server is not held.
    assert run(prog, tcp(CLIENT, SERVER, 45003, 81, "PA", ISN_C, ISN_S, REQ)) == UNSPEC
    assert run(prog, tcp(SERVER, CLIENT, 81, 45003, "PA", ISN_S, ISN_C + len(REQ), RESP)) \
        == UNSPEC
    # A stale heartbeat: nothing is held (the sensor is gone).
    hold.set_services([HeldService(ipaddress.ip_address(SERVER), 80)], 2 * 10**9)
    handshake(prog, 45004)
    assert run(prog, tcp(CLIENT, SERVER, 45004, 80, "PA", ISN_C, ISN_S, REQ)) == UNSPEC
    resp = tcp(SERVER, CLIENT, 80, 45004, "PA", ISN_S, ISN_C + len(REQ), RESP)
    assert run(prog, resp) == SHOT
    c = blocks.config()
    c.heartbeat_ns = time.monotonic_ns() - abi.BLOCK_STALE_NS - 10**9
    bpfsys.update(blocks.cfg_fd, ctypes.c_uint32(0), c)
    assert run(prog, resp) == UNSPEC
    blocks.beat()
    assert run(prog, resp) == SHOT
    blocks.set_bit(abi.BLOCK_ANY_HOLD, False)        # the sensor stops holding
    assert run(prog, resp) == UNSPEC


def test_ipv6_service_held(prog, maps):
    c6, s6 = "fc00:9::1", "fc00:9::2"
    handshake(prog, 45005, ip=IPv6, c=c6, s=s6)
    assert run(prog, tcp(c6, s6, 45005, 80, "PA", ISN_C, ISN_S, REQ, ip=IPv6)) == UNSPEC
    assert run(prog, tcp(s6, c6, 80, 45005, "PA", ISN_S, ISN_C + len(REQ), RESP, ip=IPv6)) \
        == SHOT


def test_parse_service():
    assert str(parse_service("198.18.0.2:80")) == "198.18.0.2:80"
    assert str(parse_service("[fc00::2]:8080")) == "[fc00::2]:8080"
    for bad in ("198.18.0.2", "host:80", "198.18.0.2:0", "[fc00::2]:99999"):
        with pytest.raises(ValueError):
            parse_service(bad)
