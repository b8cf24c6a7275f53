"""TlsParser: corpus conformance, chunking, bad input, bounds, fuzzing, real openssl."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensor.l7 import fingerprints as fp
from sensor.l7 import tls as tlsmod
from sensor.l7.base import NEED_DATA, Direction, ParserState
from sensor.l7.tls import TlsParser
from tests.l7 import pcaputil

C2S, S2C = Direction.TO_SERVER, Direction.TO_CLIENT


# --- building handshakes by hand (RFC 8446 4.1.2/4.1.3 layouts) --------------------------

def _vec(data: bytes, n: int) -> bytes:
    return len(data).to_bytes(n, "big") + data


def _ext(ext_type: int, body: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + _vec(body, 2)


def client_hello(sni: str | None = "x.test", alpn=(b"h2", b"http/1.1"),
                 ciphers=(0x1301, 0xC02F), versions=(0x0304, 0x0303)) -> bytes:
    exts = b""
    if sni is not None:
        exts += _ext(0, _vec(b"\x00" + _vec(sni.encode(), 2), 2))
    if alpn:
        exts += _ext(16, _vec(b"".join(_vec(p, 1) for p in alpn), 2))
    if versions:
        exts += _ext(43, _vec(b"".join(v.to_bytes(2, "big") for v in versions), 1))
    exts += _ext(13, _vec(bytes.fromhex("04030804"), 2))
    body = (b"\x03\x03" + bytes(32) + _vec(b"", 1)
            + _vec(b"".join(c.to_bytes(2, "big") for c in ciphers), 2)
            + _vec(b"\x00", 1) + _vec(exts, 2))
    return b"\x01" + _vec(body, 3)


def server_hello(cipher=0x1301, version=0x0304, alpn: bytes | None = None,
                 random: bytes = b"\x11" * 32) -> bytes:
    exts = b""
    if version == 0x0304:
        exts += _ext(43, b"\x03\x04")
    if alpn is not None:
        exts += _ext(16, _vec(_vec(alpn, 1), 2))
    body = b"\x03\x03" + random + _vec(b"", 1) + cipher.to_bytes(2, "big") + b"\x00" + _vec(exts, 2)
    return b"\x02" + _vec(body, 3)


def record(ctype: int, payload: bytes) -> bytes:
    return bytes([ctype, 3, 3]) + _vec(payload, 2)


def run(parser, steps):
    """Feed (direction, bytes) steps at increasing times; collect transactions after EOF."""
    out = []
    for i, (direction, data) in enumerate(steps):
        parser.receive_data(direction, data, 1000 + i)
        while (ev := parser.next_event()) is not NEED_DATA:
            out.append(ev)
    for direction in (C2S, S2C):
        parser.receive_eof(direction, 10_000)
    while (ev := parser.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


# --- corpus conformance ------------------------------------------------------------------

SV_TLS_CASES = ["bug-2646-01-tls12", "community-id-ipv4-tls13", "community-id-ipv6-tls"]
_SV_VERSIONS = {"TLS 1.2": 0x0303, "TLS 1.3": 0x0304}


def _iso_ns(text: str) -> int:
    when = datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.timezone.utc)
    return int(when.timestamp()) * 1_000_000_000


@pytest.mark.parametrize("case", SV_TLS_CASES)
def test_suricata_verify_tls_fields(corpus, case):
    """Every tls event check in the case's test.yaml, field by field.

    Not compared, on purpose: tls.fingerprint (certificate SHA-1) and tls.serial are not
    TlsEvent fields. Suricata counts one tls event per flow, as Loupe does.
    """
    base = corpus / "sv" / case
    checks = [c["filter"] for c in yaml.safe_load((base / "test.yaml").read_text())["checks"]
              if c["filter"]["match"].get("event_type") == "tls"]
    assert checks
    flows = [f for f in pcaputil.flows(base / "input.pcap") if f.proto == 6]
    for check in checks:
        m = check["match"]
        want = (ipaddress.ip_address(m["src_ip"]), m["src_port"],
                ipaddress.ip_address(m["dest_ip"]), m["dest_port"])
        matching = [f for f in flows if (ipaddress.ip_address(f.src), f.sport,
                                         ipaddress.ip_address(f.dst), f.dport) == want]
        events = [t.detail for f in matching for t in pcaputil.feed(TlsParser(), f)]
        assert len(events) == check["count"]
        ev = events[0]
        assert ev.sni == m["tls.sni"]
        assert ev.version == _SV_VERSIONS[m["tls.version"]]
        if "tls.subject" in m:
            assert ev.cert_subject == m["tls.subject"]
            assert ev.cert_issuer == m["tls.issuerdn"]
            assert ev.cert_not_before_ns == _iso_ns(m["tls.notbefore"])
            assert ev.cert_not_after_ns == _iso_ns(m["tls.notafter"])
        if ev.version == 0x0304:
            # The certificate travels encrypted in TLS 1.3: nothing to report.
            assert ev.cert_subject == "" and ev.cert_san == ()


def test_arkime_certificate_and_alpn(corpus):
    """Arkime's session JSON: leaf SAN, validity (ms), cipher, version, selected ALPN."""
    import json

    case = corpus / "arkime" / "tls-alpn-h2"
    body = json.loads((case / "tls-alpn-h2.test").read_text())["sessions3"][0]["body"]
    (flow,) = [f for f in pcaputil.flows(case / "tls-alpn-h2.pcap") if f.proto == 6]
    (tx,) = pcaputil.feed(TlsParser(), flow)
    ev = tx.detail
    leaf = [c for c in body["cert"] if "alt" in c][0]
    assert list(ev.cert_san) == leaf["alt"]
    assert ev.cert_not_before_ns == leaf["notBefore"] * 1_000_000
    assert ev.cert_not_after_ns == leaf["notAfter"] * 1_000_000
    assert "CN=cloudflare.com" in ev.cert_subject
    # Arkime writes the cipher by IANA name and the version as text.
    assert body["tls"]["cipher"] == ["TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"]
    assert ev.cipher == 0xCCA9
    assert body["tls"]["version"] == ["TLSv1.2"] and ev.version == 0x0303
    # "http2" in Arkime's protocol list comes from the ALPN the server chose.
    assert "http2" in body["protocol"] and ev.alpn_selected == "h2"
    assert ev.alpn == ("h2", "http/1.1")


