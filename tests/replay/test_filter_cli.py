"""`loupe replay --filter`: the records are those of the capture that `tcpdump -r FILE
EXPR -w OUT` leaves, in one process and sharded, and a bad expression is one line with
exit status 2 before anything is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

LOUPE = [sys.executable, "-m", "sensor.cli"]
GOLDEN = REPO / "tests" / "golden"
INPUTS = [GOLDEN / "dns-udp-tcp.pcap", GOLDEN / "curl-http.pcap", GOLDEN / "dig-dnsmasq.pcap"]


def loupe(*args):
    return subprocess.run([*LOUPE, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=90)


def _records(stdout: str) -> list[str]:
    # Record order across shards is by arrival: compare as sorted JSON.
    return sorted(json.dumps(json.loads(line), sort_keys=True)
                  for line in stdout.splitlines())


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump")
@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("expr", ["udp port 53", "tcp and not port 53", "port 80 or 53"])
def test_records_are_those_of_the_tcpdump_filtered_capture(tmp_path, expr, jobs):
    for src in INPUTS:
        cut = tmp_path / f"{src.stem}.pcap"
        subprocess.run(["tcpdump", "-r", str(src), "-w", str(cut), expr], check=True,
                       capture_output=True, timeout=30)
        want = loupe("replay", cut, "--jobs", jobs)
        got = loupe("replay", src, "--filter", expr, "--jobs", jobs)
        assert got.returncode == 0 and want.returncode == 0, got.stderr + want.stderr
        assert _records(got.stdout) == _records(want.stdout), (src.name, expr)
        # The summary counts the packets that passed, as tcpdump's output holds them.
        n = len(subprocess.run(["tcpdump", "-r", str(cut), "-nn"], capture_output=True,
                               text=True, check=True).stdout.splitlines())
        assert f"loupe replay: {n} packets," in got.stderr, got.stderr


def test_filtering_drops_whole_flows():
    everything = _records(loupe("replay", INPUTS[0]).stdout)
    udp_only = _records(loupe("replay", INPUTS[0], "--filter", "udp").stdout)
    assert 0 < len(udp_only) < len(everything)
    flows = [json.loads(r) for r in udp_only if json.loads(r)["type"] == "flow"]
    assert flows and all(f["protocol"] == 17 for f in flows)


def test_a_bad_expression_is_one_line_before_any_output(tmp_path):
    out = tmp_path / "flows.jsonl"
    res = loupe("replay", INPUTS[0], "--filter", "tcp prot 80", "-o", out)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "loupe: error: --filter: syntax error at 'prot' (column 5): expected and, or, "
        "or the end")
    assert not out.exists()
