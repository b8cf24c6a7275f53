"""QUIC parser (sensor/l7/quic.py): the RFC's key vectors; crafted packets sealed by aioquic's
own packet protection (an independent implementation) for out-of-order CRYPTO data,
coalesced packets, Retry, Version Negotiation, closes and bounds; the golden capture of
aioquic's client and server against what the clients saw and against tshark; the shared
corpus against tshark (which opens Initials itself), nDPI's JA4 and Zeek's quic.log;
detection; `loupe replay` and the collector; the kernel's sniffer; a live run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from sensor import model
from sensor.l7 import fingerprints as fp
from sensor.l7 import quic as Q
from sensor.l7.base import NEED_DATA, Direction, ParserState
from sensor.l7.detect import PROTO_UDP, detect
from sensor.l7.quic import V1, V2, QuicEvent, QuicParser, looks_like
from tests.l7 import pcaputil

C, S = Direction.TO_SERVER, Direction.TO_CLIENT
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GOLDEN = HERE.parent / "golden" / "quic-parser"
CORPUS = REPO.parent / "shared" / "corpus"
DCID, SCID, SERVER_CID = bytes.fromhex("8394c8f03e515708"), b"\x11" * 8, b"\x22" * 8

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None,
                                  reason="tshark is not installed")


# -- crafted packets, sealed by aioquic -------------------------------------------------------

def varint(v: int) -> bytes:
    if v < 0x40:
        return bytes((v,))
    if v < 0x4000:
        return (v | 0x4000).to_bytes(2, "big")
    return (v | 0x80000000).to_bytes(4, "big")


def crypto(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def initial(payload: bytes, *, client: bool = True, version: int = V1, dcid: bytes = DCID,
            scid: bytes = SCID, keys: bytes | None = None, pn: int = 0,
            token: bytes = b"") -> bytes:
    """One Initial packet protected by aioquic (aioquic.quic.crypto.CryptoPair) with the
    keys of `keys` (default: its own DCID) as the client or the server sends it."""
    from aioquic.quic.crypto import CryptoPair

    pair = CryptoPair()
    pair.setup_initial(keys or dcid, is_client=client, version=version)
    payload = payload + b"\x00" * max(0, 24 - len(payload))   # room for the HP sample
    pn_len = 2
    first = 0xC0 | ((1 if version == V2 else 0) << 4) | (pn_len - 1)
    header = (bytes((first,)) + version.to_bytes(4, "big") + bytes((len(dcid),)) + dcid
              + bytes((len(scid),)) + scid + varint(len(token)) + token
              + varint(pn_len + len(payload) + 16) + pn.to_bytes(pn_len, "big"))
    return pair.encrypt_packet(header, payload, pn)


def long_packet(kind_bits: int, body: bytes, version: int = V1, dcid: bytes = SCID,
                scid: bytes = SERVER_CID) -> bytes:
    """A long-header packet of another type (Handshake, 0-RTT) with opaque contents."""
    return (bytes((0xC0 | kind_bits << 4,)) + version.to_bytes(4, "big") + bytes((len(dcid),))
            + dcid + bytes((len(scid),)) + scid + varint(len(body)) + body)


def _tls13_hellos() -> tuple[bytes, bytes]:
    """A real ClientHello and ServerHello handshake message (openssl, golden capture)."""
    [flow] = pcaputil.flows(HERE.parent / "golden" / "openssl-tls13.pcap")
    out = []
    for d in (C, S):
        rec = flow.stream(d)
        out.append(rec[5:5 + int.from_bytes(rec[3:5], "big")])
    return out[0], out[1]


CH, SH = _tls13_hellos()


def drive(datagrams, parser=None):
    """datagrams: (direction, bytes, ts) or (direction, None, ts) for EOF."""
    p = parser or QuicParser()
    out = []
    for d, blob, ts in datagrams:
        if blob is None:
            p.receive_eof(d, ts)
        else:
            p.receive_datagram(d, blob, ts)
        while (ev := p.next_event()) is not NEED_DATA:
            out.append(ev)
    return p, out


def one(datagrams) -> tuple[QuicParser, QuicEvent]:
    p, out = drive(list(datagrams) + [(C, None, 10**9), (S, None, 10**9)])
    assert len(out) == 1, (p.state, p.error, out)
    return p, out[0].detail


def test_initial_keys_match_rfc9001_and_rfc9369_vectors():
    import hashlib
    import hmac

    # RFC 9001 A.1 and RFC 9369 A.1: DCID 0x8394c8f03e515708.
    want = {
        (Q._SALT_V1, b"quic ", b"client in"): ("1f369613dd76d5467730efcbe3b1a22d",
                                               "fa044b2f42a3fd3b46fb255c",
                                               "9f50449e04a0e810283a1e9933adedd2"),
        (Q._SALT_V1, b"quic ", b"server in"): ("cf3a5331653c364c88f0f379b6067e37",
                                               "0ac1493ca1905853b0bba03e",
                                               "c206b8d9b9f0f37644430b490eeaa314"),
        (Q._SALT_V2, b"quicv2 ", b"client in"): ("8b1a0bc121284290a29e0971b5cd045d",
                                                 "91f73e2351d8fa91660e909f",
                                                 "45b95e15235d6f45a6b19cbcb0294ba9"),
        (Q._SALT_V2, b"quicv2 ", b"server in"): ("82db637861d55e1d011f19ea71d5d2a7",
                                                 "dd13c276499c0249d3310652",
                                                 "edf6d05c83121201b436e16877593c3a"),
    }
    for (salt, prefix, side), (key, iv, hp) in want.items():
        prk = hmac.new(salt, DCID, hashlib.sha256).digest()
        secret = Q._expand_label(prk, side, 32)
        assert [Q._expand_label(secret, prefix + label, n).hex()
                for label, n in ((b"key", 16), (b"iv", 12), (b"hp", 16))] == [key, iv, hp]


@pytest.mark.parametrize("version", [V1, V2, 0xFF000021, 0xFF000022])
def test_opens_what_aioquic_seals(version):
    # aioquic derives v1's keys for every version but v2: drafts 33 and 34 used them too.
    # Drafts 29-32 (their own salt) are checked on ndpi/quic-29 with tshark below.
    p, ev = one([
        (C, initial(crypto(0, CH), version=version), 1000),
        (S, initial(crypto(0, SH), client=False, version=version, dcid=SCID,
                    scid=SERVER_CID, keys=DCID), 5000)])
    hello = __import__("sensor.l7.tls", fromlist=["x"]).parse_client_hello(CH[4:])
    assert (ev.version, ev.server_version, ev.sni, ev.ja4, ev.ja3) == (
        version, version, hello.sni, fp.ja4(hello, "q"), fp.ja3(hello))
    assert ev.ja4.startswith("q13") and ev.tls_version == 0x0304 and ev.cipher
    assert (ev.dcid, ev.client_scid, ev.server_scid) == (DCID.hex(), SCID.hex(),
                                                         SERVER_CID.hex())
    assert ev.initial_packets == 2 and ev.undecryptable == 0 and ev.latency_ns == 4000
    assert p.state is ParserState.DONE and p.summary() == {"tls_sni": ev.sni,
                                                           "tls_ja4": ev.ja4}


def test_crypto_frames_out_of_order_across_packets_and_coalesced():
    cuts = [0, 40, 100, 170, 260, len(CH)]
    pieces = [crypto(a, CH[a:b]) for a, b in zip(cuts, cuts[1:])]
    rng = random.Random(7)
    rng.shuffle(pieces)
    # Three packets, the last two coalesced in one datagram; a piece sent twice, one
    # overlapping another (retransmitted with other boundaries), PING and PADDING between.
    p1 = initial(pieces[0] + b"\x01" + b"\x00" * 30 + pieces[1], pn=0)
    p2 = initial(crypto(30, CH[30:120]) + pieces[2], pn=1)
    p3 = initial(pieces[3] + pieces[4] + pieces[0], pn=2, dcid=SERVER_CID, keys=DCID)
    _, ev = one([(C, p1, 1), (C, p2 + p3, 2)])
    assert ev.sni == "localhost" or ev.sni   # openssl's SNI, whatever the capture used
    assert ev.ja4 == fp.ja4(__import__("sensor.l7.tls", fromlist=["x"])
                            .parse_client_hello(CH[4:]), "q")
    assert ev.initial_packets == 3 and not ev.truncated


def test_coalesced_packets_are_read_by_their_lengths():
    # Client: an Initial and a 0-RTT packet in one datagram; server: Initial, Handshake
    # and the zero bytes aioquic pads datagrams with.
    zero_rtt = long_packet(1, os.urandom(200), dcid=DCID, scid=SCID)
    server = (initial(b"\x02\x00\x00\x00\x00" + crypto(0, SH), client=False, dcid=SCID,
                      scid=SERVER_CID, keys=DCID)
              + long_packet(2, os.urandom(300)) + b"\x00" * 200)
    p, ev = one([(C, initial(crypto(0, CH[:100])) + zero_rtt, 1),
                 (C, initial(crypto(100, CH[100:]), pn=1), 2), (S, server, 3)])
    assert ev.cipher and ev.tls_version == 0x0304 and ev.sni and p.skipped_packets == 1


def test_retry_moves_the_keys_to_the_retry_scid():
    retry_cid = b"\x33" * 10
    retry = (bytes((0xF0,)) + V1.to_bytes(4, "big") + bytes((len(SCID),)) + SCID
             + bytes((len(retry_cid),)) + retry_cid + b"token-bytes" + b"\x00" * 16)
    p, ev = one([
        (C, initial(crypto(0, CH)), 1),
        (S, retry, 2),
        (C, initial(crypto(0, CH), dcid=retry_cid, token=b"token-bytes", pn=1), 3),
        (S, initial(crypto(0, SH), client=False, dcid=SCID, scid=SERVER_CID,
                    keys=retry_cid), 4)])
    # The server's Initial opens only with keys from the Retry's connection ID.
    assert ev.retry and ev.cipher and ev.server_version == V1
    assert ev.dcid == DCID.hex() and ev.initial_packets == 3 and ev.undecryptable == 0


def test_version_negotiation_then_v1():
    vn = (b"\x80" + bytes(4) + bytes((len(SCID),)) + SCID + bytes((len(DCID),)) + DCID
          + V1.to_bytes(4, "big") + (0x1A2A3A4A).to_bytes(4, "big"))
    new_dcid = b"\x44" * 8
    _, ev = one([
        (C, initial(crypto(0, CH), version=V2), 1),
        (S, vn, 2),
        (C, initial(crypto(0, CH), dcid=new_dcid), 3),
        (S, initial(crypto(0, SH), client=False, dcid=SCID, scid=SERVER_CID,
                    keys=new_dcid), 4)])
    assert ev.server_versions == ("00000001", "1a2a3a4a")
    assert (ev.version, ev.server_version, ev.dcid) == (V1, V1, new_dcid.hex())
    assert ev.cipher and ev.latency_ns == 1


def test_hello_retry_request_is_skipped_for_the_server_hello_after_it():
    hrr_random = bytes.fromhex(
        "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
    hrr = SH[:6] + hrr_random + SH[38:]          # RFC 8446 4.1.3: the HRR's fixed random
    p, ev = one([(C, initial(crypto(0, CH)), 1),
                 (S, initial(crypto(0, hrr), client=False, dcid=SCID, keys=DCID), 2),
                 (C, initial(crypto(len(CH), CH), pn=1), 3),
                 (S, initial(crypto(len(hrr), SH), client=False, dcid=SCID, keys=DCID, pn=1),
                  4)])
    assert p.hello_retries == 1 and ev.cipher and ev.initial_packets == 4
    assert p.state is ParserState.DONE


def test_version_negotiation_from_the_client_is_not_believed():
    vn = (b"\x80" + bytes(4) + bytes((8,)) + DCID + bytes((8,)) + SCID + bytes(4 * 3))
    p, out = drive([(C, initial(crypto(0, CH[:100])), 1), (C, vn, 2),
                    (C, initial(crypto(100, CH[100:]), pn=1), 3)])
    assert p.client_hello is not None and not p._f.get("server_versions")


def test_connection_close_in_an_initial_is_data():
    close = b"\x1c" + varint(0x178) + varint(0x06) + varint(7) + b"no alpn"
    p, ev = one([(C, initial(crypto(0, CH)), 1),
                 (S, initial(close, client=False, dcid=SCID, keys=DCID), 2)])
    assert (ev.closed_by, ev.close_code, ev.close_reason) == ("server", 0x178, "no alpn")
    assert ev.sni and not ev.cipher and p.state is ParserState.DONE


def test_packets_that_do_not_open_are_counted_and_the_rest_goes_on():
    _, ev = one([(C, initial(crypto(0, CH[:100])), 1),
                 (C, initial(crypto(100, CH[100:]), keys=b"\x99" * 8, pn=1), 2),
                 (C, initial(crypto(100, CH[100:]), pn=2), 3)])
    assert ev.undecryptable == 1 and ev.initial_packets == 2 and ev.ja4


@pytest.mark.parametrize("blob,state,reason", [
    (b"\x00" * 60, ParserState.ERROR, "neither the long-header"),
    (b"\xc0\x00\x00\x00\x02" + b"\x08" + b"x" * 1300, ParserState.ERROR, "not one Loupe opens"),
    (b"\xc0\x00\x00\x00\x01\x30" + b"x" * 20, ParserState.ERROR, "DCID of 48"),
    (b"\x4f" + os.urandom(60), ParserState.DONE, ""),   # 1-RTT: the capture began later
])
def test_first_datagram_that_is_not_an_initial(blob, state, reason):
    p, out = drive([(C, blob, 1), (C, None, 2)])
    assert p.state is state and reason in p.error and out == []


def test_gquic_is_not_opened_but_ends_quietly():
    # ndpi/http-ipv6-mixed: Google QUIC Q025 on UDP 443 (public flags 0x0d).
    flows = [f for f in pcaputil.flows(CORPUS / "ndpi/http-ipv6-mixed/http_ipv6.pcap")
             if f.proto == 17 and f.dport == 443]
    assert flows
    for flow in flows:
        p = QuicParser()
        assert pcaputil.feed(p, flow) == [] and p.state is not ParserState.OK


def test_frame_an_initial_may_not_carry_is_an_error():
    stream = b"\x08" + varint(0) + b"hello"      # STREAM in an Initial: RFC 9000 §12.4
    p, out = drive([(C, initial(crypto(0, CH[:50]) + stream), 1)])
    assert p.state is ParserState.ERROR and "frame type 0x08" in p.error
    p, out = drive([(C, initial(crypto(0, SH)), 1)])
    assert p.state is ParserState.ERROR and "handshake type 2" in p.error


def test_crypto_stream_bounds():
    # Data past MAX_CRYPTO is dropped and marked; the buffer never exceeds it.
    p, out = drive([(C, initial(crypto(Q.MAX_CRYPTO - 10, b"z" * 100) + crypto(0, CH[:60])),
                     1), (C, None, 2)])
    assert p.state is ParserState.DONE and out[0].detail.truncated
    # Hundreds of disjoint one-byte pieces: at most MAX_RANGES are held.
    frames = b"".join(crypto(10 + 2 * i, b"x") for i in range(300))
    p = QuicParser()
    p.receive_datagram(C, initial(frames), 1)
    assert len(p._crypto[0].ranges) <= Q.MAX_RANGES and p._crypto[0].truncated
    assert len(p._crypto[0].buf) <= Q.MAX_CRYPTO
    # A hello longer than the cap can never complete: its length alone says so.
    huge = b"\x01" + (Q.MAX_CRYPTO).to_bytes(3, "big") + CH[4:]
    p, out = drive([(C, initial(crypto(0, huge[:900])), 1), (C, None, 2)])
    assert out[0].detail.truncated and not out[0].detail.sni


def test_gives_up_after_max_datagrams_without_hellos():
    p, _ = drive([(C, initial(crypto(0, CH[:40]), pn=i), i) for i in range(Q.MAX_DATAGRAMS)])
    assert p.state is ParserState.DONE


def test_stream_input_and_event_validation():
    p = QuicParser()
    p.receive_data(C, b"\xc0\x00\x00\x00\x01", 1)
    assert p.state is ParserState.ERROR and "UDP" in p.error
    with pytest.raises(ValueError):
        QuicEvent(version=1 << 32)
    with pytest.raises(ValueError):
        QuicEvent(closed_by="nobody")
    with pytest.raises(ValueError):
        QuicEvent(dcid="ab" * 21)
    assert QuicEvent(alpn=["h3"]).alpn == ("h3",)


# -- detection ---------------------------------------------------------------------------------

def _first_client_datagrams():
    out = []
    for rel in CORPUS_FILES:
        for f in pcaputil.flows(CORPUS / rel):
            if f.proto == 17:
                out.append(f.chunks[0].data)
    for f in golden_flows()[1].values():
        out.append(f.chunks[0].data)
    return out


def test_signature_accepts_client_initials_and_refuses_dns_and_others():
    from scapy.layers.dns import DNS, DNSQR
    from scapy.packet import raw

    firsts = _first_client_datagrams()
    assert len(firsts) == 11 and all(looks_like(d, C) for d in firsts)
    dns = [raw(DNS(id=i, rd=1, qd=DNSQR(qname="example.org", qtype=t)))
           for i in (0, 0xC000, 0xFFFF) for t in (1, 28, 65)]
    for cap in ("dig-dnsmasq.pcap", "dns-udp-tcp.pcap"):
        dns += [c.data for f in pcaputil.flows(HERE.parent / "golden" / cap)
                if f.proto == 17 for c in f.chunks]
    assert dns and not any(looks_like(d, C) or looks_like(d, S) for d in dns)
    v1 = firsts[-1]
    assert not looks_like(v1[:1199], C)                        # under 1200 bytes
    assert not looks_like(v1[:1] + b"\x00\x00\x00\x02" + v1[5:], C)   # unknown version
    assert not looks_like(v1[:1] + V2.to_bytes(4, "big") + v1[5:], C)  # v2 with v1 type bits
    assert not looks_like(bytes((v1[0] & 0x7F,)) + v1[1:], C)   # short header


def test_detect_by_content_on_any_port_and_by_port_443():
    first = golden_flows()[1][next(iter(golden_flows()[1]))].chunks[0].data
    assert detect(protocol=PROTO_UDP, server_port=4433, to_server=first) == "quic"
    assert detect(protocol=PROTO_UDP, server_port=443, to_server=b"\x41" + bytes(40)) == "quic"
    from scapy.layers.dns import DNS, DNSQR
    from scapy.packet import raw

    assert detect(protocol=PROTO_UDP, server_port=443,
                  to_server=raw(DNS(qd=DNSQR(qname="a.example")))) == "dns"


# -- the golden capture: aioquic's client and server ---------------------------------------------

def golden_flows():
    exp = json.loads((GOLDEN / "session.expect.json").read_text())
    flows = {f.sport: f for f in pcaputil.flows(GOLDEN / "session.pcap")
             if f.proto == 17 and f.dport == exp["server_port"]}
    return exp, flows


def golden_events() -> dict[str, QuicEvent]:
    exp, flows = golden_flows()
    out = {}
    for conn in exp["connections"]:
        p = QuicParser()
        evs = pcaputil.feed(p, flows[conn["client_port"]])
        assert p.state is ParserState.DONE, (conn["case"], p.error)
        [ev] = evs
        out[conn["case"]] = ev.detail
    return out


def test_golden_matches_what_the_clients_saw():
    exp, _ = golden_flows()
    got = golden_events()
    assert sorted(got) == sorted(c["case"] for c in exp["connections"]) and len(got) == 7
    for conn in exp["connections"]:
        ev = got[conn["case"]]
        assert (ev.sni, list(ev.alpn)) == (conn["sni"], conn["alpn"]), conn["case"]
        # The client's first Initial is of the version it started with; the server's is
        # the one they settled on (compatible negotiation switches to v2 at once).
        assert ev.version == (conn["version"] if conn["case"] == "vn" else
                              conn["offered_version"]), conn["case"]
        assert ev.server_version == conn["version"], conn["case"]
        assert ev.cipher == conn["cipher"] and ev.retry == conn["retry"], conn["case"]
        assert (ev.close_code or None) == conn["error_code"], conn["case"]
        if conn["error_code"]:
            assert (ev.closed_by, ev.close_reason) == ("server", conn["error"])
        assert bool(ev.server_versions) == (conn["case"] == "vn")
        assert ev.latency_ns > 0 and ev.undecryptable == 0 and not ev.truncated
    # The big hello needed two client Initials, in two datagrams.
    assert got["big"].initial_packets >= 3 and len(got["big"].alpn) == 41
    assert (got["compat"].version, got["compat"].server_version) == (V1, V2)
    assert got["vn"].server_versions == ("00000001",)


def test_golden_client_datagrams_reordered_give_the_same_hello():
    exp, flows = golden_flows()
    [big] = [c for c in exp["connections"] if c["case"] == "big"]
    chunks = flows[big["client_port"]].chunks
    client = [c for c in chunks if c.direction == C]
    assert len(client[0].data) >= 1200 and len(client[1].data) >= 1200
    swapped = [(C, client[1].data, 1), (C, client[0].data, 2)]
    _, ev = one(swapped)
    want = golden_events()["big"]
    assert (ev.sni, ev.alpn, ev.ja4, ev.ja3) == (want.sni, want.alpn, want.ja4, want.ja3)


# -- tshark as the oracle -----------------------------------------------------------------------

_FIELDS = ("udp.srcport", "udp.dstport", "quic.version", "tls.handshake.type",
           "tls.handshake.extensions_server_name", "tls.handshake.extensions_alpn_str",
           "tls.handshake.ja3", "tls.handshake.ciphersuite", "tls.handshake.extension.type",
           "tls.handshake.sig_hash_alg", "tls.handshake.extensions.supported_version")


def tshark_hellos(path: Path) -> dict[int, dict]:
    """Per client port: the first ClientHello tshark decoded from an Initial it opened
    itself (SNI, ALPN, QUIC version, JA3, and the lists JA4 is made of), and the cipher of
    the first ServerHello."""
    args = ["tshark", "-r", str(path), "-Y", "quic", "-T", "fields", "-E", "occurrence=a",
            "-E", "aggregator=\x1f"]
    for f in _FIELDS:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout
    got: dict[int, dict] = {}
    for line in out.splitlines():
        row = {k: (v.split("\x1f") if v else []) for k, v in zip(_FIELDS, line.split("\t"))}
        port = int(row["udp.srcport"][0])
        types = row["tls.handshake.type"]
        if "1" in types and port not in got:
            got[port] = {
                "sni": (row["tls.handshake.extensions_server_name"] or [""])[0],
                "alpn": row["tls.handshake.extensions_alpn_str"],
                "version": int(row["quic.version"][0], 16),
                "ja3": row["tls.handshake.ja3"][0],
                "hello": fp.ClientHello(
                    legacy_version=0x0303,
                    ciphers=tuple(int(c, 16) for c in row["tls.handshake.ciphersuite"]),
                    extensions=tuple(map(int, row["tls.handshake.extension.type"])),
                    has_sni="0" in row["tls.handshake.extension.type"],
                    alpn=tuple(a.encode() for a in row["tls.handshake.extensions_alpn_str"]),
                    supported_versions=tuple(int(v, 16) for v in
                                             row["tls.handshake.extensions.supported_version"]),
                    signature_algorithms=tuple(int(s, 16) for s in
                                               row["tls.handshake.sig_hash_alg"])),
            }
        elif "2" in types:
            client = got.get(int(row["udp.dstport"][0]))
            if client is not None and "cipher" not in client:
                client["cipher"] = int(row["tls.handshake.ciphersuite"][0], 16)
    return got


def _check_against_tshark(events_by_port: dict[int, QuicEvent], oracle: dict[int, dict]):
    assert events_by_port and set(events_by_port) == set(oracle)
    for port, ev in events_by_port.items():
        o = oracle[port]
        assert (ev.sni, list(ev.alpn), ev.version, ev.ja3) == (
            o["sni"], o["alpn"], o["version"], o["ja3"]), port
        # JA4 from tshark's decoding of the same hello (the JA4 function itself is
        # checked against FoxIO's own outputs in test_fingerprints.py).
        assert ev.ja4 == fp.ja4(o["hello"], "q"), port
        assert list(ev.extensions) == [str(e) for e in o["hello"].extensions]
        if "cipher" in o:
            assert ev.cipher == o["cipher"], port


@needs_tshark
def test_golden_against_tshark():
    _, flows = golden_flows()
    oracle = tshark_hellos(GOLDEN / "session.pcap")
    events = {}
    for port, flow in flows.items():
        [t] = pcaputil.feed(QuicParser(), flow)
        events[port] = t.detail
    # The vn case: tshark shows its first ClientHello (v2, refused); Loupe reports the
    # attempt that went through (v1). Their hellos are the same but for the version.
    vn = next(p for p, e in events.items() if e.server_versions)
    assert oracle[vn]["version"] == V2 and events[vn].version == V1
    oracle[vn]["version"] = V1
    _check_against_tshark(events, oracle)


CORPUS_FILES = ("ndpi/quic-29/quic-29.pcap", "ndpi/quic-v2/quic-v2.pcapng",
                "sv/quic-ietf/input.pcap",
                "zeek/quic-chromium/chromium-115.0.5790.110-api-cirrus-com.pcap")


def corpus_events(rel: str) -> dict[int, QuicEvent]:
    out = {}
    for flow in pcaputil.flows(CORPUS / rel):
        if flow.proto != 17:
            continue
        p = QuicParser()
        [t] = pcaputil.feed(p, flow)
        assert p.state is ParserState.DONE, p.error
        out[flow.sport] = t.detail
    return out


@needs_tshark
@pytest.mark.parametrize("rel", CORPUS_FILES)
def test_corpus_against_tshark(rel):
    events = corpus_events(rel)
    _check_against_tshark(events, tshark_hellos(CORPUS / rel))
    for ev in events.values():
        # Every case shows the server's Initial too: ServerHello, TLS 1.3.
        assert ev.tls_version == 0x0304 and ev.server_version == ev.version
        assert ev.undecryptable == 0 and ev.latency_ns > 0


def test_corpus_features():
    # draft-29 with a Retry; the v2 server greases the fixed bit (RFC 9287) in its very
    # first Initial; Chromium scatters its hello over out-of-order CRYPTO frames.
    [d29] = corpus_events(CORPUS_FILES[0]).values()
    assert d29.retry and d29.version == 0xFF00001D and Q.version_name(d29.version) == "draft-29"
    [v2] = corpus_events(CORPUS_FILES[1]).values()
    assert v2.version == V2 and v2.cipher == 0x1301
    [chromium] = corpus_events(CORPUS_FILES[3]).values()
    assert chromium.sni == "api.cirrus-ci.com" and chromium.initial_packets == 2


@pytest.mark.parametrize("rel", CORPUS_FILES[:2])
def test_corpus_ja4_against_ndpi(rel):
    text = (CORPUS / (rel + ".out")).read_text()
    [want] = [line.split("[JA4: ")[1].split("]")[0] for line in text.splitlines()
              if "[JA4: " in line]
    [ev] = corpus_events(rel).values()
    # The cipher and extension hashes agree. nDPI's ALPN characters do not follow FoxIO's
    # JA4 definition (first and last character of the first ALPN): for "h3-29" it writes
    # "h3" where the definition gives "h9", and for "h3" it writes "h0".
    assert ev.ja4.split("_")[1:] == want.split("_")[1:]
    assert ev.ja4[:8] == want[:8]
    first = ev.alpn[0]
    assert ev.ja4[8:10] == first[0] + first[-1]


def test_zeek_quic_log():
    rows = []
    lines = (CORPUS / "zeek/quic-chromium/quic.log").read_text().splitlines()
    fields = next(line for line in lines if line.startswith("#fields")).split("\t")[1:]
    rows = [dict(zip(fields, line.split("\t"))) for line in lines if not line.startswith("#")]
    [row] = rows
    [ev] = corpus_events(CORPUS_FILES[3]).values()
    empty = lambda v: "" if v == "(empty)" else v   # noqa: E731
    assert (Q.version_name(ev.version), ev.dcid, ev.client_scid, ev.server_scid, ev.sni,
            ev.alpn[0]) == ("v" + row["version"], row["client_initial_dcid"],
                            empty(row["client_scid"]), row["server_scid"],
                            row["server_name"], row["client_protocol"])
    # ssl.log: TLSv13 and TLS_AES_128_GCM_SHA256.
    assert (ev.tls_version, ev.cipher) == (0x0304, 0x1301)
    # Loupe's own quic.log (--format zeek) has Zeek's values in Zeek's columns.
    record = model.L7Event(uid="u", ts_ns=1, src_addr="82.239.54.117", src_port=53727,
                           dst_addr="110.213.53.115", dst_port=443, protocol=17, detail=ev)
    columns = [name for name, _ in Q.ZEEK.columns]
    assert [v or "(empty)" for v in Q.ZEEK.values(record)] == [row[c] for c in columns]
    # And Suricata's EVE shape, as tests/pipeline/eve.py reads suricata-verify's checks.
    out = Q.eve(ev)
    assert out["sni"] == "api.cirrus-ci.com" and out["version"] == "1"
    assert [e.get("name") for e in out["extensions"]].index("alpn") == 8


# -- replay and the collector ---------------------------------------------------------------------

def test_replay_json_table_and_collector(tmp_path):
    from collector.ingest import decode_batch
    from collector.storage.duckdb import DuckDBStorage
    from sensor import model
    from sensor.export import jsonfmt, wire
    from sensor.export.table import TableWriter

    out = tmp_path / "out.jsonl"
    loupe = str(Path(sys.executable).with_name("loupe"))
    done = subprocess.run([loupe, "replay", "--no-progress", str(GOLDEN / "session.pcap"),
                           "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [jsonfmt.from_dict(json.loads(line)) for line in out.read_text().splitlines()]
    quic = [r for r in records if isinstance(r, model.L7Event) and r.kind == "quic"]
    exp, flows = golden_flows()
    want = {port: [t.detail for t in pcaputil.feed(QuicParser(), f)]
            for port, f in flows.items()}
    got = defaultdict(list)
    for r in quic:
        got[r.src_port].append(r.detail)
    # pcaputil reads packet times through a float: latencies compare to the microsecond.
    us = lambda evs: {p: [dataclasses.replace(e, latency_ns=round(e.latency_ns / 1000))  # noqa
                          for e in v] for p, v in evs.items()}
    assert us(got) == us(want) and len(quic) == 7
    quic_flows = [r for r in records if isinstance(r, model.Flow) and r.dst_port == 443]
    assert {f.app_proto for f in quic_flows} == {"quic"}
    assert {f.tls_sni for f in quic_flows} == {c["sni"] for c in exp["connections"]}
    assert all(f.tls_ja4.startswith("q13") for f in quic_flows)
    writer = TableWriter(None, color=False, width=None)
    lines = [writer.line(r) for r in quic]
    assert all(" quic " in line and "ja4=q13" in line for line in lines)
    assert any("QUIC v1 sni=retry.quic.golden.test alpn=h3 retry" in line for line in lines)
    assert any("closed by server 0x178 No common ALPN protocols" in line for line in lines)
    records = [r for r in records if not isinstance(r, model.LostEvent)]
    batch = wire.batch_to_proto(records, sensor_id="s1", batch_id=1, created_ns=1)
    store = DuckDBStorage(tmp_path / "db")
    store.store_many([decode_batch(batch)], 1)
    stored = list(store.records_since(0, 1 << 62, tables=("quic",)))
    key = lambda r: (r.ts_ns, r.uid)  # noqa: E731
    assert sorted(stored, key=key) == sorted(
        (dataclasses.replace(r, sensor_id="s1") for r in quic), key=key)
    store.close()


def test_tail_filters_tls_sni_and_ja4_match_quic_events():
    from collector import filters
    from sensor.export import wire

    [ev] = corpus_events(CORPUS_FILES[3]).values()
    rec = wire.to_proto(model.L7Event(uid="u", ts_ns=1, src_addr="198.18.0.1",
                                      dst_addr="198.18.0.2", protocol=17, detail=ev))
    flt = wire.observer_pb2.RecordFilter
    assert filters.compile_filter(flt(tls_sni=["*.cirrus-ci.com"]))(rec)
    assert not filters.compile_filter(flt(tls_sni=["*.example.org"]))(rec)
    assert filters.compile_filter(flt(tls_ja4=[ev.ja4]))(rec)
    assert not filters.compile_filter(flt(tls_ja4=["t13d0000h2_000000000000_000000000000"]))(rec)


# -- the kernel's content sniffer -----------------------------------------------------------

@pytest.mark.bpf
def test_kernel_sniffer_selects_quic_initials_of_the_versions_loupe_opens():
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw, raw

    from sensor.clock import SystemClock
    from sensor.kernel import abi, loader
    from sensor.kernel.hybrid import KernelSensor, SelectionConfig
    from tests.kernel.test_hybrid import MAC, Rig

    prog = loader.load(loader.LoadOptions(flow_map_size=1024))
    try:
        rig = Rig(prog, KernelSensor(prog, SystemClock()))
        rig.reset(SelectionConfig(ports=()))
        _, flows = golden_flows()
        base = next(iter(flows.values())).chunks[0].data    # a v1 client Initial
        cases = {}
        for i, version in enumerate(sorted(Q.VERSIONS)):
            type_bits = 0x10 if version == V2 else 0
            cases[20000 + i] = (bytes(((base[0] & 0xCF) | type_bits,))
                                + version.to_bytes(4, "big") + base[5:], True)
        cases[21000] = (base[:1] + (0xFF00001C).to_bytes(4, "big") + base[5:], False)
        cases[21001] = (base[:1] + (0x51303235).to_bytes(4, "big") + base[5:], False)  # Q025
        cases[21002] = (base[:1199], False)                      # too short for a client
        cases[21003] = ((base[0] | 0x10).to_bytes(1, "big") + base[1:], False)  # 0-RTT bits
        for sport, (payload, _) in cases.items():
            assert looks_like(payload, C) == cases[sport][1], sport
            rig.run(raw(Ether(**MAC) / IP(src="198.18.7.1", dst="198.18.7.2")
                        / UDP(sport=sport, dport=4433) / Raw(payload)))
        for sport, (_, selected) in cases.items():
            assert (rig.flow(sport)[1].l7_select == abi.SEL_SNIFFED) == selected, hex(sport)
    finally:
        prog.close()


# -- live: aioquic's client and server, the sensor, a collector ------------------------------

@pytest.mark.bpf
@pytest.mark.timeout(240)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_live_aioquic_v1_and_v2_at_the_collector(tmp_path):
    from tests.export.collector_proc import CollectorProcess, query, wait_for
    from tests.live.rig import Sensor, stop
    from tests.netns import VethPair

    port = 4433   # not a selected port: only the kernel's QUIC sniffer selects the flows
    env = f"PYTHONPATH={REPO}"
    gen = ("env", env, sys.executable, "-m", "tests.fixtures.gen_quic")
    collector = CollectorProcess(tmp_path / "data").start()
    try:
        with VethPair.create("lq") as pair:
            pair.wait_ready()
            server = pair.b.popen(*gen, "serve", pair.b.ip4, str(port), "main",
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            sensor = Sensor(["--netns", pair.a.netns, "--iface", pair.a.iface,
                             "--collector", collector.address,
                             "--spool-dir", str(tmp_path / "spool"), "--sensor-id", "quiclive",
                             "--output", "jsonl", "--interval", "0.5",
                             "--set", "export.batch_delay=100ms"], workdir=tmp_path)
            try:
                deadline = time.monotonic() + 20
                while not pair.b.run("ss", "-H", "-uln", f"sport = :{port}").stdout.strip():
                    assert time.monotonic() < deadline, "the aioquic server did not start"
                    time.sleep(0.1)
                sensor.start()
                clients = []
                for i, case in enumerate(("v1", "v2")):
                    out = pair.a.run(*gen, "connect", pair.b.ip4, str(port), case,
                                     str(41000 + i), timeout=60)
                    clients.append(json.loads(out.stdout))
                wait_for(lambda: len(query(collector.address, "SELECT uid FROM quic")) >= 2,
                         30, "the QUIC events at the collector")
                assert sensor.stop() == 0
            finally:
                sensor.kill()
                stop(server)
        rows = query(collector.address, "SELECT src_port, sni, alpn, version, server_version, "
                     "cipher, ja4 FROM quic ORDER BY src_port")
        # SIGTERM exported the flows: app_proto and the TLS summary fields from QUIC.
        wait_for(lambda: len(query(collector.address, "SELECT uid FROM flows WHERE "
                                   f"dst_port = {port}")) >= 2, 20, "the QUIC flows")
        flows = query(collector.address, "SELECT src_port, app_proto, tls_sni, tls_ja4 FROM "
                      f"flows WHERE dst_port = {port} ORDER BY src_port")
    finally:
        collector.stop()
    assert [c["error"] for c in clients] == ["", ""]
    assert [(r[0], r[1], list(r[2]), r[3], r[4], r[5]) for r in rows] == [
        (c["client_port"], c["sni"], c["alpn"], c["offered_version"], c["version"], c["cipher"])
        for c in clients]
    assert [c["version"] for c in clients] == [V1, V2]
    assert flows == [[r[0], "quic", r[1], r[6]] for r in rows]
    printed = [r for r in sensor.records() if getattr(r, "kind", "") == "quic"]
    assert sorted(r.detail.ja4 for r in printed) == sorted(r[6] for r in rows)
