"""The whole replay pipeline (reader -> meter -> flow table -> L7 engine) against other
tools' expected outputs in the shared corpus: suricata-verify checks, Zeek dns.log, nDPI
hostnames and app protocols, Arkime/FoxIO TLS fields.

Every expectation is parsed from the reference file at run time; nothing is copied.
Where Loupe disagrees with a reference on purpose, the test says why.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import yaml

from sensor.engine.pipeline import PipelineConfig
from sensor.flow.community_id import CommunityId
from sensor.model import DnsEvent, Flow, HttpEvent, L7Event, TlsEvent
from sensor.replay import replay_records
from tests.pipeline import eve
from tests.replay.ndpi_oracle import _endpoint


@functools.cache
def _records(path: str, seed: int) -> tuple:
    config = PipelineConfig(community=CommunityId(seed=seed))
    return tuple(replay_records(path, config=config))


def records(path: Path, *, seed: int = 0) -> list:
    return list(_records(str(path), seed))


def _suricata_seed(case_dir: Path) -> int:
    """The Community ID seed the case's suricata.yaml configures (0 by default)."""
    conf = case_dir / "suricata.yaml"
    if conf.exists():
        for line in conf.read_text().splitlines():
            if line.strip().startswith("community-id-seed:"):
                return int(line.split(":", 1)[1])
    return 0


# -- suricata-verify --------------------------------------------------------------------

def _sv_cases():
    from tests.conftest import CORPUS

    root = CORPUS / "sv"
    if not root.is_dir():
        return ["(no corpus)"]
    cases = []
    for case in sorted(root.iterdir()):
        for spec in sorted(case.glob("*test.yaml")):
            cases.append(f"{case.name}/{spec.name}")
    return cases


def _sv_pcap(case_dir: Path, spec: dict) -> Path:
    # "pcap:" names a path in the suricata-verify tree; the corpus keeps the one pcap of
    # the case beside the yaml.
    pcaps = [p for p in case_dir.iterdir() if p.suffix in (".pcap", ".pcapng")]
    assert len(pcaps) == 1, pcaps
    return pcaps[0]


@pytest.mark.parametrize("case", _sv_cases())
def test_suricata_verify_checks(corpus, case):
    name, spec_name = case.split("/")
    case_dir = corpus / "sv" / name
    spec = yaml.safe_load((case_dir / spec_name).read_text())
    # tests/dns/v2/* carry Suricata 7's DNS v2 expectations, some without saying so in env.
    default = 2 if "__v2__" in spec_name else 3
    dns_version = int((spec.get("env") or {}).get("SURICATA_EVE_DNS_VERSION", default))
    evs = eve.events(records(_sv_pcap(case_dir, spec), seed=_suricata_seed(case_dir)),
                     dns_version=dns_version)
    ran = 0
    skipped: list[str] = []
    for index, check in enumerate(spec.get("checks", [])):
        flt = check.get("filter")
        if flt is None:
            skipped.append(f"check {index}: {sorted(check)} is not an eve filter")
            continue
        match = dict(flt.get("match", {}))
        kind = match.get("event_type")
        if kind not in eve.SUPPORTED_EVENTS:
            skipped.append(f"check {index}: event_type {kind!r} has no Loupe record "
                           "(Loupe parses HTTP/DNS/TLS/QUIC; PostgreSQL, alerts are not)")
            continue
        for key in list(match):
            reason = eve.unsupported_reason(key)
            if reason:
                skipped.append(f"check {index}: {key}: {reason}")
                del match[key]
        found = eve.count_matches(evs, match)
        assert found == flt["count"], (
            f"check {index} {match}: {found} events match, expected {flt['count']}; "
            f"events of that type: {[e for e in evs if e['event_type'] == kind]}")
        ran += 1
    if not ran:
        pytest.skip("; ".join(skipped))
    print(f"{case}: {ran} checks run; not applicable: {skipped}")


# -- Zeek -------------------------------------------------------------------------------

def _zeek_log(path: Path) -> list[dict]:
    fields: list[str] = []
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#fields"):
            fields = line.split("\t")[1:]
        elif line and not line.startswith("#"):
            rows.append(dict(zip(fields, line.split("\t"))))
    return rows


