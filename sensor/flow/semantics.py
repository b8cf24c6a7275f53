"""Flow semantics in one place: the rules the kernel program (bpf/flow.c, read out by
sensor/kernel/flowmap.py) and the replay meter (sensor/engine/meter.py) both follow, and
that both are tested against.

- A flow is bidirectional (RFC 5103). Its key is canonical (the lower address/port end
  first) plus protocol, VLAN tags and, live, the interface.
- The initiator is the sender of the first SYN without ACK; failing that, the sender of
  the first packet seen.
- Timeouts (DESIGN.md): TCP idle 300 s; UDP, ICMP and other idle 60 s; active 1800 s
  (an interim record, same uid, counters since the previous record); a TCP flow ends on
  RST, or on FIN in both directions, after a 5 s linger that catches the last ACKs.
- Interim records: packets, bytes and the SYN/FIN/RST counts are those since the
  flow's previous record; OR-ed TCP flags, conn_state, history and handshake RTT are
  the flow's so far (cumulative).
- Timestamps: packet time in replay, kernel time converted to wall time live. Never the
  wall clock in replay.
- conn_state follows Zeek's definitions, derived from what each side sent (below), so it
  can be computed from the kernel's per-direction OR-ed flags as well as from a packet
  stream. For UDP, ICMP and other protocols (conn_state_other): S0 when only the
  initiator sent, SF when both did.
- Byte counts: per direction, IP bytes are the IP total length (IPv6: 40 + payload
  length), layer-2 bytes the frame's wire length including the link header as captured
  (Ethernet header and VLAN tags, Linux SLL header, ...), what nDPI and Suricata count.
- ICMP and ICMPv6 have no ports; the key uses the Community ID stand-ins instead: the
  type as one port and, for request/reply pairs (echo/echo reply, ...), the counterpart
  type as the other (else the code), so a request and its reply are one flow.
- IPv4/IPv6 fragments: the first fragment carries the ports and is keyed normally; later
  fragments are attributed to the flow of the first fragment with the same (src, dst,
  id, protocol), through a bounded table. A later fragment whose first fragment was not
  seen (yet) is counted and not attributed to any flow.
- Handshake RTT: from the initiator's SYN to its first ACK after the responder's SYN-ACK
  (the full round trip, wherever the sensor sits on the path); SYN to SYN-ACK when that
  ACK never comes.
"""

from __future__ import annotations

from dataclasses import dataclass

NS = 1_000_000_000

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Flow timeouts in nanoseconds; the defaults are DESIGN.md's."""

    tcp_idle_ns: int = 300 * NS
    other_idle_ns: int = 60 * NS
    active_ns: int = 1800 * NS
    tcp_end_linger_ns: int = 5 * NS

    def __post_init__(self) -> None:
        for name in ("tcp_idle_ns", "other_idle_ns", "active_ns"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.tcp_end_linger_ns < 0:
            raise ValueError("tcp_end_linger_ns must not be negative")

    def idle_ns(self, protocol: int) -> int:
        return self.tcp_idle_ns if protocol == PROTO_TCP else self.other_idle_ns


DEFAULT_TIMEOUTS = Timeouts()


@dataclass(frozen=True, slots=True, kw_only=True)
class SideFlags:
    """What one side of a TCP flow sent: its OR-ed flags, and whether it sent a pure SYN
    (SYN without ACK) and a SYN-ACK. The kernel keeps these per direction."""

    flags: int = 0
    syn: bool = False       # a SYN without ACK
    synack: bool = False    # a SYN with ACK
    packets: int = 0


def conn_state(orig: SideFlags, resp: SideFlags) -> str:
    """Zeek's conn_state for a TCP flow, from what each side sent.

    The order of checks mirrors Zeek's (base/protocols/conn/main.zeek): resets first,
    then the handshake outcome, then the close.
    """
    o_fin = bool(orig.flags & TCP_FIN)
    r_fin = bool(resp.flags & TCP_FIN)
    o_rst = bool(orig.flags & TCP_RST)
    r_rst = bool(resp.flags & TCP_RST)
    established = orig.syn and resp.synack
    if not orig.syn and not resp.synack:
        # Picked up mid-stream (or a stray segment): no handshake seen at all.
        return "OTH"
    if orig.syn and not resp.synack:
        if r_rst:
            return "REJ"
        if o_rst:
            return "RSTOS0"
        if o_fin:
            return "SH"
        return "S0"
    if resp.synack and not orig.syn:
        if r_rst:
            return "RSTRH"
        if r_fin:
            return "SHR"
        return "OTH"
    assert established
    if o_rst:
        return "RSTO"
    if r_rst:
        return "RSTR"
    if o_fin and r_fin:
        return "SF"
    if o_fin:
        return "S2"
    if r_fin:
        return "S3"
    return "S1"


def tcp_ended(orig: SideFlags, resp: SideFlags) -> bool:
    """A TCP flow has ended once either side reset it or both sides sent FIN."""
    if (orig.flags | resp.flags) & TCP_RST:
        return True
    return bool(orig.flags & TCP_FIN) and bool(resp.flags & TCP_FIN)


def conn_state_other(orig_packets: int, resp_packets: int) -> str:
    """Zeek's conn_state for a flow without TCP's handshake (UDP, ICMP, other)."""
    if orig_packets and resp_packets:
        return "SF"
    if orig_packets:
        return "S0"
    if resp_packets:
        return "SHR"
    return "OTH"
