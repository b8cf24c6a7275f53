"""`loupe replay --collector` when the collector is not there: it gives up after
--delivery-timeout with one line and exit status 1, removes the temporary spool it made,
and a --spool-dir keeps the undelivered batches (the line says how many and where) for a
later run, which delivers them to a real collector. Ctrl-C removes the temporary spool
too and exits 130 without a traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from tests.conftest import REPO
from tests.export.collector_proc import CollectorProcess, query, wait_for

LOUPE = str(REPO / ".venv" / "bin" / "loupe")
CAPTURE = REPO / "tests" / "golden" / "curl-http.pcap"   # 2 flows, 2 HTTP events


@pytest.fixture
def dead_address():
    """host:port of a port bound by this test but not listening: connections are
    refused, and nothing else can take the port meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def tmpdir_env(tmp_path):
    """An environment whose TMPDIR is empty and ours, to see what the run leaves there."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return tmp, {**os.environ, "TMPDIR": str(tmp)}


def _replay(*args, env=None, timeout=60):
    return subprocess.run([LOUPE, "replay", "--no-progress", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return stderr.strip().splitlines()


def test_no_collector_gives_up_in_one_line_and_removes_its_spool(dead_address, tmpdir_env):
    tmp, env = tmpdir_env
    res = _replay(CAPTURE, "--collector", dead_address, "--delivery-timeout", "1", env=env)
    assert res.returncode == 1
    summary, error = _lines(res.stderr)   # no reconnect warnings in between
    assert summary.startswith("loupe replay: 24 packets, 2 flows")
    assert error.startswith(f"loupe: error: the collector at {dead_address} did not "
                            "acknowledge 1 batches within --delivery-timeout 1 s")
    assert "UNAVAILABLE" in error and "the rest is dropped" in error
    assert list(tmp.iterdir()) == []     # the temporary spool is gone


def test_collector_that_never_answers_is_given_up_on_too(tmpdir_env):
    """A port that accepts connections and says nothing (a hung collector)."""
    tmp, env = tmpdir_env
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        address = f"127.0.0.1:{s.getsockname()[1]}"
        res = _replay(CAPTURE, "--collector", address, "--delivery-timeout", "1", env=env)
    assert res.returncode == 1
    _, error = _lines(res.stderr)
    assert error.startswith(f"loupe: error: the collector at {address} did not "
                            "acknowledge 1 batches within --delivery-timeout 1 s "
                            "(no answer in time); 0 records were delivered")
    assert list(tmp.iterdir()) == []


def test_spool_dir_keeps_what_was_not_delivered_for_the_next_run(tmp_path, dead_address):
    spool = tmp_path / "spool"
    res = _replay(CAPTURE, "--collector", dead_address, "--delivery-timeout", "1",
                  "--spool-dir", spool)
    assert res.returncode == 1
    _, error = _lines(res.stderr)
    assert error.endswith(f"the 1 batches stay in {spool} and go out with the next run "
                          f"given --spool-dir {spool}")
    assert any(p.name.startswith("seg-") for p in spool.iterdir())

    collector = CollectorProcess(tmp_path / "data").start()
    try:
        res = _replay(CAPTURE, "--collector", collector.address, "--spool-dir", spool,
                      "--sensor-id", "later")
        assert res.returncode == 0, res.stderr
        summary, delivered = _lines(res.stderr)
        # This run's 4 records (2 flows, 2 HTTP events) and the 4 left by the first.
        assert delivered == f"loupe replay: 8 records delivered to {collector.address}"
        rows = query(collector.address, "SELECT sensor_id, count(*) FROM flows "
                                        "GROUP BY sensor_id ORDER BY sensor_id")
        assert rows == [["later", 2], ["replay", 2]]
    finally:
        collector.stop()


def test_collector_present_delivers_and_exits_0(tmp_path, tmpdir_env):
    tmp, env = tmpdir_env
    collector = CollectorProcess(tmp_path / "data").start()
    try:
        res = _replay(CAPTURE, "--collector", collector.address, env=env)
        assert res.returncode == 0, res.stderr
        assert _lines(res.stderr)[-1] == \
            f"loupe replay: 4 records delivered to {collector.address}"
        assert query(collector.address, "SELECT count(*) FROM http") == [[2]]
    finally:
        collector.stop()
    assert list(tmp.iterdir()) == []


def _interrupt(args, env, spool_of) -> subprocess.CompletedProcess:
    """Start a replay to a dead collector, Ctrl-C it once its first batch is spooled
    (it is then waiting for delivery), and collect the result."""
    proc = subprocess.Popen([LOUPE, "replay", "--no-progress", *map(str, args)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for(lambda: any(p.name.startswith("seg-") for p in spool_of()), 20,
                 "the first spooled batch")
        proc.send_signal(signal.SIGINT)
        # Well below the 30 s default delivery timeout: Ctrl-C ends the wait.
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_ctrl_c_removes_the_temporary_spool_and_exits_130(dead_address, tmpdir_env):
    tmp, env = tmpdir_env

    def spool_files():
        return [f for d in tmp.iterdir() for f in d.iterdir()]

    res = _interrupt([CAPTURE, "--collector", dead_address], env, spool_files)
    assert res.returncode == 130
    assert "Traceback" not in res.stderr and "KeyboardInterrupt" not in res.stderr
    assert list(tmp.iterdir()) == []


def test_ctrl_c_with_spool_dir_says_what_stays(tmp_path, dead_address):
    spool = tmp_path / "spool"
    res = _interrupt([CAPTURE, "--collector", dead_address, "--spool-dir", spool], None,
                     lambda: list(spool.iterdir()) if spool.exists() else [])
    assert res.returncode == 130
    (line,) = _lines(res.stderr)
    assert line == (f"loupe replay: 1 batches not delivered to {dead_address} stay in "
                    f"{spool} and go out with the next run given --spool-dir {spool}")
