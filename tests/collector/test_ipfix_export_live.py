"""The collector's IPFIX export in a live run: `loupe sensor run` attached in a test
namespace sends its records to a collector, which exports them to nfcapd (repeating
every datagram to nfacctd, -R); nfdump and pmacct show the same flows, packets and bytes
as the collector stored, and those are the sensor's own records of the same run.

Uniflow mode, since pmacct ignores RFC 5103 reverse IEs (test_ipfix_export.py has
biflows into nfdump)."""

from __future__ import annotations

import time

import pytest

from sensor.export import jsonfmt
from tests.export.ipfix_collectors import Nfacctd, Nfcapd, directions, needs_collectors
from tests.live.rig import Sensor, start_http, stop, wait_tcp
from tests.netns import VethPair

from .test_ipfix_export import stored_flows, wait_exported

pytestmark = [pytest.mark.bpf, needs_collectors]


def test_live_flows_through_the_collector_reach_nfdump_and_nfacctd(start_collector, tmp_path):
    with VethPair.create("cx") as pair:
        pair.wait_ready()
        http = start_http(pair.b, tmp_path)
        nfacctd = Nfacctd(tmp_path)
        nfcapd = Nfcapd(tmp_path, repeat_to=nfacctd.port)
        c = start_collector(ipfix_targets=(f"127.0.0.1:{nfcapd.port}",), ipfix_uniflow=True)
        sensor = Sensor(["--netns", pair.a.netns, "--iface", pair.a.iface,
                         "--collector", c.address, "--spool-dir", str(tmp_path / "spool"),
                         "--sensor-id", "live-ipfix", "--output", "jsonl", "--interval", "0.5",
                         "--set", "timeouts.tcp_linger=1s", "--set", "export.batch_delay=100ms"],
                        workdir=tmp_path)
        try:
            wait_tcp(pair.a, pair.b.ip4, 8080)
            time.sleep(1.5)   # the probe's flow ends before the sensor starts
            sensor.start()
            for size in (100, 20000, 5):     # three connections
                pair.a.run("curl", "-s", "-o", "/dev/null",
                           f"http://{pair.b.ip4}:8080/size/{size}")
            assert sensor.stop() == 0        # every record acked by the collector
            own = [jsonfmt.to_dict(r) for r in sensor.records() if type(r).__name__ == "Flow"]
            stored = stored_flows(c.address)
            wait_exported(c.collector.ipfix, len(stored))
            ours = directions(stored)
            theirs_pm = nfacctd.counts(sum(v for k, v in ours.items() if k[-1] == "packets"))
            time.sleep(0.3)
        finally:
            sensor.kill()
            stop(http)
            nfcapd.stop()
            nfacctd.stop()
    assert sum(1 for f in stored if f["dst_port"] == 8080) >= 3
    # The collector stored what the sensor saw...
    assert directions(own) == ours
    # ... and the flow tools show what the collector stored.
    assert "Sequence Errors: 0" in nfcapd.log(), nfcapd.log()
    assert nfcapd.uniflows() == ours
    assert +theirs_pm == ours