def test_ndpi_tls_sni(corpus):
    """nDPI's Hostname/SNI for every flow it classified as TLS."""
    checked = 0
    for out in sorted((corpus / "ndpi").glob("*/*.out")):
        expected = pcaputil.ndpi_hostnames(out, "TLS")
        if not expected:
            continue
        flows = pcaputil.flows(out.with_suffix(""))
        for proto, a, b, host in expected:
            flow = pcaputil.find_flow(flows, proto, a, b)
            parser = TlsParser()
            pcaputil.feed(parser, flow)
            assert parser.summary()["tls_sni"] == host, (out.name, a, b)
            checked += 1
    assert checked == 10


# --- chunking and junk (STYLE rule 14) -----------------------------------------------------

def _corpus_flows(corpus):
    yield from (f for f in pcaputil.flows(corpus / "arkime/tls-alpn-h2/tls-alpn-h2.pcap") if f.proto == 6)
    yield from (f for f in pcaputil.flows(corpus / "sv/bug-2646-01-tls12/input.pcap") if f.proto == 6)
    yield from (f for f in pcaputil.flows(corpus / "sv/community-id-ipv4-tls13/input.pcap") if f.proto == 6)


def _bytewise(flow: pcaputil.L4Flow) -> pcaputil.L4Flow:
    chunks = [pcaputil.Chunk(c.direction, c.data[i:i + 1], c.ts_ns)
              for c in flow.chunks for i in range(len(c.data))]
    return pcaputil.L4Flow(flow.proto, flow.src, flow.sport, flow.dst, flow.dport, chunks)


def test_whole_bytewise_and_trailing_junk_agree(corpus):
    for flow in _corpus_flows(corpus):
        whole = pcaputil.feed(TlsParser(), flow)
        assert len(whole) == 1
        one = TlsParser()
        assert pcaputil.feed(one, _bytewise(flow)) == whole
        assert one.state is ParserState.DONE
        # Each direction's whole stream in one call, client first: still the same event.
        at_once = pcaputil.L4Flow(flow.proto, flow.src, flow.sport, flow.dst, flow.dport, [
            pcaputil.Chunk(d, flow.stream(d), next(c.ts_ns for c in flow.chunks if c.direction == d))
            for d in (C2S, S2C)])
        assert pcaputil.feed(TlsParser(), at_once) == whole
        # Junk after the handshake: the parser is DONE and no longer reads the stream (the
        # engine has stopped feeding it), so the junk cannot change anything.
        junk = pcaputil.L4Flow(flow.proto, flow.src, flow.sport, flow.dst, flow.dport,
                               flow.chunks + [pcaputil.Chunk(C2S, b"\xde\xad" * 50, 0)])
        late = TlsParser()
        assert pcaputil.feed(late, junk) == whole
        assert late.state is ParserState.DONE


