"""TLS plaintext: a sensor that has probed Go binaries stops in time and keeps delivering.

Closing a uprobe's perf event waits for grace periods under a kernel-wide lock, 0.1-0.15 s
each and one after another on an idle host: a sensor that had probed the go tool and a Go
client (~50 perf events) spent 7 s of its stop on them, and on a busy host passed
loupe-sensor.service's TimeoutStopSec (60 s). Where the kernel has uprobe_multi links
(6.6+), each program is attached with one link per file, which waits once
(sensor/kernel/tlsprobe.py, "Detaching"). Here: a Go client (tests/live/go/tlsclient.go)
appears, is probed and talks; an OpenSSL client (curl) talks after it and is still
delivered; the Go binary's probes are uprobe_multi links; SIGTERM ends the sensor with 0
well within the unit's stop timeout."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.export.collector_proc import wait_for
from tests.live.rig import Sensor, stop, wait_tcp
from tests.live.tls_peers import go_client, nginx
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(180)]

# Well within TimeoutStopSec=60s of systemd/loupe-sensor.service: the stop also drains,
# flushes and closes the exporter.
STOP_S = 30.0


def _uprobe_multi(release: str) -> bool:
    major, minor = (int(x) for x in release.split(".")[:2])
    return (major, minor) >= (6, 6)


def _links(pid: int) -> list[str]:
    """fdinfo of the process's uprobe_multi BPF links."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf_link":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                text = f.read()
        except OSError:
            continue
        if "uprobe_multi" in text:
            out.append(text)
    return out


def _agents(path) -> set[str]:
    """User agents of the tls_plaintext HTTP events the sensor printed so far."""
    agents = set()
    for line in path.read_text().splitlines():
        if line.startswith("{") and '"tls_plaintext"' in line:
            ev = json.loads(line)
            if ev.get("type") == "http":
                agents.add(ev["detail"]["user_agent"].split("/")[0])
    return agents


def test_stop_after_go_binaries_and_delivery_goes_on(tmp_path):
    client = go_client(tmp_path)
    with VethPair.create("tq") as pair:
        pair.wait_ready()
        srv = nginx(pair.b, tmp_path)
        sensor = Sensor(["--netns", pair.a.netns, "--iface", pair.a.iface, "--collector", "",
                         "--spool-dir", str(tmp_path / "spool"), "--sensor-id", "tlsstop",
                         "--output", "-", "--interval", "0.5", "--tls-plaintext",
                         "--set", "tls_plaintext.rescan=1s", "--set", "timeouts.tcp_linger=1s"],
                        workdir=tmp_path)
        proc = None
        code = None
        try:
            wait_tcp(pair.a, pair.b.ip4, 443)
            sensor.start()
            proc = pair.a.popen(str(client), "GET", f"https://{pair.b.ip4}/a.txt",
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
            wait_for(lambda: f"Go crypto/tls in {client}" in sensor.stderr_now()
                     or proc.poll() is not None, 30, "the Go client's probes")
            out, errs = proc.communicate("go\n", timeout=60)
            assert out.split() == ["200"], out + errs
            curl = pair.a.run("curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                              f"https://{pair.b.ip4}/index.html")
            assert curl.stdout == "200"
            out_file = tmp_path / "sensor-0.out"
            wait_for(lambda: {"Go-http-client", "curl"} <= _agents(out_file), 20,
                     "the events of both clients")
            if _uprobe_multi(os.uname().release):
                # The Go client's probes: one link each for Read's and Write's entries and
                # Close's, one for all the RETs (not a perf event per uprobe).
                rets = int(re.search(re.escape(f"Go crypto/tls in {client} (/proc/")
                                     + r"\d+/exe\) \((\d+) return points",
                                     sensor.stderr_now()).group(1))
                counts = sorted(int(re.search(r"uprobe_cnt:\s+(\d+)", text).group(1))
                                for text in _links(sensor.proc.pid)
                                if f"path:\t{client}\n" in text)
                assert counts == [1, 1, 1, rets], counts
            code = sensor.stop(STOP_S)   # raises past STOP_S
        finally:
            sensor.kill()
            stop(srv)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == 0, sensor.stderr
    assert "Traceback" not in sensor.stderr
    assert "probes detached" in sensor.stderr, sensor.stderr
