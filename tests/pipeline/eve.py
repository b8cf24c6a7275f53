"""Loupe records seen as Suricata eve.json events, so suricata-verify's test.yaml checks
run against them generically: filter by event_type, dotted keys, count.

Each mapping below names the eve key, the Loupe value it is compared with, and, for eve
keys Loupe has no equivalent for, the reason (UNSUPPORTED). A check key listed there is
dropped from the match (and reported); a check whose event_type Loupe does not produce
is skipped as a whole.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections import OrderedDict

from sensor.model import DnsEvent, Flow, HttpEvent, L7Event, TlsEvent
from sensor.l7.quic import QuicEvent

UNSUPPORTED = {
    "pcap_cnt": "Loupe records carry packet time, not the packet's index in the file",
    "tx_id": "Suricata's per-flow transaction counter has no Loupe field",
    "flow_id": "Suricata's internal flow hash; Loupe links records by uid/community_id",
    "flow.alerted": "Loupe has no alerting",
    "flow.reason": "Suricata's reason (timeout/shutdown/forced) differs from IPFIX "
                   "flow_end_reason, which Loupe checks in its own tests",
    "flow.state": "Suricata's internal flow state machine; Loupe has Zeek conn_state",
    "tcp.state": "Suricata's TCP stream state at flow end; Loupe has Zeek conn_state",
    "tls.fingerprint": "Loupe keeps certificate subject/issuer/SAN/validity, not its hash",
    "tls.serial": "Loupe keeps certificate subject/issuer/SAN/validity, not its serial",
    "netflow.max_ttl": "Loupe records carry no TTL",
    "netflow.min_ttl": "Loupe records carry no TTL",
    "dns.tx_id": "Suricata's per-flow transaction counter has no Loupe field",
    "dns.version": "eve log format version, not a property of the traffic",
    "dns.flags": "Loupe keeps rcode and the TC bit, not the raw header flags",
    "dns.qr": "Loupe keeps rcode and the TC bit, not the raw header flags",
    "dns.rd": "Loupe keeps rcode and the TC bit, not the raw header flags",
    "dns.ra": "Loupe keeps rcode and the TC bit, not the raw header flags",
    "dns.aa": "Loupe keeps rcode and the TC bit, not the raw header flags",
}
SUPPORTED_EVENTS = frozenset({"flow", "netflow", "tls", "dns", "http", "quic"})

# Loupe app_proto -> Suricata's name for the same protocol.
_APP = {"postgres": "pgsql", "http2": "http2"}
_PROTO = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "IPv6-ICMP", 132: "SCTP"}
_RRTYPE = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
           28: "AAAA", 33: "SRV", 65: "HTTPS", 255: "ANY"}
_RCODE = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
          5: "REFUSED"}
_TLS_VERSION = {0x0300: "SSLv3", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2",
                0x0304: "TLS 1.3"}
_FLAG_BITS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10,
              "urg": 0x20, "ecn": 0x40, "cwr": 0x80}


def _iso(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns // 10**9, datetime.timezone.utc) \
        .strftime("%Y-%m-%dT%H:%M:%S")


def _iso_us(ns: int) -> str:
    dt = datetime.datetime.fromtimestamp(ns // 10**9, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{(ns // 1000) % 10**6:06d}+0000"


def _envelope(kind: str, src: str, sport: int, dst: str, dport: int, proto: int,
              cid: str) -> dict:
    return {"event_type": kind, "src_ip": src, "src_port": sport, "dest_ip": dst,
            "dest_port": dport, "proto": _PROTO.get(proto, str(proto)),
            "community_id": cid}


def suricata_flows(flows: list[Flow]) -> list[Flow]:
    """Suricata keeps a closed TCP flow until its timeout and counts late packets (the
    last ACKs, retransmitted FINs) in it; Loupe ends a flow 5 s after FIN both ways
    (DESIGN.md) and meters later packets as a new flow. To compare, later records of
    the same 5-tuple are folded into the first, oriented as the first."""
    merged: OrderedDict[tuple, list] = OrderedDict()
    for f in flows:
        key = (f.protocol, frozenset({(f.src_addr, f.src_port), (f.dst_addr, f.dst_port)}),
               f.vlan_id, f.inner_vlan_id)
        merged.setdefault(key, []).append(f)
    out = []
    for group in merged.values():
        first = group[0]
        fields = {name: getattr(first, name) for name in first.__slots__}
        for later in group[1:]:
            same = (later.src_addr, later.src_port) == (first.src_addr, first.src_port)
            i, r = ("initiator", "responder") if same else ("responder", "initiator")
            for part in ("packets", "octets", "l2_octets"):
                fields[f"initiator_{part}"] += getattr(later, f"{i}_{part}")
                fields[f"responder_{part}"] += getattr(later, f"{r}_{part}")
            fields["initiator_tcp_flags"] |= getattr(later, f"{i}_tcp_flags")
            fields["responder_tcp_flags"] |= getattr(later, f"{r}_tcp_flags")
            fields["flow_end_ns"] = max(fields["flow_end_ns"], later.flow_end_ns)
            fields["flow_start_ns"] = min(fields["flow_start_ns"], later.flow_start_ns)
            fields["app_proto"] = fields["app_proto"] or later.app_proto
        out.append(Flow(**fields))
    return out


def _tcp_keys(ev: dict, ts_flags: int, tc_flags: int) -> None:
    both = ts_flags | tc_flags
    ev["tcp.tcp_flags"] = f"{both:02x}"
    ev["tcp.tcp_flags_ts"] = f"{ts_flags:02x}"
    ev["tcp.tcp_flags_tc"] = f"{tc_flags:02x}"
    for name, bit in _FLAG_BITS.items():
        if both & bit:
            ev[f"tcp.{name}"] = True


def events(records: list, *, dns_version: int = 3) -> list[dict]:
    """eve-shaped dicts (flat, dotted keys) for every record."""
    out: list[dict] = []
    flows = suricata_flows([r for r in records if isinstance(r, Flow)])
    for f in flows:
        ev = _envelope("flow", f.src_addr, f.src_port, f.dst_addr, f.dst_port, f.protocol,
                       f.community_id)
        if f.app_proto:
            ev["app_proto"] = _APP.get(f.app_proto, f.app_proto)
        vlans = [v for v in (f.vlan_id, f.inner_vlan_id) if v]
        if vlans:
            ev["vlan"] = vlans
        ev["flow.pkts_toserver"] = f.initiator_packets
        ev["flow.pkts_toclient"] = f.responder_packets
        ev["flow.bytes_toserver"] = f.initiator_l2_octets
        ev["flow.bytes_toclient"] = f.responder_l2_octets
        ev["flow.age"] = (f.flow_end_ns - f.flow_start_ns) // 10**9
        if f.protocol == 6:
            _tcp_keys(ev, f.initiator_tcp_flags, f.responder_tcp_flags)
        out.append(ev)
        # netflow: one unidirectional record per direction (Suricata's netflow log).
        for fwd in (True, False):
            src, sport, dst, dport = (f.src_addr, f.src_port, f.dst_addr, f.dst_port) if fwd \
                else (f.dst_addr, f.dst_port, f.src_addr, f.src_port)
            nf = _envelope("netflow", src, sport, dst, dport, f.protocol, f.community_id)
            if f.app_proto:
                nf["app_proto"] = _APP.get(f.app_proto, f.app_proto)
            nf["netflow.pkts"] = f.initiator_packets if fwd else f.responder_packets
            nf["netflow.bytes"] = f.initiator_l2_octets if fwd else f.responder_l2_octets
            nf["netflow.start"] = _iso_us(f.flow_start_ns)
            nf["netflow.end"] = _iso_us(f.flow_end_ns)
            nf["netflow.age"] = (f.flow_end_ns - f.flow_start_ns) // 10**9
            if f.protocol == 6:
                flags = f.initiator_tcp_flags if fwd else f.responder_tcp_flags
                nf["tcp.tcp_flags"] = f"{flags:02x}"
                for name, bit in _FLAG_BITS.items():
                    if flags & bit:
                        nf[f"tcp.{name}"] = True
            out.append(nf)
    for r in records:
        if not isinstance(r, L7Event):
            continue
        d = r.detail
        env = (r.src_addr, r.src_port, r.dst_addr, r.dst_port, r.protocol, r.community_id)
        if isinstance(d, TlsEvent):
            ev = _envelope("tls", *env)
            ev.update({"tls.sni": d.sni, "tls.version": _TLS_VERSION.get(d.version, ""),
                       "tls.ja3.hash": d.ja3, "tls.ja3s.hash": d.ja3s, "tls.ja4": d.ja4})
            if d.cert_subject:
                ev["tls.subject"] = d.cert_subject
                ev["tls.issuerdn"] = d.cert_issuer
                ev["tls.notbefore"] = _iso(d.cert_not_before_ns)
                ev["tls.notafter"] = _iso(d.cert_not_after_ns)
            out.append(ev)
        elif isinstance(d, HttpEvent):
            ev = _envelope("http", *env)
            ev.update({"http.hostname": d.host, "http.url": d.path,
                       "http.http_method": d.method, "http.status": d.status,
                       "http.http_user_agent": d.user_agent, "http.protocol": d.version,
                       "http.length": d.response_body_len,
                       "http.http_content_type": d.response_content_type})
            out.append(ev)
        elif isinstance(d, DnsEvent):
            out.extend(_dns(env, d, dns_version))
        elif isinstance(d, QuicEvent):
            out.append(_quic(env, d))
    return out


def _dns(env: tuple, d: DnsEvent, version: int) -> list[dict]:
    src, sport, dst, dport, proto, cid = env
    rrtype = _RRTYPE.get(d.qtype, str(d.qtype))
    query = _envelope("dns", src, sport, dst, dport, proto, cid)
    query["dns.id"] = d.id
    if version == 2:
        query.update({"dns.type": "query", "dns.rrname": d.qname, "dns.rrtype": rrtype})
    else:
        query.update({"dns.type": "request", "dns.queries[0].rrname": d.qname,
                      "dns.queries[0].rrtype": rrtype})
    out = [query]
    if d.rcode < 0:
        return out
    if version == 2:
        # eve DNS v2 logs the answer in the flow's direction (client -> server).
        ans = _envelope("dns", src, sport, dst, dport, proto, cid)
        ans.update({"dns.type": "answer", "dns.rrname": d.qname, "dns.rrtype": rrtype})
    else:
        ans = _envelope("dns", dst, dport, src, sport, proto, cid)
        ans.update({"dns.type": "response", "dns.queries[0].rrname": d.qname,
                    "dns.queries[0].rrtype": rrtype})
    ans["dns.id"] = d.id
    ans["dns.rcode"] = _RCODE.get(d.rcode, str(d.rcode))
    grouped: dict[str, list[str]] = {}
    for i, a in enumerate(d.answers):
        name = _RRTYPE.get(a.rtype, str(a.rtype))
        ans[f"dns.answers[{i}].rrname"] = a.name
        ans[f"dns.answers[{i}].rrtype"] = name
        ans[f"dns.answers[{i}].ttl"] = a.ttl
        ans[f"dns.answers[{i}].rdata"] = a.data
        grouped.setdefault(name, []).append(a.data)
    for name, values in grouped.items():
        for i, value in enumerate(values):
            ans[f"dns.grouped.{name}[{i}]"] = value
    out.append(ans)
    return out


# Suricata's quic.extensions[i]: the ClientHello's extensions in wire order, by name; the
# values Loupe keeps are those of server_name and alpn.
_TLS_EXT = {0: "server_name", 16: "alpn", 43: "supported_versions", 13: "signature_algorithms",
            10: "supported_groups", 51: "key_share", 45: "psk_key_exchange_modes"}


def _quic(env: tuple, d: QuicEvent) -> dict:
    ev = _envelope("quic", *env)
    ev.update({"quic.version": f"{d.version:x}", "quic.sni": d.sni, "quic.ja3.hash": d.ja3,
               "quic.ja4": d.ja4})
    for i, ext in enumerate(int(e) for e in d.extensions):
        ev[f"quic.extensions[{i}].type"] = ext
        if ext in _TLS_EXT:
            ev[f"quic.extensions[{i}].name"] = _TLS_EXT[ext]
        values = [d.sni] if ext == 0 else list(d.alpn) if ext == 16 else []
        for j, value in enumerate(values):
            ev[f"quic.extensions[{i}].values[{j}]"] = value
    return ev


_ADDR_KEYS = ("src_ip", "dest_ip")


def _same(key: str, expected, actual) -> bool:
    if key in _ADDR_KEYS:
        return ipaddress.ip_address(str(expected)) == ipaddress.ip_address(str(actual))
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected == actual
    if isinstance(expected, list):
        return list(expected) == list(actual)
    return str(expected) == str(actual)


def unsupported_reason(key: str) -> str | None:
    if key in UNSUPPORTED:
        return UNSUPPORTED[key]
    base = re.sub(r"\[\d+\]", "", key)
    return UNSUPPORTED.get(base)


def count_matches(evs: list[dict], match: dict) -> int:
    n = 0
    for ev in evs:
        if all(k in ev and _same(k, v, ev[k]) for k, v in match.items()):
            n += 1
    return n