def test_junk_inside_the_handshake_is_an_error_after_the_client_fields():
    parser = TlsParser()
    events = run(parser, [(C2S, record(22, client_hello()) + b"GET / HTTP/1.1\r\n\r\n")])
    assert parser.state is ParserState.ERROR and "not a TLS record" in parser.error
    (ev,) = [t.detail for t in events]
    assert ev.sni == "x.test" and ev.version == 0 and ev.ja4.startswith("t13d0204h2_")


def test_handshake_split_across_many_records_and_records_across_segments():
    hello = client_hello()
    records = b"".join(record(22, hello[i:i + 7]) for i in range(0, len(hello), 7))
    steps = [(C2S, records[i:i + 3]) for i in range(0, len(records), 3)]
    steps.append((S2C, record(22, server_hello())))
    split = run(TlsParser(), steps)
    joined = run(TlsParser(), [(C2S, record(22, hello)), (S2C, record(22, server_hello()))])
    assert [t.detail for t in split] == [t.detail for t in joined]
    assert split[0].detail.version == 0x0304 and split[0].detail.cipher == 0x1301
    assert split[0].ts_ns == 1000  # first byte of the ClientHello


def test_tls13_done_at_server_hello_and_alpn_selected_invisible():
    parser = TlsParser()
    events = run(parser, [(C2S, record(22, client_hello())), (S2C, record(22, server_hello()))])
    assert parser.state is ParserState.DONE
    (ev,) = [t.detail for t in events]
    assert ev.alpn_selected == "" and ev.client_version == 0x0303
    parser.receive_data(S2C, b"\xff" * 100, 5)  # ignored once DONE
    assert parser.state is ParserState.DONE


def test_tls12_selected_alpn_and_done_at_server_change_cipher_spec():
    parser = TlsParser()
    steps = [(C2S, record(22, client_hello(versions=()))),
             (S2C, record(22, server_hello(cipher=0xC02F, version=0x0303, alpn=b"h2")))]
    parser = TlsParser()
    parser.receive_data(*steps[0], 1)
    parser.receive_data(*steps[1], 2)
    assert parser.state is ParserState.OK  # waiting for the certificate
    parser.receive_data(S2C, record(20, b"\x01"), 3)  # resumption: straight to CCS
    assert parser.state is ParserState.DONE
    ev = parser.next_event().detail
    assert (ev.version, ev.cipher, ev.alpn_selected) == (0x0303, 0xC02F, "h2")
    assert ev.ja4.startswith("t12d")


def test_hello_retry_request_waits_for_the_real_server_hello():
    hrr = server_hello(cipher=0x1302, random=tlsmod._HRR_RANDOM)
    parser = TlsParser()
    events = run(parser, [
        (C2S, record(22, client_hello(sni="first.test"))),
        (S2C, record(22, hrr)),
        (C2S, record(20, b"\x01") + record(22, client_hello(sni="second.test"))),
        (S2C, record(22, server_hello(cipher=0x1303))),
    ])
    (ev,) = [t.detail for t in events]
    assert parser.hello_retries == 1
    assert ev.sni == "first.test" and ev.cipher == 0x1303


def test_alert_before_server_hello_emits_the_client_side():
    parser = TlsParser()
    events = run(parser, [(C2S, record(22, client_hello())), (S2C, record(21, b"\x02\x28"))])
    (ev,) = [t.detail for t in events]
    assert ev.sni == "x.test" and ev.cipher == 0 and parser.state is ParserState.DONE


def test_eof_with_only_a_client_hello():
    parser = TlsParser()
    (tx,) = run(parser, [(C2S, record(22, client_hello(sni=None, alpn=())))])
    assert tx.detail.ja4.startswith("t13i020200_") and tx.detail.sni == ""


