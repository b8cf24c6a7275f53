"""Subscribe fan-out by peer feeds (collector/fanout.py), without BPF or ClickHouse: two
real `loupe collector run` processes, each listing the other in cluster.peers (each on
its own DuckDB here: the feed does not depend on the store). A live stream on either
collector carries the records pushed to the other, each once (no loop through the
mesh); a peer that is down at start is followed once it is up; under mTLS the feed
presents an analyst certificate ([cluster] cert_file, key_file)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import grpc
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


def test_peer_feeds_under_mtls_with_an_analyst_certificate(tmp_path):
    from loupe.v1 import observer_pb2_grpc

    from sensor.export import wire
    from sensor.export.grpc_client import TlsFiles

    certs = tmp_path / "certs"
    subprocess.run([sys.executable, "-m", "sensor.cli", "certs", "init", "--dir", str(certs),
                    "--sensor", "edge-7", "--analyst", "peer"],
                   cwd=REPO, check=True, capture_output=True, timeout=60)
    tls = ["--tls-cert", str(certs / "collector.pem"), "--tls-key", str(certs / "collector.key"),
           "--tls-ca", str(certs / "ca.pem")]
    ports = [free_port(), free_port()]
    procs = []
    try:
        for mine, peer in ((ports[0], ports[1]), (ports[1], ports[0])):
            procs.append(subprocess.Popen([
                sys.executable, "-m", "sensor.cli", "collector", "run", "--listen",
                f"127.0.0.1:{mine}", "--data-dir", str(tmp_path / str(mine)), *tls,
                "--set", f"cluster.peers=127.0.0.1:{peer}",
                "--set", f"cluster.cert_file={certs / 'peer.pem'}",
                "--set", f"cluster.key_file={certs / 'peer.key'}",
            ], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        analyst = TlsFiles(ca_cert=certs / "ca.pem", client_cert=certs / "peer.pem",
                           client_key=certs / "peer.key").credentials()

        def subscribers(port: int) -> int:
            with grpc.secure_channel(f"127.0.0.1:{port}", analyst) as channel:
                try:
                    return observer_pb2_grpc.ObserverStub(channel).Status(
                        wire.observer_pb2.StatusRequest(), timeout=5).subscribers
                except grpc.RpcError:
                    return -1

        # Each collector serves the other's feed: the analyst certificate was accepted.
        wait_for(lambda: subscribers(ports[0]) == 1 and subscribers(ports[1]) == 1, 60,
                 "the peer feeds over mTLS", 0.3)
        channel = grpc.secure_channel(f"127.0.0.1:{ports[1]}", analyst)
        call = observer_pb2_grpc.ObserverStub(channel).Subscribe(
            wire.observer_pb2.SubscribeRequest(follow=True, number=20), timeout=60)
        wait_for(lambda: subscribers(ports[1]) == 2, 20, "the tail on B", 0.2)
        ex = GrpcExporter(GrpcExportConfig(
            target=f"127.0.0.1:{ports[0]}", sensor_id="x", spool_dir=tmp_path / "spool",
            batch_delay_s=0.05, tls=TlsFiles(ca_cert=certs / "ca.pem",
                                             client_cert=certs / "edge-7.pem",
                                             client_key=certs / "edge-7.key"))).start()
        for i in range(20):
            ex.submit(numbered_flow(i))
        ex.close(20)
        got = [wire.from_proto(r.record) for r in call]
        channel.close()
        # Pushed to A under the sensor's certificate, seen on B with its identity.
        assert sorted(r.uid for r in got) == [numbered_flow(i).uid for i in range(20)]
        assert {r.sensor_id for r in got} == {"edge-7"}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(15)
