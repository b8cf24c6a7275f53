"""TLS edge cases on real bytes, tshark's decode as the oracle.

Each capture is made here on loopback (tests/l7/tls_captures.py): `openssl s_server`
answers either `openssl s_client` or a raw socket sending a Chrome-shaped ClientHello
with an X25519MLKEM768 key share (OpenSSL 3.0 has no such group and picks the X25519
share beside it; its ServerHello is the proof the bytes are TLS). Covered:

- a ClientHello over many records and TCP segments (records cut across segments too);
  the server's Certificate over many records; the server's real handshake messages
  re-framed as one message over many records and as all messages in one record;
- huge ClientHellos: post-quantum key share (~1.7 KB), 13 KB of padding, and one of
  ~70 KB, past MAX_HANDSHAKE: its SNI/ALPN and the whole ServerHello still come out,
  the fingerprints of the cut hello are left empty and `truncated` counts it;
- an 8-certificate chain (~12 KB) in 512-byte records: every certificate's subject,
  issuer, serial and validity as tshark decodes them;
- one direction only (client->server, server->client) through `replay`;
- TLS on ports no hint names (5000, 2222) and on ports hinted for other protocols
  (8080 HTTP, 3306 MySQL), found by content.
"""

from __future__ import annotations

import datetime
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sensor import model
from sensor.l7 import detect, fingerprints as fp
from sensor.l7 import tls as tlsmod
from sensor.l7.base import Direction, ParserState
from sensor.l7.tls import TlsParser
from sensor.replay.api import replay_records
from tests.l7 import pcaputil
from tests.l7 import tls_captures as tc
from tests.l7.test_tls import _independent_ja4, _tshark_client_hello

pytestmark = pytest.mark.skipif(tc.available() is not None, reason=str(tc.available()))

C2S, S2C = Direction.TO_SERVER, Direction.TO_CLIENT


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tls-edges")


@pytest.fixture(scope="module")
def chain(workdir) -> tc.Chain:
    return tc.make_chain(workdir, depth=8)


def _pq_capture(workdir: Path, chain: tc.Chain, name: str, hello: bytes, record_size: int,
                segment: int) -> tuple[Path, int, bytes]:
    port = tc.free_port()
    pcap = workdir / f"{name}.pcap"
    with pcaputil.capture_lo(pcap, port):
        with tc.s_server(port, chain):
            reply = tc.raw_client(port, tc.records(hello, record_size), segment=segment)
    return pcap, port, reply


@pytest.fixture(scope="module")
def pq_capture(workdir, chain):
    """The Chrome-shaped hello in 300-byte records written 250 bytes at a time."""
    hello = tc.chrome_hello("pq.x.test")
    return _pq_capture(workdir, chain, "pq", hello, 300, 250)


@pytest.fixture(scope="module")
def chain_capture(workdir, chain):
    """TLS 1.2, s_client against s_server sending records of at most 512 bytes."""
    port = tc.free_port()
    pcap = workdir / "chain.pcap"
    with pcaputil.capture_lo(pcap, port):
        with tc.s_server(port, chain, "-max_send_frag", "512"):
            out = tc.s_client(port, "-tls1_2")
    assert "Server certificate" in out
    return pcap, port


def _flow(pcap: Path, port: int) -> pcaputil.L4Flow:
    (flow,) = [f for f in pcaputil.flows(pcap) if f.proto == 6 and port in (f.sport, f.dport)]
    return flow


def _replay(pcap: Path, port: int):
    """The TLS events and the Flow record `loupe replay` gives for the port's flow."""
    records = [r for r in replay_records(pcap)
               if port in (getattr(r, "src_port", None), getattr(r, "dst_port", None))]
    flows = [r for r in records if isinstance(r, model.Flow)]
    events = [r.detail for r in records if isinstance(r, model.L7Event)]
    assert len(flows) == 1, records
    return events, flows[0]


def _tshark_server_hello(pcap: Path, port: int) -> dict[str, list[str]]:
    (row,) = tc.tshark_fields(pcap, port, "tls.handshake.type == 2", [
        "tls.handshake.ciphersuite", "tls.handshake.extensions.supported_version",
        "tls.handshake.ja3s", "tls.handshake.version"])
    return row


