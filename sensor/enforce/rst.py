"""TCP resets for both ends of a blocked flow, from userspace, with a raw socket.

A receiver accepts a RST only when its sequence number is exactly the next one it
expects (RFC 5961 section 3.2; one inside the window but elsewhere draws a challenge ACK,
which the block then drops). So each reset carries the sender's next sequence number as
the sensor's reassembly last saw it: to the server, the client's stream end (the request
was just parsed, so it is exact); to the client, the server's stream end. A response the
server sent before the verdict and that the reassembly had not read yet makes the
client's reset miss (the block still stops the rest of the flow; docs/rules.md,
"Enforcement").

The kernel program lets bare RSTs through a block (flow.c, blocked()), so these reach
both ends even though the flow's other packets are dropped.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

TCP_RST, TCP_ACK = 0x04, 0x10


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _checksum(data: bytes) -> int:
    return ~_sum16(data) & 0xFFFF


def tcp_rst(src: str, sport: int, dst: str, dport: int, seq: int, ack: int,
            flags: int = TCP_RST | TCP_ACK, window: int = 0) -> bytes:
    """A TCP header (20 octets, RST|ACK, window 0 unless told) with its checksum over
    the pseudo header of src and dst (IPv4 or IPv6)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      5 << 4, flags, window, 0, 0)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(hdr))
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", len(hdr), socket.IPPROTO_TCP)
    csum = _checksum(pseudo + hdr)
    return hdr[:16] + struct.pack("!H", csum) + hdr[18:]


def ipv4_packet(src: str, dst: str, tcp: bytes) -> bytes:
    total = 20 + len(tcp)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, socket.IPPROTO_TCP, 0,
                     ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + tcp


class ResetSender:
    """Raw sockets, opened once (in the sensor's network namespace, before privileges
    are dropped: CAP_NET_RAW), one per address family."""

    def __init__(self) -> None:
        self._v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self._v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        # IPPROTO_RAW means the caller writes the IP header (IPv6 too, since Linux 4.5):
        # the reset must carry the peer's address as its source.
        self.sent = 0
        self.failed = 0

    def reset(self, src: str, sport: int, dst: str, dport: int, seq: int, ack: int) -> bool:
        return self._send(src, dst, tcp_rst(src, sport, dst, dport, seq, ack))

    def ack(self, src: str, sport: int, dst: str, dport: int, seq: int, ack: int) -> bool:
        """A bare duplicate ACK (hold mode's nudge, hold.py): it acknowledges nothing new,
        so the receiver only re-reads its send queue and sends what waits there. The
        receiver may take its window as the sender's: 65535 (times the connection's
        scale) is at most an overstatement, which the sender's next real ACK corrects,
        where 0 would stall the receiver in zero-window probes."""
        return self._send(src, dst, tcp_rst(src, sport, dst, dport, seq, ack,
                                             flags=TCP_ACK, window=0xFFFF))

    def _send(self, src: str, dst: str, tcp: bytes) -> bool:
        try:
            if ipaddress.ip_address(src).version == 4:
                self._v4.sendto(ipv4_packet(src, dst, tcp), (dst, 0))
            else:
                ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64,
                                  ipaddress.IPv6Address(src).packed,
                                  ipaddress.IPv6Address(dst).packed)
                self._v6.sendto(ip6 + tcp, (dst, 0))
        except OSError:
            self.failed += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._v4.close()
        self._v6.close()
