"""`loupe replay` as a real process: outputs read back in every format, sharded runs,
delivery to a real collector process, the summary line and the one-line errors."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sensor.export.jsonfmt import to_dict
from sensor.replay import replay_records
from tests.conftest import REPO

LOUPE = [sys.executable, "-m", "sensor.cli"]
GOLDEN = REPO / "tests" / "golden"
PIPELINED = GOLDEN / "http-pipelined.pcap"
ALL = sorted(GOLDEN.glob("*.pcap"))


def loupe(*args, timeout=90):
    return subprocess.run([*LOUPE, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _expected(paths) -> list[dict]:
    return [to_dict(r) for r in replay_records(paths)]


def _key(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


def test_jsonl_on_stdout_and_summary_on_stderr():
    res = loupe("replay", PIPELINED)
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert got == _expected(PIPELINED)
    # stderr is not a terminal here: no progress bar, only the summary line.
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("loupe replay: 15 packets, 1 flows, 2 L7 events (http 2)")
    assert "nothing lost" in line


def test_summary_reports_loss_by_source():
    res = loupe("replay", GOLDEN / "http-gap-garbage.pcap", "-o", "/dev/null",
                "--format", "jsonl")
    assert res.returncode == 0, res.stderr
    assert "lost/errors: parser_error 2, reassembly_gap 1" in res.stderr


def test_parquet_and_csv_read_back(tmp_path):
    expected = _expected(ALL)
    kinds = Counter(d["type"] for d in expected)
    out = tmp_path / "flows.parquet"
    res = loupe("replay", *ALL, "-o", out)
    assert res.returncode == 0, res.stderr
    flows = pq.read_table(out).to_pylist()
    assert len(flows) == kinds["flow"]
    assert {f["uid"] for f in flows} == {d["uid"] for d in expected if d["type"] == "flow"}
    http = pq.read_table(tmp_path / "flows.http.parquet").to_pylist()
    assert sorted(h["path"] for h in http) == sorted(
        d["detail"]["path"] for d in expected if d["type"] == "http")
    dns = pq.read_table(tmp_path / "flows.dns.parquet").to_pylist()
    assert len(dns) == kinds["dns"]
    assert any(a["data"] == "198.18.0.53" for d in dns for a in d["answers"])

    out = tmp_path / "flows.csv"
    res = loupe("replay", *ALL, "-o", out)
    assert res.returncode == 0, res.stderr
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == kinds["flow"]
    by_uid = {d["uid"]: d for d in expected if d["type"] == "flow"}
    for row in rows:
        want = by_uid[row["uid"]]
        assert int(row["initiator_packets"]) == want["initiator_packets"]
        assert row["app_proto"] == want["app_proto"]
        assert int(row["l7_coverage_skipped_octets"]) == \
            want["l7_coverage"]["skipped_octets"]
    with open(tmp_path / "flows.tls.csv", newline="") as fh:
        tls = list(csv.DictReader(fh))
    assert sorted(t["sni"] for t in tls) == sorted(
        d["detail"]["sni"] for d in expected if d["type"] == "tls")


def test_jobs_give_the_same_records(tmp_path):
    """Sharded metering (--jobs 2) makes the same records, in another order."""
    out = tmp_path / "out.jsonl"
    res = loupe("replay", *ALL, "-o", out, "--jobs", "2")
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(map(_key, got)) == Counter(map(_key, _expected(ALL)))


def test_automatic_jobs_stay_single_for_small_inputs(tmp_path):
    from sensor.replay.cli import auto_jobs

    assert auto_jobs(ALL) == 1                 # a few KiB: one process, capture order
    big = tmp_path / "big.pcap"
    with open(big, "wb") as fh:
        fh.truncate(100 << 20)                 # sparse: size only
    assert 1 <= auto_jobs([big]) <= 4


def test_no_l7_gives_flows_only():
    res = loupe("replay", GOLDEN / "curl-http.pcap", "--no-l7")
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert {d["type"] for d in got} == {"flow"}
    assert all(not d["l7_coverage"]["inspected"] and d["app_proto"] == "" for d in got)


def test_unreadable_and_corrupt_files_fail_with_one_line(tmp_path):
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"this is not a capture file at all\n")
    for path, words in ((junk, "is not a pcap or pcapng capture"),
                        (tmp_path / "missing.pcap", "cannot open capture file")):
        res = loupe("replay", PIPELINED, path)
        assert res.returncode == 1
        assert res.stdout == ""        # nothing is written before every file is checked
        (line,) = res.stderr.strip().splitlines()
        assert line.startswith("loupe: error: ") and words in line
        assert "Traceback" not in res.stderr


def test_truncated_capture_keeps_what_was_read(tmp_path):
    data = PIPELINED.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:len(data) - 30])     # the last record loses its tail
    res = loupe("replay", cut)
    # Records written, input truncated: exit status 3 (sensor/replay/cli.py).
    assert res.returncode == 3, res.stderr
    lost = [json.loads(line) for line in res.stdout.splitlines()
            if json.loads(line)["type"] == "lost"]
    assert [(d["source"], d["count"]) for d in lost] == [("capture_error", 1)]
    assert "capture_error 1" in res.stderr


def _start_collector(data_dir: Path):
    proc = subprocess.Popen(
        [*LOUPE, "collector", "run", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "listening on" in line:
            return proc, line.split("listening on ")[1].split()[0]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"collector did not start: {proc.stderr.read()}")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_to_a_real_collector_stores_the_records(tmp_path, jobs):
    """With --jobs 2 the exporter starts in the parent after the shards were forked."""
    from tests.export.collector_proc import query

    proc, address = _start_collector(tmp_path / "data")
    try:
        res = loupe("replay", *ALL, "--to", address, "--sensor-id", "lab-replay",
                    "--spool-dir", tmp_path / "spool", "--jobs", jobs)
        assert res.returncode == 0, res.stderr
        expected = _expected(ALL)
        kinds = Counter(d["type"] for d in expected)
        assert f"{len(expected)} records delivered to {address}" in res.stderr
        assert res.stdout == ""        # --to without -o writes no file and no stdout
        rows = query(address, "SELECT uid, sensor_id, app_proto FROM flows")
        assert len(rows) == kinds["flow"]
        assert {r[1] for r in rows} == {"lab-replay"}
        want = {(d["uid"], d["app_proto"]) for d in expected if d["type"] == "flow"}
        # uids are keyed by the sensor id, so compare the app_proto multiset instead.
        assert Counter(r[2] for r in rows) == Counter(a for _, a in want)
        sni = query(address, "SELECT sni FROM tls ORDER BY sni")
        assert [r[0] for r in sni] == sorted(
            d["detail"]["sni"] for d in expected if d["type"] == "tls")
        lost = query(address, "SELECT source, count FROM lost ORDER BY source")
        assert [tuple(r) for r in lost] == [("parser_error", 2), ("reassembly_gap", 1)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_progress_bar_only_on_a_terminal(tmp_path):
    """stderr on a pseudo-terminal gets the bar (and a cleared line before the summary);
    piped stderr never does (test_jsonl_on_stdout_and_summary_on_stderr)."""
    import os
    import pty

    master, slave = pty.openpty()
    try:
        argv = [*LOUPE, "replay", *map(str, ALL), "-o", str(tmp_path / "o.jsonl")]
        proc = subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=slave,
                              timeout=60)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = b"".join(chunks).decode()
    assert proc.returncode == 0
    assert "\r[" in text and "% file " in text and " packets " in text
    assert "loupe replay: 142 packets" in text and "parser_error 2" in text
