"""Statistics against a server of known latency (tests/stats/latency_app.py): 10 ms and
100 ms endpoints and one with planted 500s, driven over two connections, captured with
tcpdump and replayed into real collectors.

- p50 within 10 % of 10 ms and 100 ms; 5xx counts and rates exact for the planted 500s;
- every quantile within the sketch's documented relative accuracy (ALPHA) of the exact
  quantile of the stored latencies (read back with `loupe query`);
- the two connections as two sensors, merged in one collector, give the quantiles of one
  sensor that saw everything, in another collector (equal bin for bin: well within ALPHA);
- a restarted collector answers the same (the statistics are stored).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collector.stats.model import ALPHA
from tests.netns import VethPair
from tests.stats import latency_app as app

LOUPE = str(Path(sys.executable).with_name("loupe"))
APP = str(Path(__file__).resolve().with_name("latency_app.py"))
PORT = 8080
SERVICE = f"app.test:{PORT}"


def loupe(*args) -> str:
    out = subprocess.run([LOUPE, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout


def endpoints(address: str) -> dict[str, dict]:
    out = loupe("services", "--endpoints", "--collector", address, "--resolution", "10s",
                "--format", "json")
    return {r["path"]: r for r in map(json.loads, out.splitlines())}


def settle(pcap: Path) -> None:
    """Wait until tcpdump has written what the kernel holds for it: stopped at once, it
    loses the packets still in its buffer (the tail of the traffic). Bounded: 5 s."""
    size = -1
    for _ in range(10):
        time.sleep(0.5)
        if pcap.stat().st_size == size:
            return
        size = pcap.stat().st_size


def capture(tmp_path: Path) -> tuple[Path, dict, str]:
    pcap = tmp_path / "all.pcap"
    with VethPair.create("sts") as pair:
        pair.wait_ready()
        server = pair.b.popen(sys.executable, APP, "serve", pair.b.ip4, str(PORT),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # --immediate-mode: packets reach tcpdump at once, not in blocks up to 1 s late.
        dump = pair.b.popen("tcpdump", "-i", pair.b.iface, "--immediate-mode", "-U", "-n",
                            "-w", str(pcap),
                            f"tcp port {PORT}", stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
        try:
            assert "listening on" in dump.stderr.readline()
            for _ in range(50):   # bounded: 5 s to listen
                if pair.b.run("ss", "-Hltn", f"sport = :{PORT}").stdout.strip():
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the test app did not start listening")
            sent = json.loads(pair.a.run(sys.executable, APP, "drive", pair.b.ip4, str(PORT),
                                         pair.a.ip4, timeout=60).stdout)
            settle(pcap)
        finally:
            for proc in (dump, server):
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return pcap, sent, pair.a.ip4


def split(pcap: Path, port: int) -> Path:
    out = pcap.with_name(f"port{port}.pcap")
    subprocess.run(["tcpdump", "-r", str(pcap), "-w", str(out),
                    f"tcp portrange {port}-{port + 998}"],
                   check=True, capture_output=True, timeout=30)
    return out


def exact(latencies: list[int], q: float) -> int:
    """The value of rank floor(q * (n - 1)), the rank DDSketch answers for."""
    return sorted(latencies)[int(q * (len(latencies) - 1))]


@pytest.mark.bpf   # root: namespaces and tcpdump
def test_known_latency_errors_and_merge(start_collector, tmp_path):
    pcap, sent, client = capture(tmp_path)
    assert sent["flaky_500"] == app.FLAKY // app.FLAKY_EVERY   # what the app planted

    one = start_collector(data_dir=tmp_path / "one")
    loupe("replay", pcap, "--collector", one.address, "--sensor-id", "all", "--no-progress")
    two = start_collector(data_dir=tmp_path / "two")
    for sensor, port in (("s1", app.PORT_A), ("s2", app.PORT_B)):
        loupe("replay", split(pcap, port), "--collector", two.address, "--sensor-id", sensor,
              "--no-progress")

    seen = endpoints(one.address)
    print("\n" + loupe("services", "--endpoints", "--collector", one.address, "--format", "table"))
    assert set(seen) == {"/fast/{id}", "/slow", "/flaky"}
    fast, slow, flaky = seen["/fast/{id}"], seen["/slow"], seen["/flaky"]
    assert (fast["requests"], slow["requests"], flaky["requests"]) == (app.FAST, app.SLOW, app.FLAKY)
    assert abs(fast["p50_ns"] - 10e6) <= 0.1 * 10e6, fast
    assert abs(slow["p50_ns"] - 100e6) <= 0.1 * 100e6, slow
    assert flaky["errors_5xx"] == sent["flaky_500"] and flaky["errors_4xx"] == 0
    assert flaky["error_rate_5xx"] == app.FLAKY_EVERY ** -1
    assert fast["errors_5xx"] == slow["errors_5xx"] == 0

    # Each quantile within ALPHA of the exact one over the stored latencies (one query).
    rows = [json.loads(r) for r in loupe("query", "--collector", one.address, "--format",
                                         "json", "SELECT path, latency_ns FROM http")
            .splitlines()]
    for path, match in (("/fast/{id}", lambda p: p.startswith("/fast/")),
                        ("/slow", lambda p: p == "/slow"), ("/flaky", lambda p: p == "/flaky")):
        lat = [r["latency_ns"] for r in rows if match(r["path"])]
        for q, name in ((0.5, "p50_ns"), (0.9, "p90_ns"), (0.99, "p99_ns")):
            true = exact(lat, q)
            assert abs(seen[path][name] - true) <= ALPHA * true + 1, (path, name, true)

    # Two sensors merged == one sensor that saw all.
    merged = endpoints(two.address)
    keys = ("requests", "errors_5xx", "p50_ns", "p90_ns", "p99_ns", "latency_count")
    for path in seen:
        for k in keys:
            assert abs(merged[path][k] - seen[path][k]) <= ALPHA * seen[path][k], (path, k)
        print(f"{path}: one sensor {[seen[path][k] for k in keys]}, two merged "
              f"{[merged[path][k] for k in keys]}")
    services = json.loads(loupe("services", "--collector", two.address, "--format", "json"))
    assert services["service"] == SERVICE and services["requests"] == sum(sent[k] for k in
                                                                           ("fast", "slow", "flaky"))
    edges = [json.loads(r) for r in loupe("services", "--edges", "--collector", two.address,
                                          "--format", "json").splitlines()]
    assert [(e["protocol"], e["client"], e["service"]) for e in edges] == [("http", client, SERVICE)]

    # Stored: a collector restarted on the same directory answers the same.
    one.stop()
    again = start_collector(data_dir=tmp_path / "one")
    assert endpoints(again.address) == seen
