"""The copy budget for gRPC on the real kernel, with a real grpcio server and client.

A live sensor on the server's side of a veth pair (the server runs in one namespace, the
client in the other; on loopback, segments can be delivered out of order under load, and a
hole that may hold a frame header stops the walk by design) sees two channels of 20 unary
echo calls each: messages of 1 KiB, then of 10 MiB. The kernel follows the HTTP/2 frames (bpf/frames.h) and leaves
DATA, PING and WINDOW_UPDATE frames out by itself, so every call is still parsed (its
method and grpc-status, from the HEADERS and trailers) and the octets copied to userspace
(each flow's own l7_coverage) stay nearly the same although the traffic grows 10,000-fold.
Without the walk the 10 MiB channel's allowance runs out mid-frame, HPACK state is lost
and the parse ends after a few calls.
"""

from __future__ import annotations

import sys
import time

import pytest

from sensor.model import Flow, L7Event, LostEvent
from tests.conftest import REPO
from tests.fixtures import gen_http2 as G
from tests.live.rig import Sensor, wait_tcp
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

CALLS = 20
SIZES = {"small": 1024, "large": 10 << 20}
PORT = 50151
SERVER = ("import sys, time\nfrom tests.fixtures import gen_http2 as G\n"
          "server, _ = G.grpc_server(sys.argv[1], int(sys.argv[2]))\n"
          "time.sleep(600)\n")
CLIENT = ("import sys\nfrom tests.fixtures import gen_http2 as G\n"
          "G.grpc_sized(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))\n")


def test_grpc_10_mib_messages_copy_about_what_1_kib_messages_do(tmp_path):
    port = PORT
    with VethPair.create("grb") as pair:
        pair.wait_ready()
        server = pair.b.popen("env", f"PYTHONPATH={REPO}", sys.executable, "-c", SERVER,
                              pair.b.ip4, str(port))
        sensor = Sensor(["--netns", pair.b.netns, "--iface", pair.b.iface, "--collector", "",
                         "--spool-dir", str(tmp_path / "spool"), "--sensor-id", "livegrpcbudget",
                         "--output", "jsonl", "--interval", "0.5", "--select", f"port:{port}",
                         "--no-process", "--set", "timeouts.tcp_linger=1s"], workdir=tmp_path)
        try:
            wait_tcp(pair.a, pair.b.ip4, port)
            time.sleep(1.5)   # the probe's flow ends before the sensor starts
            sensor.start()
            for size in SIZES.values():    # one channel (one connection) each
                pair.a.run("env", f"PYTHONPATH={REPO}", sys.executable, "-c", CLIENT,
                           pair.b.ip4, str(port), str(size), str(CALLS), timeout=120)
            time.sleep(2.5)   # past the linger and a read: ended flows are exported
            assert sensor.stop() == 0
        finally:
            sensor.kill()
            server.kill()
            server.wait()
    records = sensor.records()
    flows = {r.uid: r for r in records if isinstance(r, Flow) and r.dst_port == port}
    events: dict[str, list] = {}
    for r in records:
        if isinstance(r, L7Event) and r.kind == "http2" and r.dst_port == port:
            events.setdefault(r.uid, []).append(r.detail)
    lost = [r for r in records if isinstance(r, LostEvent)]
    # Both channels, in the order they ran (their flows' first packets).
    uids = sorted(events, key=lambda u: flows[u].flow_start_ns)
    assert len(uids) == 2, {u: len(e) for u, e in events.items()}
    copied, wire = {}, {}
    for name, uid in zip(SIZES, uids):
        got = events[uid]
        # Every call parsed: an event each, with its method and status.
        cov = flows[uid].l7_coverage
        assert [(e.grpc_service, e.grpc_method, e.grpc_status) for e in got] == \
            [(G.SERVICE, "Unary", 0)] * CALLS, (name, [e.grpc_status for e in got], cov, lost)
        copied[name] = cov.captured_octets
        wire[name] = (cov.captured_octets + cov.skipped_octets + cov.truncated_octets
                      + cov.gap_octets)
        assert cov.gap_octets == 0, cov
    print(f"payload copied: {CALLS} calls of 1 KiB {copied['small']} B "
          f"(of {wire['small']} B), of 10 MiB {copied['large']} B (of {wire['large']} B)")
    # The large channel carries 2 x 20 x 10 MiB; what it copies is its calls' header
    # blocks and the frames around them, as for 1 KiB messages (whose DATA frames are left
    # out the same way), plus the odd control frame grpc adds for a big transfer.
    assert wire["large"] > 2 * CALLS * SIZES["large"]
    assert copied["large"] <= 2 * copied["small"] + 16384, copied