def _check_client_side(ev, parser: TlsParser, pcap: Path, port: int, sni: str) -> None:
    ws = _tshark_client_hello(pcap, port)
    assert ws["tls.handshake.extensions_server_name"] == [sni] and ev.sni == sni
    assert ev.ja3 == ws["tls.handshake.ja3"][0]
    assert fp.ja3_string(parser.client_hello) == ws["tls.handshake.ja3_full"][0]
    assert ev.ja4 == _independent_ja4(ws)
    assert ev.alpn == tuple(ws["tls.handshake.extensions_alpn_str"]) == ("h2", "http/1.1")


def _check_server_hello(ev, pcap: Path, port: int) -> None:
    sh = _tshark_server_hello(pcap, port)
    assert ev.cipher == int(sh["tls.handshake.ciphersuite"][0], 0)
    versions = sh["tls.handshake.extensions.supported_version"] or sh["tls.handshake.version"]
    assert ev.version == int(versions[0], 0)
    assert ev.ja3s == sh["tls.handshake.ja3s"][0]


# --- 1 and 2: big ClientHellos over records and segments -------------------------------------

@pytest.mark.parametrize(("padding", "record_size", "segment"), [
    (0, 16384, 0),        # one record, one write
    (0, 300, 250),        # records cut across segments, segments across records
    (0, 64, 0),           # 27 records of 64 bytes in one segment
    (12000, 4096, 1448),  # ~13.7 KB: four records over ten segments
], ids=["one-record", "records-across-segments", "tiny-records", "padded-13k"])
def test_big_client_hello_over_records_and_segments(workdir, chain, padding, record_size,
                                                    segment):
    hello = tc.chrome_hello("pq.x.test", padding=padding)
    name = f"hello-{padding}-{record_size}-{segment}"
    pcap, port, reply = _pq_capture(workdir, chain, name, hello, record_size, segment)
    assert reply[0] == 22 and reply[5] == 2, "the server did not answer with a ServerHello"
    flow = _flow(pcap, port)
    client_writes = [c for c in flow.chunks if c.direction is C2S]
    expected_records = -(-len(hello) // record_size)
    if segment:
        assert len(client_writes) == -(-(len(hello) + 5 * expected_records) // segment)
    # tshark reassembles the message from the records; its length is ours.
    (ws,) = tc.tshark_fields(pcap, port, "tls.handshake.type == 1", [
        "tls.handshake.length", "tls.record.length", "tls.handshake.extensions_key_share_group",
        "tls.handshake.extensions_key_share_key_exchange_length",
        "tls.handshake.extensions_supported_group"])
    assert int(ws["tls.handshake.length"][0]) == len(hello) - 4
    assert ws["tls.handshake.extensions_key_share_key_exchange_length"][1] == \
        str(tc.MLKEM768_SHARE)
    parser = TlsParser()
    (tx,) = pcaputil.feed(parser, flow)
    ev = tx.detail
    assert parser.state is ParserState.DONE and parser.truncated == 0
    assert list(parser.client_hello.groups) == [int(g, 0) for g in
                                                ws["tls.handshake.extensions_supported_group"]]
    assert tc.X25519MLKEM768 in parser.client_hello.groups
    _check_client_side(ev, parser, pcap, port, "pq.x.test")
    _check_server_hello(ev, pcap, port)
    assert ev.version == 0x0304 and ev.cipher == 0x1301
    assert tx.ts_ns == client_writes[0].ts_ns
    # The whole pipeline (meter, reassembly, detection) gives the same event.
    events, record = _replay(pcap, port)
    assert events == [ev] and record.app_proto == "tls" and record.tls_sni == "pq.x.test"


def test_client_hello_past_max_handshake_is_cut_and_the_rest_still_parsed(workdir, chain):
    """A ~70 KB ClientHello (4000 extra cipher suites, 60 KB of padding after the other
    extensions) that OpenSSL accepts. Its first MAX_HANDSHAKE bytes give the SNI and
    ALPN; the tail is dropped as it comes, never buffered; the ServerHello after it is
    parsed whole. tshark 4.0 does not reassemble a handshake message this long (it shows
    "Encrypted Handshake Message"), so the client side is checked against the hello as
    built, the server side against tshark."""
    hello = tc.chrome_hello("big.x.test", padding=60000, extra_ciphers=4000)
    assert len(hello) - 4 > tlsmod.MAX_HANDSHAKE
    pcap, port, reply = _pq_capture(workdir, chain, "hello-70k", hello, 16384, 0)
    assert reply[0] == 22 and reply[5] == 2
    flow = _flow(pcap, port)
    parser = TlsParser()
    steps = 0
    for chunk in flow.chunks:
        parser.receive_data(chunk.direction, chunk.data, chunk.ts_ns)
        steps += 1
        for side in parser._sides:
            assert len(side.handshake) <= 4 + tlsmod.MAX_HANDSHAKE
    assert parser.state is ParserState.DONE and parser.truncated == 1
    ev = parser.next_event().detail
    assert ev.sni == "big.x.test" and ev.alpn == ("h2", "http/1.1")
    assert ev.ja3 == "" and ev.ja4 == "" and parser.client_hello.truncated
    assert len(parser.client_hello.ciphers) == 4000 + len(tc.CHROME_CIPHERS)
    assert parser.summary() == {"tls_sni": "big.x.test"}
    _check_server_hello(ev, pcap, port)
    events, record = _replay(pcap, port)
    assert events == [ev] and record.tls_sni == "big.x.test" and record.tls_ja4 == ""


# --- 1 and 3: the server's messages over many records; a long chain -------------------------

def _utc_ns(text: str) -> int:
    when = datetime.datetime.strptime(text.replace(" (UTC)", ""), "%Y-%m-%d %H:%M:%S")
    return int(when.replace(tzinfo=datetime.timezone.utc).timestamp()) * 1_000_000_000


_WS_ATTRS = {"id-at-countryName": "C", "id-at-organizationName": "O",
             "id-at-organizationalUnitName": "OU", "id-at-commonName": "CN"}


def _ws_name(showname: str) -> str:
    """tshark's 'rdnSequence: 4 items (id-at-commonName=x,...)' (last RDN first) in the
    one-line form the parser writes (first RDN first)."""
    inner = showname[showname.index("(") + 1:-1]
    parts = []
    for item in inner.split(","):
        attr, value = item.split("=", 1)
        parts.append(f"{_WS_ATTRS[attr]}={value}")
    return ", ".join(reversed(parts))


def _tshark_chain(pcap: Path, port: int) -> list[dict]:
    """Per certificate of the Certificate message, in order: serial, issuer, subject and
    validity, from tshark's PDML."""
    import subprocess

    xml = subprocess.run(
        ["tshark", "-r", str(pcap), "-d", f"tcp.port=={port},tls", "-Y",
         "tls.handshake.type == 11", "-T", "pdml"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    out = []
    for cert in ET.fromstring(xml).iter("field"):
        if cert.get("name") != "tls.handshake.certificate":
            continue
        got: dict = {"times": []}
        for f in cert.iter("field"):
            name = f.get("name")
            if name == "x509af.serialNumber":
                got["serial"] = int(f.get("value"), 16)
            elif name == "x509af.issuer":
                got["issuer"] = _ws_name(f.find("field").get("showname"))
            elif name == "x509af.subject":
                got["subject"] = _ws_name(f.find("field").get("showname"))
            elif name == "x509af.utcTime":
                got["times"].append(_utc_ns(f.get("show")))
        out.append(got)
    return out


def _server_records(flow: pcaputil.L4Flow) -> list[tuple[int, bytes]]:
    """The server's plaintext records before its ChangeCipherSpec, walked from the stream."""
    data, pos, out = flow.stream(S2C), 0, []
    while pos + 5 <= len(data) and data[pos] != 20:
        n = int.from_bytes(data[pos + 3:pos + 5], "big")
        out.append((data[pos], data[pos + 5:pos + 5 + n]))
        pos += 5 + n
    return out


def test_certificate_chain_over_many_records(chain_capture, chain):
    pcap, port = chain_capture
    flow = _flow(pcap, port)
    server_records = _server_records(flow)
    assert all(len(body) <= 512 for _, body in server_records)
    assert len(server_records) >= 20   # ~12 KB of certificates in 512-byte records
    parser = TlsParser(chain=True)
    (tx,) = pcaputil.feed(parser, flow)
    ev = tx.detail
    ws = _tshark_chain(pcap, port)
    assert parser.chain_certs == len(ws) == len(parser.chain) == 8
    for mine, theirs, truth in zip(parser.chain, ws, chain.certs):
        assert mine.subject == theirs["subject"]
        assert mine.issuer == theirs["issuer"]
        assert int(mine.serial, 16) == theirs["serial"] == truth.serial_number
        assert [mine.not_before_ns, mine.not_after_ns] == theirs["times"]
    assert (ev.cert_subject, ev.cert_issuer) == (ws[0]["subject"], ws[0]["issuer"])
    assert [ev.cert_not_before_ns, ev.cert_not_after_ns] == ws[0]["times"]
    assert ev.cert_san[0] == "x.test" and len(ev.cert_san) == 31
    _check_client_side(ev, parser, pcap, port, "x.test")
    _check_server_hello(ev, pcap, port)
    assert ev.version == 0x0303 and ev.alpn_selected == "h2"
    events, record = _replay(pcap, port)
    assert events == [ev] and record.app_proto == "tls"


def test_server_messages_reframed_over_records_and_coalesced(chain_capture):
    """The server's real handshake messages, framed two more ways: every record 5 bytes
    (the ServerHello spans records too), and all messages coalesced in one record. The
    event is the same as from the server's own framing."""
    pcap, port = chain_capture
    flow = _flow(pcap, port)
    messages = b"".join(body for ctype, body in _server_records(flow) if ctype == 22)
    assert len(messages) < (1 << 14)   # fits one record
    client = flow.stream(C2S)
    want = pcaputil.feed(TlsParser(chain=True), flow)

    def run(server_bytes: bytes) -> tuple[TlsParser, list]:
        parser = TlsParser(chain=True)
        parser.receive_data(C2S, client, want[0].ts_ns)
        for i in range(0, len(server_bytes), 1000):
            parser.receive_data(S2C, server_bytes[i:i + 1000], want[0].ts_ns + 1)
        return parser, [parser.next_event()]

    tiny, got = run(tc.records(messages, 5, 0x0303))
    assert got == want and len(tiny.chain) == 8
    whole, got = run(tc.records(messages, 1 << 14, 0x0303))
    assert got == want and whole.chain == tiny.chain


# --- bytes lost inside the handshake: a short snap length --------------------------------------

def test_short_snap_length_still_gives_what_was_captured(workdir, pq_capture, chain_capture):
    """The captures cut to 300 bytes a frame (editcap -s 300: 234 bytes of TCP payload).
    The hellos arrive in part: what arrived is read (the Chrome-shaped hello's SNI and
    ALPN sit in its first 200 bytes), the server's direction is parsed on its own, and
    the lost bytes are counted (reassembly gap, parser error)."""
    import subprocess

    for (pcap, port), client_whole in (((pq_capture[0], pq_capture[1]), False),
                                       (chain_capture, True)):
        (full,), _ = _replay(pcap, port)
        snapped = workdir / f"{pcap.stem}-snap300.pcap"
        subprocess.run(["editcap", "-s", "300", str(pcap), str(snapped)], check=True,
                       capture_output=True, timeout=30)
        summary: list = []
        records = list(replay_records(snapped, summary=summary))
        (ev,) = [r.detail for r in records if isinstance(r, model.L7Event)]
        assert (ev.sni, ev.alpn) == (full.sni, full.alpn)
        assert (ev.version, ev.cipher, ev.ja3s) == (full.version, full.cipher, full.ja3s)
        # A fingerprint only of a whole hello; the certificate did not fit in 234 bytes.
        assert ev.ja4 == (full.ja4 if client_whole else "")
        assert ev.ja3 == (full.ja3 if client_whole else "")
        assert ev.cert_subject == ""
        assert summary[0].lost.get("reassembly_gap", 0) >= 1


def test_hello_cut_by_lost_bytes_on_real_bytes(pq_capture, chain_capture):
    """The real client stream cut at several places, then a gap: the SNI comes out once
    its extension arrived; the real server stream cut inside the chain after the leaf:
    the leaf's fields come out."""
    flow = _flow(pq_capture[0], pq_capture[1])
    client = flow.stream(C2S)
    for cut, sni in ((100, ""), (160, "pq.x.test"), (900, "pq.x.test"),
                     (len(client) - 1, "pq.x.test")):
        parser = TlsParser()
        parser.receive_data(C2S, client[:cut], 1)
        parser.receive_gap(C2S, len(client) - cut, 2)
        parser.receive_eof(S2C, 3)
        assert parser.state is ParserState.ERROR and "missing" in parser.error
        ev = parser.next_event().detail
        assert ev.sni == sni and ev.ja4 == "" and ev.client_version == 0x0303

    flow = _flow(*chain_capture)
    (want,) = pcaputil.feed(TlsParser(), flow)
    server = flow.stream(S2C)
    parser = TlsParser()
    parser.receive_data(C2S, flow.stream(C2S), 1)
    parser.receive_data(S2C, server[:4000], 2)   # ServerHello, leaf, part of the chain
    parser.receive_gap(S2C, 100, 3)
    parser.receive_eof(C2S, 4)
    assert parser.state is ParserState.ERROR
    assert parser.next_event().detail == want.detail


# --- 4: one direction only --------------------------------------------------------------------

@pytest.mark.parametrize("start", ["syn", "mid-stream"])
@pytest.mark.parametrize("which", ["pq", "chain"])
def test_one_direction_captures(workdir, pq_capture, chain_capture, which, start):
    """Only client->server: SNI, ALPN, JA3, JA4 still come out. Only server->client: the
    version, cipher, JA3S and (TLS 1.2) the certificate. tshark decodes each half file
    to the same fingerprints, with or without the TCP handshake's packets. With no SYN
    the first packet's sender is the initiator, so a server-only flow has the server as
    src; the parser takes each hello in whichever direction it comes."""
    pcap, port = (pq_capture[0], pq_capture[1]) if which == "pq" else chain_capture
    (full,), _ = _replay(pcap, port)
    cut = " and tcp[tcpflags] & tcp-syn == 0" if start == "mid-stream" else ""
    client_only = tc.one_direction(pcap, workdir / f"{which}-{start}-c2s.pcap",
                                   f"tcp dst port {port}{cut}")
    server_only = tc.one_direction(pcap, workdir / f"{which}-{start}-s2c.pcap",
                                   f"tcp src port {port}{cut}")

    (ev,), record = _replay(client_only, port)
    assert (ev.sni, ev.alpn, ev.ja3, ev.ja4, ev.client_version) == \
        (full.sni, full.alpn, full.ja3, full.ja4, full.client_version)
    assert ev.cipher == 0 and ev.ja3s == "" and ev.cert_subject == ""
    assert record.app_proto == "tls" and record.tls_sni == full.sni
    assert record.tls_ja4 == full.ja4 and record.responder_packets == 0
    ws = _tshark_client_hello(client_only, port)
    assert ev.ja3 == ws["tls.handshake.ja3"][0] and ev.ja4 == _independent_ja4(ws)

    (ev,), record = _replay(server_only, port)
    assert (ev.version, ev.cipher, ev.ja3s, ev.alpn_selected) == \
        (full.version, full.cipher, full.ja3s, full.alpn_selected)
    assert (ev.cert_subject, ev.cert_issuer, ev.cert_san, ev.cert_not_after_ns) == \
        (full.cert_subject, full.cert_issuer, full.cert_san, full.cert_not_after_ns)
    assert ev.sni == "" and ev.ja3 == "" and ev.ja4 == ""
    assert record.app_proto == "tls" and record.tls_sni == ""
    # No SYN: the first packet's sender, the server, is the initiator (sensor/flow/
    # semantics.py; a SYN-ACK alone does not count as the other side's SYN).
    assert record.src_port == port
    _check_server_hello(ev, server_only, port)


# --- 5: TLS on ports that do not say TLS -------------------------------------------------------

def _move_port(src: Path, dst: Path, old: int, new: int) -> Path:
    """The capture with the server's port changed (checksums recomputed): the same bytes
    above TCP on another port."""
    from scapy.layers.inet import TCP
    from scapy.utils import rdpcap, wrpcap

    packets = rdpcap(str(src))
    for p in packets:
        if TCP in p:
            tcp = p[TCP]
            if tcp.sport == old:
                tcp.sport = new
            if tcp.dport == old:
                tcp.dport = new
            del tcp.chksum
    wrpcap(str(dst), packets)
    return dst


@pytest.mark.parametrize("port", [5000, 2222, 8080, 3306])
def test_tls_found_by_content_on_any_port(workdir, pq_capture, port):
    """5000 and 2222 have no port hint; 8080 (HTTP) and 3306 (MySQL) hint another
    protocol. The content decides: replay parses the ClientHello whatever the port."""
    pcap, old, _ = pq_capture
    (want,), _ = _replay(pcap, old)
    moved = _move_port(pcap, workdir / f"port-{port}.pcap", old, port)
    first = next(c.data for c in _flow(moved, port).chunks if c.direction is C2S)
    assert detect.detect(protocol=detect.PROTO_TCP, server_port=port,
                         to_server=first) == "tls"
    (ev,), record = _replay(moved, port)
    assert ev == want and record.app_proto == "tls" and record.dst_port == port
    ws = _tshark_client_hello(moved, port)
    assert ws["tls.handshake.extensions_server_name"] == [ev.sni]
    assert ws["tls.handshake.ja3"] == [ev.ja3]
