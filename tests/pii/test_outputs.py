"""PII end to end: planted values in request bodies, query strings, headers and a response
body (HTTP/1), and in HTTP/2 DATA and gRPC messages both ways with a Basic credential, in
a capture that `loupe replay --pii` reads and sends to a real collector. The
counts arrive per type and endpoint (records, `loupe pii`, after a restart too), and no
planted value, plain or URL-encoded, is in any output: JSON lines, EVE, Parquet and CSV
(replay and the collector's export), the sensor's and the collector's logs, the
collector's Prometheus text, its DuckDB file and its inventory file."""

from __future__ import annotations

import csv
import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from tests.conftest import REPO
from tests.export.collector_proc import free_port
from tests.pii.planted import h2_exchanges, planted_strings, write_capture

LOUPE = str(Path(sys.executable).with_name("loupe"))
TEMPLATES = {("POST", "/api/signup"): ("POST", "/api/signup"),
             ("POST", "/api/pay"): ("POST", "/api/pay"),
             ("GET", "/api/account/42"): ("GET", "/api/account/{id}")}


# The collector as `loupe collector run` runs it (serve(): metrics server included), in a
# child process whose debug log goes to a file the test searches.
_CHILD = """
import asyncio, logging, sys
from pathlib import Path
from collector.server import CollectorConfig, serve
logging.basicConfig(level=logging.DEBUG, format="collector %(levelname)s %(name)s: %(message)s")
listen, data_dir, metrics = sys.argv[1:4]
asyncio.run(serve(CollectorConfig(listen=listen, data_dir=Path(data_dir), grace_s=1.0,
                                  metrics_listen=metrics)))
"""


