"""The capture reader on files built byte by byte: every format variant, every link type,
bad input counted and skipped, non-captures refused with one line."""

from __future__ import annotations

import gzip
import struct

import pytest

from sensor.errors import CaptureFileError
from sensor.flow.packet import SUPPORTED_LINKTYPES
from sensor.replay.reader import CaptureReader, read_packets
from tests.fixtures import capture_files as cf
from tests.fixtures import packets as pk
from tests.replay.metering import meter_file

T0 = 1_700_000_000_123_456_789  # ns; the µs formats keep 1_700_000_000_123_456_000


def _frames(n=3):
    return [pk.udp4("198.18.0.1", 1000 + i, "198.18.0.2", 53, b"q" * i) for i in range(n)]


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("ns", [False, True])
def test_classic_pcap_both_resolutions_and_byte_orders(tmp_path, byteorder, ns):
    frames = _frames()
    recs = [(T0 + i * 1_000_000_007, f) for i, f in enumerate(frames)]
    # Named .pcapng on purpose: detection is by magic, never by extension.
    path = _write(tmp_path, "x.pcapng", cf.pcap(recs, ns=ns, byteorder=byteorder))
    with CaptureReader(path) as r:
        got = list(r)
        assert r.format == "pcap"
    assert [p[3] for p in got] == frames
    for (ts, f), p in zip(recs, got):
        assert p[0] == (ts if ns else ts // 1000 * 1000)
        assert p[1:3] == (0, 1) and p[4] == len(f)


def test_pcapng_interfaces_with_own_link_type_and_resolution(tmp_path):
    raw = pk.ipv4("198.18.0.1", "198.18.0.2", 17, pk.udp(1, 2, b"x"))
    eth = pk.ether(raw)
    data = (cf.shb() + cf.idb(1) + cf.idb(101, tsresol=9) + cf.idb(228, tsresol=0x80 | 20)
            + cf.custom_block()
            + cf.epb(0, T0 // 1000, eth)                      # default: µs
            + cf.epb(1, T0, raw)                              # 10^-9
            + cf.epb(2, (T0 << 20) // 1_000_000_000, raw))    # 2^-20 s
    path = _write(tmp_path, "x.pcap", data)   # misnamed on purpose
    with CaptureReader(path) as r:
        got = list(r)
        assert r.format == "pcapng"
        assert r.stats.unknown_blocks == 1
    assert [(p[1], p[2]) for p in got] == [(0, 1), (1, 101), (2, 228)]
    assert got[0][0] == T0 // 1000 * 1000
    assert got[1][0] == T0
    assert abs(got[2][0] - T0) < 1000  # 2^-20 s is ~954 ns
    assert all(isinstance(p[0], int) for p in got)


def test_pcapng_big_endian_sections_and_tsoffset(tmp_path):
    raw = pk.ipv4("198.18.0.1", "198.18.0.2", 17, pk.udp(1, 2, b"x"))
    data = (cf.shb(">") + cf.idb(101, tsoffset=10, bo=">") + cf.epb(0, 5, raw, bo=">")
            + cf.shb("<") + cf.idb(229) + cf.spb(pk.ipv6("fc00::1", "fc00::2", 17,
                                                         pk.udp(1, 2))))
    got = list(read_packets(_write(tmp_path, "be", data)))
    assert got[0][:3] == (10_000_000_000 + 5_000, 0, 101)
    # The second section's interface 0 is the file's interface 1; SPB has no time.
    assert got[1][:3] == (0, 1, 229)


def test_gzip_is_transparent(tmp_path):
    frames = _frames()
    data = cf.pcap([(T0, f) for f in frames])
    path = _write(tmp_path, "plain.pcap", gzip.compress(data))
    assert [p[3] for p in read_packets(path)] == frames


@pytest.mark.parametrize("linktype", sorted(SUPPORTED_LINKTYPES))
def test_every_link_type_reaches_a_flow(tmp_path, linktype):
    ip = pk.ipv4("198.18.0.1", "198.18.0.2", 6, pk.tcp(40000, 80, pk.SYN))
    if linktype == 1:
        frame = pk.ether(ip)
    elif linktype == 0:
        frame = struct.pack("<I", 2) + ip        # host byte order AF_INET
    elif linktype == 108:
        frame = struct.pack(">I", 2) + ip        # network byte order
    elif linktype == 113:
        frame = struct.pack("!HHH8sH", 0, 1, 6, b"\0" * 8, 0x0800) + ip
    elif linktype == 276:
        frame = struct.pack("!HHIHBB8s", 0x0800, 0, 1, 1, 0, 6, b"\0" * 8) + ip
    elif linktype == 104:
        frame = b"\x0f\x00\x08\x00" + ip            # Cisco HDLC, unicast, IPv4
    else:
        frame = ip
    path = _write(tmp_path, "l.pcap", cf.pcap([(T0, frame)], linktype=linktype))
    records, meter = meter_file(path)
    assert len(records) == 1, meter.stats
    r = records[0]
    assert (r.src_addr, r.src_port, r.dst_addr, r.dst_port) == ("198.18.0.1", 40000,
                                                                 "198.18.0.2", 80)
    assert r.initiator_l2_octets == len(frame) and r.initiator_octets == len(ip)


def test_corrupt_record_is_counted_and_reader_resyncs(tmp_path):
    frames = _frames(6)
    good = cf.pcap([(T0 + i, f) for i, f in enumerate(frames)])
    hdr, body = good[:24], bytearray(good[24:])
    # Record 2's captured length becomes absurd.
    off = sum(16 + len(f) for f in frames[:2])
    struct.pack_into("<I", body, off + 8, 0x7FFFFFFF)
    with CaptureReader(_write(tmp_path, "c.pcap", hdr + bytes(body))) as r:
        got = [p[3] for p in r]
        assert r.stats.corrupt_records == 1
        assert r.stats.skipped_bytes == 16 + len(frames[2])
    assert got == frames[:2] + frames[3:]


def test_truncated_last_record_is_counted(tmp_path):
    data = cf.pcap([(T0, f) for f in _frames(3)])
    with CaptureReader(_write(tmp_path, "t.pcap", data[:-5])) as r:
        assert len(list(r)) == 2
        assert r.stats.truncated_records == 1


def test_pcapng_corrupt_block_is_skipped(tmp_path):
    raw = pk.ipv4("198.18.0.1", "198.18.0.2", 17, pk.udp(1, 2, b"x"))
    bad = bytearray(cf.epb(0, 1, raw))
    struct.pack_into("<I", bad, len(bad) - 4, 999)   # trailing length disagrees
    data = cf.shb() + cf.idb(101) + cf.epb(0, 1, raw) + bytes(bad) + cf.epb(0, 2, raw)
    with CaptureReader(_write(tmp_path, "c.pcapng", data)) as r:
        assert len(list(r)) == 2
        assert r.stats.corrupt_records == 1
    cut = cf.shb() + cf.idb(101) + cf.epb(0, 1, raw) + cf.epb(0, 2, raw)[:-7]
    with CaptureReader(_write(tmp_path, "t.pcapng", cut)) as r:
        assert len(list(r)) == 1
        assert r.stats.truncated_records == 1


@pytest.mark.parametrize("content", [b"", b"GIF89a not a capture at all", b"\0" * 100,
                                     gzip.compress(b"hello world, no capture here")])
def test_non_capture_raises_one_line_error(tmp_path, content):
    path = _write(tmp_path, "bad.pcap", content)
    with pytest.raises(CaptureFileError) as exc:
        CaptureReader(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg


def test_missing_file_raises_capture_file_error(tmp_path):
    with pytest.raises(CaptureFileError, match="cannot open"):
        CaptureReader(tmp_path / "nope.pcap")


def test_every_corpus_file_reads(corpus):
    files = [p for p in corpus.rglob("*") if p.suffix in (".pcap", ".pcapng")]
    assert len(files) >= 50
    for path in files:
        with CaptureReader(path) as r:
            n = sum(1 for _ in r)
        assert n == r.stats.packets
        records, meter = meter_file(path)
        assert meter.stats.packets == n


@pytest.mark.parametrize("how", ["mapped", "gzip"])
def test_records_near_the_snap_length_across_refills_are_not_cut(tmp_path, how):
    # Records of ~64 KiB in a snaplen-65535 capture over several 1 MiB refills: the
    # reader's fast loop leaves less than one whole record in the buffer, and the next
    # record was once taken for a record cut short (replay stopped, "input truncated").
    sizes = [65_000 - 97 * i for i in range(40)]
    head = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65_535, 1)
    body = b"".join(struct.pack("<IIII", 1_700_000_000 + i, 0, n, n) + bytes([i]) * n
                    for i, n in enumerate(sizes))
    path = tmp_path / "big.pcap"
    data = head + body
    if how == "gzip":
        path = tmp_path / "big.pcap.gz"
        data = gzip.compress(data)
    path.write_bytes(data)
    with CaptureReader(path) as reader:
        got = [(len(frame), frame[:1]) for _, _, _, frame, _ in reader]
        assert reader.stats.truncated_records == 0
    assert got == [(n, bytes([i])) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("ns", [False, True])
def test_mapped_file_past_the_look_ahead_reads_every_record(tmp_path, ns):
    # More than a snap length of records: the reader's tight loop over the mapping runs
    # (compiled, on C integers for little-endian files), not only the general code.
    frames = [pk.udp4("198.18.0.1", 1000 + i % 50000, "198.18.0.2", 53, b"q" * (i % 300))
              for i in range(3000)]
    recs = [(T0 + i * 999_999_937, f) for i, f in enumerate(frames)]
    path = _write(tmp_path, "big.pcap", cf.pcap(recs, ns=ns, byteorder="<"))
    with CaptureReader(path) as r:
        got = list(r)
    assert [p[3] for p in got] == frames
    assert [p[0] for p in got] == [ts if ns else ts // 1000 * 1000 for ts, _ in recs]
    assert all(p[1:3] == (0, 1) and p[4] == len(p[3]) for p in got)
    assert r.stats.packets == 3000 and not r.stats.cut_short


def test_iteration_stopped_early_closes_cleanly(tmp_path):
    # The compiled reader holds a view of the mapped file while it iterates: closing the
    # reader in the middle of an iteration must release it (the mapping refuses to close
    # while a view exists).
    frames = [pk.udp4("198.18.0.1", 1000, "198.18.0.2", 53, b"q" * 200)] * 2000
    path = _write(tmp_path, "big.pcap", cf.pcap([(T0 + i, f) for i, f in enumerate(frames)]))
    with CaptureReader(path) as r:
        for n, _packet in enumerate(r):
            if n == 10:
                break
    assert list(read_packets(path))[1999][3] == frames[0]
