"""The collector and analyst commands as real processes: SIGKILL durability, `loupe tail`,
`loupe query`, `loupe export`, and the one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from sensor.export import jsonfmt, wire

from .conftest import REPO, batch, mixed, push, query

LOUPE = [sys.executable, "-m", "sensor.cli"]
STORED = wire.ingest_pb2.ACK_STATUS_STORED
DUPLICATE = wire.ingest_pb2.ACK_STATUS_DUPLICATE


def run_loupe(*args, timeout=60):
    return subprocess.run([*LOUPE, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def start_process(data_dir):
    proc = subprocess.Popen(
        [*LOUPE, "collector", "run", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "listening on" in line:
            return proc, line.split("listening on ")[1].split()[0]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"collector did not start: {proc.stderr.read()}")


def test_sigkill_after_ack_loses_no_acked_batch(tmp_path):
    proc, address = start_process(tmp_path / "data")
    try:
        batches = [batch(mixed(300, i * 300), i + 1) for i in range(6)]
        acks = push(address, batches)
        assert [a.status for a in acks] == [STORED] * 6
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc, address = start_process(tmp_path / "data")
    try:
        total = query(address, "SELECT (SELECT count(*) FROM flows) + (SELECT count(*) FROM http)"
                               " + (SELECT count(*) FROM dns) + (SELECT count(*) FROM tls)")
        assert total == [(1800,)]
        # The dedup state survived too: a resent batch is not stored twice.
        assert push(address, batches[:2])[0].status == DUPLICATE
        assert push(address, [batch(mixed(5), 7)])[0].status == STORED
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_tail_and_query_print_the_records(collector):
    push(collector.address, [batch(mixed(100), 1)])
    out = run_loupe("tail", "--collector", collector.address, "--since", "2020-01-01T00:00:00Z",
                    "--type", "http", "--http-status", "500+", "--output", "json")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert lines and all(x["type"] == "http" and x["detail"]["status"] == 503 for x in lines)
    assert len(lines) == sum(1 for i in range(100) if i % 10 in (5, 6) and i % 3 == 2)

    out = run_loupe("tail", "--collector", collector.address, "--since", "2020-01-01T00:00:00Z",
                    "--type", "dns", "--dns-qname", "*.example.test", "--dns-rcode", "NXDOMAIN",
                    "--not-from-port", "33007", "--format", "table")
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()
    assert rows and all(" dns  " in r and "a.example.test A -> NXDOMAIN" in r for r in rows)
    assert not any(":33007 ->" in r for r in rows)

    out = run_loupe("tail", "--collector", collector.address, "--since", "2020-01-01T00:00:00Z",
                    "--type", "tls", "--last", "3", "--format", "table")
    rows = out.stdout.splitlines()
    assert len(rows) == 3 and all("TLS 1.3 sni=api.example.test" in r and "ja4=t13d1516h2_" in r
                                  for r in rows)
    assert rows[-1].startswith("2023-11-14T22:13:20.000Z")

    out = run_loupe("query", "--collector", collector.address, "--format", "table",
                    "SELECT status, count(*) AS n FROM http GROUP BY 1 ORDER BY 1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0].split() == ["status", "n"]
    statuses = [r.detail.status for r in mixed(100) if hasattr(r, "detail") and r.kind == "http"]
    assert [line.split() for line in out.stdout.splitlines()[2:]] == [
        [str(s), str(statuses.count(s))] for s in (200, 404, 503)]

    out = run_loupe("query", "--collector", collector.address, "DROP TABLE flows")
    assert out.returncode != 0 and "read-only" in out.stderr and len(out.stderr.splitlines()) == 1


def test_unreachable_collector_is_one_line_naming_the_address():
    out = run_loupe("tail", "--collector", "127.0.0.1:9", "--follow", timeout=30)
    assert out.returncode == 1
    assert out.stderr.startswith("loupe: error: cannot reach the collector at 127.0.0.1:9")
    assert len(out.stderr.splitlines()) == 1


def _rows(path) -> int:
    return pq.read_table(path).num_rows


# mixed(100): 50 flows, 20 HTTP, 20 DNS and 10 TLS events.
KINDS = {"flows": 50, "http": 20, "dns": 20, "tls": 10}


def test_export_through_the_running_collector_writes_every_kind(start_collector, tmp_path):
    running = start_collector()
    push(running.address, [batch(mixed(100), 1)])
    via = ("--collector", running.address)

    out = run_loupe("export", *via, "-o", str(tmp_path / "x.parquet"))
    assert out.returncode == 0, out.stderr
    assert {t: _rows(tmp_path / ("x.parquet" if t == "flows" else f"x.{t}.parquet"))
            for t in KINDS} == KINDS
    assert out.stderr.startswith("wrote 100 records (flow 50, ")

    # JSON lines: every kind in one file, in the one record shape, in time order.
    out = run_loupe("export", *via, "-o", str(tmp_path / "all.jsonl"))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    records = [jsonfmt.from_dict(d) for d in lines]
    assert [r.uid for r in records] == [r.uid for r in mixed(100)]
    assert {d["type"] for d in lines} == {"flow", "http", "dns", "tls"}

    out = run_loupe("export", *via, "--format", "csv", "-o", str(tmp_path / "x.csv"))
    assert out.returncode == 0, out.stderr
    assert pyarrow.csv.read_csv(tmp_path / "x.http.csv").num_rows == 20

    # A later export with fewer kinds replaces the whole set: no stale x.dns.parquet.
    out = run_loupe("export", *via, "--table", "flows", "-o", str(tmp_path / "x.parquet"))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.glob("x.*parquet")) == ["x.parquet"]

    # A suffix that contradicts --format: one line, nothing written.
    out = run_loupe("export", *via, "--format", "parquet", "-o", str(tmp_path / "y.csv"))
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert "does not fit the file name" in out.stderr and not (tmp_path / "y.csv").exists()

    # The store's file is the running collector's: --data-dir says to ask it instead.
    locked = run_loupe("export", "--data-dir", str(running.config.data_dir),
                       "-o", str(tmp_path / "z.parquet"))
    assert locked.returncode != 0 and len(locked.stderr.splitlines()) == 1
    assert "locked by another process" in locked.stderr and "without --data-dir" in locked.stderr


def test_export_reads_a_stopped_collectors_store_with_data_dir(start_collector, tmp_path):
    running = start_collector()
    push(running.address, [batch(mixed(100), 1)])
    running.stop()
    data = str(running.config.data_dir)
    out = run_loupe("export", "--collector", "127.0.0.1:9", "-o", str(tmp_path / "x.parquet"))
    assert out.returncode == 1 and "give --data-dir DIR" in out.stderr
    out = run_loupe("export", "--data-dir", data, "--since", "2020-01-01T00:00:00Z",
                    "-o", str(tmp_path / "x.parquet"))
    assert out.returncode == 0, out.stderr
    assert _rows(tmp_path / "x.parquet") == 50 and _rows(tmp_path / "x.tls.parquet") == 10
    out = run_loupe("export", "--data-dir", data, "--table", "dns", "--since", "1h",
                    "-o", str(tmp_path / "recent.parquet"))
    assert out.returncode == 0 and out.stderr.startswith("wrote 0 records")
    assert not (tmp_path / "recent.dns.parquet").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_tail_says_the_collector_went_away_mid_stream(tmp_path, sig):
    proc, address = start_process(tmp_path / "data")
    tail = None
    try:
        push(address, [batch(mixed(10), 1)])
        tail = subprocess.Popen([*LOUPE, "tail", "--collector", address, "--since", "2020-01-01",
                                 "--follow", "--format", "json"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert json.loads(tail.stdout.readline())   # streaming: the collector was reachable
        proc.send_signal(sig)
        proc.wait(30)
        _, err = tail.communicate(timeout=30)
    finally:
        for p in (proc, tail):
            if p is not None and p.poll() is None:
                p.kill()
    assert tail.returncode == 1
    assert err.startswith(f"loupe: error: the collector at {address} went away mid-stream "
                          "after "), err
    assert len(err.splitlines()) == 1


def test_a_failed_start_prints_one_line_and_creates_nothing(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = tmp_path / "not-yet" / "data"
        out = run_loupe("collector", "run", "--listen", f"127.0.0.1:{port}",
                        "--data-dir", str(data))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"loupe: error: cannot listen on 127.0.0.1:{port}: the port is in use or the address "
        "is not on this host; stop the other process or choose another --listen HOST:PORT"]
    assert not (tmp_path / "not-yet").exists()


def test_status_exits_non_zero_when_the_sensor_is_down(collector):
    import socket

    with socket.socket() as probe:   # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    out = run_loupe("status", "--sensor-metrics", dead, "--collector", collector.address)
    assert out.returncode == 3, out
    assert f"sensor at {dead}: not answering" in out.stdout
    assert f"collector at {collector.address}: up" in out.stdout
    # Skipping the sensor: only the collector is asked, and it is up.
    out = run_loupe("status", "--sensor-metrics", "", "--collector", collector.address)
    assert out.returncode == 0, out
