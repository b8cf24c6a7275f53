"""Real L7 event sequences for the DDoS detector's tests: HTTP/1 connections as the kernel
delivers them (payload events with sequence numbers) through the live L7 stage (LiveL7:
reassembly and the HTTP/1 parser), so the detector sees the events and parser states the
sensor would produce."""

from __future__ import annotations

from sensor.engine.live import LiveL7
from sensor.kernel.hybrid import flow_key
from tests.live.test_live_l7 import ACK, SYN, Conn, Control

NS = 10**9
T0 = 1_800_000_000 * NS
# Higher than every client address: clients are the key's low side, which Control (side
# 0) makes the initiator.
SERVER = "198.18.200.1"
RESPONSES = {200: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
             404: b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
             503: b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"}


class Client:
    """One keep-alive connection from `addr` to SERVER:80."""

    def __init__(self, l7: LiveL7, addr: str, sport: int, ts_ns: int = T0 - NS) -> None:
        self.addr = addr
        self.l7 = l7
        self.conn = Conn(bytes(flow_key(src=addr, dst=SERVER, sport=sport, dport=80,
                                        protocol=6, ifindex=3)))
        self._send(0, b"", SYN, ts_ns)
        self._send(1, b"", SYN | ACK, ts_ns)

    def _send(self, direction: int, data: bytes, flags: int, ts_ns: int) -> None:
        self.conn.ts = ts_ns - 1000   # Conn.event adds 1000 ns
        ev = self.conn.event(direction, data, flags) if flags != -1 else None
        if ev is not None:
            self.l7.on_payload(ev, 0, 0)

    def request(self, ts_ns: int, path: str = "/", status: int = 200) -> None:
        self._send(0, f"GET {path} HTTP/1.1\r\nHost: shop\r\n\r\n".encode(), 0x18, ts_ns)
        self._send(1, RESPONSES[status], 0x18, ts_ns + 500_000)

    def partial_head(self, ts_ns: int) -> None:
        """A request head begun and never finished (slowloris keeps adding header lines)."""
        self._send(0, b"GET /?a=1 HTTP/1.1\r\nHost: shop\r\nX-a: b\r\n", 0x18, ts_ns)


def live_l7(emit) -> LiveL7:
    return LiveL7(emit=emit, control=Control(), budget=(1 << 20, 1 << 20))
