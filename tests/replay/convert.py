"""Test helper: a classic pcap (little-endian, µs) rewritten as pcapng, same packets."""

from __future__ import annotations

import struct

from tests.fixtures import capture_files as cf


def to_pcapng(pcap: bytes) -> bytes:
    """The same packets as a pcapng file (one Ethernet interface, ns resolution)."""
    (link,) = struct.unpack_from("<I", pcap, 20)
    out = [cf.shb(), cf.idb(link, tsresol=9)]
    pos = 24
    while pos < len(pcap):
        sec, usec, incl, orig = struct.unpack_from("<IIII", pcap, pos)
        frame = pcap[pos + 16:pos + 16 + incl]
        out.append(cf.epb(0, sec * 1_000_000_000 + usec * 1000, frame, wire=orig))
        pos += 16 + incl
    return b"".join(out)