def test_sslv2_client_hello_is_counted_unsupported():
    # SSLv2 record: 2-byte length with the high bit, then CLIENT-HELLO (1), version 3.1.
    v2 = bytes.fromhex("802e0103010015000000100000390000380000350000160000130000" "0a") + bytes(16)
    parser = TlsParser()
    assert run(parser, [(C2S, v2)]) == []
    assert parser.unsupported == 1 and parser.state is ParserState.DONE


def test_gap_inside_handshake_is_an_error():
    parser = TlsParser()
    parser.receive_data(C2S, record(22, client_hello())[:20], 1)
    parser.receive_gap(C2S, 100, 2)
    # That direction is over (too little of the hello arrived to read); the other one
    # is still parsed, and the parse ends in ERROR: bytes were lost.
    assert parser.state is ParserState.OK and parser.next_event() is NEED_DATA
    parser.receive_data(C2S, record(22, client_hello()), 3)   # ignored: side given up
    parser.receive_data(S2C, record(22, server_hello()), 4)
    assert parser.state is ParserState.ERROR and "missing" in parser.error
    ev = parser.next_event().detail
    assert ev.sni == "" and ev.cipher == 0x1301 and ev.version == 0x0304


def test_gap_in_both_directions_ends_the_parse():
    parser = TlsParser()
    parser.receive_data(C2S, record(22, client_hello())[:60], 1)
    parser.receive_gap(C2S, 100, 2)
    parser.receive_data(S2C, record(22, server_hello())[:10], 3)
    parser.receive_gap(S2C, 100, 4)
    assert parser.state is ParserState.ERROR
    # The hello's first 55 bytes hold no extension: fields, no fingerprint.
    ev = parser.next_event().detail
    assert ev.client_version == 0x0303 and ev.ja3 == "" and ev.ja4 == ""


def test_hello_cut_by_a_gap_gives_what_arrived():
    whole = record(22, client_hello(sni="gap.test"))
    parser = TlsParser()
    parser.receive_data(C2S, whole[:-8], 1)     # the hello's tail is lost
    parser.receive_gap(C2S, 8, 2)
    parser.receive_eof(S2C, 3)
    assert parser.state is ParserState.ERROR
    ev = parser.next_event().detail
    assert ev.sni == "gap.test" and ev.alpn == ("h2", "http/1.1") and ev.ja4 == ""
    assert parser.summary() == {"tls_sni": "gap.test"}


def test_stream_ending_inside_a_record_is_an_error():
    parser = TlsParser()
    parser.receive_data(C2S, record(22, client_hello())[:-1], 1)
    parser.receive_eof(C2S, 2)
    assert parser.state is ParserState.OK   # the server's side may still come
    parser.receive_eof(S2C, 3)
    assert parser.state is ParserState.ERROR and "ended inside" in parser.error
    # What arrived of the hello is read: all but its last byte.
    assert parser.next_event().detail.sni == "x.test"


def test_record_and_handshake_bounds():
    parser = TlsParser()
    parser.receive_data(C2S, bytes([22, 3, 3]) + (tlsmod.MAX_RECORD + 1).to_bytes(2, "big"), 1)
    assert parser.state is ParserState.ERROR and "exceeds" in parser.error
    # A handshake message over MAX_HANDSHAKE is cut, not refused: its first MAX_HANDSHAKE
    # bytes are used, the rest is dropped unbuffered, and the next message is parsed
    # (tests/l7/test_tls_edges.py has it with a real server).
    parser = TlsParser()
    parser.receive_data(C2S, record(22, client_hello()), 1)
    parser.receive_data(S2C, record(22, server_hello(version=0x0303, cipher=0xC02F)), 2)
    declared = (1 << 24) - 1
    parser.receive_data(S2C, record(22, b"\x0b" + declared.to_bytes(3, "big")), 3)
    sent = 0
    while sent < declared:
        n = min(1 << 14, declared - sent)
        parser.receive_data(S2C, record(22, bytes(n)), 4)
        sent += n
        _assert_bounded(parser)
        if sent > tlsmod.MAX_HANDSHAKE:
            assert parser.truncated == 1
    # The cut chain (no leaf) emits the event; the parse waits for ServerHelloDone (a
    # CertificateRequest may come before it).
    assert parser.state is ParserState.OK and parser.truncated == 1
    parser.receive_data(S2C, record(22, b"\x0e\x00\x00\x00"), 5)
    assert parser.state is ParserState.DONE
    ev = parser.next_event().detail
    assert ev.cipher == 0xC02F and ev.sni == "x.test" and ev.cert_subject == ""


