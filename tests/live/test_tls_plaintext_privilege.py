"""TLS plaintext under least privilege, as loupe-sensor.service runs it: started as root
with `--user nobody --tls-plaintext`, the sensor loads and attaches as root, then runs as
nobody with the flow meter's three capabilities plus exactly CAP_DAC_READ_SEARCH and
CAP_SYS_PTRACE (sensor/kernel/tlsprobe.py RUNTIME_CAPS says why), and still finds the
socket of a root-owned server's TLS objects through its /proc/PID/fd (selection by
process name: nginx only, whose sockets are accept()ed, so /proc is the only way)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sensor.export import jsonfmt
from sensor.model import L7Event
from tests.conftest import REPO
from tests.live.rig import LOUPE, stop, wait_tcp
from tests.live.tls_peers import nginx
from tests.netns import VethPair

pytestmark = [pytest.mark.bpf, pytest.mark.timeout(240)]

CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE = 2, 19
CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF = 12, 38, 39
TOKEN = f"tq{os.getpid()}"
EXPECTED = sum(1 << c for c in (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_DAC_READ_SEARCH,
                                CAP_SYS_PTRACE))


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(re.findall(r"^(\w+):\s*(.*)$", text, re.M))


def test_server_side_plaintext_as_nobody(tmp_path):
    tmp_path.chmod(0o755)   # the spool's parent, for nobody
    with VethPair.create("tq") as pair:
        pair.wait_ready()
        srv = nginx(pair.b, tmp_path)
        # --user runs the sensor inside the namespace (nsenter keeps the host's /sys and
        # tracefs, as the unit sees them); records come out on stdout.
        out, err = open(tmp_path / "sensor.out", "w+"), open(tmp_path / "sensor.err", "w+")
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{pair.a.netns}", *LOUPE, "sensor", "run",
             "--iface", pair.a.iface, "--collector", "", "--output", "-", "--metrics", "",
             "--spool-dir", str(tmp_path / "spool"), "--sensor-id", "tlspriv",
             "--interval", "0.5", "--user", "nobody", "--tls-plaintext",
             "--set", "tls_plaintext.processes=nginx"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=err,
            text=True)
        try:
            wait_tcp(pair.a, pair.b.ip4, 443)
            deadline = time.monotonic() + 120
            while "attached to" not in Path(err.name).read_text():
                assert proc.poll() is None and time.monotonic() < deadline, \
                    Path(err.name).read_text()
                time.sleep(0.2)
            time.sleep(0.5)   # the drop to nobody follows the attach
            st = _status(proc.pid)
            assert int(st["CapEff"], 16) == EXPECTED and int(st["CapPrm"], 16) == EXPECTED
            assert set(st["Uid"].split()) == {"65534"}
            pair.a.run("curl", "-sk", "--http1.1", "-o", "/dev/null",
                       f"https://{pair.b.ip4}/a.txt?{TOKEN}", "--next", "-sk", "--http1.1",
                       "-o", "/dev/null", f"https://{pair.b.ip4}/nope?{TOKEN}", timeout=30)
            time.sleep(2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, Path(err.name).read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stop(srv)
    stderr = Path(err.name).read_text()
    events = [jsonfmt.from_dict(json.loads(line)) for line in
              Path(out.name).read_text().splitlines() if line.startswith("{")]
    # The probes see every nginx on the host: ours are the requests with our token.
    events = [e for e in events if isinstance(e, L7Event) and e.source == "tls_plaintext"
              and e.detail.path.endswith(TOKEN)]
    assert [(e.detail.path, e.detail.status) for e in events] == [
        (f"/a.txt?{TOKEN}", 200), (f"/nope?{TOKEN}", 404)], stderr
    assert "Traceback" not in stderr
    # The log says what was kept, the two plaintext capabilities by name.
    assert ("running as nobody (uid 65534) with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, "
            "CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE only") in stderr, stderr
