"""The budget and the ring buffer on real traffic. curl fetches the same number of 1 KiB and of 1 MiB bodies
over one keep-alive connection between two namespaces, with the flow meter attached
and KernelSensor acting as the L7 stage would: for every response header it sees, it
skips the body (skip_until its last byte) and grants room for the next header. Every
response header is seen in both runs, and the payload bytes copied to userspace
(measured by the kernel's own counters) stay nearly the same although 1000 times more
bytes crossed the wire."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from sensor.clock import SystemClock
from sensor.kernel import abi, attach
from sensor.kernel.counters import possible_cpus, read_counters
from sensor.kernel.hybrid import KernelSensor, SelectionConfig
from tests.kernel.conftest import in_netns
from tests.netns import VethPair

pytestmark = pytest.mark.bpf

REQUESTS = 10
HEADER_GRANT = 2048    # room for the next response header, granted with each skip

# Serves the files in argv[2], keep-alive. Each response's header goes out on its own
# and the body PAUSE later, as an application that looks its data up would: the test
# stands in for the L7 stage, and without the pause a test process descheduled for a few
# ms on a loaded machine sets skip_until only after the body (or the next header) has
# gone by, which is the lag the test is not about.
PAUSE = 0.05
SERVER = f"""
import http.server, os, socket, sys, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive
    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def log_message(self, *a): pass
    def do_GET(self):
        with open(os.path.join(sys.argv[2], os.path.basename(self.path)), "rb") as f:
            body = f.read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        time.sleep({PAUSE})
        self.wfile.write(body)