def test_client_hello_cut_anywhere_gives_what_fits():
    """parse_client_hello(truncated=True) on every prefix of a Chrome-shaped hello (as
    the parser holds the first MAX_HANDSHAKE bytes of a longer one): no exception, the
    ciphers and extensions read are prefixes of the whole hello's, and the SNI is there
    once its extension fits whole."""
    from tests.l7.tls_captures import chrome_hello

    body = chrome_hello("cut.x.test")[4:]
    whole = tlsmod.parse_client_hello(body)
    sni_end = None
    for cut in range(2 + 32 + 33, len(body) + 1):
        got = tlsmod.parse_client_hello(body[:cut], truncated=True)
        assert got.truncated and got.legacy_version == whole.legacy_version
        assert whole.ciphers[:len(got.ciphers)] == got.ciphers
        assert whole.extensions[:len(got.extensions)] == got.extensions
        if got.sni:
            assert got.sni == "cut.x.test"
            sni_end = cut if sni_end is None else sni_end
        else:
            assert sni_end is None  # once whole, it stays
    assert got.extensions == whole.extensions and sni_end is not None
    with pytest.raises(tlsmod.Malformed):
        tlsmod.parse_client_hello(body[:-1])  # not declared cut: malformed


def test_malformed_client_hello_is_an_error():
    bad = b"\x01\x00\x00\x05\x03\x03\x00\x00\x00"
    parser = TlsParser()
    run(parser, [(C2S, record(22, bad))])
    assert parser.state is ParserState.ERROR and "malformed" in parser.error


def test_datagram_is_refused():
    parser = TlsParser()
    parser.receive_datagram(C2S, record(22, client_hello()), 1)
    assert parser.state is ParserState.ERROR


# --- fuzzing -------------------------------------------------------------------------------

_SEED = record(22, client_hello()) + record(22, server_hello(version=0x0303, cipher=0xC02F, alpn=b"h2"))


def _assert_bounded(parser: TlsParser) -> None:
    for side in parser._sides:
        assert len(side.records) <= 5 + tlsmod.MAX_RECORD
        assert len(side.handshake) <= 4 + tlsmod.MAX_HANDSHAKE


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([C2S, S2C]), st.binary(max_size=300)), max_size=12))
def test_fuzz_random_bytes(steps):
    parser = TlsParser()
    run(parser, steps)
    _assert_bounded(parser)
    assert parser.state in (ParserState.OK, ParserState.DONE, ParserState.ERROR)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_handshakes(data):
    raw = bytearray(_SEED)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    sizes = data.draw(st.lists(st.integers(1, 64), min_size=1, max_size=20))
    steps, pos = [], 0
    for size in sizes:
        steps.append((C2S, bytes(raw[pos:pos + size])))
        pos += size
    steps.append((S2C, bytes(raw[cut:])))
    parser = TlsParser()
    for tx in run(parser, steps):
        assert tx.detail.ja4 == "" or len(tx.detail.ja4) == 36
    _assert_bounded(parser)


