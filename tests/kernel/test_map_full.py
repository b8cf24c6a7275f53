"""A tiny flow map flooded with new flows: the program keeps passing packets, counts
every packet it could not track, the reader keeps working, and the loss reaches the
records as a LostEvent."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from sensor.clock import SystemClock
from sensor.kernel import abi, testrun
from sensor.kernel.counters import CounterWatcher
from sensor.kernel.flowmap import FlowMapReader
from sensor.model import LostSource

pytestmark = pytest.mark.bpf

MAC = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def test_flood_past_a_tiny_map(load_program):
    prog = load_program(flow_map_size=16)
    watcher = CounterWatcher(prog.counters_fd)
    reader = FlowMapReader(prog.flows_fd, SystemClock())
    flows = 100  # bounded flood: 100 distinct flows into 16 slots
    for port in range(1000, 1000 + flows):
        frame = raw(Ether(**MAC) / IP(src="198.18.2.1", dst="198.18.2.2")
                    / UDP(sport=port, dport=53))
        assert testrun.run_skb(prog.prog_fd, frame).retval == -1

    lost = watcher.poll(SystemClock().wall_ns())
    assert [(e.source, e.count) for e in lost] == \
        [(LostSource.KERNEL_FLOW_MAP_FULL.value, flows - 16)]
    assert watcher.totals()[abi.Counter.PACKETS] == flows

    reader.drain()
    records = reader.flush()
    assert len(records) == 16 and sum(r.initiator_packets for r in records) == 16
    # Room again: the next new flow is tracked, and nothing new is lost.
    frame = raw(Ether(**MAC) / IP(src="198.18.2.1", dst="198.18.2.2") / UDP(sport=1, dport=53))
    testrun.run_skb(prog.prog_fd, frame)
    assert watcher.poll(SystemClock().wall_ns()) == []
    reader.drain()
    assert [r.src_port for r in reader.flush()] == [1]
