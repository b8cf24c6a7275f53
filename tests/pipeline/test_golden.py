"""Golden tests: each capture in tests/golden/ (made by tests/fixtures/gen_golden.py,
scapy edge cases and real curl/openssl/dig traffic) replays into exactly the records of
its expected file. After an intended change, regenerate the expected files with
`python -m tests.fixtures.gen_golden` and review the diff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sensor.export.jsonfmt import from_dict, to_dict
from sensor.replay import replay_records

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.pcap"))


def test_every_capture_has_an_expected_file():
    assert len(CASES) >= 9
    for name in CASES:
        assert (GOLDEN / f"{name}.jsonl").is_file(), name


@pytest.mark.parametrize("name", CASES)
def test_replay_matches_expected(name):
    expected = [json.loads(line) for line in
                (GOLDEN / f"{name}.jsonl").read_text().splitlines()]
    got = [to_dict(r) for r in replay_records(GOLDEN / f"{name}.pcap")]
    assert expected, f"{name}.jsonl is empty"
    for i, (want, have) in enumerate(zip(expected, got)):
        assert have == want, f"record {i} of {name} differs"
    assert len(got) == len(expected)
    # The expected files are valid records themselves (the JSON round trip holds).
    for item in expected:
        assert to_dict(from_dict(item)) == item


def _records(name):
    return [to_dict(r) for r in replay_records(GOLDEN / f"{name}.pcap")]


def test_real_curl_http_transactions():
    recs = _records("curl-http")
    http = [r for r in recs if r["type"] == "http"]
    assert sorted(r["detail"]["path"] for r in http) == ["/b.txt", "/index.html"]
    for r in http:
        assert r["detail"]["method"] == "GET" and r["detail"]["status"] == 200
        assert r["detail"]["user_agent"] == "golden-curl"
    index = next(r for r in http if r["detail"]["path"] == "/index.html")
    assert index["detail"]["response_body_len"] == len("<html>golden</html>\n") * 50
    flows = {r["uid"]: r for r in recs if r["type"] == "flow"}
    for r in http:
        assert flows[r["uid"]]["app_proto"] == "http"
        assert flows[r["uid"]]["http_host"] == "198.18.7.2"


@pytest.mark.parametrize("name, version", [("openssl-tls12", 0x0303),
                                           ("openssl-tls13", 0x0304)])
def test_real_openssl_handshakes(name, version):
    recs = _records(name)
    (tls,) = [r for r in recs if r["type"] == "tls"]
    d = tls["detail"]
    assert d["sni"] == "tls.golden.test" and d["version"] == version
    # JA4 names the highest version the client offers: curl offers TLS 1.3 either way.
    assert d["ja4"].startswith("t13d") and d["ja3"]
    if version == 0x0303:
        # TLS 1.2 shows the certificate in the clear.
        assert d["cert_san"] == ["tls.golden.test", "alt.golden.test"]
        assert "tls.golden.test" in d["cert_subject"]
    (flow,) = [r for r in recs if r["type"] == "flow" and r["uid"] == tls["uid"]]
    assert flow["tls_sni"] == "tls.golden.test" and flow["tls_ja4"] == d["ja4"]
    # The parser is done after the handshake: the encrypted rest is skipped, not parsed.
    assert flow["l7_coverage"]["skipped_octets"] > 0


def test_real_dig_udp_and_tcp():
    recs = _records("dig-dnsmasq")
    dns = [r["detail"] for r in recs if r["type"] == "dns"]
    got = sorted((d["qname"], d["qtype"], d["transport"], d["answers"][0]["data"])
                 for d in dns)
    assert got == [("dig.golden.test", 1, "tcp", "198.18.0.53"),
                   ("dig.golden.test", 1, "udp", "198.18.0.53"),
                   ("v6.golden.test", 28, "udp", "fc00::53")]


def test_scapy_edge_cases():
    http = [r for r in _records("http-pipelined") if r["type"] == "http"]
    assert [(h["detail"]["path"], h["detail"]["status"]) for h in http] == [
        ("/a", 200), ("/b?token=REDACTED", 201)]   # pipelined, in request order
    assert http[0]["detail"]["response_body_len"] == 11     # chunked "hello world"
    lost = {r["source"]: r["count"] for r in _records("http-gap-garbage")
            if r["type"] == "lost"}
    assert lost == {"parser_error": 2, "reassembly_gap": 1}
    (frag,) = [r for r in _records("dns-ipv4-fragments-vlan") if r["type"] == "dns"]
    assert len(frag["detail"]["answers"][0]["data"]) > 1500   # reassembled from 4 fragments
