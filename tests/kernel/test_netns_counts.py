"""Exact counts on real traffic: two namespaces joined by a veth pair, the flow meter
attached to one end, tcpdump capturing that same interface during the same run. Every
flow's per-direction packets, IP bytes and layer-2 bytes equal the capture's; flags,
initiator and end reasons match what happened.

Offloads off: tcpdump sees wire packets. Offloads on: tcpdump sees the GSO/GRO buffers,
and the expected counts are the wire segments their sizes imply.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from sensor.clock import SystemClock
from sensor.flow.semantics import NS, Timeouts
from sensor.kernel import attach
from sensor.kernel import abi
from sensor.kernel.counters import read_counters, possible_cpus
from sensor.kernel.events import EventDecoder
from sensor.kernel.flowmap import FlowMapReader
from sensor.model import FlowEndReason
from tests.kernel.conftest import in_netns
from tests.kernel.pcapflows import flows_from_pcap, flows_from_records
from tests.netns import VethPair

pytestmark = pytest.mark.bpf

PY = sys.executable
LINGER = Timeouts(tcp_end_linger_ns=NS // 5)


class Capture:
    def __init__(self, host, path):
        self.path = path
        self.proc = host.popen("tcpdump", "-i", host.iface, "-w", str(path), "-U", "-n",
                               "--immediate-mode",
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()  # "listening on ...": the socket is open
        assert "listening" in line, line

    def stop(self) -> str:
        # tcpdump writes what it already received only as fast as it can; packets still
        # in its ring at SIGINT would be missing from the file. Wait until it stops
        # growing (bounded: 50 x 0.1 s).
        size = -1
        for _ in range(50):
            time.sleep(0.1)
            now = self.path.stat().st_size
            if now == size:
                break
            size = now
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=10)
        return err


def _meter_run(pair, load_program, traffic, tmp_path, *, offloads: bool):
    pair.set_offloads(offloads)
    prog = load_program(flow_map_size=4096)
    with in_netns(pair.b.netns):
        att = attach.attach(pair.b.iface, prog.prog_fd)
    reader = FlowMapReader(prog.flows_fd, SystemClock(), timeouts=LINGER)
    decoder = EventDecoder()
    prog.open_events(lambda raw: reader.on_event(decoder.decode(raw)))
    pcap = tmp_path / "cap.pcap"
    cap = Capture(pair.b, pcap)
    try:
        traffic()
    finally:
        err = cap.stop()
        with in_netns(pair.b.netns):
            attach.detach(att)
    assert "0 packets dropped by kernel" in err, err
    captured = int(err.split(" packets captured")[0].split()[-1])
    received = int(err.split(" packets received by filter")[0].split()[-1])
    assert captured == received, err
    time.sleep(0.25)  # past the linger: ended TCP flows retire as END_OF_FLOW
    prog.poll_events(0)
    records = reader.collect()
    reader.drain()
    prog.poll_events(0)
    records += reader.flush()
    counters = read_counters(prog.counters_fd, possible_cpus())
    return records, pcap, counters


def _assert_same(kernel: dict, reference: dict):
    assert set(kernel) == set(reference), (set(kernel) ^ set(reference))
    for key, ref in reference.items():
        got = kernel[key]
        for end, side in ref.sides.items():
            assert got.sides.get(end) == side, (key, end)
        assert got.initiator == ref.initiator, key


@pytest.fixture
def pair():
    with VethPair.create("kt") as p:
        p.wait_ready()
        yield p


def _http(pair):
    srv = pair.b.popen(PY, "-m", "http.server", "8080", "--bind", "::",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if pair.a.run("curl", "-s", "-o", "/dev/null", f"http://{pair.b.ip4}:8080/",
                          check=False).returncode == 0:
                break
            time.sleep(0.1)
        pair.a.run("curl", "-s", "-o", "/dev/null", "-g", f"http://[{pair.b.ip6}]:8080/")
    finally:
        srv.terminate()
        srv.wait()


def _iperf(pair, *args):
    srv = pair.b.popen("iperf3", "-s", "-1", "-B", "::", stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            r = pair.a.run("iperf3", "-c", pair.b.ip4, *args, check=False)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        assert r.returncode == 0, r.stderr
    finally:
        srv.wait(timeout=10)


def _scapy_send(pair, code: str):
    script = ("from scapy.all import *\n"
              f"A4, B4 = {pair.a.ip4!r}, {pair.b.ip4!r}\n" + code)
    pair.a.run(PY, "-c", script)


TAGGED = """
e = Ether(src=get_if_hwaddr('veth0'), dst='02:00:00:00:00:09')
base = IP(src=A4, dst=B4) / UDP(sport=4000, dport=4001) / Raw(b'q' * 100)
sendp([e / Dot1Q(vlan=100) / base] * 3, iface='veth0', verbose=False)
sendp([e / Dot1AD(vlan=200) / Dot1Q(vlan=30) / base] * 2, iface='veth0', verbose=False)
frags = fragment(IP(src=A4, dst=B4, id=4242) / UDP(sport=4002, dport=4003)
                 / Raw(b'f' * 4000), fragsize=1400)
