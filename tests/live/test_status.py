"""`loupe status` against real sensors: it lists the interfaces of the sensor it asked, not
every flow meter in the namespace; a stop while the collector is down says what stayed in
the spool, and where; a sensor that is down makes status exit non-zero."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from sensor.status_cli import NOT_RUNNING
from tests.conftest import REPO
from tests.export.collector_proc import free_port
from tests.live.rig import LOUPE, Sensor
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]


@pytest.fixture
def pair():
    with VethPair.create("st") as p:
        p.wait_ready()
        yield p


def _in_ns(host, args: list[str], workdir) -> Sensor:
    """A sensor run inside host's namespace (its metrics on that namespace's loopback),
    its output files in a workdir of its own."""
    workdir.mkdir()
    sensor = Sensor(args, workdir=workdir)
    sensor.args = host.cmd(*sensor.args)
    return sensor


def _status(host, metrics_port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        host.cmd(*LOUPE, "status", "--sensor-metrics", f"127.0.0.1:{metrics_port}",
                 "--collector", "", "--interval", "0.2"),
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=60)


def test_status_lists_only_the_queried_sensors_interfaces(pair, tmp_path):
    spool = tmp_path / "spool"
    # Sensor 1 on the veth, exporting to a collector that is not there; sensor 2 on the
    # same namespace's loopback.
    dead = f"127.0.0.1:{free_port()}"
    one = _in_ns(pair.a, ["--iface", pair.a.iface, "--collector", dead,
                          "--spool-dir", str(spool), "--drain-timeout", "1",
                          "--sensor-id", "one"], tmp_path / "one")
    two = _in_ns(pair.a, ["--iface", "lo", "--collector", "", "--sensor-id", "two"],
                 tmp_path / "two")
    try:
        # Both compile at once (on two cores a start costs one compile, not two).
        for s in (one, two):
            s.launch()
        for s in (one, two):
            s.wait_note("READY=1", 90)
        pair.a.run("ping", "-c", "3", "-i", "0.2", pair.b.ip4)

        out = _status(pair.a, one.metrics_port)
        assert out.returncode == 0, out.stderr
        attached = [line for line in out.stdout.splitlines() if "attached:" in line]
        assert attached == [f"  attached: {pair.a.iface} (ingress+egress)"], out.stdout
        out = _status(pair.a, two.metrics_port)
        assert "  attached: lo (ingress)" in out.stdout.splitlines(), out.stdout
    finally:
        codes = [s.stop() for s in (one, two)]
    assert codes == [0, 0]

    # Stopped with the collector down: the closing line says what is left, and where.
    closing = one.stderr.strip().splitlines()[-1]
    m = re.search(r"; (\d+) batches \((\d+) bytes\) not delivered, kept in the spool (\S+) ",
                  closing)
    assert m, closing
    assert int(m.group(1)) >= 1 and int(m.group(2)) > 0 and m.group(3) == str(spool)
    assert "not delivered" not in two.stderr

    # Both are down now: status says so, and exits non-zero.
    out = _status(pair.a, one.metrics_port)
    assert out.returncode == NOT_RUNNING and "not answering" in out.stdout


def test_a_failed_sensor_start_prints_one_line_and_creates_no_spool(tmp_path):
    spool = tmp_path / "not-yet" / "spool"
    out = subprocess.run([*LOUPE, "sensor", "run", "--iface", "nosuch0", "--metrics", "",
                          "--collector", f"127.0.0.1:{free_port()}", "--spool-dir", str(spool)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "loupe: error: no network interface named 'nosuch0': pick one from `ip link` "
        "(inside its network namespace if it lives in one)"]
    assert not (tmp_path / "not-yet").exists()
