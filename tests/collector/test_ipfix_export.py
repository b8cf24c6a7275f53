"""The collector's IPFIX export (collector/ipfix.py): every stored flow, from row and
columnar batches alike, to Debian's nfcapd and nfacctd, with nfdump showing the flows,
packets and bytes the collector stored; one Observation Domain per sensor, each with its
own templates and sequence numbers (read with the independent decoder of
tests/export/ipfix_decode.py); a full queue drops and counts without holding up ingest;
a dead TCP target is retried; bad targets are one line."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time

import pytest

from collector.cli import collector_config
from collector.ingest import decode_batch
from collector.ipfix import IpfixExport, observation_domain
from collector.server import Collector
from sensor.cli import build_parser
from sensor.errors import ConfigError
from sensor.metrics import MetricsRegistry
from sensor.export import ipfix as sensor_ipfix
from sensor.export import wire
from sensor.export.columnar import encode as columnar_batch
from tests.export.ipfix_collectors import (Nfacctd, Nfcapd, biflows, directions,
                                           needs_collectors)
from tests.export.ipfix_decode import Decoder, num

from .conftest import BASE_NS, REPO, batch, flow, push, query

STORED = wire.ingest_pb2.ACK_STATUS_STORED
GOLDEN = sorted(str(p) for p in (REPO / "tests" / "golden").glob("*.pcap"))
LOUPE = [sys.executable, "-m", "sensor.cli"]
FLOW_COLUMNS = ("src_addr, dst_addr, src_port, dst_port, protocol, flow_start_ns, flow_end_ns, "
                "initiator_packets, initiator_octets, responder_packets, responder_octets, "
                "vlan_id, sensor_id")


def stored_flows(address: str) -> list[dict]:
    names = [c.strip() for c in FLOW_COLUMNS.split(",")]
    return [dict(zip(names, row)) for row in query(address, f"SELECT {FLOW_COLUMNS} FROM flows")]


def wait_exported(export: IpfixExport, flows: int, deadline_s: float = 15.0) -> None:
    end = time.monotonic() + deadline_s
    while export.counters()["ipfix_flows_exported"] < flows or export.queued:
        assert time.monotonic() < end, export.counters()
        time.sleep(0.05)


@needs_collectors
def test_nfdump_and_nfacctd_show_the_flows_the_collector_stored(start_collector, tmp_path):
    nfcapd, nfacctd = Nfcapd(tmp_path), Nfacctd(tmp_path)
    try:
        c = start_collector(ipfix_targets=(f"127.0.0.1:{nfcapd.port}",
                                           f"udp://127.0.0.1:{nfacctd.port}"))
        columnar = []                 # per batch the writer got: columns or rows
        store = c.collector.writer.store

        async def spy(batch, raw, identity):
            columnar.append(batch.columnar)
            return await store(batch, raw, identity)

        c.collector.writer.store = spy
        # A real replay of the golden captures through the sensor's gRPC exporter (rows
        # or columns, as its Ingest.Options answer came before or after it spooled), then
        # a second sensor's Arrow batches and a third one's row batches.
        run = subprocess.run([*LOUPE, "replay", *GOLDEN, "--collector", c.address,
                              "--sensor-id", "golden", "--no-progress"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        def columns(b: int):
            return columnar_batch([flow(i) for i in range(100 * b, 100 * b + 100)],
                                  sensor_id="columns", batch_id=b, created_ns=BASE_NS)

        acks = push(c.address, [columns(b) for b in range(1, 4)])
        acks += push(c.address, [batch([flow(i) for i in range(100 * b, 100 * b + 100)], b,
                                       sensor_id="rows") for b in (4, 5)])
        assert [a.status for a in acks] == [STORED] * 5
        # A resent batch is a duplicate: not stored again, not exported again.
        push(c.address, [columns(1)])
        assert set(columnar) == {True, False}          # both ingest paths
        ours = stored_flows(c.address)
        assert {f["sensor_id"] for f in ours} == {"golden", "columns", "rows"}
        assert len(ours) == 500 + sum(f["sensor_id"] == "golden" for f in ours)
        wait_exported(c.collector.ipfix, len(ours))
        initiator = directions(ours, responder=False)
        theirs = nfacctd.counts(sum(v for k, v in initiator.items() if k[-1] == "packets"))
        time.sleep(0.3)              # the last datagrams are read before the stop
    finally:
        nfcapd.stop()
        nfacctd.stop()
    # nfcapd checks each observation domain's sequence numbers: none missing.
    assert "Sequence Errors: 0" in nfcapd.log(), nfcapd.log()
    # Flow by flow: 5-tuple, start and end (ms), packets and bytes both ways, VLAN.
    assert nfcapd.flows() == biflows(ours)
    # pmacct reads the initiator's direction of a biflow (docs/export.md).
    assert +theirs == initiator
    counters = c.collector.ipfix.counters()
    assert counters["ipfix_records_sent"] == 2 * len(ours)     # two targets
    assert counters["ipfix_records_dropped"] == counters["ipfix_queue_full"] == 0
    metrics = MetricsRegistry("collector")
    metrics.add_source("collector", lambda: c.collector.metrics_snapshot(c.loop))
    shown = metrics.render().decode()
    for line in (f'loupe_records_exported_total{{kind="ipfix"}} {2 * len(ours)}.0',
                 'loupe_lost_total{reason="export_queue_full"} 0.0',
                 'loupe_lost_total{reason="ipfix_send_error"} 0.0',
                 'loupe_queue_depth{queue="ipfix_flows"} 0.0'):
        assert line in shown.splitlines(), line


def _decoded(*sensors_flows):
    """DecodedBatch of row batches, one per (sensor id, flows), as the writer hands
    them to on_stored."""
    return [decode_batch(batch(flows, n, sensor_id=sensor))
            for n, (sensor, flows) in enumerate(sensors_flows, 1)]


def _receive(sock, until_records: int) -> list:
    decoder, got, records = Decoder(), [], 0
    while records < until_records:
        msg = decoder.message(sock.recv(65535))
        got.append(msg)
        records += len(msg.records)
    return got


def test_one_observation_domain_per_sensor_with_its_own_templates_and_sequence(udp_sock):
    export = IpfixExport((f"127.0.0.1:{udp_sock.getsockname()[1]}",))
    export.start()
    try:
        a = [flow(i) for i in range(30)]
        b = [flow(i, src_addr="fc00::1", dst_addr="fc00::2", ip_version=6)
             for i in range(30, 50)]
        for decoded in _decoded(("sensor-a", a), ("sensor-b", b), ("sensor-a", a[:5])):
            export.on_stored(decoded)
        messages = _receive(udp_sock, 55)
    finally:
        export.close()
    dom_a, dom_b = observation_domain("sensor-a"), observation_domain("sensor-b")
    assert dom_a != dom_b
    # Stable across collectors, restarts and versions: the first four octets of
    # SHA-256("sensor-a"), pinned here (docs/export.md).
    assert dom_a == 0xD06F9F2D
    by_domain: dict[int, list] = {}
    for msg in messages:
        by_domain.setdefault(msg.domain, []).append(msg)
    assert set(by_domain) == {dom_a, dom_b}
    for domain, msgs in by_domain.items():
        # Templates open each domain's stream; sequence numbers count its records only.
        assert msgs[0].templates == [256, 257]
        seq = 0
        for msg in msgs:
            assert msg.sequence == seq
            seq += len(msg.records)
    assert sum(len(m.records) for m in by_domain[dom_a]) == 35
    got_b = sorted(num(r, "octetDeltaCount") for m in by_domain[dom_b] for r in m.records)
    assert got_b == sorted(f.initiator_octets for f in b)


def test_udp_templates_are_refreshed_per_domain(udp_sock):
    class Clock:
        now = 100.0

        def __call__(self):
            return self.now

    clock = Clock()
    sink = sensor_ipfix.IpfixSink(f"127.0.0.1:{udp_sock.getsockname()[1]}", monotonic=clock)
    decoder = Decoder()

    def send(domain: int, i: int):
        sink.write_flow(flow(i), domain)
        sink.flush()
        return decoder.message(udp_sock.recv(65535))

    # Each domain's templates go out with its first message and again refresh_s after
    # its own last ones, whatever the other domain does; sequences count per domain.
    sent = [send(1, 0)]
    clock.now += 30
    sent += [send(2, 1), send(1, 2)]
    clock.now += sink.refresh_s - 29          # domain 1's templates are 61 s old
    sent += [send(1, 3), send(2, 4)]
    clock.now += 30                           # domain 2's are now
    sent += [send(2, 5), send(1, 6)]
    assert [(m.domain, m.sequence, bool(m.templates)) for m in sent] == [
        (1, 0, True), (2, 0, True), (1, 1, False), (1, 2, True), (2, 1, False),
        (2, 2, True), (1, 3, False)]
    sink.close()


def test_a_full_queue_drops_whole_batches_counts_them_and_logs_once(udp_sock, caplog):
    export = IpfixExport((f"127.0.0.1:{udp_sock.getsockname()[1]}",), queue_records=1000)
    batches = _decoded(*[("s", [flow(i) for i in range(600 * n, 600 * n + 600)])
                         for n in range(4)])
    # Not started yet: nothing drains, as behind a target that cannot keep up. The
    # hook returns at once whatever the queue holds.
    started = time.perf_counter()
    for decoded in batches:
        export.on_stored(decoded)
    assert time.perf_counter() - started < 0.5
    assert (export.queued, export.queue_full) == (600, 1800)
    with caplog.at_level(logging.WARNING, logger="collector.ipfix"):
        export.start()
        _receive(udp_sock, 600)
        export.close()
    full = [r.getMessage() for r in caplog.records if "queue full" in r.getMessage()]
    assert full == ["IPFIX export queue full: 1800 flows not exported (1800 in all); the "
                    "targets or this host cannot keep up"]
    assert export.counters()["ipfix_flows_exported"] == 600


def test_a_dead_tcp_target_is_retried_and_gets_templates_and_sequence_zero():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]          # closed again: nothing listens there
    export = IpfixExport((f"tcp://127.0.0.1:{port}",))
    export.start()
    server = None
    try:
        first, second = _decoded(("s", [flow(i) for i in range(10)]),
                                 ("s", [flow(i) for i in range(10, 13)]))
        export.on_stored(first)
        wait_exported(export, 10)
        assert export.counters()["ipfix_records_dropped"] == 10   # counted, not raised
        server = socket.create_server(("127.0.0.1", port))
        server.settimeout(10)
        # The first retry comes RECONNECT_S after the failed connect.
        time.sleep(sensor_ipfix.RECONNECT_S + 0.2)
        export.on_stored(second)
        conn, _ = server.accept()
        conn.settimeout(10)
        data = conn.recv(65535)
        msg = Decoder().message(data)
        assert msg.templates == [256, 257] and msg.sequence == 0
        assert len(msg.records) == 3
        conn.close()
    finally:
        export.close()
        if server is not None:
            server.close()


def test_reconnect_backoff_doubles_up_to_the_cap():
    class Clock:
        now = 100.0

        def __call__(self):
            return self.now

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clock = Clock()
    sink = sensor_ipfix.IpfixSink(f"tcp://127.0.0.1:{port}", monotonic=clock)
    waits = []
    for _ in range(7):
        waits.append(sink._next_connect - clock.now)
        clock.now = sink._next_connect
        sink._connect()
    assert waits == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    sink.close()


def test_a_bad_target_is_one_line_and_nothing_starts(tmp_path):
    run = subprocess.run([*LOUPE, "collector", "run", "--listen", "127.0.0.1:0",
                          "--data-dir", str(tmp_path / "data"), "--ipfix", "127.0.0.1:99999"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "loupe: error: IPFIX target '127.0.0.1:99999': port 99999 is not 1..65535"]
    assert not (tmp_path / "data").exists()      # failed before the store was made


@pytest.mark.parametrize("target, says", [
    ("ftp://127.0.0.1:4739", "ipfix.targets[0]: 'ftp://127.0.0.1:4739' is not HOST:PORT, "
                             "udp://HOST:PORT or tcp://HOST:PORT"),
    ("no-such-host.invalid:4739", "cannot resolve 'no-such-host.invalid'"),
])
def test_bad_targets_are_config_errors(tmp_path, target, says):
    args = build_parser().parse_args(["collector", "run", "--ipfix", target,
                                      "--data-dir", str(tmp_path / "data")])
    with pytest.raises(ConfigError) as err:
        Collector(collector_config(args))
    assert says in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "data").exists()


@pytest.fixture
def udp_sock():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)
    yield sock
    sock.close()
