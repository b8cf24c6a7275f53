"""Per-flow counts from a tcpdump capture, with the flow meter's semantics (bpf/flow.c):
canonical bidirectional key with VLAN tags, ICMP replies with their request type,
later fragments attributed through their first fragment, and, for offloaded captures,
the wire segments a GSO/GRO buffer stands for. The reference the kernel's counts are
held to."""

from __future__ import annotations

import ipaddress
import math
import struct
from dataclasses import dataclass, field

import dpkt

ICMP_REQ4 = {0: 8, 14: 13, 16: 15, 18: 17, 9: 10}
ICMP_REQ6 = {129: 128, 134: 133, 136: 135}


@dataclass
class Side:
    packets: int = 0
    ip_bytes: int = 0
    l2_bytes: int = 0
    tcp_flags: int = 0
    # TCP payload octets (what L7 accounting covers); records have no such count, so
    # it stays out of the comparison between a capture's flows and a sensor's.
    payload: int = field(default=0, compare=False)


@dataclass
class PcapFlow:
    first: tuple  # the (addr, port) end that sent the first packet
    syn_from: tuple | None = None
    sides: dict = field(default_factory=dict)  # end -> Side (what that end sent)

    @property
    def initiator(self) -> tuple:
        return self.syn_from or self.first


def read_pcap(path):
    """(wire length, captured bytes) of each record; the wire length is the pcap
    record's orig_len, which is what the interface carried."""
    data = open(path, "rb").read()
    off = 24
    out = []
    while off + 16 <= len(data):
        _s, _us, incl, orig = struct.unpack_from("=IIII", data, off)
        out.append((orig, data[off + 16:off + 16 + incl]))
        off += 16 + incl
    return out


def flows_from_pcap(path, *, segment_sizes: dict | None = None) -> dict:
    """key -> PcapFlow. key = (vlan, inner_vlan, proto, frozenset of two ends) where an
    end is (address, port). segment_sizes: end -> TCP payload bytes per wire segment,
    for captures taken with offloads on."""
    flows: dict = {}
    frags: dict = {}
    for wire_len, buf in read_pcap(path):
        eth = dpkt.ethernet.Ethernet(buf)
        tags = [t.id for t in getattr(eth, "vlan_tags", [])]
        vlan = tags[0] if tags else 0
        inner = tags[1] if len(tags) > 1 else 0
        ip = eth.data
        if isinstance(ip, dpkt.ip.IP):
            version, src, dst = 4, ip.src, ip.dst
            ip_len, hdr = ip.len, ip.hl * 4
            offset, mf, ident, proto = ip.offset, ip.mf, ip.id, ip.p
            l4 = ip.data
        elif isinstance(ip, dpkt.ip6.IP6):
            version, src, dst = 6, ip.src, ip.dst
            ip_len, hdr = 40 + ip.plen, 40 + sum(len(h) for h in ip.all_extension_headers)
            fh = ip.extension_hdrs.get(44)
            offset = (fh.frag_off << 3) if fh else 0
            mf, ident = (fh.m_flag if fh else 0), (fh.id if fh else 0)
            proto, l4 = ip.p, ip.data
        else:
            continue
        s_addr = str(ipaddress.ip_address(src))
        d_addr = str(ipaddress.ip_address(dst))
        fkey = (s_addr, d_addr, ident, proto)
        segs, seg_hdr = 1, 0
        if offset:
            if fkey not in frags:
                continue  # the kernel counts these in FRAG_NO_FIRST, not in a flow
            key, s_end = frags[fkey]
        else:
            sport = dport = 0
            flags = 0
            if proto == 6 and isinstance(l4, dpkt.tcp.TCP):
                sport, dport, flags = l4.sport, l4.dport, l4.flags
                seg_hdr = hdr + l4.off * 4
                size = (segment_sizes or {}).get((s_addr, sport))
                payload = ip_len - seg_hdr
                if size and payload > size:
                    segs = math.ceil(payload / size)
            elif proto == 17 and isinstance(l4, dpkt.udp.UDP):
                sport, dport = l4.sport, l4.dport
            elif proto in (1, 58):
                t = l4.type
                sport = (ICMP_REQ4 if version == 4 else ICMP_REQ6).get(t, t)
                dport = l4.code
            s_end, d_end = (s_addr, sport), (d_addr, dport)
            if proto in (1, 58):
                s_end, d_end = (s_addr, -1), (d_addr, -1)
                key = (vlan, inner, proto, frozenset((s_end, d_end)), sport, dport)
            else:
                key = (vlan, inner, proto, frozenset((s_end, d_end)))
            if mf:
                frags[fkey] = (key, s_end)
            flow = flows.get(key)
            if flow is None:
                flow = flows[key] = PcapFlow(first=s_end)
            if proto == 6 and flags & 0x02 and not flags & 0x10 and flow.syn_from is None:
                flow.syn_from = s_end
            flow.sides.setdefault(s_end, Side()).tcp_flags |= flags
        flow = flows[key]
        side = flow.sides.setdefault(s_end, Side())
        side.packets += segs
        side.ip_bytes += ip_len + (segs - 1) * seg_hdr
        side.l2_bytes += wire_len + (segs - 1) * (wire_len - ip_len + seg_hdr)
        if seg_hdr:
            side.payload += ip_len - seg_hdr
    return flows


def flows_from_records(records) -> dict:
    """The same keys, from Flow records (summed over a flow's records)."""
    out: dict = {}
    for r in records:
        if r.protocol in (1, 58):
            s_end, d_end = (r.src_addr, -1), (r.dst_addr, -1)
            # The ports are Community ID stand-ins; the key here uses the first
            # message's type (as its request) and code.
            req = (ICMP_REQ4 if r.ip_version == 4 else ICMP_REQ6).get(r.icmp_type, r.icmp_type)
            key = (r.vlan_id, r.inner_vlan_id, r.protocol, frozenset((s_end, d_end)),
                   req, r.icmp_code)
        else:
            s_end, d_end = (r.src_addr, r.src_port), (r.dst_addr, r.dst_port)
            key = (r.vlan_id, r.inner_vlan_id, r.protocol, frozenset((s_end, d_end)))
        flow = out.get(key)
        if flow is None:
            flow = out[key] = PcapFlow(first=s_end)
        for end, pk, ipb, l2, fl in ((s_end, r.initiator_packets, r.initiator_octets,
                                      r.initiator_l2_octets, r.initiator_tcp_flags),
                                     (d_end, r.responder_packets, r.responder_octets,
                                      r.responder_l2_octets, r.responder_tcp_flags)):
            if pk:
                side = flow.sides.setdefault(end, Side())
                side.packets += pk
                side.ip_bytes += ipb
                side.l2_bytes += l2
                side.tcp_flags |= fl
    return out
