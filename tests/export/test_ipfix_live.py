"""IPFIX from the live sensor: `loupe sensor run --ipfix` attached in a test namespace,
curl traffic, and nfdump and pmacct show the same flows, packets and bytes as the
sensor's own records of the same run.

One run feeds both collectors: the sensor sends to nfcapd, which repeats every datagram
to nfacctd (-R). Uniflow mode, since pmacct ignores RFC 5103 reverse IEs (see
test_ipfix_collectors.py for biflows into nfdump)."""

from __future__ import annotations

import time

import pytest

from sensor.export import jsonfmt
from tests.export.ipfix_collectors import Nfacctd, Nfcapd, directions, needs_collectors
from tests.live.rig import Sensor, start_http, stop, wait_tcp
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, needs_collectors]


def test_live_sensor_flows_reach_nfdump_and_nfacctd(tmp_path):
    with VethPair.create("ix") as pair:
        pair.wait_ready()
        http = start_http(pair.b, tmp_path)
        nfacctd = Nfacctd(tmp_path)
        nfcapd = Nfcapd(tmp_path, repeat_to=nfacctd.port)
        sensor = Sensor(["--netns", pair.a.netns, "--iface", pair.a.iface, "--collector", "",
                         "--output", "jsonl", "--interval", "0.5",
                         "--set", "timeouts.tcp_linger=1s",
                         "--ipfix", f"127.0.0.1:{nfcapd.port}", "--ipfix-uniflow"],
                        workdir=tmp_path)
        try:
            wait_tcp(pair.a, pair.b.ip4, 8080)
            time.sleep(1.5)   # the probe's flow ends before the sensor starts
            sensor.start()
            for size in (100, 20000, 5):     # three connections
                pair.a.run("curl", "-s", "-o", "/dev/null",
                           f"http://{pair.b.ip4}:8080/size/{size}")
            pair.a.run("curl", "-s", "-o", "/dev/null", f"http://[{pair.b.ip6}]:8080/size/7",
                       check=False)        # the server listens on IPv4 only: a reset
            assert sensor.stop() == 0      # every flow out, the exporter flushed
            flows = [jsonfmt.to_dict(r) for r in sensor.records()
                     if type(r).__name__ == "Flow"]
            ours = directions(flows)
            theirs_pm = nfacctd.counts(sum(v for k, v in ours.items() if k[-1] == "packets"))
            time.sleep(0.3)
        finally:
            sensor.kill()
            stop(http)
            nfcapd.stop()
            nfacctd.stop()
    assert sum(1 for f in flows if f["dst_port"] == 8080) >= 4
    assert "Sequence Errors: 0" in nfcapd.log(), nfcapd.log()
    assert nfcapd.uniflows() == ours
    assert +theirs_pm == ours
    assert "ipfix_send_error" not in sensor.stderr
