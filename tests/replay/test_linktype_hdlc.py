"""Cisco HDLC (link type 104, DLT_C_HDLC) in replay, on real bytes.

A TLS 1.2 connection over IPv4 and one over IPv6 (openssl s_client against s_server on
loopback, captured with tcpdump as Ethernet) are rewritten frame by frame into Cisco
HDLC: the 14-byte Ethernet header becomes address (0x0F unicast), control 0 and the same
EtherType. A SLARP keepalive (0x8035) and a CDP announcement (0x2000), both to the
broadcast address 0x8F, are put in between: they are not IP, so they are counted as
non-IP and are no error. tshark decodes the result (chdlc, ip/ipv6, tls, slarp, cdp),
and replay must give the same flows and TLS events as from the Ethernet original, the
layer-2 octet counts 10 less per packet. Both classic pcap and pcapng are read, and
`--filter` works on the HDLC frames.
"""

from __future__ import annotations

import dataclasses
import struct
import subprocess
from pathlib import Path

import pytest

from sensor import model
from sensor.engine.meter import shard_of
from sensor.engine.pipeline import PipelineConfig
from sensor.flow.packet import LINKTYPE_C_HDLC
from sensor.replay.api import replay_records
from sensor.replay.reader import read_packets
from tests.fixtures import capture_files as cf
from tests.l7 import pcaputil
from tests.l7 import tls_captures as tc
from tests.replay.metering import meter_file

pytestmark = pytest.mark.skipif(tc.available() is not None, reason=str(tc.available()))

# SLARP keepalive (RFC 1547 predates it; Cisco's format as Wireshark decodes it): code 2,
# my sequence, your sequence, reliability 0xFFFF.
SLARP = b"\x8f\x00\x80\x35" + struct.pack("!IIIH", 2, 7, 6, 0xFFFF)
# CDP v2, TTL 180, checksum, one Device-ID TLV.
_CDP_TLV = struct.pack("!HH", 1, 4 + 6) + b"router"
CDP = b"\x8f\x00\x20\x00" + struct.pack("!BBH", 2, 180, 0) + _CDP_TLV


def _capture(tmp: Path, chain: tc.Chain, v6: bool) -> tuple[Path, int]:
    port = tc.free_port()
    pcap = tmp / f"eth-{'v6' if v6 else 'v4'}.pcap"
    host = "[::1]" if v6 else "127.0.0.1"
    with pcaputil.capture_lo(pcap, port):
        server = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"{host}:{port}", "-cert", str(chain.leaf_cert),
             "-key", str(chain.leaf_key), "-naccept", "1", "-quiet", *(["-6"] if v6 else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):  # bounded: at most 10 s for the listener
                if subprocess.run(["ss", "-Htln", f"sport = :{port}"], capture_output=True,
                                  text=True).stdout.strip():
                    break
                subprocess.run(["sleep", "0.1"])
            subprocess.run(["openssl", "s_client", "-connect", f"{host}:{port}", "-servername",
                            "hdlc.x.test", "-tls1_2"], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30)
        finally:
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return pcap, port


def _to_hdlc(eth: Path) -> list[tuple[int, bytes]]:
    """The capture's TCP frames as Cisco HDLC, SLARP and CDP after the first two."""
    out = []
    for ts_ns, _itf, link, buf, _wire in read_packets(eth):
        ethertype = buf[12:14]
        assert link == 1
        if ethertype in (b"\x08\x00", b"\x86\xdd"):
            out.append((ts_ns, b"\x0f\x00" + ethertype + buf[14:]))
            if len(out) == 2:
                out += [(ts_ns, SLARP), (ts_ns, CDP)]
    return out


def _pcapng(frames: list[tuple[int, bytes]]) -> bytes:
    return cf.shb() + cf.idb(LINKTYPE_C_HDLC, tsresol=9) + b"".join(
        cf.epb(0, ts, frame) for ts, frame in frames)


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hdlc")
    chain = tc.make_chain(tmp, depth=2, sans=2)
    out = []
    for v6 in (False, True):
        eth, port = _capture(tmp, chain, v6)
        frames = _to_hdlc(eth)
        name = "v6" if v6 else "v4"
        classic = tmp / f"hdlc-{name}.pcap"
        classic.write_bytes(cf.pcap(frames, linktype=LINKTYPE_C_HDLC, ns=True))
        ng = tmp / f"hdlc-{name}.pcapng"
        ng.write_bytes(_pcapng(frames))
        out.append((eth, classic, ng, port, len(frames) - 2))
    return out


