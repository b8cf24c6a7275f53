"""DDoS detection and mitigation, live: `loupe sensor run` with [ddos] mitigation "block"
watches nginx in a namespace. Three flood namespaces (bridged onto the client's link,
198.18.0.11-13) run h2load for 6 s while two normal clients poll once a second from
198.18.0.1 and 198.18.0.3; then a Python slowloris client holds 200 incomplete heads.

- the flood is detected within 10 s of its start and exactly its three sources are
  blocked (a request from one of them is dropped meanwhile);
- the pollers see no error, and no alert names them;
- the ban lifts after its TTL (5 s): the flood source is served again;
- the slowloris run is detected (a slow-request alert naming its source).

Why ~30 s: the sensor's start (compiling the program), the 6 s flood, the 5 s TTL and the
slowloris heads' age (3 s) are each the least that shows what they show."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sensor.model import Alert
from sensor.rules import ddos
from tests import nginx as nginx_peer
from tests.live.rig import Sensor, stop, wait_tcp
from tests.netns import Host, VethPair, sh

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(150)]

POLLERS = ("198.18.0.1", "198.18.0.3")
FLOODERS = ("198.18.0.11", "198.18.0.12", "198.18.0.13")
TTL_S = 5
FLOOD_S = 6

# One request a second on a new connection each, from a given address, for `seconds`;
# one JSON line per poll: the status or the error.
POLLER = r"""
import http.client, json, sys, time
src, dst, seconds, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
end = time.monotonic() + seconds
with open(out, "w") as f:
    while time.monotonic() < end:
        t = time.monotonic()
        try:
            c = http.client.HTTPConnection(dst, 80, timeout=3, source_address=(src, 0))
            c.request("GET", "/poll")
            r = c.getresponse()
            r.read()
            c.close()
            f.write(json.dumps({"status": r.status}) + "\n")
        except OSError as exc:
            f.write(json.dumps({"error": repr(exc)}) + "\n")
        f.flush()
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
"""

# Slowloris: `n` connections, each sends a request head's start and then one more header
# line every second, never the blank line that ends it; holds them for `seconds`.
SLOWLORIS = r"""
import socket, sys, time
dst, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks = []
for i in range(n):
    s = socket.create_connection((dst, 80), timeout=5)
    s.sendall(b"GET /?s=%d HTTP/1.1\r\nHost: shop\r\nUser-Agent: slow\r\n" % i)
    socks.append(s)
end = time.monotonic() + seconds
while time.monotonic() < end:
    time.sleep(1)
    for s in socks:
        s.sendall(b"X-a: b\r\n")
