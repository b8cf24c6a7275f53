"""A capture cut short (a download or copy that stopped) keeps every complete packet before
the cut, and says so: one line naming the file, "input truncated" in the summary, exit
status 3. For gzip the reference is the decompressed prefix of the cut file, written out
as a plain capture and read by path: every packet complete in it must come out."""

from __future__ import annotations

import gzip
import io
import random
import subprocess
import zlib

import pytest

from sensor.replay import reader as reader_module
from sensor.replay.reader import CaptureReader
from tests.conftest import REPO
from tests.fixtures.gen_mixed import generate
from tests.replay.convert import to_pcapng

LOUPE = str(REPO / ".venv" / "bin" / "loupe")
EXIT_TRUNCATED = 3


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A 4000-packet mixed capture (about 2.4 MB gzipped: more than two of the reader's
    1 MiB reads, where the loss used to hide), plain and gzipped, pcap and pcapng."""
    base = tmp_path_factory.mktemp("mixed")
    plain = base / "mixed.pcap"
    generate(str(plain), 4000, seed=7)
    data = plain.read_bytes()
    return {"pcap": data, "pcapng": to_pcapng(data)}


def _packets(path) -> list[tuple[int, bytes]]:
    with CaptureReader(path) as reader:
        return [(p[0], p[3]) for p in reader]


def _cuts(size: int) -> list[int]:
    # 3000 bytes (the case), inside the stream, and inside the 8-byte trailer
    # (every packet there, the end marker missing).
    return [3000, size * 2 // 5, size * 4 // 5, size - 4]


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_cut_gzip_keeps_every_complete_packet(tmp_path, mixed, fmt):
    gz = gzip.compress(mixed[fmt], 6)
    total = len(_packets_of(tmp_path, mixed[fmt]))
    for cut in _cuts(len(gz)):
        prefix = gz[:cut]
        cut_file = tmp_path / f"cut.{fmt}.gz"
        cut_file.write_bytes(prefix)
        plain = tmp_path / f"prefix.{fmt}"
        plain.write_bytes(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(prefix))
        expected = _packets(plain)
        with CaptureReader(cut_file) as reader:
            got = [(p[0], p[3]) for p in reader]
            assert reader.stats.cut_short == "the gzip stream ends before its end marker"
            assert reader.stats.packets == len(got)
            line = reader.stats.truncation()
        assert got == expected, f"cut at {cut} of {len(gz)}"
        assert expected, "every cut holds complete packets"
        assert f"its {len(got)} complete packets" in line and str(cut_file) in line
    assert len(got) == total   # the cut inside the trailer loses no packet


def _packets_of(tmp_path, data: bytes):
    path = tmp_path / "whole"
    path.write_bytes(data)
    return _packets(path)


def test_damaged_gzip_keeps_what_came_before(tmp_path, mixed):
    gz = bytearray(gzip.compress(mixed["pcap"], 6))
    mid = len(gz) // 2
    gz[mid:mid + 64] = bytes(64)   # zeroed deflate data: an error, or garbage, from here
    path = tmp_path / "damaged.pcap.gz"
    path.write_bytes(bytes(gz))
    with CaptureReader(path) as reader:
        got = list(reader)
        assert reader.stats.cut_short.startswith(("damaged gzip data", "the gzip stream"))
    assert len(got) > 1000


def _replay(*args, **kw):
    return subprocess.run([LOUPE, "replay", "--no-progress", "--no-l7", *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=REPO, **kw)


def _lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return stderr.strip().splitlines()


@pytest.mark.parametrize("name", ["pcap.gz", "pcapng.gz", "pcap", "pcapng"])
def test_cli_says_truncated_in_one_line_and_exits_3(tmp_path, mixed, name):
    fmt = name.split(".")[0]
    data = mixed[fmt]
    whole = gzip.compress(data, 6) if name.endswith(".gz") else data
    cut_file = tmp_path / f"cut.{name}"
    cut_file.write_bytes(whole[:len(whole) * 4 // 5])
    if name.endswith(".gz"):
        prefix = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(whole[:len(whole) * 4 // 5])
    else:
        prefix = whole[:len(whole) * 4 // 5]
    plain = tmp_path / f"prefix.{fmt}"
    plain.write_bytes(prefix)
    n = len(_packets(plain))

    res = _replay(cut_file, "-o", tmp_path / "out.jsonl")
    assert res.returncode == EXIT_TRUNCATED, res.stderr
    summary, *rest = _lines(res.stderr)
    assert summary.startswith(f"loupe replay: {n} packets, ")
    assert summary.endswith("; input truncated (1 file)")
    (line,) = [text for text in rest if "truncated" in text]
    assert line.startswith(f"loupe replay: {cut_file} is truncated (")
    assert f"its {n} complete packets before the cut were replayed" in line
    # The same records as the prefix replayed as a plain capture.
    _replay(plain, "-o", tmp_path / "ref.jsonl")
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_cut_gzip_through_a_pipe_names_stdin(tmp_path, mixed):
    gz = gzip.compress(mixed["pcap"], 6)
    res = _replay("-", stdin=_pipe_of(tmp_path, gz[:3000]))
    assert res.returncode == EXIT_TRUNCATED, res.stderr
    (line,) = [text for text in _lines(res.stderr) if " is truncated " in text]
    assert line.startswith("loupe replay: stdin is truncated (the gzip stream ends")


def _pipe_of(tmp_path, data: bytes):
    """A pipe's read end fed by `cat` (so the replay's stdin is not seekable)."""
    src = tmp_path / "head.bin"
    src.write_bytes(data)
    cat = subprocess.Popen(["cat", str(src)], stdout=subprocess.PIPE)
    cat.wait(10)
    return cat.stdout


def test_whole_capture_exits_0_without_a_truncation_line(tmp_path, mixed):
    path = tmp_path / "whole.pcap.gz"
    path.write_bytes(gzip.compress(mixed["pcap"], 6))
    res = _replay(path, "-o", tmp_path / "out.jsonl")
    assert res.returncode == 0, res.stderr
    (summary,) = _lines(res.stderr)
    assert "truncated" not in summary and summary.endswith("nothing lost")


def test_concatenated_gzip_members_read_as_one_stream(tmp_path, mixed):
    """`cat a.gz b.gz` (and zero padding after the last member) is one capture, as for
    gzip -d; a cut in the second member keeps the first member's packets and more."""
    data = mixed["pcap"]
    half = len(data) // 2 + 7          # the split falls inside a record
    joined = gzip.compress(data[:half]) + gzip.compress(data[half:]) + bytes(512)
    path = tmp_path / "joined.pcap.gz"
    path.write_bytes(joined)
    plain = tmp_path / "plain.pcap"
    plain.write_bytes(data)
    with CaptureReader(path) as reader:
        got = [(p[0], p[3]) for p in reader]
        assert not reader.stats.cut_short
    assert got == _packets(plain)
    path.write_bytes(joined[:len(joined) - 600])   # into the second member
    with CaptureReader(path) as reader:
        assert len(list(reader)) > len(got) // 2
        assert reader.stats.cut_short == "the gzip stream ends before its end marker"


@pytest.mark.parametrize("read_size", [777, 4096, 1 << 20])
def test_cut_gzip_yields_exactly_the_decompressed_prefix(monkeypatch, mixed, read_size):
    """Byte level, over many cut points: what the reader's input layer hands out is what
    zlib makes of the whole prefix at once. Small reads and a small CHUNK put the cut
    everywhere relative to the bounded decompress calls; repeated data gives long
    matches, whose output a bounded call can hold back with all its input consumed."""
    monkeypatch.setattr(reader_module, "CHUNK", 4096)
    data = mixed["pcap"][:600_000]
    gz = gzip.compress(data + data[:300_000], 9)
    rng = random.Random(1)
    cuts = sorted(rng.sample(range(100, len(gz)), 300)) + [len(gz) - 9, len(gz) - 1]
    for cut in cuts + [len(gz)]:
        prefix = gz[:cut]
        source = reader_module._Input(io.BytesIO(prefix))
        got = b"".join(iter(lambda: source.read(read_size), b""))
        assert got == zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(prefix), cut
        assert bool(source.cut) == (cut < len(gz)), cut
