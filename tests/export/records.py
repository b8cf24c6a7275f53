"""Sample records of every kind for the export tests, and a numbered-flow generator so
delivery tests can check that each record arrived exactly once by its uid."""

from __future__ import annotations

from sensor import model

FLOW = model.Flow(
    uid="Cx1", sensor_id="s1", flow_start_ns=1_700_000_000_000_000_000,
    flow_end_ns=1_700_000_001_000_000_000, src_addr="198.18.0.1", dst_addr="198.18.0.2",
    src_port=40000, dst_port=80, protocol=6, ip_version=4, vlan_id=100, inner_vlan_id=7,
    ifindex=3, initiator_octets=500, responder_octets=1500, initiator_packets=5,
    responder_packets=4, initiator_l2_octets=570, responder_l2_octets=1556,
    initiator_tcp_flags=0x1B, responder_tcp_flags=0x1A, tcp_syn_count=2, tcp_fin_count=2,
    flow_end_reason=model.FlowEndReason.END_OF_FLOW, conn_state="SF", history="ShADadFf",
    handshake_rtt_ns=120_000, community_id="1:abc=", app_proto="http",
    l7_coverage=model.L7Coverage(inspected=True, captured_octets=300, skipped_octets=1000),
    process=model.ProcessInfo(pid=42, comm="curl", exe="/usr/bin/curl", uid=0, user="root"),
    http_host="example.test",
)

ICMP6_FLOW = model.Flow(uid="C6", flow_start_ns=1, flow_end_ns=2, src_addr="fc00::1",
                        dst_addr="fc00::2", protocol=58, ip_version=6, icmp_type=128)

HTTP = model.L7Event(
    uid="Cx1", sensor_id="s1", community_id="1:abc=", ts_ns=5, src_addr="198.18.0.1",
    dst_addr="198.18.0.2", src_port=40000, dst_port=80, protocol=6,
    detail=model.HttpEvent(method="GET", host="example.test", path="/a?x=1", version="1.1",
                           status=200, reason="OK", user_agent="curl/7.88.1",
                           response_body_len=1024, latency_ns=300_000,
                           pii={"card.response": 1, "email.request": 2}),
)

DNS = model.L7Event(
    uid="C2", ts_ns=9, src_addr="fc00::1", dst_addr="fc00::53", src_port=5353,
    dst_port=53, protocol=17,
    detail=model.DnsEvent(id=4660, qname="a.example.test", qtype=1, rcode=0, answers=(
        model.DnsAnswer(name="a.example.test", rtype=5, ttl=60, data="b.example.test"),
        model.DnsAnswer(name="b.example.test", rtype=1, ttl=60, data="198.18.0.9"),
    ), latency_ns=1000),
)

TLS = model.L7Event(
    uid="C3", ts_ns=10, src_addr="198.18.0.1", dst_addr="198.18.0.2", src_port=1,
    dst_port=443, protocol=6,
    detail=model.TlsEvent(version=0x0304, client_version=0x0303, sni="x.test",
                          alpn=("h2", "http/1.1"), cipher=0x1301,
                          ja4="t13d1516h2_8daaf6152771_b0da82dd1658",
                          cert_san=("x.test",)),
)

LOST = model.LostEvent(source=model.LostSource.SPOOL_FULL.value, count=12,
                       interval_start_ns=1, interval_end_ns=2, sensor_id="s1")

ALL_KINDS = [FLOW, ICMP6_FLOW, HTTP, DNS, TLS, LOST]


def numbered_flow(i: int, *, sensor_id: str = "") -> model.Flow:
    """A small flow whose uid names its number, for exactly-once checks."""
    return model.Flow(
        uid=f"F{i:08d}", sensor_id=sensor_id, flow_start_ns=1_700_000_000_000_000_000 + i,
        flow_end_ns=1_700_000_000_000_000_000 + i + 1000, src_addr="198.18.0.1",
        dst_addr="198.18.0.2", src_port=1024 + i % 60000, dst_port=80, protocol=6,
        ip_version=4, initiator_packets=1, initiator_octets=60,
    )