sendp([e / f for f in frags], iface='veth0', verbose=False)
"""


def test_exact_counts_offloads_off(pair, load_program, tmp_path):
    def traffic():
        pair.a.run("ping", "-c", "3", "-i", "0.05", pair.b.ip4)
        pair.a.run("ping", "-6", "-c", "3", "-i", "0.05", pair.b.ip6)
        pair.a.run("ping", "-c", "2", "-i", "0.05", "-s", "4000", pair.b.ip4)
        pair.a.run("ping", "-6", "-c", "2", "-i", "0.05", "-s", "4000", pair.b.ip6)
        _http(pair)
        _iperf(pair, "-b", "20M", "-n", "1M")
        _iperf(pair, "-u", "-b", "4M", "-l", "1000", "-n", "200K")
        _scapy_send(pair, TAGGED)

    records, pcap, counters = _meter_run(pair, load_program, traffic, tmp_path, offloads=False)
    reference = flows_from_pcap(pcap)
    _assert_same(flows_from_records(records), reference)
    assert counters[abi.Counter.FLOW_MAP_FULL] == 0
    assert counters[abi.Counter.FRAG_NO_FIRST] == 0

    # What happened, flow by flow: HTTP over v4 and v6 closed cleanly and was exported
    # as ended; VLAN and QinQ frames are their own flows; fragments joined their flow.
    http = [r for r in records if r.protocol == 6 and r.dst_port == 8080]
    done = [r for r in http if r.conn_state == "SF"]
    assert len(done) == 2  # v4 and v6; earlier tries before the server listened: REJ
    assert all(r.conn_state == "REJ" and r.tcp_rst_count == 1 for r in http if r not in done)
    for r in done + [r for r in http if r not in done]:
        assert r.flow_end_reason == FlowEndReason.END_OF_FLOW
    for r in done:
        assert r.src_addr in (pair.a.ip4, pair.a.ip6) and r.handshake_rtt_ns > 0
    vlans = {(r.vlan_id, r.inner_vlan_id): r.initiator_packets for r in records if r.vlan_id}
    assert vlans == {(100, 0): 3, (200, 30): 2}
    [frag] = [r for r in records if r.dst_port == 4003]
    assert frag.initiator_packets == 3 and frag.initiator_octets == 4000 + 8 + 3 * 20
    pings = [r for r in records if r.protocol == 1]
    assert pings and all(r.icmp_type == 8 and r.src_port == 8 for r in pings)
    assert sum(r.initiator_packets for r in pings) == 3 + 2 * 3  # 4000 B: 3 fragments


def test_exact_wire_counts_offloads_on(pair, load_program, tmp_path):
    def traffic():
        _iperf(pair, "-b", "200M", "-n", "8M")
        _http(pair)

    records, pcap, _ = _meter_run(pair, load_program, traffic, tmp_path, offloads=True)
    # The senders' segment size: MSS 1460 on a 1500-byte MTU, minus the 12 bytes of
    # TCP timestamps every segment carries.
    ends = {(r.src_addr, r.src_port) for r in records if r.protocol == 6} | \
        {(r.dst_addr, r.dst_port) for r in records if r.protocol == 6}
    sizes = {end: (1448 if ":" not in end[0] else 1428) for end in ends}
    reference = flows_from_pcap(pcap, segment_sizes=sizes)
    _assert_same(flows_from_records(records), reference)
    data = max((r for r in records if r.protocol == 6), key=lambda r: r.initiator_octets)
    # offloads really were on: the meter saw buffers of many segments
    assert data.initiator_packets > 100
