"""The service units under a real systemd as PID 1, in a container that cannot touch the
host (tests/ops/container.py): install, start, readiness, records from the real sensor
to the real collector, metrics, reload, SIGKILL and watchdog restarts, stop, uninstall.

The container sees the repository at /srv/loupe wherever the checkout lives on the host
(a CI clone under /tmp included): the units' PrivateTmp would hide a path under /tmp.

The units are started once, by the `running` fixture. When they do not start, every test
that needs them errors with that one reason (the unit's journal), not with a cascade of
unrelated-looking failures.

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

CHECKOUT = ct.CHECKOUT
INSTALL = f"{CHECKOUT}/scripts/install-service.sh"
UNINSTALL = f"{CHECKOUT}/scripts/uninstall-service.sh"
LOUPE = "/opt/loupe/bin/loupe"
SENSOR = "loupe-sensor.service"
COLLECTOR = "loupe-collector.service"
SENSOR_ID = "ops-unit"
CAP_NET_ADMIN, CAP_NET_RAW, CAP_PERFMON, CAP_BPF = 12, 13, 38, 39
# install-service.sh --enforce: systemd/loupe-sensor-enforce.conf, for hosts that enforce.
ENFORCE_DROPIN = f"/etc/systemd/system/{SENSOR}.d/enforce.conf"
PIN_DIR = "/sys/fs/bpf/loupe"
# systemd-analyze security "exposure" (0 safest .. 10): what the units reach today, with a
# little room; a change that weakens the sandbox fails here first.
MAX_EXPOSURE = {SENSOR: 3.0, COLLECTOR: 1.5}
# A short watchdog so the watchdog test takes seconds, and a short abort timeout so the
# killed main process is gone soon after.
SENSOR_DROPIN = "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=5s\n"
# The container's only interface is its loopback: attach there. Flows end soon after
# their last packet (1 s idle for UDP, the shortest linger, 1 s, after a TCP reset) so
# records reach the collector within seconds.
SENSOR_SETTINGS = ("interfaces=lo", f"sensor_id={SENSOR_ID}", "timeouts.other_idle=1s",
                   "timeouts.tcp_linger=1s", "export.batch_delay=100ms")
# A DNS query for example.com (A), sent to the container's loopback port 53: a UDP flow
# on a selected port, so its payload reaches the sensor through the ring buffer.
DNS_QUERY = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "s.sendto(bytes.fromhex('abcd01000001000000000000076578616d706c6503636f6d0000010001'),"
             " ('127.0.0.1', 53))\n"
             "try:\n socket.create_connection(('127.0.0.1', 9), 5)\n"
             "except ConnectionRefusedError:\n pass\n")
FETCH = ("import sys, urllib.request; print(urllib.request.urlopen("
         "'http://' + sys.argv[1] + '/metrics', timeout=10).read().decode())")


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    reason = ct.unavailable_reason()
    if reason:
        pytest.skip(reason)
    ct.build_rootfs()
    box = ct.Container(f"loupeops{os.getpid()}", tmp_path_factory.mktemp("ops") / "boot.log")
    try:
        box.boot()
        box.run(INSTALL, "--venv", f"{CHECKOUT}/.venv", timeout=120)
        box.run("mkdir", "-p", f"/etc/systemd/system/{SENSOR}.d")
        box.run("tee", f"/etc/systemd/system/{SENSOR}.d/test.conf", input=SENSOR_DROPIN)
        # Through `config show`, which also proves it writes a file `config check` accepts.
        sets = " ".join(f"--set {s}" for s in SENSOR_SETTINGS)
        box.run("sh", "-c", f"{LOUPE} config show /etc/loupe/sensor.toml {sets} "
                "> /etc/loupe/sensor.toml.new && mv /etc/loupe/sensor.toml.new "
                "/etc/loupe/sensor.toml")
        box.run(LOUPE, "config", "check", "/etc/loupe/sensor.toml")
        box.run("systemctl", "daemon-reload")
        yield box
    finally:
        box.shutdown()


@pytest.fixture(scope="module")
def running(machine):
    """Both units started (Type=notify: `systemctl start` returns only after READY=1, or
    fails). A failure here is the root cause for every test that uses this fixture."""
    for unit in (COLLECTOR, SENSOR):
        started = machine.run("systemctl", "start", unit, check=False, timeout=150)
        if started.returncode != 0:
            journal = machine.run("journalctl", "-u", unit, "--no-pager", "-n", "30",
                                  "-o", "cat").stdout
            raise AssertionError(f"{unit} did not start: {started.stderr.strip()}\n"
                                 f"its journal:\n{journal}")
    return machine


def _main_pid(box, unit) -> int:
    return int(box.show(unit, "MainPID")["MainPID"])


def _proc_status(box, pid: int) -> str:
    return box.run("cat", f"/proc/{pid}/status").stdout


def _caps(box, pid: int) -> tuple[int, int]:
    status = _proc_status(box, pid)
    cap_eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    uid = int(re.search(r"^Uid:\s*(\d+)", status, re.M).group(1))
    return cap_eff, uid


def _cap_bnd(box, pid: int) -> int:
    return int(re.search(r"^CapBnd:\s*([0-9a-f]+)", _proc_status(box, pid), re.M).group(1), 16)


def _raw_sockets(box, pid: int) -> int:
    """How many raw sockets (IPv4 or IPv6) the process holds open."""
    raw = set()
    for table in ("raw", "raw6"):
        lines = box.run("cat", f"/proc/{pid}/net/{table}").stdout.splitlines()[1:]
        raw |= {line.split()[9] for line in lines}     # the inode column
    held = set(re.findall(r"socket:\[(\d+)\]", box.run("ls", "-l", f"/proc/{pid}/fd").stdout))
    return len(held & raw)


def _scrape(box, address: str) -> dict:
    text = box.run("python3", "-c", FETCH, address).stdout
    return {f.name: f for f in text_string_to_metric_families(text)}


def _journal(box, unit: str, *args: str) -> str:
    return box.run("journalctl", "-u", unit, "--no-pager", "-o", "cat", *args).stdout


def test_install_is_idempotent_and_units_verify(machine):
    assert machine.run("id", "-u", "loupe").stdout.strip().isdigit()
    machine.run("systemd-analyze", "verify", f"/etc/systemd/system/{SENSOR}",
                f"/etc/systemd/system/{COLLECTOR}")
    # With --venv the command is a wrapper naming the paths the units see, not a link to
    # the venv's script (whose #! line names the host's path of the venv).
    wrapper = machine.run("cat", LOUPE).stdout
    assert f"PYTHONPATH='{CHECKOUT}' exec '{CHECKOUT}/.venv/bin/python' -P -m sensor.cli" in wrapper
    assert machine.run("test", "-L", LOUPE, check=False).returncode == 1
    before = machine.run("cat", "/etc/loupe/sensor.toml").stdout
    machine.run(INSTALL, "--venv", f"{CHECKOUT}/.venv", timeout=120)
    # A second install keeps the admin's (here: the test's) configuration.
    assert machine.run("cat", "/etc/loupe/sensor.toml").stdout == before
    assert 'interfaces = ["lo"]' in before
    mode = machine.run("stat", "-c", "%a %U %G", "/etc/loupe/collector.toml").stdout.split()
    assert mode == ["640", "root", "loupe"]


def test_install_refuses_a_checkout_the_sandbox_hides(machine):
    # The same checkout seen under /tmp (as a CI clone may be): PrivateTmp would hide it
    # from the services, so the install says so instead of leaving units that fail with
    # status=203/EXEC.
    machine.run("mkdir", "-p", "/tmp/ops-checkout")
    machine.run("mount", "--bind", CHECKOUT, "/tmp/ops-checkout")
    try:
        result = machine.run("/tmp/ops-checkout/scripts/install-service.sh", "--venv",
                             "/tmp/ops-checkout/.venv", check=False, timeout=60)
    finally:
        machine.run("umount", "/tmp/ops-checkout")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "install-service: /tmp/ops-checkout is hidden from the services by PrivateTmp=yes: "
        "put the checkout elsewhere (e.g. /srv or /opt), or install without --venv")
    assert f"'{CHECKOUT}/.venv/bin/python'" in machine.run("cat", LOUPE).stdout


def test_security_exposure(machine):
    for unit, limit in MAX_EXPOSURE.items():
        out = machine.run("systemd-analyze", "security", "--no-pager", unit).stdout
        exposure = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
        assert exposure <= limit, f"{unit}: exposure {exposure} > {limit}\n{out}"


def _meter_hooks(box) -> list[str]:
    """The hooks of the container's loopback running the flow meter (tcx or clsact)."""
    out = box.run("env", f"PYTHONPATH={CHECKOUT}", f"{CHECKOUT}/.venv/bin/python", "-P", "-c",
                  "from sensor.kernel.attach import attached_hooks; "
                  "print(' '.join(attached_hooks('lo')))").stdout
    return out.split()


