"""Subscribe fan-out by peer feeds (collector/fanout.py), without BPF or ClickHouse: two
real `loupe collector run` processes, each listing the other in cluster.peers (each on
its own DuckDB here: the feed does not depend on the store). A live stream on either
collector carries the records pushed to the other, each once (no loop through the
mesh); a peer that is down at start is followed once it is up."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from sensor.export.grpc_client import GrpcExportConfig, GrpcExporter
from tests.conftest import REPO
from tests.export.collector_proc import free_port, wait_for
from tests.export.records import numbered_flow
from tests.scale.test_many_collectors import Collector, Tail

pytestmark = pytest.mark.timeout(120)


class DuckCollector(Collector):
    def start(self, peers: list[str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.workdir / "collector.err", "w")
        self.proc = subprocess.Popen([
            sys.executable, "-m", "sensor.cli", "collector", "run", "--listen", self.address,
            "--data-dir", str(self.workdir), "--grace", "1",
            "--set", f"cluster.peers={','.join(peers)}",
        ], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL, stderr=self.log)


def push(address: str, spool_dir, sensor_id: str, first: int, n: int) -> None:
    ex = GrpcExporter(GrpcExportConfig(target=address, sensor_id=sensor_id,
                                       spool_dir=spool_dir, batch_delay_s=0.05)).start()
    for i in range(first, first + n):
        ex.submit(numbered_flow(i, sensor_id=sensor_id))
    ex.close(20)
    assert ex.counters()["records_acked"] == n


def test_live_streams_carry_the_peers_records_once(tmp_path):
    a = DuckCollector(tmp_path / "a", 0, "")
    b = DuckCollector(tmp_path / "b", 0, "")
    tails = []
    try:
        a.start([b.address])
        b.start([a.address])
        a.wait_listening()
        b.wait_listening()
        tails = [Tail(a.address), Tail(b.address)]
        wait_for(lambda: a.status().subscribers == 2 and b.status().subscribers == 2, 30,
                 "the tails and the peer feeds", interval_s=0.2)
        push(a.address, tmp_path / "sa", "to-a", 0, 300)
        push(b.address, tmp_path / "sb", "to-b", 1000, 200)
        want = Counter({("to-a", numbered_flow(i).uid): 1 for i in range(300)})
        want.update({("to-b", numbered_flow(i).uid): 1 for i in range(1000, 1200)})
        for tail in tails:
            wait_for(lambda t=tail: Counter((r.sensor_id, r.uid) for r in t.records) == want,
                     20, "both sensors' records, once each, on both live streams")
        # Status counts what each collector's feed brought from its peer.
        assert a.status().counters["peer_records"] == 200
        assert b.status().counters["peer_records"] == 300
        assert a.status().counters["peer_feeds_up"] == 1
    finally:
        for tail in tails:
            tail.close()
        a.stop()
        b.stop()


def test_a_peer_that_is_down_is_followed_once_it_is_up(tmp_path):
    port = free_port()
    a = DuckCollector(tmp_path / "a", 0, "")
    b = DuckCollector(tmp_path / "b", 0, "")
    b.port, b.address = port, f"127.0.0.1:{port}"
    tail = None
    try:
        a.start([b.address])          # B is not there yet: A's feed backs off and retries
        a.wait_listening()
        tail = Tail(a.address)
        b.start([])
        b.wait_listening()
        wait_for(lambda: b.status().subscribers == 1, 30, "A's feed to reach B", 0.2)
        push(b.address, tmp_path / "sb", "to-b", 0, 50)
        wait_for(lambda: len(tail.records) == 50, 20, "B's records on A's live stream")
    finally:
        if tail is not None:
            tail.close()
        a.stop()
        b.stop()
