"""Merged views across collectors (collector/fanout.py, "Merged views"), without BPF or
ClickHouse: two real `loupe collector run` processes listing each other in cluster.peers,
each fed a different capture by `loupe replay --collector`. `loupe endpoints` and
`loupe clients` on either show the whole estate; with one peer stopped the other still answers, its own part, and
names the peer it could not reach; fed the stopped peer's capture too, it shows exactly
the merged view (merging equals one collector fed everything)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.scale.test_fanout import DuckCollector

pytestmark = pytest.mark.timeout(120)

GOLDEN = REPO / "tests" / "golden"
# Two captures with different HTTP services: curl's GETs to 198.18.7.2, and pipelined
# GET and POST to golden.test.
CAPTURES = (GOLDEN / "curl-http.pcap", GOLDEN / "http-pipelined.pcap")
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def loupe(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sensor.cli", *map(str, args)], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def done(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out, err


def view(command: str, *addresses: str) -> list[tuple[list[dict], str]]:
    """`loupe COMMAND --output json` on each collector at once: (rows, stderr)."""
    procs = [loupe(command, "--collector", a, "--output", "json") for a in addresses]
    return [([json.loads(line) for line in out.splitlines()], err)
            for out, err in map(done, procs)]


def test_endpoints_on_any_peer_show_the_whole_estate(tmp_path):
    a = DuckCollector(tmp_path / "a", 0, "")
    b = DuckCollector(tmp_path / "b", 0, "")
    try:
        a.start([b.address])
        b.start([a.address])
        for c in (a, b):
            c.wait_listening()
            c.status()          # serving: the replay's first connection is not refused
        # One sensor id throughout: the endpoints' facts (sensors included) then match.
        for proc in [loupe("replay", pcap, "--collector", c.address, "--sensor-id", "s")
                     for c, pcap in ((a, CAPTURES[0]), (b, CAPTURES[1]))]:
            done(proc)
        (merged, err_a), (on_b, err_b), (clients, err_ca), (clients_b, err_cb) = (
            view("endpoints", a.address, b.address) + view("clients", a.address, b.address))
        assert {e["service"].split(":")[0] for e in merged} == {"198.18.7.2", "golden.test"}
        assert on_b == merged
        assert clients_b == clients and clients
        assert {e.split(" ")[1].split(":")[0] for c in clients for e in c["endpoints"]} == {
            "198.18.7.2", "golden.test"}
        assert "unreachable" not in err_a + err_b + err_ca + err_cb

        b.stop()
        [(got, err)] = view("endpoints", a.address)
        # A's own part (curl's service), and one line naming B.
        warning = f"loupe: peer {b.address} (unavailable) unreachable: view is partial"
        assert got == [e for e in merged if e["service"].startswith("198.18.7.2:")] and got
        assert err.strip() == warning
        # A fed B's capture too is the collector fed both: its view is the merged one.
        done(loupe("replay", CAPTURES[1], "--collector", a.address, "--sensor-id", "s"))
        [(got, err), (got_clients, err_c)] = view("endpoints", a.address) + view(
            "clients", a.address)
        assert got == merged and err.strip() == warning
        assert got_clients == clients and err_c.strip() == warning
    finally:
        for c in (a, b):
            c.stop()