print(len(socks), flush=True)
"""


@pytest.fixture
def net():
    """The client's side bridged: namespace a's link to the server is a bridge port, and
    three flood namespaces hang off the same bridge."""
    if shutil.which("h2load") is None:
        pytest.skip("h2load is not installed (scripts/apt-packages.txt: nghttp2-client)")
    with VethPair.create("dd") as p:
        a = p.a
        a.run("ip", "link", "add", "br0", "type", "bridge")
        a.run("ip", "addr", "del", f"{a.ip4}/24", "dev", a.iface)
        a.run("ip", "-6", "addr", "del", f"{a.ip6}/64", "dev", a.iface)
        a.run("ip", "link", "set", a.iface, "master", "br0")
        a.run("ip", "addr", "add", f"{a.ip4}/24", "dev", "br0")
        a.run("ip", "-6", "addr", "add", f"{a.ip6}/64", "dev", "br0", "nodad")
        a.run("ip", "addr", "add", f"{POLLERS[1]}/24", "dev", "br0")
        a.run("ip", "link", "set", "br0", "up")
        hosts = []
        try:
            for i, addr in enumerate(FLOODERS):
                h = Host(f"{p.prefix}f{i}", "eth0", addr, "")
                sh("ip", "netns", "add", h.netns)
                hosts.append(h)
                h.run("ip", "link", "set", "lo", "up")
                sh("ip", "link", "add", f"{p.prefix}f{i}x", "netns", a.netns, "type", "veth",
                   "peer", "name", "eth0", "netns", h.netns)
                a.run("ip", "link", "set", f"{p.prefix}f{i}x", "master", "br0")
                a.run("ip", "link", "set", f"{p.prefix}f{i}x", "up")
                h.run("ip", "addr", "add", f"{addr}/24", "dev", "eth0")
                h.run("ip", "link", "set", "eth0", "up")
            p.wait_ready()
            yield p, hosts
        finally:
            for h in hosts:
                sh("ip", "netns", "del", h.netns, check=False)


def curl(host: Host, server: str, max_time: float = 2.0) -> int:
    out = host.run("curl", "-sS", "-o", "/dev/null", "--max-time", str(max_time),
                   f"http://{server}/", check=False, timeout=max_time + 10)
    return out.returncode


def test_flood_blocked_pollers_untouched_ttl_lifts_slowloris_seen(net, tmp_path):
    pair, flood_hosts = net
    server = pair.b.ip4
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_peer.config(
        tmp_path, 'listen 80; location / { return 200 "ok\\n"; }', connections=2048,
        http="keepalive_requests 1000000; default_type text/plain;"))
    procs = [pair.b.popen(nginx_peer.binary(), "-c", str(conf),
                          "-e", str(tmp_path / "error.log"), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)]
    pin_dir = Path(f"/sys/fs/bpf/loupe-test-{uuid.uuid4().hex[:8]}")
    sensor = Sensor(["--netns", pair.b.netns, "--iface", pair.b.iface, "--output", "jsonl",
                     "--spool-dir", str(tmp_path / "spool"), "--interval", "0.5",
                     "--sensor-id", "ddostest", "--collector", "127.0.0.1:9",
                     "--set", f"enforce.pin_dir={pin_dir}", "--set", "ddos.enabled=true",
                     "--set", "ddos.mitigation=block", "--set", f"ddos.ttl={TTL_S}s",
                     "--set", "ddos.slow_head_age=3s"], workdir=tmp_path)
    try:
        wait_tcp(pair.a, server, 80)
        sensor.start()
        poller = tmp_path / "poller.py"
        poller.write_text(POLLER)
        polls = [tmp_path / f"poll{i}.jsonl" for i in range(2)]
        procs += [pair.a.popen(sys.executable, str(poller), src, server, "17", str(out))
                  for src, out in zip(POLLERS, polls)]
        time.sleep(2)
        flood_start = time.time_ns()
        floods = [h.popen("h2load", "--h1", "-D", str(FLOOD_S), "-c", "2", "-t", "1",
                          "--rps", "100", f"http://{server}/", stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) for h in flood_hosts]
        procs += floods
        deadline = time.monotonic() + 10
        blocked = 0
        while time.monotonic() < deadline and blocked < 3:
            time.sleep(0.2)
            blocked = sensor.metrics().get("loupe_ddos", {}).get("sources_blocked", 0)
        detected_s = (time.time_ns() - flood_start) / 1e9
        assert blocked == 3, sensor.metrics().get("loupe_ddos")
        assert curl(flood_hosts[0], server, 1.0) == 28     # dropped while banned
        for f in floods:
            f.wait(FLOOD_S + 10)
        # The ban lifts after its TTL: the flood source is served again.
        lift_by = flood_start / 1e9 + detected_s + TTL_S + 2
        time.sleep(max(0.0, lift_by - time.time()))
        assert curl(flood_hosts[0], server) == 0

        slow = tmp_path / "slowloris.py"
        slow.write_text(SLOWLORIS)
        loris = flood_hosts[1].popen(sys.executable, str(slow), server, "200", "5",
                                     stdout=subprocess.PIPE, text=True)
        procs.append(loris)
        assert loris.wait(30) == 0 and loris.stdout.read().strip() == "200"
        for p in procs[1:3]:
            p.wait(30)
        assert sensor.stop() == 0
    finally:
        sensor.kill()
        for p in procs:
            stop(p)
    for out in polls:
        results = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(results) >= 12 and all(r == {"status": 200} for r in results), results
    alerts = [r for r in sensor.records() if isinstance(r, Alert)]
    for a in alerts:
        assert not set(POLLERS) & ({a.src_addr} | set(a.top_sources.split())), a
    floods = [a for a in alerts if a.rule_id == ddos.RULE_HTTP]
    assert floods and set(floods[0].top_sources.split()) == set(FLOODERS), floods
    first = floods[0]
    assert first.enforced and first.mitigation == "block" and first.dst_addr == server
    assert first.ts_ns - flood_start < 10 * 10**9
    assert TTL_S * 10**9 - 10**9 < first.block_expires_ns - first.ts_ns <= TTL_S * 10**9 + 10**9
    slow_alerts = [a for a in alerts if a.rule_id == ddos.RULE_SLOW]
    assert slow_alerts and slow_alerts[0].top_sources == FLOODERS[1], slow_alerts
    assert slow_alerts[0].rate >= 150
