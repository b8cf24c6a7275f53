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

from sensor.export import wire

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


def test_export_writes_files_that_read_back_and_refuses_a_locked_store(start_collector, tmp_path):
    running = start_collector()
    push(running.address, [batch(mixed(100), 1)])
    data = str(running.config.data_dir)
    locked = run_loupe("export", "--data-dir", data, "-o", str(tmp_path / "x.parquet"))
    assert locked.returncode != 0
    assert "locked by another process" in locked.stderr and "loupe query" in locked.stderr
    running.stop()

    for fmt in ("parquet", "csv", "jsonl"):
        path = tmp_path / f"flows.{fmt}"
        out = run_loupe("export", "--data-dir", data, "--since", "2020-01-01T00:00:00Z",
                        "--format", fmt, "-o", str(path))
        assert out.returncode == 0, out.stderr
        if fmt == "parquet":
            table = pq.read_table(path)
        elif fmt == "csv":
            table = pyarrow.csv.read_csv(path)
        else:
            table = duckdb.sql(f"SELECT * FROM read_json_auto('{path}')").to_arrow_table()
        assert table.num_rows == 50
        assert sorted(table.column("uid").to_pylist())[:2] == ["F0", "F1"]
    out = run_loupe("export", "--data-dir", data, "--table", "dns", "--since", "1h",
                    "-o", str(tmp_path / "recent.parquet"))
    assert out.returncode == 0 and pq.read_table(tmp_path / "recent.parquet").num_rows == 0


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
