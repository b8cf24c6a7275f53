"""The payload budget and visible loss, on real traffic.

- Budget: two keep-alive connections with the same number of requests, 1 KiB and
  10 MiB bodies. The kernel copies each direction's bytes only up to the allowance the
  L7 stage keeps topped up (four times the largest head seen), and skips bodies of known
  length, so the bytes copied to userspace (the sensor's own per-flow coverage and kernel
  counter) for 10 MiB bodies stay within twice those for 1 KiB bodies while the traffic
  differs by four orders of magnitude; every request is parsed.
- Loss: a 64 KiB ring buffer and a sensor that cannot drain it (SIGSTOP) while a bulk
  transfer runs: the collector receives LostEvents with source kernel_ringbuf_full, the
  same count the sensor reports, and the flow counters still equal tcpdump's.
"""

from __future__ import annotations

import re
import signal
import subprocess

import pytest

from sensor.engine.live import DEFAULT_REFILL_OCTETS
from sensor.model import Flow, L7Event, LostSource
from tests.export.collector_proc import query, wait_for
from tests.kernel.pcapflows import flows_from_pcap, flows_from_records
from tests.kernel.test_netns_counts import Capture
from tests.live.rig import Sensor, http_requests, start_http, stop, wait_closed, wait_tcp
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

REQUESTS = 20


@pytest.fixture
def pair():
    with VethPair.create("lb") as p:
        p.wait_ready()
        yield p


def _args(pair, tmp_path, *extra) -> list[str]:
    return ["--netns", pair.a.netns, "--iface", pair.a.iface, "--spool-dir",
            str(tmp_path / "spool"), "--sensor-id", "livebudget", "--output", "jsonl",
            "--interval", "0.5", "--set", "timeouts.tcp_linger=1s", "--no-process", *extra]


def test_copied_bytes_do_not_grow_with_body_size(pair, tmp_path):
    http = start_http(pair.b, tmp_path)
    sensor = Sensor(_args(pair, tmp_path, "--collector", "", "--select", "port:8080",
                          "--budget", "4KiB"), workdir=tmp_path)
    sizes = {"small": 1024, "large": 10 << 20}
    try:
        wait_tcp(pair.a, pair.b.ip4, 8080)
        wait_closed(8080, pair.a, pair.b)
        sensor.start()
        for size in sizes.values():
            # One keep-alive connection each, paced at 20 requests/s (see rig.HTTP_CLIENT).
            assert http_requests(pair.a, tmp_path, pair.b.ip4, size, REQUESTS, 20.0) \
                == REQUESTS
        # Past the 1 s linger and a read: both connections' flows are printed.
        sensor.wait_records(lambda rs: sum(isinstance(r, Flow) and r.dst_port == 8080
                                           for r in rs) >= len(sizes), 30, "the two flows")
        assert sensor.stop() == 0
    finally:
        sensor.kill()
        stop(http)
    records = sensor.records()
    flows = {f.uid: f for f in records if isinstance(f, Flow) and f.dst_port == 8080}
    events = [e for e in records if isinstance(e, L7Event) and e.kind == "http"]
    copied = {}
    for name, size in sizes.items():
        mine = [e for e in events if e.detail.response_body_len == size]
        # Every request parsed, with its status and body length.
        assert len(mine) == REQUESTS, (name, len(mine), sensor.stderr.splitlines()[-1])
        assert all(e.detail.status == 200 and e.detail.path == f"/size/{size}" for e in mine)
        [uid] = {e.uid for e in mine}
        cov = flows[uid].l7_coverage
        copied[name] = cov.captured_octets
        transferred = cov.captured_octets + cov.truncated_octets + cov.skipped_octets \
            + cov.gap_octets
        assert transferred >= REQUESTS * size
    # Per request at most the refill allowance (2 KiB), plus the 4 KiB initial budget per
    # direction, whatever the body size.
    for name in sizes:
        assert copied[name] <= REQUESTS * (DEFAULT_REFILL_OCTETS + 512) + 2 * 4096, copied
    # What a body copies before its skip reaches the kernel is bounded by the room kept
    # for the next heads (four times the largest head seen, at least 512 octets), not by
    # the refill: 200 MiB of bodies cost about as much copying as 20 KiB of bodies
    # (measured 17.3 KiB and 15.2 KiB; 44.6 KiB and 22.0 KiB when every direction was
    # kept topped up to the 2 KiB refill).
    assert copied["large"] <= 2 * copied["small"], copied
    # The kernel's own counter of copied octets is what the flows' coverage says.
    closing = sensor.closing()
    assert closing["payload_octets"] == sum(f.l7_coverage.captured_octets
                                            for f in flows.values())


def test_full_ring_buffer_is_reported_and_counts_stay_exact(pair, collector, tmp_path):
    pair.set_offloads(False)   # tcpdump sees wire packets, as the kernel counts them
    iperf = pair.b.popen("iperf3", "-s", "-B", pair.b.ip4, "-p", "5201",
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sensor = Sensor(_args(pair, tmp_path, "--collector", collector.address, "--select",
                          "port:5201", "--budget", "16MiB", "--refill", "0",
                          "--set", "kernel.ringbuf_size=64KiB"), workdir=tmp_path)
    try:
        wait_tcp(pair.a, pair.b.ip4, 5201)
        wait_closed(5201, pair.a, pair.b)
        sensor.start()
        cap = Capture(pair.a, tmp_path / "cap.pcap")
        sensor.signal(signal.SIGSTOP)   # userspace stalls: nobody drains the ring
        try:
            pair.a.run("iperf3", "-c", pair.b.ip4, "-p", "5201", "-b", "100M", "-n", "4M",
                       "-l", "1400", timeout=60)
        finally:
            sensor.signal(signal.SIGCONT)
        # iperf3's control and data connections have ended (the 1 s linger) and been
        # printed: no packet of theirs is still to come.
        sensor.wait_records(lambda rs: sum(isinstance(r, Flow) and r.dst_port == 5201
                                           for r in rs) >= 2, 30, "iperf3's two flows")
        err = cap.stop()
        assert "0 packets dropped by kernel" in err, err
        assert sensor.stop() == 0
    finally:
        sensor.kill()
        stop(iperf)
    flows = [r for r in sensor.records() if isinstance(r, Flow)]
    reference = {k: v for k, v in flows_from_pcap(cap.path).items() if k[2] == 6}
    mine = flows_from_records([f for f in flows if f.protocol == 6])
    assert set(mine) == set(reference)
    for key, ref in reference.items():
        assert mine[key].sides == ref.sides, key
    # The loss is visible: in the bulk flow's coverage, in the sensor's count, and at
    # the collector as LostEvents of the same total.
    bulk = max(flows, key=lambda f: f.initiator_octets)
    assert bulk.l7_coverage.gap_octets > 0
    m = re.search(r"kernel_ringbuf_full (\d+)", sensor.stderr)
    assert m, sensor.stderr
    reported = int(m.group(1))
    source = LostSource.KERNEL_RINGBUF_FULL.value

    def stored() -> int:
        rows = query(collector.address, f"SELECT sum(count) FROM lost WHERE source = '{source}'")
        return int(rows[0][0] or 0)
    wait_for(lambda: stored() == reported, 20, "the LostEvents at the collector")
    assert reported > 0