def test_zeek_dns_over_fragmented_ipv6(corpus):
    """The answers arrive as IPv6 fragments: only IP reassembly before the L7 stage
    gives the DNS parser whole messages."""
    case = corpus / "zeek" / "ipv6-frag-dns"
    expected = _zeek_log(case / "dns.log")
    dns = [r for r in records(case / "ipv6-fragmented-dns.pcap")
           if isinstance(r, L7Event) and isinstance(r.detail, DnsEvent)]
    # Zeek logs a query that got no answer (the retransmission of trans_id 40849,
    # answered once) as a row of its own; Loupe pairs the one answer with the first
    # query and reports the retransmission in the same transaction, so rows with
    # rcode "-" have no Loupe counterpart.
    answered = [row for row in expected if row["rcode"] != "-"]
    assert len(dns) == len(answered) == 2
    for row, event in zip(answered, sorted(dns, key=lambda e: e.ts_ns)):
        d = event.detail
        assert (event.src_addr, event.src_port, event.dst_addr, event.dst_port) == (
            row["id.orig_h"], int(row["id.orig_p"]), row["id.resp_h"], int(row["id.resp_p"]))
        assert d.id == int(row["trans_id"])
        assert d.qname == row["query"]
        assert d.qtype == int(row["qtype"])
        assert d.qclass == int(row["qclass"])
        assert d.rcode == int(row["rcode"])
        assert abs(d.latency_ns / 1e9 - float(row["rtt"])) < 1e-6
        # Zeek writes each TXT string as "TXT <len> <text>"; Loupe keeps the strings.
        zeek_strings = re.findall(r"TXT \d+ ((?:(?! TXT \d+ ).)*)", row["answers"])
        loupe_strings = re.findall(r'"([^"]*)"', " ".join(a.data for a in d.answers))
        assert loupe_strings == zeek_strings
        assert [float(t) for t in row["TTLs"].split(",")] == [float(a.ttl) for a in d.answers]
        assert d.transport == row["proto"]


def test_zeek_wikipedia_http_and_dns_flows(corpus):
    """conn.log for wikipedia.pcap names each connection's service; Loupe's app_proto
    must agree on every connection Zeek identified as http or dns."""
    case = corpus / "zeek" / "rxmit-history"
    conn = _zeek_log(case / "conn-2.log")
    if "service" not in (conn[0] if conn else {}):
        pytest.skip("conn-2.log has no service column")
    flows = {(f.src_addr, f.src_port, f.dst_addr, f.dst_port): f
             for f in records(case / "wikipedia.pcap") if isinstance(f, Flow)}
    checked = 0
    for row in conn:
        if row["service"] not in ("http", "dns"):
            continue
        key = (row["id.orig_h"], int(row["id.orig_p"]), row["id.resp_h"],
               int(row["id.resp_p"]))
        assert flows[key].app_proto == row["service"], row
        checked += 1
    assert checked


# -- nDPI -------------------------------------------------------------------------------

_NDPI_LINE = re.compile(
    r"^\s+\d+\s+(?P<proto>TCP|UDP) (?P<a>\S+) <?-> (?P<b>\S+) "
    r"(?:\[VLAN: (?P<vlan>\d+)\])?.*?\[proto: [\d.]+/(?P<app>[^\]]+)\]")
_HOST = re.compile(r"\[Hostname/SNI: ([^\]]*)\]")
# nDPI master protocols that Loupe parses, and Loupe's app_proto for them.
_NDPI_APP = {"HTTP": "http", "DNS": "dns", "TLS": "tls", "QUIC": "quic"}


def _ndpi_cases():
    from tests.conftest import CORPUS

    root = CORPUS / "ndpi"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else ["(no corpus)"]


