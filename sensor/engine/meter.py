"""The replay flow meter: L2-L4 decoding and per-flow accounting with the kernel program's
semantics (sensor/flow/semantics.py), driven by packet time only.

Strategy. One method, feed(), takes a packet as a source yields it (sensor/flow/packet.py)
and does all the work inline: hand-written struct/slice parsing (faster than building dpkt
objects for the few fields we need), one dict lookup for the flow, counter updates,
Zeek-style history. Nothing is allocated per packet beyond the key tuple and, for the L7
stage, the payload slice. Timeouts run every CHECK_INTERVAL_NS of packet time (see
flowtable.py).

Decoded: Ethernet with up to two 802.1Q/802.1ad tags (a third is counted and dropped) and
PPPoE sessions, the link types of sensor/flow/packet.py, IPv4 with options and fragments,
IPv6 with up to MAX_IPV6_EXT_HEADERS extension headers, TCP, UDP, SCTP ports, ICMP/ICMPv6
type/code. Every packet that cannot be attributed to a flow is counted in MeterStats under
its reason.

The L7 seam. A PayloadSink (below) receives what the L7 stage needs and nothing else:
TCP segments that carry payload or SYN/FIN/RST (pure ACKs are not passed: they move no
stream bytes), UDP datagrams with payload, and the end of each flow. Direction is
relative to the initiator as known at that packet (0 = TO_SERVER). Fragmented datagrams
are joined first (IpDefragmenter, bounded and counted) and handed over whole. The sink
talks back through the flow's state, as the L7 stage live talks to the kernel through
l7_ctl: `l7_off` (hand over nothing more, only count the payload bytes) and `l7_skip`
(per side, the seq below which payload is not wanted). A sink that is also a
FlowAnnotator flushes each flow before its final record and fills the record's L7 fields.

Zeek history. Letters recorded (upper case: the initiator, lower: the responder):
S SYN without ACK, H SYN+ACK, A pure ACK, D payload, F FIN, R RST, I FIN+RST, Q other
multi-flag (SYN+FIN, SYN+RST), T retransmission (payload at or below the highest sequence
already seen from that side). A letter is recorded the first time it happens on its side;
S/H, F and R again when they come with a new sequence number, and T again at the 10th,
100th, ... retransmission, as Zeek does. UDP: D for each side that sent. Not recorded:
G (content gap) and C (bad checksum), which need reassembly and checksum verification,
W (zero window) and ^ (direction flipped: Loupe's initiator rule is fixed, see
semantics.py).
"""

from __future__ import annotations

import struct
from collections import OrderedDict

import cython
from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

from sensor.engine.flowtable import DEFAULT_MAX_FLOWS, FlowState, FlowTable
from sensor.flow.community_id import DEFAULT as DEFAULT_CID
from sensor.flow.community_id import CommunityId, icmp_ports
from sensor.flow.packet import (
    LINKTYPE_C_HDLC,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    LINKTYPE_RAW_12,
    LINKTYPE_RAW_14,
    Packet,
)
from sensor.flow.semantics import DEFAULT_TIMEOUTS, Timeouts
from sensor.model import Flow, FlowEndReason

# IPv6 extension headers followed before giving up (RFC 8200 expects at most one of each
# of ~6 kinds; 8 covers every legal chain and bounds the work a crafted packet can cause).
MAX_IPV6_EXT_HEADERS = 8

# First-fragment table: (src, dst, id, protocol) -> ports. 8192 datagrams in flight is
# far above what any host keeps (Linux allows ~4 MiB of fragments); entries older than
# FRAG_TIMEOUT_NS are stale (Linux's ipfrag_time is 30 s).
MAX_FRAG_ENTRIES = 8192
FRAG_TIMEOUT_NS = 30_000_000_000

# IP reassembly for the L7 stage only (metering never needs it): datagrams whose
# fragments are pending, and their bytes. 1024 datagrams and 8 MiB cover a DNS server's
# burst of large fragmented answers; beyond that the oldest datagram is given up and
# counted (a fragment flood must not grow memory). An IP datagram is at most 64 KiB.
MAX_DEFRAG_DATAGRAMS = 1024
MAX_DEFRAG_BYTES = 8 << 20
MAX_DATAGRAM_BYTES = 65_535

