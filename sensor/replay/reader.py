"""Capture file reader: classic pcap, pcapng and gzip-compressed either, in our own code.

Strategy. An uncompressed classic pcap file is mapped into memory; anything else (gzip,
pcapng, and any input that can be read only once: stdin as "-", a pipe, a FIFO, a
process substitution) is read forward in large chunks (CHUNK bytes) into one bytes
buffer, never seeking. Records are cut out of the mapping
or the buffer with struct.unpack_from, so the per-packet cost is one header unpack, one
slice and one tuple. Each packet comes out as

    (ts_ns, interface, link_type, frame, wire_len)

ts_ns is integer Unix epoch nanoseconds (pcapng timestamps are converted with integer
arithmetic from each interface's if_tsresol, never through a float); interface is 0 for
classic pcap and, for pcapng, the interface's position counted across all sections of the
file; frame is the captured bytes; wire_len the original length on the wire.

The format is detected from the magic bytes, never from the file name: capture files are
routinely misnamed (.pcapng files that are classic pcap and the other way round).

Bad input. A record whose header cannot be right (captured length beyond any snap length,
a pcapng block whose two length fields disagree) is counted in `stats` and skipped; the
reader then resynchronises by scanning forward for the next plausible record, so one
corrupt record does not lose the rest of the file. A record cut short by the end of the
file is counted as truncated. An input that ends before its capture does (a record cut
short, a gzip stream cut short or damaged) keeps every complete packet before the cut and
says why in stats.cut_short. A file that is not a capture at all, or cannot be opened,
raises CaptureFileError with one line saying what to do.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

import cython

from sensor.errors import CaptureFileError
from sensor.flow.packet import Packet

# Read size: large enough that the per-read overhead vanishes against the per-packet
# work, small enough to keep memory flat on multi-GB captures. Not larger: each refill
# joins the rest of the buffer with the new chunk, and above about 1 MiB every such
# allocation comes fresh from the kernel (page faults for each 4 KiB page), which made
# 4 MiB chunks cost 0.6 s of CPU per 769 MiB read against 0.04 s for 1 MiB. It still
# holds several records of the largest size (MAX_RECORD, MAX_BLOCK).
CHUNK = 1 << 20

# No real link layer produces frames above 256 KiB (libpcap's MAXIMUM_SNAPLEN); a record
# that claims more is corrupt. It also bounds the buffer the reader may need to hold.
MAX_RECORD = 262_144

# How far the reader scans for the next plausible record after a corrupt one before it
# gives up on the rest of the file: a corrupt region longer than this is not a capture
# any more, and scanning further would only invent packets out of noise.
MAX_RESYNC = 16 << 20

# A pcapng block carries one record plus its headers and options; options beyond 64 KiB
# (a comment longer than any tool writes) mark the block as corrupt.
MAX_BLOCK = MAX_RECORD + 65_536

# Records carry Unix epoch ns in an unsigned 64-bit field (sensor/model.py).
_TS_MAX = (1 << 64) - 1

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D

_BT_IDB = 0x00000001
_BT_OPB = 0x00000002  # obsolete Packet Block
_BT_SPB = 0x00000003
_BT_EPB = 0x00000006

# Interfaces one pcapng file may define. Far above any real capture (a host with every
# interface of a large router); bounds the per-file interface table.
MAX_INTERFACES = 65_536


@dataclass(slots=True)
class ReaderStats:
    """What the reader saw and what it had to drop; every skipped byte is accounted."""

    packets: int = 0
    corrupt_records: int = 0      # records or blocks with impossible headers, skipped
    truncated_records: int = 0    # a record cut short by the end of the file
    skipped_bytes: int = 0        # bytes passed over while resynchronising
    unknown_blocks: int = 0       # pcapng blocks of types we do not need (skipped by design)
    bad_interface: int = 0        # pcapng packets naming an interface never described
    link_types: dict[int, int] = field(default_factory=dict)  # link type -> interfaces
    source: str = ""              # the file's name, "stdin" for "-"
    # Why the input ended before the capture did ("" if it did not): a gzip stream cut
    # short or damaged, a read error, the last record cut short.
    cut_short: str = ""

    def truncation(self) -> str:
        """One line saying that this input is truncated and what was kept ("" if not)."""
        if not self.cut_short:
            return ""
        return (f"{self.source} is truncated ({self.cut_short}): its {self.packets} "
                "complete packets before the cut were replayed, the rest of the capture "
                "is missing")


@dataclass(frozen=True, slots=True)
class Interface:
    link_type: int
    snaplen: int
    # Timestamp conversion to ns: ns = ts * mul // div + offset_ns (integers only).
    mul: int
    div: int
    offset_ns: int


STDIN = "-"


class _Input:
    """The bytes of one capture, read forward only: a regular file, or a pipe, a FIFO,
    stdin or a process substitution, any of them gzip-compressed. It never seeks, so
    non-seekable inputs work; the magic is sniffed by reading it and handing it out again.

    gzip goes through zlib.decompressobj a bounded piece at a time (not gzip.GzipFile),
    so a stream cut short keeps every byte decompressed before the cut: GzipFile raises
    EOFError at the cut and drops the whole read it was filling (a 1 MiB read lost
    hundreds of packets; 3000 bytes of a .pcap.gz gave none). Concatenated gzip members
    (`cat a.gz b.gz`) read as one stream, as gzip(1) does.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.consumed = 0      # bytes taken from raw (compressed bytes for gzip)
        # Why the input ended before its end ("" while it did not): a gzip stream cut
        # short or damaged, a read error. The reader adds a record cut short itself.
        self.cut = ""
        self._head = self._raw_read(2)
        self.gzip = self._head == b"\x1f\x8b"
        self._z = None          # decompressor of the current gzip member
        self._zin = b""         # compressed bytes not yet given to it
        if self.gzip:
            self._zin, self._head = self._head, b""

    def _raw_read(self, n: int) -> bytes:
        try:
            data = self.raw.read(n)
        except OSError as exc:
            self.cut = f"read error: {exc.strerror or exc}"
            return b""
        self.consumed += len(data)
        return data

    def read(self, n: int) -> bytes:
        """Up to n bytes; fewer only at the end of the input."""
        if self.gzip:
            return self._inflate(n)
        head, self._head = self._head, b""
        if len(head) >= n:
            head, self._head = head[:n], head[n:]
            return head
        return head + self._raw_read(n - len(head))

    def _inflate(self, n: int) -> bytes:
        parts: list[bytes] = []
        have = 0
        while have < n and not self.cut:
            at_end = False
            if not self._zin:
                self._zin = self._raw_read(CHUNK)
                at_end = not self._zin
            if self._z is None:
                if at_end:
                    break
                if not self._zin.strip(b"\0"):
                    self._zin = b""   # zero padding after the last member, as gzip(1)
                    continue
                self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                # max_length bounds what one call makes: memory stays flat however well
                # the data compresses. At the end of the input the call still runs, on
                # no bytes: a call cut off by max_length may hold output (part of a long
                # match) with all its input consumed, and the packets in it count.
                piece = self._z.decompress(self._zin, n - have)
            except zlib.error as exc:
                self.cut = f"damaged gzip data ({exc})"
                break
            if self._z.eof:
                self._zin, self._z = self._z.unused_data, None
            else:
                self._zin = self._z.unconsumed_tail
            if piece:
                parts.append(piece)
                have += len(piece)
            elif at_end and self._z is not None:
                if not self.cut:
                    self.cut = "the gzip stream ends before its end marker"
                break
        return b"".join(parts)

    def close(self) -> None:
        self.raw.close()


