"""The service units under a real systemd as PID 1, in a container that cannot touch the
host (tests/ops/container.py): install, start, readiness, records to the collector,
metrics, reload, SIGKILL and watchdog restarts, stop, uninstall.

The collector is the real `loupe collector run`. The sensor is the real `loupe sensor
run` when that command exists; until then the unit runs tests/ops/unit_daemon.py (the
same config, notify, logging, metrics and exporter code) through a drop-in, and the
watchdog test uses its switch for a wedged main loop.

Slow the first time only: scripts/build-test-rootfs.sh runs debootstrap once (about a
minute with a nearby mirror) and caches the tree in /var/cache/loupe-test/rootfs.
"""

from __future__ import annotations

import os
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sensor.model import LostSource
from tests.ops import container as ct

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(600)]

REPO = ct.REPO
SENSOR = "loupe-sensor.service"
COLLECTOR = "loupe-collector.service"
CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF = 12, 38, 39
# systemd-analyze security "exposure" (0 safest .. 10): what the units reach today, with a
# little room; a change that weakens the sandbox fails here first.
MAX_EXPOSURE = {SENSOR: 3.0, COLLECTOR: 1.5}
DROPIN_DIR = "/etc/systemd/system/loupe-sensor.service.d"
STANDIN = (f"ExecStart=\nExecStart={REPO}/.venv/bin/python {REPO}/tests/ops/unit_daemon.py "
           "--config /etc/loupe/sensor.toml --kernel\n")


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    reason = ct.unavailable_reason()
    if reason:
        pytest.skip(reason)
    ct.build_rootfs()
    box = ct.Container(f"loupeops{os.getpid()}", tmp_path_factory.mktemp("ops") / "boot.log")
    try:
        box.boot()
        box.run(f"{REPO}/scripts/install-service.sh", "--venv", f"{REPO}/.venv", timeout=120)
        real_sensor = box.run("/opt/loupe/bin/loupe", "sensor", "run", "--help",
                              check=False).returncode == 0
        # A short watchdog so the watchdog test takes seconds; the stand-in when needed.
        dropin = "[Service]\nWatchdogSec=3s\n" + ("" if real_sensor else STANDIN)
        box.run("mkdir", "-p", DROPIN_DIR)
        box.run("tee", f"{DROPIN_DIR}/test.conf", input=dropin)
        # The container's only interface is its loopback: attach there (via `config show`,
        # which also proves it writes a file `config check` accepts).
        box.run("sh", "-c", "/opt/loupe/bin/loupe config show /etc/loupe/sensor.toml "
                "--set interfaces=lo > /etc/loupe/sensor.toml.new && "
                "mv /etc/loupe/sensor.toml.new /etc/loupe/sensor.toml")
        box.run("/opt/loupe/bin/loupe", "config", "check", "/etc/loupe/sensor.toml")
        box.run("systemctl", "daemon-reload")
        box.real_sensor = real_sensor
        yield box
    finally:
        box.shutdown()


def _main_pid(box, unit) -> int:
    return int(box.show(unit, "MainPID")["MainPID"])


def _caps(box, pid: int) -> tuple[int, int]:
    status = box.run("cat", f"/proc/{pid}/status").stdout
    cap_eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    uid = int(re.search(r"^Uid:\s*(\d+)", status, re.M).group(1))
    return cap_eff, uid


def test_install_is_idempotent_and_units_verify(machine):
    assert machine.run("id", "-u", "loupe").stdout.strip().isdigit()
    machine.run("systemd-analyze", "verify", f"/etc/systemd/system/{SENSOR}",
                f"/etc/systemd/system/{COLLECTOR}")
    before = machine.run("cat", "/etc/loupe/sensor.toml").stdout
    machine.run(f"{REPO}/scripts/install-service.sh", "--venv", f"{REPO}/.venv", timeout=120)
    # A second install keeps the admin's (here: the test's) configuration.
    assert machine.run("cat", "/etc/loupe/sensor.toml").stdout == before
    assert 'interfaces = ["lo"]' in before
    mode = machine.run("stat", "-c", "%a %U %G", "/etc/loupe/collector.toml").stdout.split()
    assert mode == ["640", "root", "loupe"]


