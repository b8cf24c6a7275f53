"""Nothing lost, nothing doubled, across collector outages: steady real traffic (a
bounded curl loop) while the collector is SIGKILLed for 30 s and started again over the
same DuckDB file, then the same while the sensor itself restarts during the outage
(its spool carries the records over). Every flow and L7 event the sensor exported (its
own JSON lines and counters) is stored exactly once."""

from __future__ import annotations

import subprocess
import time
from collections import Counter

import pytest

from sensor.model import Flow, L7Event
from tests.export.collector_proc import CollectorProcess, query, wait_for
from tests.live.rig import Sensor, start_http, stop, wait_closed, wait_tcp
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(300)]

# Longer than the sensor's reconnect backoff (up to 10 s), so the spool fills and the
# backoff is exercised; not longer, the suite's time is shared.
OUTAGE_S = 12


@pytest.fixture
def pair():
    with VethPair.create("lo") as p:
        p.wait_ready()
        yield p


def _loop(pair, seconds: float) -> subprocess.Popen:
    """One new HTTP flow every 0.2 s for `seconds` (bounded)."""
    n = int(seconds / 0.2)
    return pair.a.popen("bash", "-c", f"for i in $(seq 1 {n}); do curl -s -o /dev/null "
                        f"http://{pair.b.ip4}:8080/size/$i; sleep 0.2; done",
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _ended(n: int, times: int = 1):
    """records -> True once `times` flows whose request was GET /size/{n} (the last of a
    _loop of n requests) are printed: ended past the 1 s linger, so every earlier flow
    of that loop has ended too."""
    def done(records) -> bool:
        uids = {r.uid for r in records if isinstance(r, L7Event) and r.kind == "http"
                and r.detail.path == f"/size/{n}"}
        return sum(isinstance(r, Flow) and r.uid in uids for r in records) >= times
    return done


def _stored(address: str) -> tuple[Counter, Counter]:
    flows = Counter(tuple(r) for r in query(
        address, "SELECT uid, flow_end_reason, initiator_packets FROM flows"))
    http = Counter(tuple(r) for r in query(address, "SELECT uid, path FROM http"))
    return flows, http


def _printed(sensors) -> tuple[Counter, Counter]:
    flows, http = Counter(), Counter()
    for s in sensors:
        for r in s.records():
            if isinstance(r, Flow):
                flows[(r.uid, int(r.flow_end_reason), r.initiator_packets)] += 1
            elif isinstance(r, L7Event) and r.kind == "http":
                http[(r.uid, r.detail.path)] += 1
    return flows, http


def test_collector_and_sensor_restarts_lose_and_double_nothing(pair, tmp_path):
    http_server = start_http(pair.b, tmp_path)
    collector = CollectorProcess(tmp_path / "data")
    collector.start()
    args = ["--netns", pair.a.netns, "--iface", pair.a.iface, "--collector",
            collector.address, "--spool-dir", str(tmp_path / "spool"), "--sensor-id",
            "liveoutage", "--output", "jsonl", "--interval", "0.5", "--select", "port:8080",
            "--no-process", "--set", "timeouts.tcp_linger=1s",
            "--set", "export.batch_delay=100ms", "--drain-timeout", "2"]
    first = Sensor(args, workdir=tmp_path)
    second = Sensor(args, workdir=tmp_path)
    loop = None
    try:
        wait_tcp(pair.a, pair.b.ip4, 8080)
        wait_closed(8080, pair.a, pair.b)   # the probe's flow is over
        first.start()
        # 1. The collector dies (SIGKILL) for OUTAGE_S in the middle of steady traffic,
        # once the first flows have reached it.
        loop = _loop(pair, OUTAGE_S + 6)
        wait_for(lambda: len(query(collector.address, "SELECT uid FROM flows")) >= 3, 20,
                 "the first flows at the collector")
        collector.kill()
        time.sleep(OUTAGE_S)
        collector.start()
        loop.wait(30)
        first.wait_records(_ended(int((OUTAGE_S + 6) / 0.2)), 30, "the loop's last flow")

        def exported() -> int:
            return int(first.metrics()["loupe_records_exported"].get("flow", 0))
        wait_for(lambda: len(query(collector.address, "SELECT uid FROM flows")) == exported(),
                 30, "the spooled flows to reach the collector")
        # 2. The collector dies again; traffic; the sensor restarts while it is down.
        collector.kill()
        loop = _loop(pair, 2)
        loop.wait(30)
        first.wait_records(_ended(10, times=2), 30, "the second loop's last flow")
        assert first.stop() == 0      # what it could not deliver stays in the spool
        second.start()                # same spool directory, same sensor id
        loop = _loop(pair, 2)
        loop.wait(30)
        collector.start()
        second.wait_records(_ended(10), 30, "the third loop's last flow")
        # Its reconnect backoff (up to 10 s) decides when the spool goes out.
        wait_for(lambda: second.metrics()["loupe_queue_depth"]["spool"] == 0, 30,
                 "the restarted sensor's spool to be acked")
        assert second.stop(timeout_s=60) == 0
    finally:
        if loop is not None and loop.poll() is None:
            loop.kill()
        first.kill()
        second.kill()
        stop(http_server)
    try:
        printed_flows, printed_http = _printed([first, second])
        # Nothing the sensors printed is missing at the collector, and nothing is there
        # twice (a (uid, end reason, packets) triple is one record).
        deadline = time.monotonic() + 30
        stored = _stored(collector.address)
        while stored != (printed_flows, printed_http) and time.monotonic() < deadline:
            time.sleep(0.5)
            stored = _stored(collector.address)
        for got, want, what in ((stored[0], printed_flows, "flows"),
                                (stored[1], printed_http, "http")):
            assert got == want, (what, "missing:", want - got, "extra:", got - want)
        assert all(n == 1 for n in printed_flows.values())
        paths = sorted(p for (_uid, p) in printed_http)
        assert len(paths) >= (OUTAGE_S + 6 + 4) / 0.2 * 0.8   # the loop's requests
        # The sensors' own counts agree with what they printed.
        total = sum(s.closing()["flows"] for s in (first, second))
        assert total == sum(printed_flows.values())
    finally:
        collector.stop()