def _open(path: str | os.PathLike[str]) -> _Input:
    name = os.fspath(path)
    try:
        if name == STDIN:
            # A second handle on fd 0: closing the reader leaves sys.stdin alone.
            raw = open(0, "rb", closefd=False)  # noqa: SIM115 -- closed by close()
        else:
            raw = open(path, "rb")  # noqa: SIM115 -- closed by the caller's finally
    except OSError as exc:
        raise CaptureFileError(
            f"cannot open capture file {name!r}: {exc.strerror or exc}; "
            "check the path and its permissions"
        ) from None
    return _Input(raw)


def is_stream(path: str | os.PathLike[str]) -> bool:
    """True for inputs that can be read only once: stdin ("-"), a pipe, a FIFO, a socket,
    a character device, a process substitution (/dev/fd/N)."""
    name = os.fspath(path)
    if name == STDIN:
        return True
    try:
        return not stat.S_ISREG(os.stat(name).st_mode)
    except OSError:
        return False   # missing: opening it says so in one line


def _tsresol(value: int) -> tuple[int, int]:
    """(mul, div) turning a timestamp in if_tsresol units into ns."""
    if value & 0x80:
        # 2^-n seconds: ns = ts * 10^9 / 2^n.
        return 1_000_000_000, 1 << (value & 0x7F)
    if value <= 9:
        return 10 ** (9 - value), 1
    return 1, 10 ** (value - 9)