def test_security_exposure(machine):
    for unit, limit in MAX_EXPOSURE.items():
        out = machine.run("systemd-analyze", "security", "--no-pager", unit).stdout
        exposure = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
        assert exposure <= limit, f"{unit}: exposure {exposure} > {limit}\n{out}"


def test_start_reaches_ready_and_records_flow(machine):
    # Type=notify: `systemctl start` returns only after READY=1 (or fails).
    for unit in (COLLECTOR, SENSOR):
        started = machine.run("systemctl", "start", unit, check=False, timeout=150)
        journal = machine.run("journalctl", "-u", unit, "--no-pager", "-n", "40").stdout
        assert started.returncode == 0, f"{unit} did not start:\n{started.stderr}\n{journal}"
    for unit in (COLLECTOR, SENSOR):
        assert machine.run("systemctl", "is-active", unit).stdout.strip() == "active"
    assert machine.show(SENSOR, "StatusText")["StatusText"].startswith("running")
    # The flow meter is attached to the container's loopback, by user loupe with only the
    # unit's capabilities, inside the unit's sandbox.
    filters = machine.run("tc", "filter", "show", "dev", "lo", "ingress").stdout
    assert "bpf" in filters and "loupe_tc" in filters, filters
    if not machine.real_sensor:
        # A refused connection (SYN, RST) on the loopback ends a TCP flow: the kernel
        # sends a flow-end event, delivered through bcc's ctypes callback (a libffi
        # closure) under MemoryDenyWriteExecute=yes.
        connect = ("import socket\ntry:\n socket.create_connection(('127.0.0.1', 9), 5)\n"
                   "except ConnectionRefusedError:\n pass\n")
        machine.run("python3", "-c", connect)
        machine.wait_for(
            lambda: not machine.show(SENSOR, "StatusText")["StatusText"].endswith("events 0"),
            15, "a ring buffer event to reach the stand-in")

    # Least privilege as granted by the units, read from the kernel's view of the process.
    cap_eff, uid = _caps(machine, _main_pid(machine, SENSOR))
    assert cap_eff == (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN)
    loupe_uid = int(machine.run("id", "-u", "loupe").stdout)
    assert uid == loupe_uid
    assert _caps(machine, _main_pid(machine, COLLECTOR)) == (0, loupe_uid)
    for unit in (SENSOR, COLLECTOR):
        # Mode 2: seccomp filters are on (SystemCallFilter, MemoryDenyWriteExecute, ...),
        # so the sandbox below is enforced, not silently skipped.
        status = machine.run("cat", f"/proc/{_main_pid(machine, unit)}/status").stdout
        assert re.search(r"^Seccomp:\s*2$", status, re.M), unit
        assert re.search(r"^NoNewPrivs:\s*1$", status, re.M), unit

    if machine.real_sensor:
        return  # the real sensor's records depend on traffic; its own tests cover them
    # The stand-in exported 3 flows through the real exporter and spool; the collector
    # (MemoryDenyWriteExecute=yes, no capabilities) stored them.
    def stored():
        out = machine.run("/opt/loupe/bin/loupe", "collector", "status", check=False).stdout
        match = re.search(r"sensor \S+: last batch \d+, (\d+) records", out)
        return match and int(match.group(1)) >= 3
    machine.wait_for(stored, 30, "3 records at the collector")


def test_metrics_endpoint_in_the_unit(machine):
    if machine.real_sensor:
        pytest.skip("the real sensor's metrics are tested with the sensor")
    fetch = ("import urllib.request; print(urllib.request.urlopen("
             "'http://127.0.0.1:9464/metrics', timeout=10).read().decode())")
    text = machine.run(f"{REPO}/.venv/bin/python", "-c", fetch).stdout
    families = {f.name: f for f in text_string_to_metric_families(text)}
    reasons = {s.labels["reason"] for s in families["loupe_lost"].samples}
    assert reasons == {source.value for source in LostSource}
    info = families["loupe_build_info"].samples[0]
    assert info.labels["daemon"] == "sensor" and info.value == 1
    assert families["loupe_process_resident_memory_bytes"].samples[0].value > 1_000_000


