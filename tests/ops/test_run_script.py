"""scripts/run.sh (`make run`) when its collector cannot start: one line, a non-zero exit,
and no sensor exporting to whatever holds the port (issue 11, bug 3)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="scripts/run.sh needs root")


def test_collector_port_in_use_stops_with_one_line(tmp_path):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(8)
    port = squatter.getsockname()[1]
    env = {**os.environ, "COLLECTOR": f"127.0.0.1:{port}", "METRICS": "",
           "LOUPE_DATA_DIR": str(tmp_path / "data"), "IFACE": "lo"}
    proc = subprocess.Popen(["scripts/run.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)   # the old script ran on, sensor and all
        proc.communicate(timeout=60)
        pytest.fail("run.sh carried on with its collector's port taken")
    finally:
        squatter.setblocking(False)
        try:
            conn, _ = squatter.accept()
        except BlockingIOError:
            conn = None
        squatter.close()
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == 1
    assert len(lines) == 1, out
    assert lines[0].startswith("run.sh: the collector did not start: ")
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
    assert "COLLECTOR=" in lines[0]        # what to do, in make run's terms
    assert conn is None, "something connected to the port's other owner"