def test_units_are_ready_with_least_privilege(running):
    for unit in (COLLECTOR, SENSOR):
        assert running.run("systemctl", "is-active", unit).stdout.strip() == "active"
    assert running.show(SENSOR, "StatusText")["StatusText"].startswith("running; attached lo")
    # The flow meter is attached to the container's loopback, by user loupe with only the
    # unit's capabilities, inside the unit's sandbox.
    assert _meter_hooks(running) == ["ingress"]
    cap_eff, uid = _caps(running, _main_pid(running, SENSOR))
    assert cap_eff == (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN)
    loupe_uid = int(running.run("id", "-u", "loupe").stdout)
    assert uid == loupe_uid
    assert _caps(running, _main_pid(running, COLLECTOR)) == (0, loupe_uid)
    for unit in (SENSOR, COLLECTOR):
        # Mode 2: seccomp filters are on (SystemCallFilter, MemoryDenyWriteExecute, ...),
        # so the sandbox is enforced, not silently skipped.
        status = _proc_status(running, _main_pid(running, unit))
        assert re.search(r"^Seccomp:\s*2$", status, re.M), unit
        assert re.search(r"^NoNewPrivs:\s*1$", status, re.M), unit


def test_records_flow_from_sensor_to_collector(running):
    # A DNS query and a refused TCP connection on the loopback. The query's payload
    # reaches the sensor through bcc's ring buffer callback (a libffi closure) under
    # MemoryDenyWriteExecute=yes; the records reach the collector (no capabilities at all,
    # decoder processes in its sandbox) through the real exporter and spool.
    running.run("python3", "-c", DNS_QUERY)

    def stored():
        out = running.run(LOUPE, "query", "--output", "json",
                          "SELECT (SELECT count(*) FROM flows) AS flows, "
                          "(SELECT count(*) FROM dns) AS dns", check=False).stdout
        match = re.search(r'"flows": (\d+), "dns": (\d+)', out)
        return match and int(match.group(1)) >= 2 and int(match.group(2)) >= 1 and out
    running.wait_for(stored, 30, "flows and a DNS event stored by the collector")
    status = running.run(LOUPE, "collector", "status").stdout
    assert re.search(rf"sensor {SENSOR_ID}: last batch \d+, \d+ records", status), status
    # The batches were decoded by the collector's worker processes, inside its unit.
    children = running.run("ps", "--ppid", str(_main_pid(running, COLLECTOR)), "-o",
                           "args=").stdout
    assert "multiprocessing" in children, children


