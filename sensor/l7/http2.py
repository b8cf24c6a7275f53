"""HTTP/2 with prior knowledge (h2c): detected, not parsed yet.

Flows that open with the client connection preface (RFC 9113 §3.4) carry app_proto
"http2"; no parser makes events for them until one is registered here.
"""

from __future__ import annotations

from sensor.l7.base import Direction
from sensor.l7.registry import Protocol

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def looks_like(first: bytes, direction: Direction) -> bool:
    # 14 bytes ("PRI * HTTP/2.0") already rule out an HTTP/1 request line.
    return len(first) >= 14 and first.startswith(PREFACE[:len(first)])


PROTOCOL = Protocol(name="http2", signature=looks_like, priority=0)
