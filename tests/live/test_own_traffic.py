"""The sensor leaves its own traffic out of selection by default: run on `lo` in a fresh
namespace (as `make run` does on a host), its Prometheus scrapes are counted as flows but
never parsed as HTTP, while an HTTP server on another port is; with
selection.exclude_own_traffic = false the same scrapes are parsed (so the default is what
keeps them out). `--exclude` does the same for any traffic, in the kernel.

The sensor, the servers and the clients all run inside the namespace, so the sensor's
own sockets are on the `lo` it watches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sensor.model import Flow, HttpEvent, L7Event
from tests.live.rig import Sensor, stop
from tests.netns import sh

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(180)]

PORT = 18080


@pytest.fixture
def netns():
    name = f"lot{os.getpid() % 100000}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def _curl(netns: str, url: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "-o", "/dev/null",
                    "--max-time", "5", url], check=True, timeout=10)


def _run(netns: str, tmp_path, *extra: str) -> tuple[Sensor, list]:
    server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m",
                               "http.server", "--bind", "127.0.0.1", str(PORT)],
                              cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    sensor = Sensor(["--config", "/dev/null", "--iface", "lo", "--collector", "",
                     "--output", "jsonl", "--set", "timeouts.tcp_linger=1s", *extra],
                    workdir=tmp_path)
    sensor.args = ["ip", "netns", "exec", netns, *sensor.args]
    try:
        sensor.start()
        _curl(netns, f"http://127.0.0.1:{PORT}/app")
        for _ in range(2):
            _curl(netns, f"http://127.0.0.1:{sensor.metrics_port}/metrics")
    finally:
        code = sensor.stop() if sensor.proc is not None else None
        stop(server)
    assert code == 0, sensor.stderr
    return sensor, sensor.records()


def _http_ports(records) -> list[int]:
    return sorted(r.dst_port for r in records
                  if isinstance(r, L7Event) and isinstance(r.detail, HttpEvent))


def test_own_metrics_scrapes_are_counted_not_parsed(netns, tmp_path):
    sensor, records = _run(netns, tmp_path)
    metrics = sensor.metrics_port
    assert f"excluded: (tcp port {metrics} and host 127.0.0.1)" in sensor.stderr
    assert _http_ports(records) == [PORT]
    scrapes = [r for r in records if isinstance(r, Flow) and r.dst_port == metrics]
    assert len(scrapes) == 2
    assert all(f.initiator_packets > 0 and f.responder_octets > 0 for f in scrapes)
    assert not any(f.l7_coverage.inspected for f in scrapes)


def test_turned_off_the_scrapes_are_parsed_and_exclude_takes_any_filter(netns, tmp_path):
    sensor, records = _run(netns, tmp_path, "--set", "selection.exclude_own_traffic=false")
    assert _http_ports(records) == sorted([PORT] + [sensor.metrics_port] * 2)
    assert "excluded:" not in sensor.stderr
    sensor, records = _run(netns, tmp_path, "--set", "selection.exclude_own_traffic=false",
                           "--exclude", f"tcp dst port {PORT}")
    assert _http_ports(records) == [sensor.metrics_port] * 2
    app = [r for r in records if isinstance(r, Flow) and r.dst_port == PORT]
    assert len(app) == 1 and not app[0].l7_coverage.inspected
