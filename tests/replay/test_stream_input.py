"""`loupe replay` reading inputs that can be read only once: `-` (stdin fed by a pipe),
/dev/stdin, a FIFO and a process substitution, for classic pcap, pcapng and gzip. Each
run is a real `.venv/bin/loupe` process, and its records must be byte for byte those of
the same capture replayed by path."""

from __future__ import annotations

import gzip
import os
import subprocess
import threading

import pytest

from sensor.replay.reader import CaptureReader
from tests.conftest import REPO
from tests.replay.convert import to_pcapng

LOUPE = str(REPO / ".venv" / "bin" / "loupe")
GOLDEN = REPO / "tests" / "golden"


# (name, capture bytes): one golden capture per format, each with L7 records.
def _inputs():
    http = (GOLDEN / "curl-http.pcap").read_bytes()
    dns = (GOLDEN / "dig-dnsmasq.pcap").read_bytes()
    tls = (GOLDEN / "openssl-tls13.pcap").read_bytes()
    return {"pcap": http, "pcapng": to_pcapng(dns), "pcap.gz": gzip.compress(tls),
            "pcapng.gz": gzip.compress(to_pcapng(http))}


INPUTS = _inputs()


def _run(args, **kw):
    return subprocess.run([LOUPE, "replay", "--no-progress", *args], capture_output=True,
                          timeout=60, cwd=REPO, **kw)


@pytest.fixture(scope="module")
def by_path(tmp_path_factory):
    """name -> (file, stdout of the replay by path)."""
    out = {}
    base = tmp_path_factory.mktemp("captures")
    for name, data in INPUTS.items():
        path = base / f"capture.{name}"
        path.write_bytes(data)
        res = _run([str(path)])
        assert res.returncode == 0, res.stderr
        assert res.stdout.count(b"\n") >= 2   # a flow and its L7 event at least
        out[name] = (path, res.stdout)
    return out


def _feed_fifo(fifo, data: bytes) -> threading.Thread:
    def write():
        with open(fifo, "wb") as f:   # blocks until loupe opens the other end
            f.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("how", ["stdin-pipe", "dev-stdin-pipe", "fifo", "process-subst"])
def test_non_seekable_input_gives_the_records_of_the_file(tmp_path, by_path, name, how):
    path, expected = by_path[name]
    data = INPUTS[name]
    if how == "stdin-pipe":
        res = _run(["-"], input=data)            # subprocess feeds stdin through a pipe
    elif how == "dev-stdin-pipe":
        res = _run(["/dev/stdin"], input=data)
    elif how == "fifo":
        fifo = tmp_path / "capture.fifo"
        os.mkfifo(fifo)
        writer = _feed_fifo(fifo, data)
        res = _run([str(fifo)])
        writer.join(10)
    else:
        res = subprocess.run(["bash", "-c", f'"{LOUPE}" replay --no-progress <(cat "$1")',
                              "bash", str(path)], capture_output=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr.decode()
    assert b"Traceback" not in res.stderr
    assert res.stdout == expected
    summary = res.stderr.decode().strip().splitlines()[-1]
    assert summary.startswith("loupe replay: ") and "nothing lost" in summary


def test_stdin_with_several_jobs_is_refused_in_one_line():
    res = _run(["-", "--jobs", "2"], input=INPUTS["pcap"])
    assert res.returncode == 2
    (line,) = res.stderr.decode().strip().splitlines()
    assert line.startswith("loupe: error: --jobs 2") and "stdin" in line
    assert res.stdout == b""


def test_stdin_twice_is_refused_in_one_line():
    res = _run(["-", "-"], input=INPUTS["pcap"])
    assert res.returncode == 2
    (line,) = res.stderr.decode().strip().splitlines()
    assert "'-' (stdin) can be given only once" in line


def test_stdin_between_files_keeps_the_order(by_path):
    """A file, stdin, a file: one stream in the order given, as the three files."""
    pcap, _ = by_path["pcap"]
    gz, _ = by_path["pcap.gz"]
    want = _run([str(pcap), str(gz), str(pcap)])
    got = _run([str(pcap), "-", str(pcap)], input=INPUTS["pcap.gz"])
    assert got.returncode == 0, got.stderr.decode()
    assert got.stdout == want.stdout


def test_reader_on_a_pipe_reports_progress_without_a_size():
    r, w = os.pipe()
    data = INPUTS["pcapng.gz"]
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)), daemon=True)
    writer.start()
    seen = []
    with CaptureReader(f"/dev/fd/{r}") as reader:
        reader.on_read = lambda pos, size: seen.append((pos, size))
        packets = list(reader)
        assert reader.size == 0 and not reader.stats.cut_short
    os.close(r)
    writer.join(10)
    assert len(packets) == 24
    assert seen and {size for _, size in seen} == {0}
    assert seen[-1][0] == len(data)   # compressed bytes consumed


def test_progress_line_for_a_pipe_shows_packets_without_a_percentage():
    from io import StringIO

    from sensor.replay.cli import _Progress

    out = StringIO()
    _Progress(out, 1, lambda: 1234).update(5000, 0)
    assert out.getvalue() == "\rfile 0/1 1,234 packets "


def test_python_api_reads_stdin_once():
    # replay() checks every input before it runs: for "-" that check must keep the reader
    # it opened, or it reads stdin's first bytes and the run sees a cut stream.
    script = ("import sys, orjson\n"
              "from sensor.replay import replay_records\n"
              "for r in replay_records(['-']): sys.stdout.buffer.write(orjson.dumps(r) + b'\\n')\n")
    capture = REPO / "tests" / "golden" / "curl-http.pcap"
    with capture.open("rb") as stdin:
        res = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", script],
                             stdin=stdin, capture_output=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr.decode()
    by_file = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c",
                              script.replace("['-']", repr([str(capture)]))],
                             capture_output=True, cwd=REPO, timeout=60)
    assert res.stdout == by_file.stdout
    assert res.stdout.count(b"\n") == 4   # 2 flows, 2 HTTP events
