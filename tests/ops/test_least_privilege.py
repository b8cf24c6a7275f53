"""The full sensor (`loupe sensor run`) as a non-root user with only CAP_BPF, CAP_NET_ADMIN
and CAP_PERFMON: started as root with `--user`, as loupe-sensor.service runs it (attach as
root, then drop), and started as that user from the outset (setpriv); and its one-line
refusal without the capabilities.

The sensor runs in a network namespace joined with `nsenter --net` (not `ip netns exec`,
which mounts a fresh /sys and so hides tracefs: the unit sees the host's /sys). It is
attached to one end of a veth pair whose other end is in a second namespace; traffic goes
between the two namespaces only (198.18.71.0/24). setpriv takes the process down to user
nobody with exactly the three capabilities (effective through the ambient set, and
nothing more in the bounding set); `--user nobody` has the sensor do the same itself once
its programs are attached.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
CAPS = ("bpf", "net_admin", "perfmon")
CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF = 12, 38, 39
SERVER, CLIENT = "198.18.71.1", "198.18.71.2"
# bcc compiles the programs at start-up: seconds on this machine, more on a busy one.
START_TIMEOUT_S = 90
RECORD_TIMEOUT_S = 20

# One HTTP exchange on port 80 (a selected port by default). The client names itself
# (its comm) so that attribution can be checked by name as well as by pid.
SERVE_ONCE = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{SERVER}", 80))
s.listen()
s.settimeout(30)
c, _ = s.accept()
c.recv(4096)
try:
    c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
except OSError:
    pass   # the short-lived client may be gone already
c.close()
"""
CLIENT_CODE = f"""
import ctypes, socket, sys
ctypes.CDLL(None).prctl(15, b"lpclient", 0, 0, 0)   # PR_SET_NAME
c = socket.create_connection(("{SERVER}", 80), 5)
c.sendall(b"GET /least HTTP/1.1\\r\\nHost: lp.test\\r\\n\\r\\n")
if sys.argv[1] == "wait":
    c.recv(4096)
# "exit": gone right after sending, before its flow ends or is exported.
"""


