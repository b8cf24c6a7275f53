"""`replay -o X.parquet` (or .csv) owns a set of files, X.<suffix> and X.<table>.<suffix>
beside it; a second run replaces the whole set, so one output never mixes two inputs."""

from __future__ import annotations

import csv
import subprocess

import pyarrow.parquet as pq
import pytest

from sensor.export.sinks import ParquetSink
from sensor.replay import replay_records
from tests.conftest import REPO

LOUPE = str(REPO / ".venv" / "bin" / "loupe")
GOLDEN = REPO / "tests" / "golden"
DNS_TLS = [GOLDEN / "dig-dnsmasq.pcap", GOLDEN / "openssl-tls13.pcap"]
HTTP = [GOLDEN / "curl-http.pcap"]


def _replay(paths, out):
    res = subprocess.run([LOUPE, "replay", "--no-progress", *map(str, paths), "-o", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr


def _uids(records, kind) -> set[str]:
    return {r.uid for r in records if type(r).__name__ == kind}


def _rows(path, suffix) -> list[dict]:
    if suffix == "parquet":
        return pq.read_table(path).to_pylist()
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_second_run_replaces_the_whole_set(tmp_path, suffix):
    out = tmp_path / f"X.{suffix}"
    _replay(DNS_TLS, out)
    assert {p.name for p in tmp_path.iterdir()} == \
        {f"X.dns.{suffix}", f"X.tls.{suffix}", f"X.{suffix}"}

    _replay(HTTP, out)
    # Only the second input's tables: the first run's DNS and TLS files are gone, and
    # nothing is left under a temporary name.
    assert {p.name for p in tmp_path.iterdir()} == {f"X.http.{suffix}", f"X.{suffix}"}
    want = replay_records(HTTP)
    assert {r["uid"] for r in _rows(out, suffix)} == _uids(want, "Flow")
    assert len(_rows(tmp_path / f"X.http.{suffix}", suffix)) == 2


def test_parquet_set_is_replaced_only_at_close(tmp_path):
    """Until the new set is complete the earlier one stays whole (Parquet files cannot
    be read before their footer is written)."""
    out = tmp_path / "X.parquet"
    _replay(DNS_TLS, out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    sink = ParquetSink(out, row_group_rows=1)
    for record in replay_records(HTTP):
        sink.write(record)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()
            if not p.name.startswith(".")} == before
    sink.close()
    assert {p.name for p in tmp_path.iterdir()} == {"X.http.parquet", "X.parquet"}
    assert pq.read_table(tmp_path / "X.http.parquet").num_rows == 2


def test_aborted_parquet_run_leaves_the_earlier_set_and_no_partial_files(tmp_path):
    out = tmp_path / "X.parquet"
    _replay(DNS_TLS, out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    sink = ParquetSink(out, row_group_rows=1)
    for record in replay_records(HTTP):
        sink.write(record)
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    sink.abort()   # what `loupe replay` does on an error or Ctrl-C
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