_ETH_VLAN = (0x8100, 0x88A8, 0x9100)
_RAW_LINKS = (LINKTYPE_RAW, LINKTYPE_RAW_12, LINKTYPE_RAW_14, LINKTYPE_IPV4, LINKTYPE_IPV6)
# BSD address families in DLT_NULL/LOOP headers: AF_INET, and AF_INET6 as NetBSD/OpenBSD,
# FreeBSD, macOS and Linux number it.
_AF_INET6 = frozenset({24, 28, 30, 10})
_IPV6_EXT = frozenset({0, 43, 60, 135, 139, 140})

_u16 = struct.Struct("!H").unpack_from
_u32 = struct.Struct("!I").unpack_from
_tcp = struct.Struct("!HHIIBBH").unpack_from
_ports = struct.Struct("!HH").unpack_from
# ver/ihl, tos, total, id, frag, ttl, proto, checksum, src, dst: the addresses come out
# of the same call as integers (no bytes objects of their own to allocate and hash for
# the flow key, per packet; ordered like the bytes they were); packed once per new flow.
_ip4 = struct.Struct("!BBHHHBBHII").unpack_from
_addr4 = struct.Struct("!I").pack
# Ethernet type, then _ip4's fields, then _tcp's: the fast path of Meter.feed.
_eth_ip4_tcp = struct.Struct("!12xHBBHHHBBHIIHHIIBBH").unpack_from

# Sequence numbers are compared modulo 2**32. The bounds are C integers in the compiled
# build: to Cython a literal above 2**31 - 1 is a Python object, and every mask and
# comparison with it would be Python arithmetic, per packet.
_M32 = cython.declare(cython.longlong, 0xFFFFFFFF)
_HALF32 = cython.declare(cython.longlong, 0x80000000)
_Q1 = cython.declare(cython.longlong, 0x40000000)
_Q3 = cython.declare(cython.longlong, 0xC0000000)

P_TCP = 6
P_UDP = 17
P_SCTP = 132
P_ICMP = 1
P_ICMPV6 = 58

# Zeek history bits (side 1's are shifted by 16).
_H = {c: 1 << i for i, c in enumerate("SHADFRTIQ")}


class PayloadSink(Protocol):
    """What the meter hands to the L7 stage. Implementations must not raise: garbage is
    theirs to count. `flow.l7` is free for the sink's per-flow state."""

    def tcp_segment(self, flow: FlowState, direction: int, seq: int, ack: int, flags: int,
                    payload: bytes, ts_ns: int) -> None:
        """A TCP segment with payload or SYN/FIN/RST, in capture order (not reassembled)."""

    def udp_datagram(self, flow: FlowState, direction: int, payload: bytes,
                     ts_ns: int) -> None:
        """One whole UDP payload (a fragmented datagram once all its fragments came)."""

    def flow_ended(self, flow: FlowState, record: Flow) -> None:
        """The flow left the table; `record` is its final Flow record."""


@runtime_checkable
class FlowAnnotator(Protocol):
    """A PayloadSink that also contributes to the Flow records (the L7 stage): flushes a
    flow's state before its final record, and names the record's L7 fields."""

    def flow_ending(self, flow: FlowState) -> None:
        """The flow is about to leave the table; its final record is written next."""

    def flow_fields(self, flow: FlowState) -> dict:
        """Flow record fields from L7 (app_proto, l7_coverage, http_host, ...)."""


class _Datagram:
    __slots__ = ("pieces", "size", "total", "ts")

    def __init__(self, ts: int) -> None:
        self.pieces: list[tuple[int, bytes]] = []
        self.size = 0          # bytes held
        self.total = -1        # datagram length, known once the last fragment came
        self.ts = ts


