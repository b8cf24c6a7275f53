"""Pull L7 payload out of a corpus pcap for parser-level conformance tests.

This is test plumbing, not the product's replay path (sensor/replay/ and the engine's
reassembler): just enough to hand a parser what the engine would, for well-formed
captures. UDP datagrams come out whole (IPv6 fragments reassembled, since one corpus
case needs it); TCP comes out per direction in sequence order, retransmitted and
already-delivered bytes trimmed, both directions interleaved in capture order.

Direction: the flow's initiator is the sender of the first SYN, or of the first packet
seen when the SYN is missing, as in the engine.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import ipaddress
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import dpkt

from sensor.l7.base import Direction

# Bounds for test input only: the corpus files are small.
_MAX_FRAGMENT_SETS = 1024


@dataclass(frozen=True, slots=True)
class Chunk:
    direction: Direction
    data: bytes
    ts_ns: int


@dataclass(slots=True)
class L4Flow:
    proto: int                # 6 TCP, 17 UDP
    src: str                  # initiator
    sport: int
    dst: str
    dport: int
    chunks: list[Chunk] = field(default_factory=list)
    fin: set[Direction] = field(default_factory=set)

    def stream(self, direction: Direction) -> bytes:
        return b"".join(c.data for c in self.chunks if c.direction == direction)


def _packets(path: Path):
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    fh = io.BytesIO(raw)
    if raw[:4] == b"\x0a\x0d\x0d\x0a":
        reader = dpkt.pcapng.Reader(fh)
    else:
        reader = dpkt.pcap.Reader(fh)
    link = reader.datalink()
    for ts, buf in reader:
        yield int(round(ts * 1e9)), link, buf


def _ip_layer(link: int, buf: bytes):
    if link == dpkt.pcap.DLT_EN10MB:
        layer = dpkt.ethernet.Ethernet(buf).data
        # PPPoE session inside VLAN tags (one nDPI case): unwrap to the IP packet.
        while isinstance(layer, (dpkt.pppoe.PPPoE, dpkt.ppp.PPP)):
            layer = layer.data
        return layer
    if link in (dpkt.pcap.DLT_NULL, dpkt.pcap.DLT_LOOP):
        family = int.from_bytes(buf[:4], "little" if link == dpkt.pcap.DLT_NULL else "big")
        payload = buf[4:]
        if family == 2:
            return dpkt.ip.IP(payload)
        return dpkt.ip6.IP6(payload)
    if link == dpkt.pcap.DLT_LINUX_SLL:
        return dpkt.sll.SLL(buf).data
    if link in (dpkt.pcap.DLT_RAW, 12, 14, 228, 229):
        return dpkt.ip.IP(buf) if buf[0] >> 4 == 4 else dpkt.ip6.IP6(buf)
    raise ValueError(f"link type {link} not handled by the test helper")


def _addr(ip) -> str:
    family = socket.AF_INET if isinstance(ip, dpkt.ip.IP) else socket.AF_INET6
    return socket.inet_ntop(family, ip.src), socket.inet_ntop(family, ip.dst)


def _ip6_l4(ip6, frags: dict):
    """(proto, l4 bytes) of an IPv6 packet, reassembling fragments; None while incomplete."""
    if 44 not in ip6.extension_hdrs or ip6.extension_hdrs.get(44) is None:
        return ip6.p, bytes(ip6.data) if not isinstance(ip6.data, bytes) else ip6.data
    frag = ip6.extension_hdrs[44]
    key = (ip6.src, ip6.dst, frag.id)
    parts = frags.setdefault(key, {})
    if len(frags) > _MAX_FRAGMENT_SETS:
        raise ValueError("too many fragment sets for a test capture")
    offset = frag.frag_off << 3  # dpkt gives the field in 8-octet units
    more = frag.m_flag
    data = bytes(ip6.data) if not isinstance(ip6.data, bytes) else ip6.data
    parts[offset] = (data, more, frag.nxt)
    # Complete when the pieces tile 0..end and the last one has M=0.
    pos, out, nxt = 0, [], None
    for off in sorted(parts):
        piece, m, n = parts[off]
        if off != pos:
            return None
        if off == 0:
            nxt = n
        out.append(piece)
        pos += len(piece)
        if not m:
            del frags[key]
            return nxt, b"".join(out)
    return None


def flows(path: Path) -> list[L4Flow]:
    """TCP and UDP flows of a capture, in order of first packet."""
    table: dict[tuple, L4Flow] = {}
    order: list[L4Flow] = []
    next_seq: dict[tuple, int] = {}
    frags: dict = {}
    for ts_ns, link, buf in _packets(path):
        try:
            ip = _ip_layer(link, buf)
        except (dpkt.UnpackError, IndexError, ValueError):
            continue
        if isinstance(ip, dpkt.ip.IP):
            if ip.mf or ip.offset:
                continue  # IPv4 fragments: not needed by the DNS/TLS corpus cases
            proto, l4 = ip.p, ip.data
        elif isinstance(ip, dpkt.ip6.IP6):
            got = _ip6_l4(ip, frags)
            if got is None:
                continue
            proto, l4raw = got
            try:
                l4 = dpkt.tcp.TCP(l4raw) if proto == 6 else dpkt.udp.UDP(l4raw)
            except dpkt.UnpackError:
                continue
        else:
            continue
        if proto not in (6, 17) or isinstance(l4, bytes):
            continue
        src, dst = _addr(ip)
        fwd = (proto, src, l4.sport, dst, l4.dport)
        rev = (proto, dst, l4.dport, src, l4.sport)
        if fwd in table:
            flow, direction = table[fwd], Direction.TO_SERVER
        elif rev in table:
            flow, direction = table[rev], Direction.TO_CLIENT
        else:
            if proto == 6 and (l4.flags & dpkt.tcp.TH_SYN) and (l4.flags & dpkt.tcp.TH_ACK):
                # SYN-ACK first: the receiver is the initiator.
                flow = L4Flow(proto, dst, l4.dport, src, l4.sport)
                table[rev] = flow
                direction = Direction.TO_CLIENT
            else:
                flow = L4Flow(proto, src, l4.sport, dst, l4.dport)
                table[fwd] = flow
                direction = Direction.TO_SERVER
            order.append(flow)
        payload = bytes(l4.data)
        if proto == 17:
            if payload:
                flow.chunks.append(Chunk(direction, payload, ts_ns))
            continue
        key = (id(flow), direction)
        seq = l4.seq
        if l4.flags & dpkt.tcp.TH_SYN:
            next_seq[key] = (seq + 1) & 0xFFFFFFFF
            continue
        if key not in next_seq:
            next_seq[key] = seq
        expected = next_seq[key]
        delta = (seq - expected) & 0xFFFFFFFF
        if delta >= 0x80000000:  # starts before what was delivered: trim the overlap
            overlap = (expected - seq) & 0xFFFFFFFF
            payload = payload[overlap:]
            delta = 0
        if delta == 0 and payload:
            flow.chunks.append(Chunk(direction, payload, ts_ns))
            next_seq[key] = (expected + len(payload)) & 0xFFFFFFFF
        if l4.flags & (dpkt.tcp.TH_FIN | dpkt.tcp.TH_RST):
            flow.fin.add(direction)
    return order


def feed(parser, flow: L4Flow) -> list:
    """Run one flow through a parser the way the engine does; return its transactions."""
    from sensor.l7.base import NEED_DATA

    out = []
    for chunk in flow.chunks:
        if flow.proto == 17:
            parser.receive_datagram(chunk.direction, chunk.data, chunk.ts_ns)
        else:
            parser.receive_data(chunk.direction, chunk.data, chunk.ts_ns)
        while (ev := parser.next_event()) is not NEED_DATA:
            out.append(ev)
    last = flow.chunks[-1].ts_ns if flow.chunks else 0
    for direction in (Direction.TO_SERVER, Direction.TO_CLIENT):
        parser.receive_eof(direction, last)
    while (ev := parser.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


_NDPI_FLOW = re.compile(
    r"^\s+\d+\s+(UDP|TCP) (\S+) <-> (\S+) (?:\[VLAN: \d+\])?\[proto: [\d.]+/(DNS|TLS)[^\]]*\]"
    r".*?\[Hostname/SNI: ([^\]]*)\]"
)


def _endpoint(text: str) -> tuple[str, int]:
    addr, port = text.rsplit(":", 1)
    return str(ipaddress.ip_address(addr.strip("[]"))), int(port)


def ndpi_hostnames(out: Path, kind: str) -> list[tuple[int, tuple, tuple, str]]:
    """(proto, endpoint, endpoint, Hostname/SNI) of each flow an ndpiReader .out file
    classified as `kind` ("DNS" or "TLS", sub-protocols included)."""
    rows = []
    for line in out.read_text().splitlines():
        m = _NDPI_FLOW.match(line)
        if m and m.group(4) == kind:
            proto = 6 if m.group(1) == "TCP" else 17
            rows.append((proto, _endpoint(m.group(2)), _endpoint(m.group(3)), m.group(5)))
    return rows


def find_flow(all_flows: list[L4Flow], proto: int, a: tuple, b: tuple) -> L4Flow:
    (flow,) = [f for f in all_flows
               if f.proto == proto and {(f.src, f.sport), (f.dst, f.dport)} == {a, b}]
    return flow


def wait_for_port(port: int, udp: bool = False, timeout_s: float = 10.0) -> None:
    """Wait until something listens on 127.0.0.1:port (bounded by timeout_s)."""
    deadline = time.monotonic() + timeout_s
    kind = "-uln" if udp else "-tln"
    while time.monotonic() < deadline:
        out = subprocess.run(["ss", "-H", kind, f"sport = :{port}"], capture_output=True,
                             text=True, check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


@contextlib.contextmanager
def capture_lo(pcap: Path, port: int):
    """tcpdump on the loopback interface, only `port`, for the duration of the block.

    Immediate mode: libpcap otherwise hands packets over per filled block or timeout, and
    the last block is lost on SIGINT. tcpdump reports "listening" a moment before its
    filter sees packets, so readiness is
    proven by sending UDP probes to a second, unused port that the filter also admits
    until one lands in the file (-U writes each packet at once). Probes are dropped
    from the file by their port, which `flows` callers filter on anyway.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe_sock:
        probe_sock.bind(("127.0.0.1", 0))
        probe_port = probe_sock.getsockname()[1]
        proc = subprocess.Popen(
            # -B: a 64 MiB kernel buffer; the 2 MiB default drops segments of a burst of
            # a few MB on lo (a 100,000-row result set), which would cut the stream.
            ["tcpdump", "-i", "lo", "--immediate-mode", "-U", "-n", "-s", "0", "-B", "65536",
             "-w", str(pcap),
             f"port {port} or port {probe_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):  # at most 10 s
                probe_sock.sendto(b"probe", ("127.0.0.1", probe_port))
                if pcap.exists() and pcap.stat().st_size > 24:
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError("tcpdump on lo captured nothing within 10 s")
            yield
            time.sleep(0.2)  # let the last packets reach the capture socket
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