def _tshark(path: Path, port: int, *fields: str, display: str = "") -> list[list[str]]:
    cmd = ["tshark", "-r", str(path), "-d", f"tcp.port=={port},tls", "-T", "fields"]
    if display:
        cmd += ["-Y", display]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    return [line.split("\t") for line in out.splitlines()]


def _without_l2(records):
    """Flows with the layer-2 octets set aside (Ethernet's header is 10 bytes longer),
    and the L7 events, each without its uid (it is random per run)."""
    flows = [dataclasses.replace(r, uid="x", initiator_l2_octets=0, responder_l2_octets=0)
             for r in records if isinstance(r, model.Flow)]
    events = [dataclasses.replace(r, uid="x") for r in records if isinstance(r, model.L7Event)]
    return flows, events


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_cisco_hdlc_replays_like_ethernet(captures, family, fmt):
    eth, classic, ng, port, ip_frames = captures[0 if family == "v4" else 1]
    hdlc = classic if fmt == "pcap" else ng
    # tshark reads the file as Cisco HDLC: every frame, the keepalives and the TLS.
    rows = _tshark(hdlc, port, "chdlc.address", "chdlc.protocol")
    assert len(rows) == ip_frames + 2
    # (The capture's readiness probes are UDP over IPv4 in both.)
    assert {(a, p) for a, p in rows} == {("0x0f", "0x0800"), ("0x8f", "0x8035"),
                                         ("0x8f", "0x2000")} | (
        {("0x0f", "0x86dd")} if family == "v6" else set())
    assert len(_tshark(hdlc, port, "frame.number", display="slarp")) == 1
    assert len(_tshark(hdlc, port, "frame.number", display="cdp")) == 1
    (sni,) = _tshark(hdlc, port, "tls.handshake.extensions_server_name",
                     display="tls.handshake.type == 1")
    assert sni == ["hdlc.x.test"]

    want = replay_records(eth)
    got = replay_records(hdlc)
    assert _without_l2(got) == _without_l2(want)
    events = [r.detail for r in got if isinstance(r, model.L7Event)]
    assert [e.sni for e in events] == ["hdlc.x.test"] and events[0].cert_subject
    (flow,) = [r for r in got if isinstance(r, model.Flow) and r.dst_port == port]
    assert flow.app_proto == "tls" and flow.tls_sni == "hdlc.x.test"
    assert flow.initiator_packets + flow.responder_packets == \
        len(_tshark(hdlc, port, "frame.number", display=f"tcp.port == {port}"))

    def l2(records) -> int:
        return sum(r.initiator_l2_octets + r.responder_l2_octets
                   for r in records if isinstance(r, model.Flow))

    assert l2(want) - l2(got) == 10 * ip_frames   # 14-byte Ethernet, 4-byte HDLC header

    # `--jobs` spreads packets by addresses: the same shard as the Ethernet frame.
    eth_frames = [f for _, _, _, f, _ in read_packets(eth) if f[12:14] in (b"\x08\x00",
                                                                         b"\x86\xdd")]
    hdlc_frames = [f for _, _, _, f, _ in read_packets(hdlc) if f[0] == 0x0F]
    assert [shard_of(LINKTYPE_C_HDLC, f) for f in hdlc_frames] == \
        [shard_of(1, f) for f in eth_frames]
    assert shard_of(LINKTYPE_C_HDLC, SLARP) == shard_of(LINKTYPE_C_HDLC, CDP) == 0

    # SLARP and CDP: counted as non-IP, nothing else.
    _, meter = meter_file(hdlc)
    assert meter.stats.non_ip == 2 and meter.stats.unsupported_link == 0
    assert meter.stats.truncated_l2 == 0
    summary: list = []
    list(replay_records(hdlc, summary=summary))
    assert summary[0].errors == {} and summary[0].lost == {}

    # A capture filter reads the HDLC frames too.
    kept = replay_records(hdlc, config=PipelineConfig(packet_filter=f"tcp port {port}"))
    assert _without_l2(kept) == _without_l2(
        [r for r in got if port in (r.src_port, r.dst_port)])
    assert replay_records(hdlc, config=PipelineConfig(
        packet_filter=f"tcp port {port + 1}")) == []