class IpDefragmenter:
    """Joins IP fragments into whole L4 datagrams for the L7 stage (RFC 791 §3.2,
    RFC 8200 §4.5). Overlaps are resolved first-wins, as in TCP reassembly. Bounded by
    MAX_DEFRAG_DATAGRAMS, MAX_DEFRAG_BYTES and FRAG_TIMEOUT_NS; every datagram given up
    is counted in `given_up`."""

    def __init__(self) -> None:
        self._pending: OrderedDict[tuple, _Datagram] = OrderedDict()
        self._bytes = 0
        self.reassembled = 0
        self.given_up = 0

    def add(self, key: tuple, offset: int, more: bool, data: bytes, ts: int,
            cut: bool) -> bytes | None:
        """One fragment's data at byte `offset`; the whole datagram once complete.
        `cut`: the capture did not keep all of the fragment, so the datagram cannot be
        completed."""
        pending = self._pending
        while pending:
            oldest = next(iter(pending.values()))
            if ts - oldest.ts <= FRAG_TIMEOUT_NS:
                break
            self._drop(next(iter(pending)))
        dg = pending.get(key)
        if dg is None:
            if cut:
                self.given_up += 1
                return None
            dg = pending[key] = _Datagram(ts)
        if cut or offset + len(data) > MAX_DATAGRAM_BYTES:
            self._drop(key)
            return None
        if not more:
            dg.total = offset + len(data)
        dg.pieces.append((offset, data))
        dg.size += len(data)
        self._bytes += len(data)
        while self._bytes > MAX_DEFRAG_BYTES or len(pending) > MAX_DEFRAG_DATAGRAMS:
            self._drop(next(iter(pending)))
        if dg.total < 0 or key not in pending:
            return None
        out = bytearray()
        for off, piece in sorted(dg.pieces, key=lambda p: p[0]):
            if off > len(out):
                return None          # a hole: wait for more fragments
            if off + len(piece) > len(out):
                out += piece[len(out) - off:]
        if len(out) < dg.total:
            return None
        del pending[key]
        self._bytes -= dg.size
        self.reassembled += 1
        return bytes(out[:dg.total])

    def _drop(self, key: tuple) -> None:
        dg = self._pending.pop(key)
        self._bytes -= dg.size
        self.given_up += 1

    def flush(self) -> None:
        """End of input: datagrams still incomplete are given up."""
        while self._pending:
            self._drop(next(iter(self._pending)))


@dataclass(slots=True)
class MeterStats:
    packets: int = 0
    metered: int = 0                 # attributed to a flow
    non_ip: int = 0                  # ARP, LLDP, ... (not an error)
    unsupported_link: int = 0
    truncated_l2: int = 0
    too_many_vlan_tags: int = 0
    bad_ip: int = 0                  # bad version/header length
    truncated_ip: int = 0
    # A TCP/UDP/SCTP/ICMP header cut short (a tiny first fragment, a bad length): the
    # packet still counts, in a flow with ports 0, as nDPI and NFStream count it.
    truncated_l4: int = 0
    ipv6_ext_limit: int = 0
    fragments_attributed: int = 0
    fragments_orphaned: int = 0      # later fragment without a first fragment: not counted
    frag_table_evicted: int = 0
    # Fragmented datagrams whose payload never reached the L7 stage (a fragment lost,
    # cut by the snap length, timed out, or pushed out by the IpDefragmenter bounds).
    fragmented_payload_not_passed: int = 0
    fragmented_payload_passed: int = 0
    no_timestamp: int = 0            # pcapng simple packet blocks: last known time used