class CaptureReader:
    """Iterate over the packets of one capture file. Use as a context manager or call
    close(); iteration happens once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.stats = ReaderStats(source="stdin" if self.path == STDIN else self.path)
        self.format = ""
        # Called with (bytes of the file consumed, file size) after each chunk is read:
        # progress reporting at no per-packet cost. The size is 0 where it is unknown
        # (a pipe, stdin).
        self.on_read: Callable[[int, int], None] | None = None
        self._mm: mmap.mmap | None = None   # the mapped file while classic pcap is read
        self._packets: Iterator[Packet] | None = None   # the iteration under way
        self._in = _open(path)
        raw = self._in.raw
        self.size = 0
        # Only a regular file read from its start can be mapped (stdin redirected from
        # a file may start anywhere in it).
        self._mappable = False
        try:
            st = os.fstat(raw.fileno())
            if stat.S_ISREG(st.st_mode):
                self.size = st.st_size
                self._mappable = not self._in.gzip and raw.tell() == 2
        except (OSError, ValueError):
            pass
        magic = self._in.read(4)
        if len(magic) < 4:
            self._in.close()
            if self._in.cut:
                raise CaptureFileError(
                    f"cannot read {self.path!r}: {self._in.cut}; the file is damaged "
                    "or not a capture")
            raise CaptureFileError(
                f"{self.path!r} is too short to be a capture file "
                "(expected a pcap or pcapng file)"
            )
        self._magic = magic
        le = struct.unpack("<I", magic)[0]
        if le in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            self.format = "pcap"
        elif struct.unpack(">I", magic)[0] in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            self.format = "pcap"
        elif le == PCAPNG_SHB:
            self.format = "pcapng"
        else:
            self._in.close()
            raise CaptureFileError(
                f"{self.path!r} is not a pcap or pcapng capture (magic {magic.hex()}); "
                "give a file written by tcpdump, tshark or dumpcap"
            )

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._packets is not None:
            # An iteration stopped early still holds its view of the mapping (compiled,
            # _iter_pcap); closing the generator releases it, so the mapping can close.
            self._packets.close()
        if self._mm is not None:
            self._mm.close()
        self._in.close()

    def _map(self) -> mmap.mmap | None:
        """The whole file mapped read-only, or None where it cannot be (gzip, a pipe, an
        empty file). Mapping saves the kernel's copy into a fresh buffer and the join of
        each refill: on a 769 MiB capture 0.6 s of system time and 191k page faults
        became 0.1 s. The file must not shrink while it is read (the mapping would
        fault); captures are written by appending, and the size is fixed at open."""
        if not self._mappable:
            return None
        try:
            mm = mmap.mmap(self._in.raw.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None
        try:
            mm.madvise(mmap.MADV_SEQUENTIAL)
        except (OSError, AttributeError):
            pass   # only a read-ahead hint; reading works the same without it
        return mm

    def _read(self, n: int) -> bytes:
        """Read up to n bytes; fewer only at the end of the input (or where a damaged
        gzip stream or a read error ends it early: counted, see _end)."""
        data = self._in.read(n)
        if self.on_read is not None:
            self.on_read(self._in.consumed, self.size)
        return data

    def _end(self, cut_record: bool) -> None:
        """At the end of the input: note whether it ended early, and why."""
        stats = self.stats
        if self._in.cut.startswith("damaged") or self._in.cut.startswith("read error"):
            stats.truncated_records += 1   # the bytes after the damage are lost
        if self._in.cut:
            stats.cut_short = self._in.cut
        elif cut_record:
            stats.cut_short = "the last record is cut short"

    def __iter__(self) -> Iterator[Packet]:
        self._packets = self._iter_pcap() if self.format == "pcap" else self._iter_pcapng()
        return self._packets

    # ---------------------------------------------------------------- classic pcap

    @cython.locals(view="const unsigned char[::1]", p="const unsigned char *",
                   at=cython.Py_ssize_t, stop_at=cython.Py_ssize_t, last_at=cython.Py_ssize_t,
                   incl_c=cython.ulonglong, frac_c=cython.ulonglong, orig_c=cython.ulonglong,
                   limit_c=cython.ulonglong, frac_max_c=cython.ulonglong,
                   mul_c=cython.ulonglong, sec_c=cython.ulonglong, packets=cython.longlong)
    def _iter_pcap(self) -> Iterator[Packet]:
        head = self._magic + self._read(20)
        if len(head) < 24:
            raise CaptureFileError(f"{self.path!r}: pcap file header is cut short")
        if struct.unpack("<I", head[:4])[0] in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            bo = "<"
        else:
            bo = ">"
        magic, _vmaj, _vmin, _zone, _sig, snaplen, linktype = struct.unpack(
            bo + "IHHiIII", head)
        # The top bits of the link type field carry FCS information (pcap spec, sect. 4).
        linktype &= 0x0FFFFFFF
        self.stats.link_types[linktype] = 1
        ns = magic == PCAP_MAGIC_NS
        # Like libpcap, accept records above a small snap length (writers get it wrong,
        # e.g. snaplen 1 or 0), but never above the hard bound.
        limit = min(max(snaplen, 65_535), MAX_RECORD)
        unpack = struct.Struct(bo + "IIII").unpack_from
        stats = self.stats
        read = self._read
        # Keep at least one whole record (header + snap length) plus the next header in
        # the buffer, so a record never straddles a refill and resync can look ahead.
        need = 32 + limit
        buf = b""
        pos = end = 0
        eof = False
        # With the file mapped, a refill only moves the end of the window by CHUNK bytes
        # (so records, drops and counters come out exactly as from the read buffer),
        # reports progress and releases the pages already consumed: mapped pages count
        # in the process's resident memory, and a multi-GB capture must not.
        mm = self._mm = self._map()
        view = None
        if mm is not None:
            buf = mm
            pos = end = 24
            size = len(mm)
            released = 0
            page = mmap.PAGESIZE
        resyncing = False
        packets = 0
        prev_sec = -1
        frac_max = 1_000_000_000 if ns else 1_000_000
        mul = 1 if ns else 1000
        while True:
            if end - pos < need and not eof:
                if mm is not None:
                    if end < size:
                        end = min(end + CHUNK, size)
                        if self.on_read is not None:
                            self.on_read(end, size)
                        drop = pos - pos % page
                        if drop - released >= CHUNK:
                            mm.madvise(mmap.MADV_DONTNEED, released, drop - released)
                            released = drop
                    else:
                        eof = True
                    continue
                more = read(CHUNK)
                eof = not more
                buf = buf[pos:] + more
                pos = 0
                end = len(buf)
                continue
            if not resyncing:
                # While a record of the largest allowed size still fits in the buffer,
                # neither the refill nor the end-of-buffer checks can fire: a tight loop
                # over plausible headers; anything else drops to the general code below.
                last = end - need
                if cython.compiled and mm is not None and bo == "<":
                    # Compiled, a little-endian file mapped (nearly every capture): the
                    # same loop on C integers, headers read in place and the frame
                    # copied straight out of the mapping (no header tuple, no slice
                    # object).
                    if view is None:
                        view = mm
                        p = cython.address(view[0])
                        limit_c, frac_max_c, mul_c = limit, frac_max, mul
                    at, last_at = pos, last
                    sec_c = 0
                    first = packets
                    while at <= last_at:
                        frac_c = _le32(p, at + 4)
                        incl_c = _le32(p, at + 8)
                        orig_c = _le32(p, at + 12)
                        if incl_c > limit_c or frac_c >= frac_max_c or \
                                (orig_c < incl_c and orig_c):
                            break
                        sec_c = _le32(p, at)
                        stop_at = at + 16 + incl_c
                        packets += 1
                        yield (sec_c * 1_000_000_000 + frac_c * mul_c, 0, linktype,
                               p[at + 16:stop_at], orig_c or incl_c)
                        at = stop_at
                    pos = at
                    if packets != first:
                        prev_sec = sec_c
                while pos <= last:
                    sec, frac, incl, orig = unpack(buf, pos)
                    if incl > limit or frac >= frac_max or (orig < incl and orig):
                        break
                    stop = pos + 16 + incl
                    packets += 1
                    prev_sec = sec
                    yield (sec * 1_000_000_000 + frac * mul, 0, linktype, buf[pos + 16:stop],
                           orig or incl)
                    pos = stop
                if end - pos < need and not eof:
                    # The loop ran out of guaranteed room: refill before the general code,
                    # which takes a record that does not fit for one cut short.
                    continue
            if pos + 16 > end:
                if pos < end:
                    stats.truncated_records += 1
                break
            sec, frac, incl, orig = unpack(buf, pos)
            if resyncing or incl > limit or frac >= frac_max or (orig < incl and orig):
                if not resyncing:
                    # Impossible header: count it, then look for the next good one.
                    stats.corrupt_records += 1
                    stats.skipped_bytes += 1
                    pos += 1
                found, nxt = _pcap_resync(buf, pos, end, unpack, limit, frac_max, prev_sec,
                                          eof)
                stats.skipped_bytes += nxt - pos
                pos = nxt
                if found:
                    resyncing = False
                    continue
                if eof or stats.skipped_bytes > MAX_RESYNC:
                    stats.skipped_bytes += end - pos
                    break
                # Undecided at the end of the buffer: the refill above runs next (fewer
                # than `need` bytes remain from pos) and the scan resumes here.
                resyncing = True
                continue
            stop = pos + 16 + incl
            if stop > end:
                # Only possible at the end of the file (the buffer holds `need` bytes
                # otherwise): a record cut short.
                stats.truncated_records += 1
                break
            packets += 1
            prev_sec = sec
            yield (sec * 1_000_000_000 + frac * mul, 0, linktype, buf[pos + 16:stop],
                   orig or incl)
            pos = stop
        stats.packets = packets
        self._end(stats.truncated_records > 0)

    # ---------------------------------------------------------------- pcapng

    def _iter_pcapng(self) -> Iterator[Packet]:
        stats = self.stats
        read = self._read
        buf = self._magic + read(CHUNK)
        pos = 0
        bo = "<"
        hdr = struct.Struct("<II")
        epb = struct.Struct("<IIIII")
        ifaces: list[Interface] = []
        base = 0          # interface number of this section's first interface
        total_ifaces = 0
        packets = 0
        eof = False
        # A whole block of the largest size we accept must fit in the buffer.
        need = MAX_BLOCK + 12
        while True:
            if len(buf) - pos < need and not eof:
                more = read(CHUNK)
                eof = not more
                buf = buf[pos:] + more
                pos = 0
            end = len(buf)
            if pos + 12 > end:
                if pos < end:
                    stats.truncated_records += 1
                break
            btype, blen = hdr.unpack_from(buf, pos)
            if btype == PCAPNG_SHB:
                if pos + 12 > end:
                    stats.truncated_records += 1
                    break
                bom = buf[pos + 8:pos + 12]
                if bom == b"\x4d\x3c\x2b\x1a":
                    bo = "<"
                elif bom == b"\x1a\x2b\x3c\x4d":
                    bo = ">"
                else:
                    if pos == 0 and packets == 0:
                        raise CaptureFileError(
                            f"{self.path!r}: pcapng section header has no valid byte-order "
                            "magic; the file is damaged or not a capture")
                    stats.corrupt_records += 1
                    pos = self._pcapng_resync(buf, pos + 4, bo)
                    continue
                hdr = struct.Struct(bo + "II")
                epb = struct.Struct(bo + "IIIII")
                btype, blen = hdr.unpack_from(buf, pos)
                base = total_ifaces
                ifaces = []
            if blen < 12 or blen % 4 or blen > MAX_BLOCK:
                if pos == 0 and packets == 0 and btype == PCAPNG_SHB:
                    raise CaptureFileError(
                        f"{self.path!r}: pcapng section header has an impossible length "
                        f"({blen}); the file is damaged")
                stats.corrupt_records += 1
                pos = self._pcapng_resync(buf, pos + 4, bo)
                continue
            if pos + blen > end:
                # Only possible at the end of the file (the buffer holds `need` bytes
                # otherwise): a block cut short.
                stats.truncated_records += 1
                break
            trailer = hdr.unpack_from(buf, pos + blen - 8)[1]
            if trailer != blen:
                stats.corrupt_records += 1
                pos = self._pcapng_resync(buf, pos + 4, bo)
                continue
            if btype == _BT_EPB:
                if blen < 32:
                    stats.corrupt_records += 1
                    pos += blen
                    continue
                ifid, hi, lo, cap, wire = epb.unpack_from(buf, pos + 8)
                start = pos + 28
                if start + cap > pos + blen - 4:
                    stats.corrupt_records += 1
                    pos += blen
                    continue
                if ifid >= len(ifaces):
                    stats.bad_interface += 1
                    pos += blen
                    continue
                itf = ifaces[ifid]
                ts = ((hi << 32) | lo) * itf.mul // itf.div + itf.offset_ns
                if not 0 <= ts <= _TS_MAX:
                    # A coarse if_tsresol or a large if_tsoffset put the packet before
                    # 1970 or past 2554: the timestamp (or the interface) is corrupt.
                    stats.corrupt_records += 1
                    pos += blen
                    continue
                packets += 1
                yield (ts, base + ifid, itf.link_type, buf[start:start + cap], wire)
            elif btype == _BT_SPB:
                if blen < 16 or not ifaces:
                    stats.corrupt_records += 1 if blen < 16 else 0
                    stats.bad_interface += 0 if blen < 16 else 1
                    pos += blen
                    continue
                wire = struct.unpack_from(bo + "I", buf, pos + 8)[0]
                itf = ifaces[0]
                cap = min(wire, blen - 16, itf.snaplen or MAX_RECORD)
                packets += 1
                # A simple packet block has no timestamp; 0 tells the meter "unknown".
                yield (0, base, itf.link_type, buf[pos + 12:pos + 12 + cap], wire)
            elif btype == _BT_OPB:
                if blen < 32:
                    stats.corrupt_records += 1
                    pos += blen
                    continue
                ifid = struct.unpack_from(bo + "H", buf, pos + 8)[0]
                hi, lo, cap, wire = struct.unpack_from(bo + "IIII", buf, pos + 12)
                start = pos + 28
                if start + cap > pos + blen - 4 or ifid >= len(ifaces):
                    stats.corrupt_records += 1
                    pos += blen
                    continue
                itf = ifaces[ifid]
                ts = ((hi << 32) | lo) * itf.mul // itf.div + itf.offset_ns
                if not 0 <= ts <= _TS_MAX:
                    # A coarse if_tsresol or a large if_tsoffset put the packet before
                    # 1970 or past 2554: the timestamp (or the interface) is corrupt.
                    stats.corrupt_records += 1
                    pos += blen
                    continue
                packets += 1
                yield (ts, base + ifid, itf.link_type, buf[start:start + cap], wire)
            elif btype == _BT_IDB:
                if blen < 20 or total_ifaces >= MAX_INTERFACES:
                    stats.corrupt_records += 1
                    pos += blen
                    continue
                link, _res, snap = struct.unpack_from(bo + "HHI", buf, pos + 8)
                ifaces.append(self._interface(buf, pos + 16, pos + blen - 4, bo, link, snap))
                stats.link_types[link] = stats.link_types.get(link, 0) + 1
                total_ifaces += 1
            elif btype != PCAPNG_SHB:
                stats.unknown_blocks += 1
            pos += blen
        stats.packets = packets
        self._end(stats.truncated_records > 0)

    @staticmethod
    def _interface(buf: bytes, pos: int, end: int, bo: str, link: int,
                   snap: int) -> Interface:
        """Parse an IDB's options for if_tsresol (9) and if_tsoffset (14)."""
        mul, div, offset = 1000, 1, 0  # default resolution: microseconds
        opt = struct.Struct(bo + "HH")
        while pos + 4 <= end:
            code, length = opt.unpack_from(buf, pos)
            if code == 0:
                break
            val = pos + 4
            if val + length > end:
                break
            if code == 9 and length >= 1:
                mul, div = _tsresol(buf[val])
            elif code == 14 and length >= 8:
                offset = struct.unpack_from(bo + "q", buf, val)[0] * 1_000_000_000
            pos = val + ((length + 3) & ~3)
        return Interface(link_type=link, snaplen=snap, mul=mul, div=div, offset_ns=offset)

    def _pcapng_resync(self, buf: bytes, pos: int, bo: str) -> int:
        """Next 4-byte aligned offset (relative to pos - 4) holding a block of a known type
        whose two length fields agree; end of buffer if none (the rest is skipped)."""
        hdr = struct.Struct(bo + "II")
        start = pos - 4
        end = len(buf)
        p = start + 4
        known = (_BT_EPB, _BT_SPB, _BT_IDB, _BT_OPB, PCAPNG_SHB, 5, 4, 7, 0xA, 0xBAD)
        while p + 12 <= end:
            btype, blen = hdr.unpack_from(buf, p)
            if (btype in known and 12 <= blen <= MAX_BLOCK and blen % 4 == 0
                    and p + blen <= end and hdr.unpack_from(buf, p + blen - 8)[1] == blen):
                self.stats.skipped_bytes += p - start
                return p
            p += 4
        self.stats.skipped_bytes += end - start
        return end