def test_collector_reload_applies_the_retention(running):
    pid = _main_pid(running, COLLECTOR)
    running.run("sh", "-c", f"{LOUPE} config show --kind collector /etc/loupe/collector.toml "
                "--set retention=30d > /etc/loupe/collector.toml.new && "
                "mv /etc/loupe/collector.toml.new /etc/loupe/collector.toml")
    running.run("systemctl", "reload", COLLECTOR, timeout=60)
    running.wait_for(lambda: "; retention 30d;" in running.show(COLLECTOR, "StatusText")["StatusText"],
                     10, "the collector to report the new retention")
    assert _main_pid(running, COLLECTOR) == pid
    assert "reloaded: retention 30d" in _journal(running, COLLECTOR)


def test_metrics_endpoints_in_the_units(running):
    for daemon, address in (("sensor", "127.0.0.1:9464"), ("collector", "127.0.0.1:9465")):
        families = _scrape(running, address)
        reasons = {s.labels["reason"] for s in families["loupe_lost"].samples}
        assert reasons == {source.value for source in LostSource}, daemon
        info = families["loupe_build_info"].samples[0]
        assert info.labels["daemon"] == daemon and info.value == 1
        rss = families["loupe_process_resident_memory_bytes"].samples[0].value
        assert rss > 1_000_000, daemon
        if daemon == "collector":
            batches = {s.labels["result"]: s.value for s in families["loupe_batches"].samples
                       if s.name == "loupe_batches_total"}
            assert batches["stored"] >= 1 and batches["rejected"] == 0, batches