class Meter:
    """Feed packets, receive Flow records through `emit`."""

    def __init__(
        self,
        *,
        emit,
        sink: PayloadSink | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        max_flows: int = DEFAULT_MAX_FLOWS,
        sensor_id: str = "",
        community: CommunityId = DEFAULT_CID,
    ) -> None:
        self.sink = sink
        annotator = sink if isinstance(sink, FlowAnnotator) else None
        self.table = FlowTable(
            emit=emit, on_end=sink.flow_ended if sink is not None else None,
            timeouts=timeouts, max_flows=max_flows, sensor_id=sensor_id,
            community=community,
            before_final=annotator.flow_ending if annotator is not None else None,
            describe=annotator.flow_fields if annotator is not None else None)
        self._stats = MeterStats()
        # The two counters every packet moves live on the meter (C integers when
        # compiled: an attribute write on the dataclass costs more than the rest of a
        # counter update); `stats` folds them in when read.
        self._packets = 0
        self._metered = 0
        self._frags: OrderedDict[tuple, tuple[int, int, int]] = OrderedDict()
        self._defrag = IpDefragmenter()

    def run(self, packets: Iterable[Packet]) -> None:
        """Meter every packet, then flush the table (FORCED_END for live flows)."""
        self.feed_from(packets)
        self.flush()

    def feed_from(self, packets: Iterable[Packet]) -> int:
        """feed() every packet of `packets`; the last one's timestamp (-1 if none). The
        replay loop lives here rather than in its caller so that, compiled, the tuple
        unpack and the call to feed are C (meter.pxd), not a Python call per packet."""
        ts = -1
        for ts, ifx, link, frame, wire in packets:
            self.feed(ts, ifx, link, frame, wire)
        return ts

    @property
    def stats(self) -> MeterStats:
        stats = self._stats
        stats.packets = self._packets
        stats.metered = self._metered
        return stats

    def flush(self) -> None:
        self.table.flush()
        self._defrag.flush()
        self._stats.fragmented_payload_not_passed = self._defrag.given_up

    # The hot path. Long on purpose: every call and attribute lookup here is paid per
    # packet, so decoding and accounting are one function with locals.
    def feed(self, ts: int, ifindex: int, link: int, frame: bytes, wire_len: int) -> None:
        stats = self._stats
        self._packets += 1
        table = self.table
        if not ts:
            stats.no_timestamp += 1
            ts = table.now_ns
        if ts >= table.next_check_ns:
            table.expire(ts)
        n = len(frame)
        vlan = ivlan = 0
        # Ethernet, untagged IPv4 without options, not a fragment, a whole TCP header:
        # most packets of most captures, decoded by one unpack instead of three steps
        # (0.2 us less per packet). Any other packet, or one that fails a check here,
        # takes the general path below, which decodes these packets to the same values.
        general = True
        if link == LINKTYPE_ETHERNET and n >= 54:
            if cython.compiled and type(frame) is bytes:
                # Compiled: the same fields as _eth_ip4_tcp below, read in place, so no
                # tuple and no 18 integer objects per packet (meter.pxd types p and u).
                p = frame
                if (p[12] == 0x08 and p[13] == 0x00 and p[14] == 0x45 and p[23] == P_TCP
                        and not (((p[20] << 8) | p[21]) & 0x3FFF)):
                    ip_len = (p[16] << 8) | p[17]
                    if ip_len >= 40:
                        general = False
                        proto = P_TCP
                        u = p[26]
                        src = (u << 24) | (p[27] << 16) | (p[28] << 8) | p[29]
                        u = p[30]
                        dst = (u << 24) | (p[31] << 16) | (p[32] << 8) | p[33]
                        sport = (p[34] << 8) | p[35]
                        dport = (p[36] << 8) | p[37]
                        u = p[38]
                        seq = (u << 24) | (p[39] << 16) | (p[40] << 8) | p[41]
                        u = p[42]
                        ack = (u << 24) | (p[43] << 16) | (p[44] << 8) | p[45]
                        doff = p[46]
                        tcp_flags = p[47]
            else:
                (et, vihl, _tos, ip_len, ip_id, frag, _ttl, proto, _sum, src, dst, sport,
                 dport, seq, ack, doff, tcp_flags, _win) = _eth_ip4_tcp(frame, 0)
                if (et == 0x0800 and vihl == 0x45 and proto == P_TCP and not frag & 0x3FFF
                        and ip_len >= 40):
                    general = False
            if not general:
                ver = 4
                first_frag = later_frag = False
                l4 = 34
                end = 14 + ip_len
                cap_end = end if end <= n else n
                doff = (doff >> 4) << 2
        if general:
            # ---- layer 2: find the IP header
            if link == LINKTYPE_ETHERNET:
                if n < 14:
                    stats.truncated_l2 += 1
                    return
                et = (frame[12] << 8) | frame[13]
                off = 14
                if et == 0x0800:
                    pass   # untagged IPv4, by far the most common frame: no more checks
                elif et in _ETH_VLAN:
                    if n < 18:
                        stats.truncated_l2 += 1
                        return
                    vlan = _u16(frame, 14)[0] & 0xFFF
                    et = _u16(frame, 16)[0]
                    off = 18
                    if et in _ETH_VLAN:
                        if n < 22:
                            stats.truncated_l2 += 1
                            return
                        ivlan = _u16(frame, 18)[0] & 0xFFF
                        et = _u16(frame, 20)[0]
                        off = 22
                        if et in _ETH_VLAN:
                            stats.too_many_vlan_tags += 1
                            return
                if et == 0x8864:
                    # PPPoE session (RFC 2516): 6-byte header, then the PPP protocol.
                    if n < off + 8:
                        stats.truncated_l2 += 1
                        return
                    ppp = _u16(frame, off + 6)[0]
                    off += 8
                    et = 0x0800 if ppp == 0x0021 else 0x86DD if ppp == 0x0057 else 0
                if et == 0x0800:
                    ver = 4
                elif et == 0x86DD:
                    ver = 6
                else:
                    stats.non_ip += 1
                    return
            elif link in _RAW_LINKS:
                off = 0
                if not n:
                    stats.truncated_l2 += 1
                    return
                ver = frame[0] >> 4
            elif link == LINKTYPE_NULL or link == LINKTYPE_LOOP:
                if n < 5:
                    stats.truncated_l2 += 1
                    return
                # NULL: host byte order of the writer; LOOP: network order. Either way a
                # small number sits in the first or the last byte.
                af = frame[0] or frame[3]
                if af != 2 and af not in _AF_INET6:
                    stats.non_ip += 1
                    return
                off = 4
                ver = frame[4] >> 4
            elif link == LINKTYPE_LINUX_SLL or link == LINKTYPE_LINUX_SLL2:
                off = 16 if link == LINKTYPE_LINUX_SLL else 20
                if n < off:
                    stats.truncated_l2 += 1
                    return
                et = _u16(frame, 14 if link == LINKTYPE_LINUX_SLL else 0)[0]
                if et == 0x8100 and n >= off + 4:
                    vlan = _u16(frame, off)[0] & 0xFFF
                    et = _u16(frame, off + 2)[0]
                    off += 4
                if et == 0x0800:
                    ver = 4
                elif et == 0x86DD:
                    ver = 6
                else:
                    stats.non_ip += 1
                    return
            elif link == LINKTYPE_C_HDLC:
                # Cisco HDLC: address (0x0F unicast, 0x8F broadcast), control 0, then an
                # EtherType. SLARP (0x8035) and CDP (0x2000) keepalives are not IP.
                if n < 4:
                    stats.truncated_l2 += 1
                    return
                et = _u16(frame, 2)[0]
                off = 4
                if et == 0x0800:
                    ver = 4
                elif et == 0x86DD:
                    ver = 6
                else:
                    stats.non_ip += 1
                    return
            else:
                stats.unsupported_link += 1
                return
            # ---- layer 3
            first_frag = later_frag = False
            if ver == 4:
                if n < off + 20:
                    stats.truncated_ip += 1
                    return
                vihl, _tos, ip_len, ip_id, frag, _ttl, proto, _sum, src, dst = _ip4(frame, off)
                ihl = (vihl & 15) << 2
                if vihl >> 4 != 4 or ihl < 20:
                    stats.bad_ip += 1
                    return
                if n < off + ihl:
                    stats.truncated_ip += 1
                    return
                if ip_len < ihl:
                    # TSO/GSO captures write 0 here; count what was captured instead.
                    ip_len = n - off
                l4 = off + ihl
                end = off + ip_len
                if frag & 0x3FFF:
                    frag_off = (frag & 0x1FFF) << 3
                    frag_more = frag & 0x2000
                    if frag & 0x1FFF:
                        later_frag = True
                    else:
                        first_frag = True
            elif ver == 6:
                if n < off + 40:
                    stats.truncated_ip += 1
                    return
                ip_len = 40 + _u16(frame, off + 4)[0]
                proto = frame[off + 6]
                src = frame[off + 8:off + 24]
                dst = frame[off + 24:off + 40]
                l4 = off + 40
                end = off + ip_len
                if proto in _IPV6_EXT or proto == 44 or proto == 51:
                    hops = 0
                    while True:
                        if hops == MAX_IPV6_EXT_HEADERS:
                            stats.ipv6_ext_limit += 1
                            return
                        if n < l4 + 8:
                            stats.truncated_ip += 1
                            return
                        hops += 1
                        nxt = frame[l4]
                        if proto == 44:
                            fo = _u16(frame, l4 + 2)[0]
                            ip_id = _u32(frame, l4 + 4)[0]
                            frag_off = fo & 0xFFF8
                            frag_more = fo & 1
                            if fo & 0xFFF8:
                                later_frag = True
                            elif fo & 1:
                                first_frag = True
                            l4 += 8
                        elif proto == 51:
                            l4 += (frame[l4 + 1] + 2) << 2
                        else:
                            l4 += (frame[l4 + 1] + 1) << 3
                        proto = nxt
                        if later_frag or not (proto in _IPV6_EXT or proto == 44 or proto == 51):
                            break
            else:
                stats.bad_ip += 1
                return
            # Header checks and TCP segment length follow the IP length (a capture with a
            # short snap length still has whole headers and says how long the payload was);
            # payload handed on is what was captured.
            cap_end = end if end <= n else n
            # ---- layer 4
            sport = dport = 0
            tcp_flags = -1
            if later_frag:
                fkey = (src, dst, ip_id, proto)
                hit = self._frags.get(fkey)
                if hit is None or ts - hit[2] > FRAG_TIMEOUT_NS:
                    stats.fragments_orphaned += 1
                    return
                sport, dport = hit[0], hit[1]
                stats.fragments_attributed += 1
            elif proto == P_TCP:
                if cap_end - l4 < 20:
                    stats.truncated_l4 += 1
                else:
                    sport, dport, seq, ack, doff, tcp_flags, _win = _tcp(frame, l4)
                    doff = (doff >> 4) << 2
            elif proto == P_UDP or proto == P_SCTP:
                if cap_end - l4 < 8:
                    stats.truncated_l4 += 1
                else:
                    sport, dport = _ports(frame, l4)
            elif proto == P_ICMP or proto == P_ICMPV6:
                if cap_end - l4 < 2:
                    stats.truncated_l4 += 1
                else:
                    sport, dport, _one_way = icmp_ports(proto, frame[l4], frame[l4 + 1])
            if first_frag:
                frags = self._frags
                frags[(src, dst, ip_id, proto)] = (sport, dport, ts)
                if len(frags) > MAX_FRAG_ENTRIES:
                    frags.popitem(last=False)
                    stats.frag_table_evicted += 1
        # ---- the flow
        if src < dst or (src == dst and sport <= dport):
            d = 0
            key = (src, sport, dst, dport, proto, vlan, ivlan)
        else:
            d = 1
            key = (dst, dport, src, sport, proto, vlan, ivlan)
        flows = table.tcp if proto == P_TCP else table.other
        st = flows.get(key)
        if st is None:
            pure_syn = tcp_flags >= 0 and tcp_flags & 0x12 == 0x02
            if ver == 4:
                a_addr, b_addr = _addr4(key[0]), _addr4(key[2])
            else:
                a_addr, b_addr = key[0], key[2]
            st = table.create(key, a_addr, key[1], b_addr, key[3], proto, vlan, ivlan,
                              ifindex, d, ts)
            st.init_by_syn = pure_syn
            if proto == P_ICMP or proto == P_ICMPV6:
                if cap_end - l4 >= 2 and not later_frag:
                    st.icmp_type = frame[l4]
                    st.icmp_code = frame[l4 + 1]
        else:
            flows.move_to_end(key)
            if st.ended_ns and tcp_flags >= 0 and tcp_flags & 0x17 == 0x02:
                # A new SYN on a flow that already ended: the key is reused by a new
                # connection. Close the old one now and start over.
                table.finish(st, FlowEndReason.END_OF_FLOW)
                self._packets -= 1  # counted again by the call below
                return self.feed(ts, ifindex, link, frame, wire_len)
            if not st.start_ns:
                st.start_ns = ts
        if ts > st.last_ns:
            st.last_ns = ts
        st.pkts[d] += 1
        st.octs[d] += ip_len
        st.l2[d] += wire_len
        self._metered += 1
        if tcp_flags >= 0 and not tcp_flags & 0x07:
            # TCP without SYN, FIN or RST (nearly every segment): the block below with
            # the branches that cannot apply taken out. Same effects.
            pstart = l4 + doff
            plen = end - pstart if end > pstart else 0
            st.flags[d] |= tcp_flags
            if (not st.rtt_ns and st.synack_ns and tcp_flags & 0x10 and d == st.init
                    and st.syn_ns and ts > st.syn_ns):
                st.rtt_ns = ts - st.syn_ns
            if plen:
                bit = 8 << (16 * d)   # 'D'
                seen = st.hist_seen
                if not seen & bit:
                    st.hist_seen = seen | bit
                    st.hist.append("d" if d else "D")
                top = (seq + plen) & _M32
                last = st.last_seq[d]
                if last < 0:
                    st.last_seq[d] = top
                else:
                    delta = (top - last) & _M32
                    if delta and delta < _HALF32:
                        st.last_seq[d] = top
                    else:
                        st.rxmit[d] += 1
                        if st.rxmit[d] == st.rxmit_next[d]:
                            st.rxmit_next[d] *= 10
                            st.hist.append("t" if d else "T")
                sink = self.sink
                if sink is not None and not first_frag:
                    # A fragmented segment reaches the sink whole, through _fragment().
                    if st.l7_off:
                        st.l7_skipped += plen
                        return
                    skip = st.l7_skip
                    if skip is not None:
                        until = skip[d]
                        if until is not None and \
                                (until - seq - plen) & _M32 < _HALF32:
                            return   # wholly inside the L7 stage's skip range
                    sink.tcp_segment(st, d ^ st.init, seq, ack, tcp_flags,
                                     frame[pstart:cap_end] if cap_end > pstart else b"", ts)
            else:
                if tcp_flags & 0x10:
                    bit = 4 << (16 * d)   # 'A'
                    seen = st.hist_seen
                    if not seen & bit:
                        st.hist_seen = seen | bit
                        st.hist.append("a" if d else "A")
                top = seq & _M32
                last = st.last_seq[d]
                if last < 0:
                    st.last_seq[d] = top
                else:
                    delta = (top - last) & _M32
                    if delta and delta < _HALF32:
                        st.last_seq[d] = top
        elif tcp_flags >= 0:
            # TCP, inline: a call per packet costs more than this block's length.
            pstart = l4 + doff
            plen = end - pstart if end > pstart else 0
            st.flags[d] |= tcp_flags
            syn = tcp_flags & 0x02
            fin = tcp_flags & 0x01
            rst = tcp_flags & 0x04
            shift = 16 * d
            seen = st.hist_seen
            hist = st.hist
            if syn:
                st.syn_count += 1
                if tcp_flags & 0x10:
                    st.synack[d] = True
                    if not st.synack_ns:
                        st.synack_ns = ts
                else:
                    st.pure_syn[d] = True
                    if not st.init_by_syn:
                        # The first SYN without ACK names the initiator (semantics.py).
                        st.init_by_syn = True
                        if st.init != d and st.src_text:
                            # Identity was filled already (an L7 event): the texts follow.
                            st.src_text, st.dst_text = st.dst_text, st.src_text
                        st.init = d
                    if not st.syn_ns:
                        st.syn_ns = ts
            elif (not st.rtt_ns and st.synack_ns and tcp_flags & 0x10 and d == st.init
                  and st.syn_ns and ts > st.syn_ns):
                # (a capture out of time order gives no RTT rather than a negative one)
                st.rtt_ns = ts - st.syn_ns
            if fin:
                st.fin_count += 1
            if rst:
                st.rst_count += 1
            # Zeek's history (TCPSessionAdapter update_history).
            nbits = (syn >> 1) + fin + (rst >> 2)
            if nbits > 1:
                code = "I" if fin and rst else "Q"
                bit = _H[code] << shift
                if not seen & bit:
                    st.hist_seen = seen | bit
                    hist.append(code.lower() if d else code)
            elif nbits == 1:
                if syn:
                    code = "H" if tcp_flags & 0x10 else "S"
                    bit = _H[code] << shift
                    if not seen & bit:
                        st.hist_seen = seen | bit
                        hist.append(code.lower() if d else code)
                    elif seq != st.last_syn[d]:
                        hist.append(code.lower() if d else code)
                    st.last_syn[d] = seq
                elif fin:
                    fseq = (seq + plen) & _M32
                    bit = _H["F"] << shift
                    if not seen & bit:
                        st.hist_seen = seen | bit
                        hist.append("f" if d else "F")
                    elif fseq != st.last_fin[d]:
                        hist.append("f" if d else "F")
                    st.last_fin[d] = fseq
                else:
                    bit = _H["R"] << shift
                    if not seen & bit:
                        st.hist_seen = seen | bit
                        hist.append("r" if d else "R")
                    elif seq != st.last_rst[d]:
                        hist.append("r" if d else "R")
                    st.last_rst[d] = seq
            elif plen:
                bit = 8 << shift
                if not seen & bit:
                    st.hist_seen = seen | bit
                    hist.append("d" if d else "D")
            elif tcp_flags & 0x10:
                bit = 4 << shift
                if not seen & bit:
                    st.hist_seen = seen | bit
                    hist.append("a" if d else "A")
            # Retransmission: payload that ends at or before the highest sequence seen.
            top = (seq + plen + (1 if syn else 0) + (1 if fin else 0)) & _M32
            last = st.last_seq[d]
            if last < 0:
                st.last_seq[d] = top
            else:
                delta = (top - last) & _M32
                if delta and delta < _HALF32:
                    st.last_seq[d] = top
                elif plen and not ((syn or rst) and _Q1 < delta < _Q3):
                    st.rxmit[d] += 1
                    if st.rxmit[d] == st.rxmit_next[d]:
                        st.rxmit_next[d] *= 10
                        hist.append("t" if d else "T")
            if (fin or rst) and not st.ended_ns:
                i = st.init
                if rst or (st.flags[i] & 0x01 and st.flags[1 - i] & 0x01):
                    table.mark_ended(st, ts)
            sink = self.sink
            if sink is not None and (plen or syn or fin or rst) and not first_frag:
                # A fragmented segment reaches the sink whole, through _fragment().
                if st.l7_off:
                    st.l7_skipped += plen
                    return
                skip = st.l7_skip
                if skip is not None and plen and not syn | fin | rst:
                    until = skip[d]
                    if until is not None and (until - seq - plen) & _M32 < _HALF32:
                        return   # wholly inside the L7 stage's skip range
                sink.tcp_segment(st, d ^ st.init, seq, ack, tcp_flags,
                                 frame[pstart:cap_end] if cap_end > pstart else b"", ts)
        elif proto == P_UDP and not later_frag:
            bit = 8 << (16 * d)   # 'D'
            if not st.hist_seen & bit:
                st.hist_seen |= bit
                st.hist.append("d" if d else "D")
            sink = self.sink
            if sink is not None and cap_end - l4 > 8 and not first_frag:
                if st.l7_off:
                    st.l7_skipped += cap_end - l4 - 8
                else:
                    sink.udp_datagram(st, d ^ st.init, frame[l4 + 8:cap_end], ts)
        if (first_frag or later_frag) and self.sink is not None and not st.l7_off:
            self._fragment(st, d, (src, dst, ip_id, proto), frag_off, frag_more,
                           frame[l4:cap_end], cap_end < end, ts)

    def _fragment(self, st: FlowState, d: int, key: tuple, offset: int, more: int,
                  data: bytes, cut: bool, ts: int) -> None:
        """Hand a fragmented datagram's payload to the L7 stage once it is whole."""
        whole = self._defrag.add(key, offset, bool(more), data, ts, cut)
        self._stats.fragmented_payload_not_passed = self._defrag.given_up
        if whole is None:
            return
        self._stats.fragmented_payload_passed += 1
        proto = key[3]
        if proto == P_UDP and len(whole) > 8:
            self.sink.udp_datagram(st, d ^ st.init, whole[8:], ts)
        elif proto == P_TCP and len(whole) >= 20:
            _sp, _dp, seq, ack, doff, flags, _win = _tcp(whole, 0)
            doff = (doff >> 4) << 2
            self.sink.tcp_segment(st, d ^ st.init, seq, ack, flags, whole[doff:], ts)