@pytest.mark.parametrize("case", _ndpi_cases())
def test_ndpi_hostnames_and_app_protocols(corpus, case):
    out = next((corpus / "ndpi" / case).glob("*.out"))
    pcap = out.with_suffix("")
    flows: dict[tuple, list[Flow]] = {}
    for r in records(pcap):
        if isinstance(r, Flow):
            key = (r.protocol, frozenset({(r.src_addr, r.src_port), (r.dst_addr, r.dst_port)}),
                   r.inner_vlan_id or r.vlan_id)
            flows.setdefault(key, []).append(r)
    checked = 0
    for line in out.read_text(errors="replace").splitlines():
        m = _NDPI_LINE.match(line)
        if not m:
            continue
        master = m["app"].split(".")[0]
        app = _NDPI_APP.get(master)
        if app is None:
            continue
        a, b = _endpoint(m["a"]), _endpoint(m["b"])
        key = (6 if m["proto"] == "TCP" else 17, frozenset({a, b}), int(m["vlan"] or 0))
        mine = flows.get(key)
        assert mine, f"no Loupe flow for {line.strip()[:120]}"
        host = _HOST.search(line)
        guessed = "[Confidence: DPI]" not in line
        if guessed:
            # nDPI classified by port or IP only ("Match by port", "DPI (cache)"...):
            # Loupe decides by content and may see no payload at all, so only a
            # content-based nDPI verdict is compared.
            continue
        if app == "tls" and m["proto"] == "UDP":
            continue   # DTLS/QUIC: nDPI's TLS over UDP; Loupe parses TLS over TCP only
        if app == "quic" and "[QUIC ver: Q0" in line:
            continue   # Google QUIC (Q0xx): its hello is not TLS; Loupe opens IETF QUIC only
        protos = {f.app_proto for f in mine}
        assert app in protos, f"{line.strip()[:160]}: Loupe app_proto {protos}"
        if host and host.group(1):
            names = set()
            for f in mine:
                names |= {f.http_host, f.dns_qname, f.tls_sni}
            want = host.group(1)
            if app == "http":
                # nDPI keeps the Host header as sent (with a port if any); Loupe's
                # http_host drops a default port only when the client did.
                assert want in names or want.split(":")[0] in {n.split(":")[0] for n in names}, \
                    (line.strip()[:200], names)
            else:
                assert want.lower() in {n.lower() for n in names}, (line.strip()[:200], names)
        checked += 1
    if not checked:
        pytest.skip("no content-detected HTTP/DNS/TLS flows in this case")


# -- Arkime / FoxIO ---------------------------------------------------------------------

def test_arkime_tls_alpn_h2(corpus):
    case = corpus / "arkime" / "tls-alpn-h2"
    body = json.loads((case / "tls-alpn-h2.test").read_text())["sessions3"][0]["body"]
    snap = yaml.safe_load((case / "ja4__insta@tls-alpn-h2.pcap.snap").read_text()
                          .split("---", 2)[2])[0]
    recs = records(case / "tls-alpn-h2.pcap")
    (flow,) = [r for r in recs if isinstance(r, Flow)]
    (tls,) = [r for r in recs if isinstance(r, L7Event) and isinstance(r.detail, TlsEvent)]
    d = tls.detail
    assert (flow.src_addr, flow.src_port) == (body["source"]["ip"], body["source"]["port"])
    assert (flow.dst_addr, flow.dst_port) == (body["destination"]["ip"],
                                             body["destination"]["port"])
    assert flow.community_id == tls.community_id == body["network"]["community_id"]
    assert flow.app_proto == "tls" and "tls" in body["protocol"]
    assert d.ja3 == body["tls"]["ja3"][0]
    assert d.ja3s == body["tls"]["ja3s"][0]
    assert d.ja4 == snap["ja4"] == flow.tls_ja4
    assert d.sni == snap["tls_server_name"] == flow.tls_sni
    # Arkime lists the SNI under http.host too (it keys hosts across protocols).
    assert d.sni == body["http"]["host"][0]
    assert d.alpn_selected == "h2" and "http2" in body["protocol"]
    assert d.version == 0x0303
    # Leaf certificate: Arkime lowercases CNs; the validity is the leaf's.
    leaf = next(c for c in body["cert"] if c.get("alt"))
    assert list(d.cert_san) == leaf["alt"]
    assert d.cert_not_after_ns // 10**6 == leaf["notAfter"]
    assert d.cert_not_before_ns // 10**6 == leaf["notBefore"]
    assert leaf["subjectCN"][0] in d.cert_subject.lower()
    # Arkime's packets/bytes count frames (with the 4-byte DLT_NULL header).
    assert flow.initiator_packets == body["source"]["packets"]
    assert flow.responder_packets == body["destination"]["packets"]
    assert flow.initiator_l2_octets == body["source"]["bytes"]
    assert flow.responder_l2_octets == body["destination"]["bytes"]


def test_http_events_carry_flow_identity(corpus):
    """Every L7 event points at its flow: same uid, community_id and 5-tuple."""
    recs = records(corpus / "zeek" / "rxmit-history" / "wikipedia.pcap")
    flows = {f.uid: f for f in recs if isinstance(f, Flow)}
    events = [r for r in recs if isinstance(r, L7Event)]
    assert any(isinstance(e.detail, HttpEvent) for e in events)
    for e in events:
        f = flows[e.uid]
        assert e.community_id == f.community_id
        assert (e.src_addr, e.src_port, e.dst_addr, e.dst_port, e.protocol) == (
            f.src_addr, f.src_port, f.dst_addr, f.dst_port, f.protocol)