def _le32(p, off: int) -> int:
    """The little-endian 32-bit integer at p[off:off + 4] (a C pointer read when compiled,
    see reader.pxd)."""
    return (p[off] | (p[off + 1] << 8) | (p[off + 2] << 16)
            | (cython.cast(cython.ulonglong, p[off + 3]) << 24))


def _pcap_resync(buf, pos: int, size: int, unpack, limit: int, frac_max: int,
                 prev_sec: int, eof: bool) -> tuple[bool, int]:
    """(True, offset) of the next plausible pcap record header at or after pos, or
    (False, offset) where the scan must resume once more bytes are in; buf holds size
    bytes read so far (the read buffer, or the window of the mapped file).

    Plausible: fractional part in range, captured length within the snap length and
    not above the wire length, time within a day of the previous good record, and the
    record after it plausible too (or the end of the file right after it).
    """
    while pos + 16 <= size:
        sec, frac, incl, orig = unpack(buf, pos)
        if (frac < frac_max and 0 < incl <= limit and incl <= orig
                and (prev_sec < 0 or abs(sec - prev_sec) <= 86_400)):
            nxt = pos + 16 + incl
            if nxt + 16 <= size:
                s2, f2, i2, o2 = unpack(buf, nxt)
                if (f2 < frac_max and i2 <= limit and (i2 <= o2 or not o2)
                        and abs(s2 - sec) <= 86_400):
                    return True, pos
            elif eof:
                if nxt == size:
                    return True, pos
            else:
                return False, pos  # cannot judge yet: wait for more bytes
        pos += 1
    return False, pos


def read_packets(path: str | os.PathLike[str]) -> Iterator[Packet]:
    """All packets of one capture file (see the module docstring for the tuple)."""
    with CaptureReader(path) as reader:
        yield from reader