class Lab:
    """Two namespaces joined by a veth pair, and a directory user nobody can read."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.ns_sensor, self.ns_peer = f"lpsen{pid}", f"lppeer{pid}"
        self.if_sensor, self.if_peer = f"lpv{pid}s", f"lpv{pid}p"
        self.dir = Path(tempfile.mkdtemp(prefix="loupe-lp-"))
        self.dir.chmod(0o755)
        self.config = self.dir / "sensor.toml"
        self.config.write_text("")  # every key at its default, whatever /etc/loupe holds
        self.config.chmod(0o644)

    def up(self) -> None:
        ip = ["ip"]
        for ns in (self.ns_sensor, self.ns_peer):
            _run(*ip, "netns", "add", ns)
        _run(*ip, "link", "add", self.if_sensor, "netns", self.ns_sensor, "type", "veth",
             "peer", "name", self.if_peer, "netns", self.ns_peer)
        for ns, ifname, addr in ((self.ns_sensor, self.if_sensor, SERVER),
                                 (self.ns_peer, self.if_peer, CLIENT)):
            _run(*ip, "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            _run(*ip, "-n", ns, "link", "set", ifname, "up")
            _run(*ip, "-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        for ns in (self.ns_sensor, self.ns_peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)

    def in_ns(self, ns: str, *cmd: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{ns}", *cmd]


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def lab():
    for tool in ("setpriv", "nsenter", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing (util-linux, iproute2)")
    # The unprivileged sensor runs this checkout with this venv: both must be readable by
    # other users (a checkout under a 0700 home directory is not).
    probe = subprocess.run([*_setpriv(()), "--", "env", f"PYTHONPATH={REPO}", sys.executable,
                            "-P", "-c", "import sensor.cli"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot import sensor.cli from {REPO} with {sys.executable}: "
                    "a parent directory is not readable by other users")
    box = Lab()
    try:
        box.up()
        yield box
    finally:
        box.down()


def _setpriv(caps: tuple[str, ...]) -> list[str]:
    granted = "".join(f",+{cap}" for cap in caps)
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--init-groups",
            f"--inh-caps=-all{granted}", f"--ambient-caps=-all{granted}",
            f"--bounding-set=-all{granted}"]


def _sensor_cmd(lab: Lab, caps: tuple[str, ...] | None, *extra: str) -> list[str]:
    """caps None: as root (the reference run); else as nobody with exactly `caps`."""
    drop = [] if caps is None else [*_setpriv(caps), "--"]
    # The repository's code with this venv's Python, as install-service.sh --venv runs it.
    return lab.in_ns(lab.ns_sensor, *drop, "env", f"PYTHONPATH={REPO}", sys.executable, "-P",
                     "-m", "sensor.cli", "sensor", "run", "--config", str(lab.config),
                     "--iface", lab.if_sensor, "--collector", "", "--metrics", "",
                     "--output", "jsonl", "--set", "timeouts.tcp_linger=1s", *extra)


class Sensor:
    """A running `loupe sensor run --output jsonl`: its records as they arrive."""

    def __init__(self, lab: Lab, cmd: list[str]) -> None:
        self.stderr_path = lab.dir / "sensor.err"
        self.stderr_file = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr_file,
                                     stdin=subprocess.DEVNULL)
        self.records: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.records.append(json.loads(line))

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_attached(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if "attached to" in self.stderr:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the sensor exited {self.proc.returncode}:\n{self.stderr}")
            time.sleep(0.2)
        raise AssertionError(f"the sensor did not attach in {START_TIMEOUT_S}s:\n{self.stderr}")

    def wait_for(self, predicate, what: str) -> dict:
        deadline = time.monotonic() + RECORD_TIMEOUT_S
        while time.monotonic() < deadline:
            for record in list(self.records):
                if predicate(record):
                    return record
            time.sleep(0.2)
        raise AssertionError(f"no {what} in {len(self.records)} records:\n{self.stderr}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        self.stderr_file.close()
        return self.proc.returncode


def _exchange(lab: Lab, mode: str) -> int:
    """One HTTP request from the peer namespace; returns the client's pid (nsenter execs
    the program in place, so it is the pid the kernel saw connect)."""
    server = subprocess.Popen(lab.in_ns(lab.ns_sensor, "python3", "-c", SERVE_ONCE))
    try:
        time.sleep(0.5)     # listening (a refused connection would be a different flow)
        client = subprocess.Popen(lab.in_ns(lab.ns_peer, "python3", "-c", CLIENT_CODE, mode),
                                  stderr=subprocess.PIPE)
        _, err = client.communicate(timeout=30)
        assert client.returncode == 0, err
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    return client.pid


def _caps_of(pid: int) -> tuple[int, int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    bnd = int(re.search(r"^CapBnd:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    uid = int(re.search(r"^Uid:\s*(\d+)", status, re.M).group(1))
    return eff, bnd, uid


def _credentials(pid: int) -> dict[str, object]:
    """Every uid and gid of the process, its groups, and its capability sets."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    out: dict[str, object] = {name: int(status[name], 16)
                              for name in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd")}
    out["uids"] = set(map(int, status["Uid"].split()))
    out["gids"] = set(map(int, status["Gid"].split()))
    out["groups"] = set(map(int, status["Groups"].split()))
    return out


THREE = (1 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_PERFMON)


def _is_http_flow(record: dict) -> bool:
    return (record["type"] == "flow" and record["dst_addr"] == SERVER
            and record["dst_port"] == 80 and record["src_addr"] == CLIENT)


def test_full_sensor_as_nobody_with_three_capabilities(lab):
    # Started as nobody, the sensor cannot read tracefs (0700 root): process attribution
    # is off, said in one line with what to do, and the rest runs.
    sensor = Sensor(lab, _sensor_cmd(lab, CAPS))
    try:
        sensor.wait_attached()
        eff, bnd, uid = _caps_of(sensor.proc.pid)
        assert (eff, bnd, uid) == (THREE, THREE, 65534)
        off = [line for line in sensor.stderr.splitlines() if "process attribution" in line]
        assert len(off) == 1, sensor.stderr
        assert "process attribution off: tracefs (/sys/kernel/tracing) is readable by root " \
               "only" in off[0] and "--user" in off[0], off[0]
        assert _meter_hooks(lab) == ["ingress", "egress"]
        _exchange(lab, "wait")
        http = sensor.wait_for(lambda r: r["type"] == "http" and r["detail"]["host"] == "lp.test",
                               "HTTP event for lp.test")
        assert (http["detail"]["method"], http["detail"]["path"], http["detail"]["status"]) == (
            "GET", "/least", 200)
        flow = sensor.wait_for(_is_http_flow, "flow to port 80")
        assert flow["initiator_packets"] >= 3 and flow["responder_octets"] > 0
        assert flow["l7_coverage"]["inspected"] is True
    finally:
        code = sensor.stop()
    # SIGTERM: detached and flushed, as nobody (detaching needs CAP_NET_ADMIN too).
    assert code == 0, sensor.stderr
    assert "Traceback" not in sensor.stderr
    assert sensor.stderr.splitlines()[-1].startswith("loupe sensor: ")
    assert _meter_hooks(lab) == []