def test_reload_keeps_the_process(running):
    pid = _main_pid(running, SENSOR)
    before = _journal(running, SENSOR).count("reloaded")
    running.run("systemctl", "reload", SENSOR, timeout=60)
    # systemd 252's reload returns once `kill -HUP` has; the daemon's RELOADING=1 and
    # READY=1 follow (Type=notify-reload, systemd >= 253, closes that gap).
    running.wait_for(lambda: _journal(running, SENSOR).count("reloaded") > before, 10,
                     "the sensor to log its reload")
    assert _main_pid(running, SENSOR) == pid
    assert running.run("systemctl", "is-active", SENSOR).stdout.strip() == "active"


def test_enforce_dropin_adds_resets_and_pins(running):
    # The default unit (measured by test_security_exposure above): no CAP_NET_RAW even in
    # the bounding set, so the sensor enforces without resets and without pins.
    pid = _main_pid(running, SENSOR)
    assert not _cap_bnd(running, pid) & (1 << CAP_NET_RAW)
    assert _raw_sockets(running, pid) == 0
    assert running.run("test", "-e", f"{PIN_DIR}/block_cfg", check=False).returncode == 1
    journal = _journal(running, SENSOR)
    warnings = (journal.count("enforcement: no TCP resets"), journal.count("not pinned under"))
    assert warnings[0] >= 1 and warnings[1] >= 1, journal
    running.run(INSTALL, "--venv", f"{CHECKOUT}/.venv", "--enforce", timeout=120)
    assert running.run("cat", ENFORCE_DROPIN).stdout == (
        ct.REPO / "systemd" / "loupe-sensor-enforce.conf").read_text()
    running.run("systemd-analyze", "verify", f"/etc/systemd/system/{SENSOR}")
    # nspawn's /sys has no bpffs, which systemd mounts at /sys/fs/bpf on a host: mount it
    # the way systemd does (a mount point made in the read-only tmpfs /sys for that).
    running.run("sh", "-c", "mountpoint -q /sys/fs/bpf || { mount -o remount,rw /sys && "
                "mkdir -p /sys/fs/bpf && mount -o remount,ro /sys && "
                "mount -t bpf -o mode=700 bpf /sys/fs/bpf; }")
    running.run("systemctl", "restart", SENSOR, timeout=150)
    pid = _main_pid(running, SENSOR)
    # The raw sockets for resets were opened as root, before the drop to loupe, which
    # keeps the same three capabilities as without the drop-in: CAP_NET_RAW is in the
    # bounding set, not in the running sensor's effective or permitted set.
    assert _cap_bnd(running, pid) & (1 << CAP_NET_RAW)
    assert _raw_sockets(running, pid) == 2
    cap_eff, _ = _caps(running, pid)
    assert cap_eff == (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN)
    # The maps are pinned in the writable pin_dir, which `loupe block` reaches.
    mode = running.run("stat", "-c", "%a %U %G", PIN_DIR).stdout.split()
    assert mode == ["770", "root", "loupe"]
    assert sorted(running.run("ls", PIN_DIR).stdout.split()) == [
        "block_cfg", "block_flow", "block_src"]
    running.run(LOUPE, "block", "add", "198.18.7.0/24", "--ttl", "1m", "--note", "ops")
    assert "198.18.7.0/24" in running.run(LOUPE, "block", "list").stdout
    running.run(LOUPE, "block", "del", "198.18.7.0/24")
    assert running.run(LOUPE, "block", "list").stdout.strip() == "no active blocks"
    journal = _journal(running, SENSOR)
    assert (journal.count("enforcement: no TCP resets"),
            journal.count("not pinned under")) == warnings, journal