def shard_of(link: int, frame: bytes) -> int:
    """A number that is the same for both directions of every flow between two hosts
    (the low 16 bits of the two IP addresses, XOR-ed), for spreading packets over
    parallel meters; 0 for what is not IP. Addresses only, not ports, so that every
    fragment of a datagram lands where its first fragment does."""
    n = len(frame)
    if link == LINKTYPE_ETHERNET:
        if n < 14:
            return 0
        et = (frame[12] << 8) | frame[13]
        off = 14
        while et in _ETH_VLAN and off + 4 <= n and off < 26:
            et = (frame[off + 2] << 8) | frame[off + 3]
            off += 4
        if et == 0x8864:
            if n < off + 8:
                return 0
            ppp = (frame[off + 6] << 8) | frame[off + 7]
            off += 8
            et = 0x0800 if ppp == 0x0021 else 0x86DD if ppp == 0x0057 else 0
        if et != 0x0800 and et != 0x86DD:
            return 0
    elif link in _RAW_LINKS:
        off = 0
    elif link == LINKTYPE_NULL or link == LINKTYPE_LOOP:
        off = 4
    elif link == LINKTYPE_LINUX_SLL or link == LINKTYPE_LINUX_SLL2:
        off = 16 if link == LINKTYPE_LINUX_SLL else 20
        et_at = 14 if link == LINKTYPE_LINUX_SLL else 0
        if n >= off and (frame[et_at] << 8 | frame[et_at + 1]) == 0x8100:
            off += 4
    elif link == LINKTYPE_C_HDLC:
        if n < 4 or (frame[2] << 8 | frame[3]) not in (0x0800, 0x86DD):
            return 0
        off = 4
    else:
        return 0
    if n < off + 40 and not (n >= off + 20 and frame[off] >> 4 == 4):
        return 0
    if frame[off] >> 4 == 4:
        return ((frame[off + 14] << 8) | frame[off + 15]) ^ \
            ((frame[off + 18] << 8) | frame[off + 19])
    if frame[off] >> 4 == 6:
        return ((frame[off + 22] << 8) | frame[off + 23]) ^ \
            ((frame[off + 38] << 8) | frame[off + 39])
    return 0
