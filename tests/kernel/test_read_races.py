"""Reads racing packets: two threads feed the real program on two CPUs (BPF_PROG_TEST_RUN
runs it on the calling thread's CPU) while the reader snapshots, writes interim
records and retires the flow. Whatever the interleaving, the records of a flow add up
to exactly the packets and bytes that were sent: none lost, none counted twice."""

from __future__ import annotations

import threading
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from sensor.clock import SystemClock
from sensor.flow.semantics import NS, Timeouts
from sensor.kernel import testrun
from sensor.kernel.events import EventDecoder
from sensor.kernel.flowmap import FlowMapReader

pytestmark = pytest.mark.bpf

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
A4, B4 = "198.18.6.1", "198.18.6.2"
REPEAT = 200   # program runs per test-run call


class Hammer:
    """Two threads, each sending its frame through the program until stopped."""

    def __init__(self, prog, frames) -> None:
        self.sent = [0, 0]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(prog, frames[i], i))
                         for i in (0, 1)]
        for t in self._threads:
            t.start()

    def _work(self, prog, frame: bytes, i: int) -> None:
        while not self._stop.is_set():
            testrun.run_skb(prog.prog_fd, frame, repeat=REPEAT)
            self.sent[i] += REPEAT

    def stop(self) -> int:
        self._stop.set()
        for t in self._threads:
            t.join()
        return sum(self.sent)


def _read_while(prog, reader, hammer: Hammer, seconds: float) -> tuple[list, int]:
    """The reader's loop for `seconds` while the hammer runs; the records and the
    packets sent."""
    records = []
    until = time.monotonic() + seconds
    try:
        while time.monotonic() < until:
            prog.poll_events(0)
            records += reader.collect()
            time.sleep(0.01)
    finally:
        sent = hammer.stop()
    prog.poll_events(0)
    records += reader.collect()
    reader.drain()
    prog.poll_events(0)
    records += reader.flush()
    return records, sent


def _reader(prog, timeouts):
    reader = FlowMapReader(prog.flows_fd, SystemClock(), timeouts=timeouts)
    decoder = EventDecoder()
    prog.open_events(lambda ev: reader.on_event(decoder.decode(ev)))
    return reader


def test_interim_records_under_concurrent_packets_sum_exactly(load_program):
    prog = load_program(flow_map_size=64)
    reader = _reader(prog, Timeouts(active_ns=NS // 50))
    size = 100
    # both directions of one established-looking flow: the lock-free fast path
    frames = [raw(Ether(**MAC) / IP(src=A4, dst=B4) / TCP(sport=1000, dport=80, flags="A")
                  / Raw(b"a" * size)),
              raw(Ether(**MAC) / IP(src=B4, dst=A4) / TCP(sport=80, dport=1000, flags="A")
                  / Raw(b"b" * size))]
    records, sent = _read_while(prog, reader, Hammer(prog, frames), 1.0)
    interim = [r for r in records if r.flow_end_reason == 2]
    assert len(interim) > 5 and len({r.uid for r in records}) == 1
    packets = sum(r.initiator_packets + r.responder_packets for r in records)
    octets = sum(r.initiator_octets + r.responder_octets for r in records)
    assert packets == sent and octets == sent * (40 + size)


def test_retire_racing_packets_loses_and_doubles_nothing(load_program):
    prog = load_program(flow_map_size=64)
    # the linger is 0: the reader retires the reset flow as soon as the guard allows
    reader = _reader(prog, Timeouts(tcp_end_linger_ns=0))
    size = 10
    testrun.run_skb(prog.prog_fd, raw(Ether(**MAC) / IP(src=A4, dst=B4)
                                      / TCP(sport=2000, dport=80, flags="S")))
    testrun.run_skb(prog.prog_fd, raw(Ether(**MAC) / IP(src=B4, dst=A4)
                                      / TCP(sport=80, dport=2000, flags="RA")))
    # after the RST, both ends keep sending: every update double-checks, entries are
    # retired under the packets, late updates and new entries follow
    frames = [raw(Ether(**MAC) / IP(src=A4, dst=B4) / TCP(sport=2000, dport=80, flags="A")
                  / Raw(b"a" * size)),
              raw(Ether(**MAC) / IP(src=B4, dst=A4) / TCP(sport=80, dport=2000, flags="A")
                  / Raw(b"b" * size))]
    records, sent = _read_while(prog, reader, Hammer(prog, frames), 2.5)
    sent += 2
    # retired under the packets (END_OF_FLOW); the packets after that made a new entry
    reasons = [r.flow_end_reason.name for r in records]
    assert reasons[0] == "END_OF_FLOW" and reasons[-1] == "FORCED_END"
    packets = sum(r.initiator_packets + r.responder_packets for r in records)
    octets = sum(r.initiator_octets + r.responder_octets for r in records)
    assert packets == sent
    assert octets == 2 * 40 + (sent - 2) * (40 + size)