http.server.ThreadingHTTPServer((sys.argv[1], 8080), H).serve_forever()
"""


def _fetch(pair, prog, sensor, name: str) -> tuple[int, int]:
    """Runs REQUESTS requests on one connection; returns (response headers seen,
    payload octets the kernel copied)."""
    url = f"http://{pair.b.ip4}:8080/{name}"
    before = read_counters(prog.counters_fd, possible_cpus())[abi.Counter.PAYLOAD_OCTETS]
    args = ["curl", "-s", "--fail", "--max-time", "20"]
    for _ in range(REQUESTS):
        args += ["-o", "/dev/null", url]
    client = pair.a.popen(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    headers = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = client.poll() is not None
        sensor.poll(5)
        for ev in sensor.payload_events():
            if ev.direction != abi.PL_TO_INITIATOR or not ev.data.startswith(b"HTTP/1.1 "):
                continue
            end = ev.data.find(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", ev.data[:end])
            assert end > 0 and length, ev.data[:200]
            headers += 1
            body_end = (ev.seq + end + 4 + int(length.group(1))) & 0xFFFFFFFF
            # skip first, then grant: a body segment in between must not eat the grant
            assert sensor.skip_until(ev.key, abi.PL_TO_INITIATOR, body_end)
            assert sensor.grant(ev.key, abi.PL_TO_INITIATOR, HEADER_GRANT)
        if done:
            break
    assert client.wait(timeout=5) == 0, client.stderr.read()
    after = read_counters(prog.counters_fd, possible_cpus())[abi.Counter.PAYLOAD_OCTETS]
    return headers, after - before


def test_keepalive_copies_nearly_the_same_for_1k_and_1m_bodies(load_program, tmp_path):
    (tmp_path / "small").write_bytes(b"s" * 1024)
    (tmp_path / "large").write_bytes(b"L" * (1 << 20))
    prog = load_program(flow_map_size=1024)
    sensor = KernelSensor(prog, SystemClock(), selection=SelectionConfig(ports={8080}))
    with VethPair.create("kk") as pair:
        pair.wait_ready()
        srv = pair.b.popen(sys.executable, "-c", SERVER, pair.b.ip4, str(tmp_path),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with in_netns(pair.b.netns):
            att = attach.attach(pair.b.iface, prog.prog_fd)
        try:
            for _ in range(50):   # the server listens
                if pair.a.run("curl", "-s", "-o", "/dev/null", "--max-time", "1",
                              f"http://{pair.b.ip4}:8080/small", check=False).returncode == 0:
                    break
                time.sleep(0.1)
            sensor.poll(0)
            list(sensor.payload_events())
            small_headers, small_copied = _fetch(pair, prog, sensor, "small")
            large_headers, large_copied = _fetch(pair, prog, sensor, "large")
        finally:
            with in_netns(pair.b.netns):
                attach.detach(att)
            srv.terminate()
            srv.wait()
    assert small_headers == REQUESTS and large_headers == REQUESTS
    # 10 MiB crossed the wire in the large run; userspace got a few KiB per response.
    assert large_copied < 3 * small_copied + REQUESTS * HEADER_GRANT
    assert large_copied < REQUESTS * (1 << 20) // 100
    counters = read_counters(prog.counters_fd, possible_cpus())
    assert counters[abi.Counter.RINGBUF_FULL] == 0
    sensor.reader.drain()
    records = [r for r in sensor.reader.flush() if r.dst_port == 8080]
    cov = [r.l7_coverage for r in records]
    assert all(c.inspected for c in cov)
    # Every body octet of the large connection is accounted for: the rest of the
    # buffer that carried a response header is truncated (the budget), later buffers
    # of the body are skipped (skip_until reached the kernel by then).
    big = max(records, key=lambda r: r.responder_octets)
    c = big.l7_coverage
    assert c.captured_octets + c.truncated_octets + c.skipped_octets >= REQUESTS << 20
    assert c.skipped_octets > REQUESTS << 19 and c.gap_octets == 0


def test_tiny_ring_buffer_under_real_load_loses_payload_not_counts(load_program, tmp_path):
    """One 4 KiB ring page, a budget of 1 GiB and nobody polling during a 2 MiB
    transfer (at a rate tcpdump keeps up with): payload is lost and counted (per flow as gap octets, globally as
    ringbuf_full and a kernel_ringbuf_full LostEvent), while the flow's packet and byte
    counts still equal tcpdump's."""
    from sensor.kernel.counters import CounterWatcher
    from sensor.model import LostSource
    from tests.kernel.pcapflows import flows_from_pcap, flows_from_records
    from tests.kernel.test_netns_counts import Capture

    prog = load_program(flow_map_size=256, ringbuf_pages=1)
    sensor = KernelSensor(prog, SystemClock(), selection=SelectionConfig(
        ports={5201}, sniff=False, budget=(1 << 30, 1 << 30)))
    watcher = CounterWatcher(prog.counters_fd)
    with VethPair.create("kr") as pair:
        pair.wait_ready()
        pair.set_offloads(False)   # tcpdump then sees wire packets
        with in_netns(pair.b.netns):
            att = attach.attach(pair.b.iface, prog.prog_fd)
        cap = Capture(pair.b, tmp_path / "cap.pcap")
        srv = pair.b.popen("iperf3", "-s", "-1", stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        try:
            for _ in range(50):
                r = pair.a.run("iperf3", "-c", pair.b.ip4, "-b", "40M", "-n", "2M",
                               check=False)
                if r.returncode == 0:
                    break
                time.sleep(0.1)
            assert r.returncode == 0, r.stderr
        finally:
            srv.wait(timeout=10)
            err = cap.stop()
            with in_netns(pair.b.netns):
                attach.detach(att)
    assert "0 packets dropped by kernel" in err, err
    captured = int(err.split(" packets captured")[0].split()[-1])
    received = int(err.split(" packets received by filter")[0].split()[-1])
    assert captured == received, err
    lost = {e.source: e.count for e in watcher.poll(SystemClock().wall_ns())}
    assert lost.get(LostSource.KERNEL_RINGBUF_FULL.value, 0) > 0
    sensor.poll(0)
    list(sensor.payload_events())
    sensor.reader.drain()
    records = sensor.reader.flush()
    # The iperf3 connections (control and data): other packets (IPv6 neighbour
    # discovery, MLD) may fall between attaching and starting the capture.
    def iperf(flows: dict) -> dict:
        return {k: f for k, f in flows.items()
                if k[2] == 6 and any(port == 5201 for _, port in k[3])}

    reference = iperf(flows_from_pcap(tmp_path / "cap.pcap"))
    kernel = iperf(flows_from_records(records))
    # control and data connections, and any attempt refused before the server listened
    assert set(kernel) == set(reference) and len(reference) >= 2
    for key, ref in reference.items():
        assert kernel[key].sides == ref.sides, key
    data = max(records, key=lambda r: r.initiator_octets)
    c = data.l7_coverage
    assert c.inspected and c.gap_octets > 1 << 20
    # Every payload octet of the data connection, as tcpdump saw it, is accounted once.
    [wire] = [f for f in reference.values()
              if {data.src_port, data.dst_port} <= {port for _, port in f.sides}]
    sent = sum(s.payload for s in wire.sides.values())
    assert sent >= 2 << 20
    assert c.captured_octets + c.gap_octets + c.truncated_octets + c.skipped_octets == sent