# --- real traffic: openssl s_client <-> openssl s_server on loopback -----------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl_handshake(tmp_path: Path, port: int, proto_flag: str, cipher_args: list[str]) -> str:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=x.test",
             "-addext", "subjectAltName=DNS:x.test,DNS:alt.x.test"],
            check=True, capture_output=True, timeout=30)
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert), "-key", str(key),
         "-alpn", "h2", "-naccept", "1", "-quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        pcaputil.wait_for_port(port)
        client = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "x.test",
             "-alpn", "h2,http/1.1", proto_flag, *cipher_args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        return client.stdout
    finally:
        try:
            server.wait(timeout=5)  # -naccept 1: it exits after the one connection
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _tshark_client_hello(pcap: Path, port: int) -> dict[str, list[str]]:
    """Wireshark's decode of the capture's ClientHello. The port is decoded as TLS: a
    free port may be one Wireshark gives to another protocol (it then shows no TLS)."""
    fields = ["tls.handshake.ja3_full", "tls.handshake.ja3", "tls.handshake.ciphersuite",
              "tls.handshake.extension.type", "tls.handshake.sig_hash_alg",
              "tls.handshake.extensions.supported_version", "tls.handshake.extensions_alpn_str",
              "tls.handshake.extensions_server_name", "tls.handshake.version"]
    cmd = ["tshark", "-r", str(pcap), "-d", f"tcp.port=={port},tls",
           "-Y", "tls.handshake.type == 1", "-T", "fields",
           "-E", "separator=\t", "-E", "aggregator=|"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    values = out.strip().split("\n")[0].split("\t")
    return {f: v.split("|") if v else [] for f, v in zip(fields, values)}


def _independent_ja4(ws: dict[str, list[str]]) -> str:
    """JA4 from Wireshark's decode of the same ClientHello, written straight from JA4.md
    (not through sensor.l7.fingerprints), so a shared parsing mistake cannot hide."""
    import hashlib

    def grease(v: int) -> bool:
        return v & 0x0F0F == 0x0A0A and v >> 8 == v & 0xFF

    ciphers = [int(c, 0) for c in ws["tls.handshake.ciphersuite"]]
    exts = [int(e) for e in ws["tls.handshake.extension.type"]]
    sigs = [int(s, 0) for s in ws["tls.handshake.sig_hash_alg"]]
    versions = [int(v, 0) for v in ws["tls.handshake.extensions.supported_version"]]
    ciphers = [c for c in ciphers if not grease(c)]
    exts = [e for e in exts if not grease(e)]
    versions = [v for v in versions if not grease(v)]
    legacy = int(ws["tls.handshake.version"][0], 0)
    version = {0x0304: "13", 0x0303: "12"}[max(versions) if versions else legacy]
    alpn = ws["tls.handshake.extensions_alpn_str"][0]
    a = f"t{version}{'d' if 0 in exts else 'i'}{len(ciphers):02d}{len(exts):02d}{alpn[0]}{alpn[-1]}"
    b = hashlib.sha256(",".join(sorted(f"{c:04x}" for c in ciphers)).encode()).hexdigest()[:12]
    c_list = ",".join(sorted(f"{e:04x}" for e in exts if e not in (0, 16)))
    c_list += "_" + ",".join(f"{s:04x}" for s in sigs if not grease(s))
    return f"{a}_{b}_{hashlib.sha256(c_list.encode()).hexdigest()[:12]}"


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing on lo with tcpdump needs root")
@pytest.mark.skipif(not all(shutil.which(t) for t in ("openssl", "tcpdump", "tshark")),
                    reason="needs openssl, tcpdump and tshark (make install)")
@pytest.mark.parametrize(
    ("proto_flag", "cipher_args", "version", "cipher", "alpn_visible"),
    [
        ("-tls1_2", ["-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"], 0x0303, 0xC02B, True),
        ("-tls1_3", ["-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"], 0x0304, 0x1303, False),
    ],
)
def test_real_openssl_handshake(tmp_path, proto_flag, cipher_args, version, cipher, alpn_visible):
    port = _free_port()
    pcap = tmp_path / "tls.pcap"
    with pcaputil.capture_lo(pcap, port):
        stdout = _openssl_handshake(tmp_path, port, proto_flag, cipher_args)
    assert "ALPN protocol: h2" in stdout  # the client agrees on what was negotiated
    (flow,) = [f for f in pcaputil.flows(pcap) if f.proto == 6 and port in (f.sport, f.dport)]
    parser = TlsParser()
    (tx,) = pcaputil.feed(parser, flow)
    ev = tx.detail
    assert ev.sni == "x.test"
    assert ev.alpn == ("h2", "http/1.1")
    assert ev.version == version and ev.cipher == cipher
    assert ev.alpn_selected == ("h2" if alpn_visible else "")
    ws = _tshark_client_hello(pcap, port)
    assert ws["tls.handshake.extensions_server_name"] == ["x.test"]
    assert ev.ja3 == ws["tls.handshake.ja3"][0]
    assert fp.ja3_string(parser.client_hello) == ws["tls.handshake.ja3_full"][0]
    assert ev.ja4 == _independent_ja4(ws)
    if version == 0x0303:
        assert ev.cert_subject == "CN=x.test" and ev.cert_issuer == "CN=x.test"
        assert ev.cert_san == ("x.test", "alt.x.test")
        assert ev.cert_not_after_ns - ev.cert_not_before_ns == 2 * 86400 * 10**9
