"""Two collectors in front of a ClickHouse cluster of two shards, three sensors pushing to
both, one collector SIGKILLed mid-run: every record is stored exactly once, `loupe query`
on the survivor sees all of them, and a live stream on either collector carries the
records that arrived at the other (collector/fanout.py).

The parts are all real: two clickhouse-server processes (tests/storage), two `loupe
collector run` processes on the cluster, each following the other as its peer, two `loupe
replay --collector A,B` processes, and one live `loupe sensor run --collector A,B` on a
namespace interface with bounded HTTP traffic. What each sensor sent is what it wrote to
its own JSON lines beside the export (the same records, from the same queue hand-over).

1. Fan-out: replay r1 (two collectors share its batches); the live streams opened on A
   and B before it each carry every r1 record once.
2. Failover: the live sensor and replay r2 (fed to its stdin in slices, so the kill lands
   while it is reading) push while A is SIGKILLed; both finish through B.
3. Exactly once: per sensor, kind and uid, B's `loupe query` count equals what the
   sensor wrote.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from sensor import model
from sensor.export import jsonfmt, tables, wire
from tests.conftest import REPO
from tests.export.collector_proc import free_port, wait_for
from tests.live.rig import Sensor, start_http, stop, wait_tcp
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(180)]

LOUPE = [sys.executable, "-m", "sensor.cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CORPUS = Path("/work/shared/corpus")
R1 = CORPUS / "waf" / "sqli.pcap"          # ~2,300 records: several batches
R2 = CORPUS / "waf" / "benign.pcap"
TABLE = tables.kind_tables()


class Collector:
    """`loupe collector run` on the ClickHouse cluster, following its peers."""

    def __init__(self, workdir: Path, shard_port: int, database: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workdir = workdir
        self.shard_port = shard_port
        self.database = database
        self.proc = None

    def start(self, peers: list[str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.workdir / "collector.err", "w")
        self.proc = subprocess.Popen([
            *LOUPE, "collector", "run", "--listen", self.address,
            "--data-dir", str(self.workdir), "--grace", "1",
            "--set", "storage.backend=clickhouse",
            "--set", f"storage.clickhouse.port={self.shard_port}",
            "--set", f"storage.clickhouse.database={self.database}",
            "--set", "storage.clickhouse.cluster=loupe",
            "--set", f"cluster.peers={','.join(peers)}",
        ], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=self.log)

    def wait_listening(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.workdir / "collector.err").read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("collector did not listen")

    def status(self):
        from loupe.v1 import observer_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            return observer_pb2_grpc.ObserverStub(channel).Status(
                wire.observer_pb2.StatusRequest(), timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()


class Tail:
    """A live Subscribe (follow, no filter) kept in a thread: every record it carried."""

    def __init__(self, address: str) -> None:
        from loupe.v1 import observer_pb2_grpc

        self.channel = grpc.insecure_channel(address)
        self.call = observer_pb2_grpc.ObserverStub(self.channel).Subscribe(
            wire.observer_pb2.SubscribeRequest(follow=True))
        self.records: list[model.Record] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for resp in self.call:
                self.records.append(wire.from_proto(resp.record))
        except grpc.RpcError:
            pass   # cancelled at the end, or its collector was killed

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)
        self.channel.close()


def keys(records, sensor_id: str | None = None) -> Counter:
    """(sensor, kind, uid) -> records; LostEvents by source (they have no uid)."""
    out = Counter()
    for r in records:
        if sensor_id is None or r.sensor_id == sensor_id:
            uid = r.source if isinstance(r, model.LostEvent) else r.uid
            out[(r.sensor_id, model.record_kind(r), uid)] += 1
    return out


def read_jsonl(path: Path, sensor_id: str) -> list[model.Record]:
    # The JSON lines of a replay carry the sensor id only where the export set it; it is
    # the same run's records, so the id is put back here.
    from dataclasses import replace

    return [replace(jsonfmt.from_dict(json.loads(line)), sensor_id=sensor_id)
            for line in path.read_text().splitlines() if line.startswith("{")]


def stored(address: str, sensors: tuple[str, ...]) -> Counter:
    """The same keys, as one `loupe query` on `address` counts them."""
    names = ", ".join(f"'{s}'" for s in sensors)
    sql = " UNION ALL ".join(
        f"SELECT sensor_id, '{kind}' AS kind, {'source' if kind == 'lost' else 'uid'} AS k, "
        f"count() AS n FROM {table} WHERE sensor_id IN ({names}) GROUP BY sensor_id, k"
        for kind, table in TABLE.items())
    res = subprocess.run([*LOUPE, "query", "--collector", address, "--format", "json",
                          "--max-rows", "100000", sql],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = Counter()
    for line in res.stdout.splitlines():
        row = json.loads(line)
        out[(row["sensor_id"], row["kind"], row["k"])] += int(row["n"])
    return out


@pytest.fixture
def pair():
    with VethPair.create("sc") as p:
        p.wait_ready()
        yield p


def test_two_collectors_three_sensors_one_killed_exactly_once(
        clickhouse_cluster, pair, tmp_path):
    if not (R1.exists() and R2.exists()):
        pytest.skip(f"the shared corpus is not at {CORPUS}")
    shard1, shard2 = clickhouse_cluster
    database = f"scale{os.getpid()}"
    a = Collector(tmp_path / "a", shard1.port, database)
    b = Collector(tmp_path / "b", shard2.port, database)
    http = start_http(pair.b, tmp_path)
    # The live sensor starts first, in a thread: compiling its kernel programs is the
    # slowest start here, and until the collectors listen it only spools.
    sensor = Sensor([
        "--netns", pair.a.netns, "--iface", pair.a.iface,
        "--collector", f"{a.address},{b.address}", "--spool-dir", str(tmp_path / "spool"),
        "--sensor-id", "live", "--output", "jsonl", "--select", "port:8080",
        "--no-process", "--set", "timeouts.tcp_linger=1s",
        "--set", "export.batch_delay=100ms", "--drain-timeout", "10",
    ], workdir=tmp_path)
    sensor_start = threading.Thread(target=sensor.start)
    sensor_start.start()
    tails = []
    loop = None
    try:
        # A first alone: it makes the tables on both shards; B then finds them.
        a.start([b.address])
        a.wait_listening()
        b.start([a.address])
        b.wait_listening()
        tails = [Tail(a.address), Tail(b.address)]
        # Each collector serves our tail and the other's peer feed.
        wait_for(lambda: a.status().subscribers == 2 and b.status().subscribers == 2, 30,
                 "the tails and the peer feeds", interval_s=0.5)

        # 1. Fan-out: r1 over both collectors; each live stream carries all of it.
        r1 = subprocess.run([
            *LOUPE, "replay", str(R1), "--collector", f"{a.address},{b.address}",
            "--sensor-id", "r1", "-o", str(tmp_path / "r1.jsonl"), "--no-progress",
        ], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
        assert r1.returncode == 0, r1.stderr
        sent_r1 = keys(read_jsonl(tmp_path / "r1.jsonl", "r1"))
        assert a.status().counters["batches_stored"] > 0
        assert b.status().counters["batches_stored"] > 0   # spread over both
        for tail in tails:
            wait_for(lambda t=tail: keys(t.records, "r1") == sent_r1, 20,
                     "every r1 record on both live streams")

        # 2. Failover: the live sensor and r2 push while A is SIGKILLed.
        wait_tcp(pair.a, pair.b.ip4, 8080)
        sensor_start.join(120)
        assert any("READY=1" in note for note in sensor.notes), "the live sensor did not start"
        n = 25   # one new HTTP flow every 0.1 s: bounded
        loop = pair.a.popen("bash", "-c", f"for i in $(seq 1 {n}); do curl -s -o /dev/null "
                            f"http://{pair.b.ip4}:8080/size/$i; sleep 0.1; done",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r2 = subprocess.Popen([
            *LOUPE, "replay", "-", "--collector", f"{a.address},{b.address}",
            "--sensor-id", "r2", "-o", str(tmp_path / "r2.jsonl"), "--no-progress",
        ], cwd=REPO, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        data = R2.read_bytes()
        step = len(data) // 8
        for i in range(8):
            r2.stdin.write(data[i * step:(i + 1) * step if i < 7 else len(data)])
            r2.stdin.flush()
            time.sleep(0.25)
            if i == 3:
                killed = time.monotonic()
                a.proc.send_signal(signal.SIGKILL)
                a.proc.wait(10)
        r2.stdin.close()
        assert r2.wait(60) == 0, r2.stderr.read().decode()
        assert loop.wait(30) == 0
        time.sleep(1.5)   # the last flows end (1 s linger) and are exported
        assert sensor.stop() == 0, sensor.stderr
        finished = time.monotonic()

        # 3. Exactly once, counted by `loupe query` on the survivor.
        sent = (sent_r1 + keys(read_jsonl(tmp_path / "r2.jsonl", "r2"))
                + keys(sensor.records(), "live"))
        live_flows = sum(v for (s, k, _), v in sent.items() if s == "live" and k == "flow")
        assert live_flows >= n and sum(v for (s, *_), v in sent.items() if s == "r2") > 100
        got = stored(b.address, ("r1", "r2", "live"))
        assert got == sent, ("missing:", sent - got, "extra:", got - sent)
        st = b.status()
        print(f"\nrecords sent/stored {sum(sent.values())}/{sum(got.values())}; "
              f"duplicates suppressed at B: {st.counters['batches_duplicate']} batches; "
              f"kill to end of run {finished - killed:.1f} s")
    finally:
        for tail in tails:
            tail.close()
        if loop is not None and loop.poll() is None:
            loop.kill()
        sensor_start.join(120)
        sensor.kill()
        stop(http)
        a.stop()
        b.stop()
