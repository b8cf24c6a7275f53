"""scripts/run.sh (`make run`) when its collector cannot start: one line, a non-zero exit,
and no sensor exporting to whatever holds the port (issue 11, bug 3). Both ways a start
fails: the port is taken (before it binds), and the store is locked by another collector
(after it bound the port: listening is not yet serving)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from tests.conftest import REPO
from tests.export.collector_proc import CollectorProcess, free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="scripts/run.sh needs root")


def _run(env: dict[str, str]) -> tuple[int, list[str]]:
    """run.sh's status and its non-empty output lines; a run that carries on fails."""
    proc = subprocess.Popen(["scripts/run.sh"], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)   # the old script ran on, sensor and all
        proc.communicate(timeout=60)
        pytest.fail("run.sh carried on without a collector of its own")
    return proc.returncode, [line for line in out.splitlines() if line.strip()]


def test_collector_port_in_use_stops_with_one_line(tmp_path):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(8)
    port = squatter.getsockname()[1]
    try:
        code, lines = _run({"COLLECTOR": f"127.0.0.1:{port}", "METRICS": "",
                            "LOUPE_DATA_DIR": str(tmp_path / "data"), "IFACE": "lo"})
    finally:
        squatter.setblocking(False)
        try:
            conn, _ = squatter.accept()
        except BlockingIOError:
            conn = None
        squatter.close()
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("run.sh: the collector did not start: ")
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
    assert "COLLECTOR=" in lines[0]        # what to do, in make run's terms
    assert conn is None, "something connected to the port's other owner"


def test_collector_store_locked_stops_with_one_line(tmp_path):
    data = tmp_path / "data"
    other = CollectorProcess(data).start()   # holds data/loupe.duckdb
    try:
        code, lines = _run({"COLLECTOR": f"127.0.0.1:{free_port()}", "METRICS": "",
                            "LOUPE_DATA_DIR": str(data), "IFACE": "lo"})
    finally:
        other.stop()
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("run.sh: the collector did not start: ")
    assert "locked" in lines[0] and "LOUPE_DATA_DIR=" in lines[0]