def test_reload_keeps_the_process(machine):
    pid = _main_pid(machine, SENSOR)
    machine.run("systemctl", "reload", SENSOR, timeout=60)
    if not machine.real_sensor:
        # systemd 252's reload returns once `kill -HUP` has; the daemon's RELOADING=1 and
        # READY=1 follow (Type=notify-reload, systemd >= 253, closes that gap).
        machine.wait_for(
            lambda: "reloads 1;" in machine.show(SENSOR, "StatusText")["StatusText"],
            10, "the reload to be reported in STATUS")
    assert _main_pid(machine, SENSOR) == pid
    assert machine.run("systemctl", "is-active", SENSOR).stdout.strip() == "active"


def test_sigkilled_sensor_is_restarted(machine):
    pid = _main_pid(machine, SENSOR)
    restarts = int(machine.show(SENSOR, "NRestarts")["NRestarts"])
    machine.run("systemctl", "kill", "--kill-who=main", "--signal=SIGKILL", SENSOR)

    def back_up():
        props = machine.show(SENSOR, "MainPID", "ActiveState", "SubState", "NRestarts")
        return (props["ActiveState"] == "active" and props["SubState"] == "running"
                and int(props["MainPID"]) not in (0, pid) and props)
    props = machine.wait_for(back_up, 90, "the sensor restarted after SIGKILL")
    assert int(props["NRestarts"]) == restarts + 1


def test_wedged_main_loop_is_killed_by_the_watchdog(machine):
    if machine.real_sensor:
        pytest.skip("the real sensor has no switch to wedge its main loop")
    pid = _main_pid(machine, SENSOR)
    restarts = int(machine.show(SENSOR, "NRestarts")["NRestarts"])
    machine.run("systemctl", "kill", "--kill-who=main", "--signal=SIGUSR1", SENSOR)

    def restarted():
        props = machine.show(SENSOR, "MainPID", "ActiveState", "NRestarts")
        return (props["ActiveState"] == "active" and int(props["MainPID"]) not in (0, pid)
                and props)
    props = machine.wait_for(restarted, 30, "a watchdog restart")
    assert int(props["NRestarts"]) == restarts + 1
    journal = machine.run("journalctl", "-u", SENSOR, "--no-pager", "-o", "cat").stdout
    assert "Watchdog timeout" in journal


def test_stop_is_clean(machine):
    machine.run("systemctl", "stop", SENSOR, timeout=90)
    machine.run("systemctl", "stop", COLLECTOR, timeout=90)
    for unit in (SENSOR, COLLECTOR):
        props = machine.show(unit, "ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    # SIGTERM detached the flow meter.
    assert "loupe_tc" not in machine.run("tc", "filter", "show", "dev", "lo", "ingress").stdout
    journal = machine.run("journalctl", "-u", SENSOR, "--no-pager", "-o", "cat",
                          "-p", "info").stdout
    if not machine.real_sensor:
        # Priority prefixes reached journald: the stand-in's INFO lines are at priority
        # info, and none of them carries a literal "<6>" (the prefix was consumed).
        assert "loupe.unit_daemon: stopping" in journal
        assert "<6>" not in journal


def test_uninstall_reverses_install(machine):
    machine.run(f"{REPO}/scripts/uninstall-service.sh", timeout=60)
    for path in (f"/etc/systemd/system/{SENSOR}", f"/etc/systemd/system/{COLLECTOR}",
                 "/opt/loupe", "/etc/sysusers.d/loupe.conf"):
        assert machine.run("test", "-e", path, check=False).returncode == 1, path
    assert machine.run("id", "loupe", check=False).returncode != 0
    assert machine.run("test", "-f", "/etc/loupe/sensor.toml", check=False).returncode == 0
    machine.run(f"{REPO}/scripts/uninstall-service.sh", timeout=60)     # idempotent
    machine.run(f"{REPO}/scripts/uninstall-service.sh", "--purge", timeout=60)
    assert machine.run("test", "-e", "/etc/loupe", check=False).returncode == 1
    assert machine.run("test", "-e", "/var/lib/loupe", check=False).returncode == 1