class _Collector:
    def __init__(self, data_dir: Path, log: Path) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, self.address, str(data_dir),
             f"127.0.0.1:{self.metrics_port}"],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the collector exited"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the collector did not listen")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def _loupe(*args, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([LOUPE, "-v", *map(str, args)], capture_output=True, text=True,
                         timeout=120)
    assert not check or res.returncode == 0, res.stderr
    return res


def _loupe_all(*calls) -> list[subprocess.CompletedProcess]:
    """Several loupe commands at once (each is seconds of imports on a busy machine)."""
    procs = [subprocess.Popen([LOUPE, "-v", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in calls]
    out = []
    for args, proc in zip(calls, procs):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (args, stderr)
        out.append(subprocess.CompletedProcess(args, 0, stdout, stderr))
    return out


def _absent(name: str, blob: bytes | str, planted: list[str]) -> None:
    data = blob.encode() if isinstance(blob, str) else blob
    found = [p for p in planted if p.encode() in data]
    assert not found, f"{name} holds planted values {found}"


def _parquet_text(paths) -> str:
    return "\n".join(json.dumps(pq.read_table(p).to_pylist(), default=str) for p in paths)


def test_planted_values_are_counted_per_endpoint_and_never_output(tmp_path):
    planted = planted_strings()
    exchanges = write_capture(tmp_path / "planted.pcap", h2=True)
    h2_expected = dict(h2_exchanges()[2])
    cap = tmp_path / "planted.pcap"
    assert all(p.encode() in cap.read_bytes() for p in ("4111111111111111", "GB82WEST12345698765432"))
    logs: list[str] = []

    # -- sensor side: every file format, counts per event ---------------------------------
    outdir = tmp_path / "replay"
    outdir.mkdir()
    logs += [r.stderr for r in _loupe_all(*(
        ("replay", "--pii", "--no-progress", cap, "-o", outdir / name, "--format", fmt)
        for name, fmt in (("r.jsonl", "json"), ("r.eve.json", "eve"), ("r.parquet", "parquet"),
                          ("r.csv", "csv"))))]
    events = [json.loads(line) for line in (outdir / "r.jsonl").read_text().splitlines()]
    http = [e for e in events if e["type"] == "http"]
    assert len(http) == len(exchanges) == 3
    by_endpoint = {(e["detail"]["method"], e["detail"]["path"].split("?")[0]): e["detail"]["pii"]
                   for e in http}
    for _, _, endpoint, expected in exchanges:
        assert by_endpoint[endpoint] == expected, endpoint
    # The query values that held PII are gone from the record's path.
    pay = next(e["detail"]["path"] for e in http if e["detail"]["path"].startswith("/api/pay"))
    assert pay == "/api/pay?ssn=REDACTED&card=REDACTED&ip=REDACTED"
    # HTTP/2: the bodies' counts (a card cut between two DATA frames, gRPC protobuf
    # strings), the request's credential as its kind and the user's salted hash.
    h2 = {(e["detail"]["method"], e["detail"]["path"]): e["detail"]
          for e in events if e["type"] == "http2"}
    assert {k: v["pii"] for k, v in h2.items()} == h2_expected
    assert [c["kind"] for c in h2[("POST", "/api/h2/profile")]["auth"]] == ["basic"]
    assert h2[("POST", "/api/h2/profile")]["auth"][0]["principal"].startswith("p:")
    eve = [json.loads(x) for x in (outdir / "r.eve.json").read_text().split("\n") if x]
    assert sorted(json.dumps(e["http"]["pii"], sort_keys=True) for e in eve
                  if e["event_type"] == "http") == sorted(
        json.dumps(x, sort_keys=True) for x in by_endpoint.values())
    # Parquet and CSV carry the same counts (JSON text in the pii column).
    table = pq.read_table(outdir / "r.http.parquet").to_pylist()
    assert sorted(json.loads(r["pii"]) == by_endpoint[(r["method"], r["path"].split("?")[0])]
                  for r in table) == [True] * 3
    rows = list(csv.DictReader(io.StringIO((outdir / "r.http.csv").read_text())))
    assert {json.dumps(json.loads(r["pii"]), sort_keys=True) for r in rows} == {
        json.dumps(e, sort_keys=True) for *_, e in exchanges}

    # -- collector side ---------------------------------------------------------------------
    data_dir, collector_log = tmp_path / "data", tmp_path / "collector.log"
    col = _Collector(data_dir, collector_log)
    logs.append(_loupe("replay", "--pii", "--no-progress", cap, "--collector", col.address,
                       "--sensor-id", "pii-test").stderr)
    pii_json, leak, table_out, csv_out, pii_sql = (r.stdout for r in _loupe_all(
        ("pii", "--collector", col.address, "--output", "json"),
        ("pii", "--collector", col.address, "--output", "json", "--direction", "response",
         "--type", "card", "--no-auth"),
        ("pii", "--collector", col.address),
        ("pii", "--collector", col.address, "--output", "csv"),
        ("query", "--collector", col.address, "--output", "json",
         "SELECT pii FROM http ORDER BY ts_ns")))
    got: dict = {}
    for line in pii_json.splitlines():
        r = json.loads(line)
        got.setdefault((r["method"], r["path_template"]), {})[f"{r['type']}.{r['direction']}"] \
            = r["count"]
        assert r["first_seen_ns"] <= r["last_seen_ns"] and r["service"] == "198.18.30.2:80"
    assert got == {TEMPLATES[ep]: expected for _, _, ep, expected in exchanges} | h2_expected
    # Filters: the response leaks of endpoints without authentication (the HTTP/2 JSON
    # endpoint leaks too, but its requests carried a Basic credential).
    assert sorted((json.loads(x)["path_template"], json.loads(x)["count"])
                  for x in leak.splitlines()) == [("/api/account/{id}", 1),
                                                  ("/planted.Profile/Get", 1)]
    assert "/api/signup" in table_out and "card" in csv_out
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{col.metrics_port}/metrics",
                                     timeout=10).read()
    assert b"loupe_" in metrics and b"/api/signup" in metrics
    export = tmp_path / "export"
    export.mkdir()
    logs += [r.stderr for r in _loupe_all(*(("export", "--collector", col.address, "-o",
                                             export / name)
                                            for name in ("x.parquet", "x.csv", "x.jsonl")))]
    assert pii_sql.count("card.request") == 2
    col.stop()
    stored = {p.name: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    assert any(n.endswith(".duckdb") for n in stored) and "inventory.sqlite" in stored

    # A restart keeps the PII statistics (they live in the inventory's file).
    again = _Collector(data_dir, collector_log)
    after = _loupe("pii", "--collector", again.address, "--output", "json").stdout
    assert sorted(after.splitlines()) == sorted(pii_json.splitlines())
    again.stop()

    # -- absence of every planted value -----------------------------------------------------
    for p in sorted(outdir.iterdir()) + sorted(export.iterdir()):
        _absent(str(p.name), p.read_bytes(), planted)
    _absent("replay Parquet values", _parquet_text(outdir.glob("*.parquet")), planted)
    _absent("export Parquet values", _parquet_text(export.glob("*.parquet")), planted)
    for name, blob in stored.items():
        _absent(f"collector file {name}", blob, planted)
    duck = next(data_dir.glob("*.duckdb"))
    with duckdb.connect(str(duck), read_only=True) as db:
        for (table,) in db.execute("SELECT table_name FROM information_schema.tables").fetchall():
            _absent(f"DuckDB table {table}", json.dumps(
                db.execute(f'SELECT * FROM "{table}"').fetchall(), default=str), planted)
    _absent("loupe pii output", pii_json + table_out + csv_out + after, planted)
    _absent("collector metrics", metrics, planted)
    _absent("sensor logs", "\n".join(logs), planted)
    _absent("collector logs", collector_log.read_bytes(), planted)
    assert b"collector DEBUG" in collector_log.read_bytes()   # the log was written at all