def test_sigkilled_sensor_is_restarted(running):
    pid = _main_pid(running, SENSOR)
    restarts = int(running.show(SENSOR, "NRestarts")["NRestarts"])
    running.run("systemctl", "kill", "--kill-who=main", "--signal=SIGKILL", SENSOR)

    def back_up():
        props = running.show(SENSOR, "MainPID", "ActiveState", "SubState", "NRestarts")
        return (props["ActiveState"] == "active" and props["SubState"] == "running"
                and int(props["MainPID"]) not in (0, pid) and props)
    props = running.wait_for(back_up, 90, "the sensor restarted after SIGKILL")
    assert int(props["NRestarts"]) == restarts + 1


def test_wedged_main_loop_is_killed_by_the_watchdog(running):
    # SIGSTOP freezes the main loop as a deadlock would: no WATCHDOG=1 any more.
    pid = _main_pid(running, SENSOR)
    restarts = int(running.show(SENSOR, "NRestarts")["NRestarts"])
    running.run("systemctl", "kill", "--kill-who=main", "--signal=SIGSTOP", SENSOR)

    def restarted():
        props = running.show(SENSOR, "MainPID", "ActiveState", "SubState", "NRestarts")
        return (props["ActiveState"] == "active" and props["SubState"] == "running"
                and int(props["MainPID"]) not in (0, pid) and props)
    props = running.wait_for(restarted, 90, "a watchdog restart")
    assert int(props["NRestarts"]) == restarts + 1
    assert "Watchdog timeout" in _journal(running, SENSOR)


def test_stop_is_clean(running):
    running.run("systemctl", "stop", SENSOR, timeout=90)
    running.run("systemctl", "stop", COLLECTOR, timeout=90)
    for unit in (SENSOR, COLLECTOR):
        props = running.show(unit, "ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    # SIGTERM detached the flow meter.
    assert _meter_hooks(running) == []
    # Priority prefixes reached journald: the INFO lines are at priority info, and none of
    # them carries a literal "<6>" (journald consumed the prefix).
    journal = _journal(running, SENSOR, "-p", "info")
    assert "stopping: detaching, flushing every flow" in journal
    assert "<6>" not in journal
    assert "stopped; storage closed" in _journal(running, COLLECTOR, "-p", "info")
    # With the enforce drop-in the sensor pinned its maps; stopping as loupe it cannot
    # reach them through bpffs (mounted 0700 root), so they stay, cleared, and `loupe
    # block` says no sensor runs (exit 3) rather than reaching a stopped one.
    running.wait_for(lambda: running.run(LOUPE, "block", "list", check=False).returncode == 3,
                     10, "`loupe block list` to say no sensor runs")


def test_uninstall_reverses_install(machine):
    machine.run(UNINSTALL, timeout=60)
    for path in (f"/etc/systemd/system/{SENSOR}", f"/etc/systemd/system/{COLLECTOR}",
                 ENFORCE_DROPIN, "/opt/loupe", "/etc/sysusers.d/loupe.conf"):
        assert machine.run("test", "-e", path, check=False).returncode == 1, path
    assert machine.run("id", "loupe", check=False).returncode != 0
    assert machine.run("test", "-f", "/etc/loupe/sensor.toml", check=False).returncode == 0
    machine.run(UNINSTALL, timeout=60)     # idempotent
    machine.run(UNINSTALL, "--purge", timeout=60)
    assert machine.run("test", "-e", "/etc/loupe", check=False).returncode == 1
    assert machine.run("test", "-e", "/var/lib/loupe", check=False).returncode == 1