def _meter_hooks(lab: Lab) -> list[str]:
    """The hooks of the sensor's interface running the flow meter (tcx or clsact)."""
    from tests.kernel.conftest import meter_hooks

    return meter_hooks(lab.ns_sensor, lab.if_sensor)


@pytest.mark.parametrize("drop", [
    pytest.param(False, id="root-reference"),
    pytest.param(True, id="root-then-nobody"),
])
def test_short_lived_process_is_attributed(lab, drop):
    # The root run proves the check itself; `--user nobody` is what the unit does: the
    # tracepoint is attached as root, then the sensor runs as nobody with three
    # capabilities and attribution keeps working.
    sensor = Sensor(lab, _sensor_cmd(lab, None, *(("--user", "nobody") if drop else ())))
    try:
        sensor.wait_attached()
        if drop:
            creds = _credentials(sensor.proc.pid)
            assert creds == {"CapEff": THREE, "CapPrm": THREE, "CapInh": 0, "CapAmb": 0,
                             "CapBnd": THREE, "uids": {65534}, "gids": {65534},
                             "groups": {65534}}, sensor.stderr
        # The client exits right after sending: it is gone before its flow is exported.
        pid = _exchange(lab, "exit")
        flow = sensor.wait_for(_is_http_flow, "flow to port 80")
        http = sensor.wait_for(lambda r: r["type"] == "http" and r["detail"]["host"] == "lp.test",
                               "HTTP event for lp.test")
        assert http["detail"]["path"] == "/least"
    finally:
        code = sensor.stop()
    assert flow["process"] is not None, sensor.stderr
    assert (flow["process"]["pid"], flow["process"]["comm"]) == (pid, "lpclient")
    assert flow["process"]["user"] == "root"
    # SIGTERM as nobody: detached (CAP_NET_ADMIN kept), clean exit, no traceback.
    assert code == 0, sensor.stderr
    assert "Traceback" not in sensor.stderr and "process attribution off" not in sensor.stderr
    assert _meter_hooks(lab) == []


def test_user_needs_root(lab):
    # Started as nobody already, --user root cannot gain anything: one line, no attach.
    result = subprocess.run(_sensor_cmd(lab, CAPS, "--user", "root"), capture_output=True,
                            text=True, timeout=START_TIMEOUT_S)
    assert result.returncode != 0
    assert result.stderr.splitlines()[-1] == (
        "loupe: error: --user root needs the sensor started as root: it attaches as root, "
        "then becomes that user"), result.stderr
    assert "Traceback" not in result.stderr
    assert _meter_hooks(lab) == []


@pytest.mark.parametrize(("caps", "missing"), [
    pytest.param((), "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN", id="none"),
    pytest.param(("net_admin", "perfmon"), "CAP_BPF", id="no-bpf"),
    pytest.param(("bpf", "perfmon"), "CAP_NET_ADMIN", id="no-net_admin"),
    pytest.param(("bpf", "net_admin"), "CAP_PERFMON", id="no-perfmon"),
])
def test_without_the_capabilities_it_fails_in_one_line(lab, caps, missing):
    result = subprocess.run(_sensor_cmd(lab, caps, "--no-process"), capture_output=True,
                            text=True, timeout=START_TIMEOUT_S)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        "loupe: error: loading the flow meter needs root, or CAP_BPF, CAP_PERFMON and "
        f"CAP_NET_ADMIN; missing: {missing}: run it with sudo (or grant those capabilities "
        "to the service)"]
